#!/usr/bin/env python
"""Train / evaluate ks-detr models with detectron2's DefaultTrainer.

    python train_net.py --config-file configs/ks_conditional_detr_r50.yaml --num-gpus 8
    python train_net.py --config-file configs/conditional_detr_r50.yaml --eval-only MODEL.WEIGHTS model.pth
    python train_net.py --config-file ... MODEL.DEVICE cpu SOLVER.IMS_PER_BATCH 2   # on CPU
    python train_net.py --config-file ... --register-coco my_train train.json images/ \
        --register-coco my_val val.json images/ DATASETS.TRAIN '("my_train",)' DATASETS.TEST '("my_val",)'
"""
import os
import time

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, HookBase, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ks_detr import DetrDatasetMapper, build_optimizer, load_config
from ks_detr.data import check_num_classes, register_checked_coco


class WallClock(HookBase):
    """Records ``wall_minutes`` (since this process started training, evaluations included) at every
    iteration, so each row of ``metrics.json`` says when it was reached (``tools/plot_metrics.py --x minutes``)."""

    def before_train(self):
        self._start = time.perf_counter()

    def after_step(self):
        minutes = (time.perf_counter() - self._start) / 60
        self.trainer.storage.put_scalar("wall_minutes", minutes, smoothing_hint=False)


class Trainer(DefaultTrainer):
    """DefaultTrainer with the DETR mapper, AdamW + backbone multiplier, COCO evaluation and a wall clock."""

    def build_hooks(self):
        return [WallClock()] + super().build_hooks()

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, tasks=("bbox",), output_dir=output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=DetrDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=DetrDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)


def setup(args):
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="ks_detr")
    return cfg


def main(args):
    cfg = setup(args)
    for name, json_file, image_root in args.register_coco or []:
        register_checked_coco(name, json_file, image_root, args.skip_bad_records, cfg.OUTPUT_DIR)
    check_num_classes(cfg)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    parser = default_argument_parser()
    parser.add_argument("--register-coco", nargs=3, action="append", metavar=("NAME", "JSON", "IMAGE_DIR"),
                        help="register a COCO-format dataset (checked before training); repeatable")
    parser.add_argument("--skip-bad-records", action="store_true",
                        help="with --register-coco: leave out unreadable/missing images, size mismatches and "
                             "annotations with unknown category or image ids (counted in the log) instead of stopping")
    args = parser.parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))

#!/usr/bin/env python
"""Train / evaluate ks-detr models with detectron2's DefaultTrainer (``ks_detr.engine.Trainer``: DDP on
GPU or CPU, mixed precision, exact resume, preemption checkpoints).

    python train_net.py --config-file configs/ks_conditional_detr_r50.yaml --num-gpus 8
    python train_net.py --config-file configs/conditional_detr_r50.yaml --eval-only MODEL.WEIGHTS model.pth
    python train_net.py --config-file ... MODEL.DEVICE cpu SOLVER.IMS_PER_BATCH 2   # on CPU
    python train_net.py --num-gpus 2 --config-file ... MODEL.DEVICE cpu              # 2 CPU processes (gloo)
    python train_net.py --resume --config-file ... SOLVER.AMP.ENABLED True           # continue, bf16/fp16 autocast
    python train_net.py --config-file ... --register-coco my_train train.json images/ \
        --register-coco my_val val.json images/ DATASETS.TRAIN '("my_train",)' DATASETS.TEST '("my_val",)'
"""
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import warnings

# import-time messages that say nothing about the run (ks_detr.logs explains the rest)
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found" on CPU

from detectron2.engine import default_argument_parser, launch  # noqa: E402
from detectron2.evaluation import verify_results  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from torch.multiprocessing import ProcessExitedException  # noqa: E402

from ks_detr import load_config  # noqa: E402
from ks_detr.checkpoint import load_eval_weights  # noqa: E402
from ks_detr.data import check_num_classes, register_checked_coco  # noqa: E402
from ks_detr.data.images import set_max_image_pixels  # noqa: E402
from ks_detr.engine import (  # noqa: E402
    PREEMPTED_EXIT_CODE, PREEMPTION_SIGNALS, Trainer, end_process_group, keep_freed_cpu_memory)
from ks_detr.errors import ERROR_FILE_ENV, USER_ERROR_EXIT_CODE, repeat_worker_error, report_user_errors  # noqa: E402
from ks_detr.logs import setup_run_logging  # noqa: E402


def setup(args):
    """Config, loggers (the environment/config/model dump to OUTPUT_DIR/log.txt only), pixel limit, malloc."""
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    setup_run_logging(cfg, args)
    set_max_image_pixels(cfg.INPUT.get("MAX_IMAGE_PIXELS"))  # INPUT.MAX_IMAGE_PIXELS (ks_detr.data.images)
    keep_freed_cpu_memory(cfg)
    return cfg


def register_datasets(cfg, args):
    """``--register-coco`` datasets, checked once per machine (the other local processes read the cache)."""
    for first in (True, False):
        if (comm.get_local_rank() == 0) == first:
            for name, json_file, image_root in args.register_coco or []:
                register_checked_coco(name, json_file, image_root, args.skip_bad_records, cfg.OUTPUT_DIR)
        if comm.get_world_size() > 1:
            comm.synchronize()


def main(args):
    """One worker: run, wait for the others (the main process may still be evaluating), leave the process group.
    A user error or a preemption leaves it at once (nothing is in flight then)."""
    try:
        with report_user_errors(args.debug):
            result = run(args)
    except SystemExit:  # a user error or a preemption
        end_process_group()
        raise
    comm.synchronize()
    end_process_group()
    return result


def run(args):
    cfg = setup(args)
    register_datasets(cfg, args)
    check_num_classes(cfg)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        load_eval_weights(model, cfg, resume=args.resume)
        res = Trainer.test(cfg, model)
        verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def forward_signals_to_workers():
    """With several local processes, a preemption signal sent to this launcher alone reaches every
    worker (each saves a checkpoint after its step and exits)."""
    def forward(signum, frame):
        for child in multiprocessing.active_children():
            os.kill(child.pid, signum)

    for name in PREEMPTION_SIGNALS:
        signal.signal(getattr(signal, name), forward)


def get_parser():
    parser = default_argument_parser()
    parser.add_argument("--register-coco", nargs=3, action="append", metavar=("NAME", "JSON", "IMAGE_DIR"),
                        help="register a COCO-format dataset (checked before training); repeatable")
    parser.add_argument("--skip-bad-records", action="store_true",
                        help="with --register-coco: leave out unreadable/missing images, size mismatches and "
                             "annotations with unknown category or image ids (counted in the log) instead of stopping")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a user error (bad data, config, checkpoint) on the terminal; "
                             "without it the error is one line and the traceback goes to OUTPUT_DIR/log.txt")
    return parser


if __name__ == "__main__":
    args = get_parser().parse_args()
    error_dir = None
    if args.num_gpus * args.num_machines > 1:
        forward_signals_to_workers()
        error_dir = tempfile.TemporaryDirectory(prefix="ks_detr_")  # where a worker leaves its user error
        os.environ[ERROR_FILE_ENV] = os.path.join(error_dir.name, "error.txt")
    try:
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    except ProcessExitedException as e:  # a worker was preempted, stopped on a user error or failed
        if e.exit_code == USER_ERROR_EXIT_CODE:
            repeat_worker_error()
        sys.exit(e.exit_code if e.exit_code in (PREEMPTED_EXIT_CODE, USER_ERROR_EXIT_CODE) else 1)
    finally:
        if error_dir is not None:
            error_dir.cleanup()

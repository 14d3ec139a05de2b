#!/usr/bin/env python
"""Write a ks-detr student as a Hugging Face transformers folder (config.json, model.safetensors,
preprocessor_config.json) that ``AutoModelForObjectDetection.from_pretrained`` loads.

    python tools/export_transformers.py --config-file configs/conditional_detr_r50.yaml \\
        output/model_final.pth hf_out/ [KEY VALUE ...]

Families: Conditional DETR, DAB-DETR and Deformable DETR (single stage, ``MODEL.DETR.BOX_REFINE`` as
``with_box_refine``, ``TWO_STAGE`` as ``two_stage``) with a detectron2 ResNet (exported as
transformers' ResNet, no timm needed). A KS run (``ks_*.yaml`` config, checkpoint with teachers) is exported as its
student: the teacher-only tensors are dropped as ``tools/ks_to_student.py`` does. Class names come from the
metadata of ``DATASETS.TEST[0]`` (else LABEL_i); the image processor gets our test resize
(``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``) and pixel statistics. Settings transformers cannot compute (another backbone, dilation,
grouped convolutions, a position-embedding temperature/offset transformers does not have, BGR input) are refused by
name; the official-numerics switches (``MODEL.DETR.DECODER_PADDING_MASK`` False, ``EVAL_PAD_LAST_PIXEL`` True,
``BOX_LOGIT_EPS``) are not carried: transformers computes ours with their defaults (a note says so).
``tools/convert_checkpoint.py`` reads the folder back, bit-identically.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ks_detr import load_config  # noqa: E402
from ks_detr import transformers_layout as hf  # noqa: E402
from ks_detr.checkpoint import load_checkpoint, student_state_dict  # noqa: E402
from ks_detr.config import student_config  # noqa: E402
from ks_detr.errors import report_user_errors  # noqa: E402

log = logging.getLogger("ks_detr.export_transformers")


def class_names(cfg):
    from detectron2.data import MetadataCatalog

    names = list(MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes", None) or []) \
        if cfg.DATASETS.TEST else []
    return names if len(names) == cfg.MODEL.DETR.NUM_CLASSES else None


def export(cfg, state_dict, output):
    """Write ``output`` (a folder) from our student config and state dict; returns the transformers model."""
    import transformers

    defaults = {"DECODER_PADDING_MASK": True, "EVAL_PAD_LAST_PIXEL": False, "BOX_LOGIT_EPS": 1e-5}
    for key, value in defaults.items():
        if cfg.MODEL.DETR[key] != value:
            log.warning("MODEL.DETR.%s=%s is not carried over: transformers computes it as %s", key,
                        cfg.MODEL.DETR[key], value)
    model = hf.transformers_model(cfg, state_dict, class_names(cfg))
    model.save_pretrained(output)
    settings = hf.image_processor_settings(cfg)
    processor_cls = getattr(transformers, settings.pop("image_processor_type"))
    processor_cls(size=settings["size"], image_mean=settings["image_mean"], image_std=settings["image_std"]
                  ).save_pretrained(output)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the run's config (baseline or KS)")
    parser.add_argument("weights", help="the run's checkpoint (.pth), or a KS student from tools/ks_to_student.py")
    parser.add_argument("output", help="folder to write (created)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with report_user_errors(args.debug):
        cfg = student_config(load_config(args.config_file, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *args.opts]))
        sd, teacher_only = load_checkpoint(args.weights, with_teacher_keys=True)
        student = student_state_dict(sd, teacher_only)
        if len(student) < len(sd):
            log.info("KS checkpoint: %d teacher-only tensors dropped (the student is exported)", len(sd) - len(student))
        export(cfg, student, args.output)
        log.info("wrote %s (config.json, model.safetensors, preprocessor_config.json): "
                 "AutoModelForObjectDetection.from_pretrained(%r)", args.output, args.output)


if __name__ == "__main__":
    main()

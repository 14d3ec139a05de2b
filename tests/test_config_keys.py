"""Every config key acts or is refused.

The walk: every key of the config (detectron2's ``get_cfg()`` and ours, ``add_ks_detr_config``) is either
in ``WALK`` or in ``OUT_OF_SCOPE`` with its reason. A ``WALK`` entry changes the key (to a valid other value,
sometimes with a companion key the change needs, or under a context such as the switch the key belongs to) in
a small config of a family and checks that the change shows in what the key is for:

- ``model``: the built model (parameter names/shapes/strides/values, buffers), its outputs on a seeded
  tiny padded batch (every training loss, the eval detections), its matcher's assignment on a seeded
  40-query problem, how many layers are recomputed, or how many decoder passes a train step runs;
- ``data``: the mapper's output (train: 8 seeded draws of the augmentation; test);
- ``optimizer``: its class and per-parameter hyperparameters, and one step on fixed gradients (clipping);
- ``schedule``: the lr multiplier over the iterations;
- ``loader``: the train loader's batches (dataset indices, sampler state, batch size, workers);
- ``trainer``: ``ks_detr.engine.Trainer`` (hooks and their periods, AMP, seed, checkpointer, weights
  loaded by ``resume_or_load``);
- ``eval``: the datasets ``Trainer.test`` evaluates; ``verify``: train_net's check of TEST.EXPECTED_RESULTS;
  ``setup``: train_net's setup (cudnn.benchmark, glibc's malloc);
- ``refused``: ``ks_detr.config.load_config`` raises ConfigError naming the key (``refused_build``: the
  model's constructor does, for what a family cannot do at all).

Keys under an on/off switch that a config may flip alone (INPUT.CROP.*, SOLVER.CLIP_GRADIENTS.*,
SOLVER.AMP.DTYPE, the denoising noise under DN.GROUPS/NUM_QUERIES 0, the lr schedulers' own keys,
TEST.PRECISE_BN.NUM_ITER) are walked with their switch on; MODEL.KS.* is refused while knowledge sharing is off.
``test_every_key_read_is_walked`` records which keys the config checks, every family's model, the mappers,
optimizer, scheduler, trainer, evaluation and train_net's setup read, and requires each to be walked.
"""
import contextlib
import copy
import importlib.util
import os

import numpy as np
import pytest
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import verify_results
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage
from PIL import Image

from conftest import REPO, make_cfg, session_tempdir
from ks_detr import add_ks_detr_config, build_optimizer
from ks_detr.data import DetrDatasetMapper
from ks_detr.data.images import MAX_PIXELS_ENV
from ks_detr.data.sampler import build_resumable_train_loader
from ks_detr.engine import Trainer, keep_freed_cpu_memory
from ks_detr.errors import ConfigError
from ks_detr.modeling.layers import MSDeformAttn, transformer

WORK = session_tempdir("ks_detr_test_config_keys_")
TRAIN, OTHER = "ks_config_keys_train", "ks_config_keys_other"  # registered below
# Tiny models: a ResNet-50 at 1/8 width (bottleneck blocks, so that every RESNETS key is read), width 32
TINY = ("MODEL.DETR.HIDDEN_DIM", 32, "MODEL.DETR.NHEADS", 2, "MODEL.DETR.DIM_FEEDFORWARD", 32,
        "MODEL.DETR.ENC_LAYERS", 2, "MODEL.DETR.DEC_LAYERS", 2, "MODEL.DETR.NUM_QUERIES", 6,
        "MODEL.DETR.NUM_TOPK_TEST", 6, "MODEL.DETR.NUM_CLASSES", 7, "MODEL.RESNETS.STEM_OUT_CHANNELS", 4,
        "MODEL.RESNETS.RES2_OUT_CHANNELS", 8, "MODEL.RESNETS.WIDTH_PER_GROUP", 2)
COMMON = ("DATASETS.TRAIN", f"('{TRAIN}',)", "DATASETS.TEST", f"('{TRAIN}',)", "OUTPUT_DIR", WORK,
          "DATALOADER.NUM_WORKERS", 0, "SOLVER.IMS_PER_BATCH", 2)
BASES = {
    "conditional": ("configs/conditional_detr_r50.yaml", TINY),
    "ks_conditional": ("configs/ks_conditional_detr_r50.yaml", TINY),
    "dn_detr": ("configs/dn_detr_r50.yaml", TINY),
    "deformable": ("configs/deformable_detr_r50.yaml", TINY),
    "dn_deformable": ("configs/dn_deformable_detr_r50.yaml", TINY),
    "ks_dn_deformable_two_stage": ("configs/ks_dn_deformable_detr_r50.yaml", TINY + ("MODEL.DETR.TWO_STAGE", True)),
    "dino": ("configs/dino_r50_4scale_12ep.yaml", TINY + ("MODEL.DETR.DN.NUM_QUERIES", 6)),
    "mobilenet": ("configs/quickstart/trees.yaml", TINY[:-6] + ("MODEL.MOBILENET_V2.PRETRAINED", False)),
    "retinanet": ("configs/quickstart/retinanet_trees.yaml", ("MODEL.MOBILENET_V2.PRETRAINED", False)),
}
SCHEDULER_CONTEXT = ("SOLVER.WARMUP_ITERS", 1000)  # Base-DETR.yaml has no warm-up



pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

def entry(base, changes, probe, context=()):
    """One walk step: ``changes`` {key: value} (the walked key first; the others are companions it needs)
    applied to BASES[base] + ``context``, expected to show in ``probe``."""
    return dict(base=base, changes=changes, probe=probe, context=tuple(context))


def w(base, key, value, probe, context=(), **companions):
    changes = {key: value, **{k.replace("__", "."): v for k, v in companions.items()}}
    return entry(base, changes, probe, context)


WALK = {
    # ---- ours: MODEL.DETR ----
    "MODEL.DETR.NUM_CLASSES": [w("conditional", "MODEL.DETR.NUM_CLASSES", 5, "model")],
    "MODEL.DETR.IN_FEATURES": [w("deformable", "MODEL.DETR.IN_FEATURES", ["res4", "res5"], "model",
                                 MODEL__RESNETS__OUT_FEATURES=["res4", "res5"]),
                               w("deformable", "MODEL.DETR.IN_FEATURES", ["res4", "res5"], "refused")],
    "MODEL.DETR.NUM_FEATURE_LEVELS": [w("deformable", "MODEL.DETR.NUM_FEATURE_LEVELS", 3, "model"),
                                      w("conditional", "MODEL.DETR.NUM_FEATURE_LEVELS", 2, "refused")],
    "MODEL.DETR.DEFORMABLE_POINTS": [w("deformable", "MODEL.DETR.DEFORMABLE_POINTS", 2, "model"),
                                     w("dn_detr", "MODEL.DETR.DEFORMABLE_POINTS", 2, "refused")],
    "MODEL.DETR.DEFORMABLE_ATTN_IMPL": [w("deformable", "MODEL.DETR.DEFORMABLE_ATTN_IMPL", "pytorch", "model"),
                                        w("deformable", "MODEL.DETR.DEFORMABLE_ATTN_IMPL", "cuda", "refused"),
                                        w("dn_detr", "MODEL.DETR.DEFORMABLE_ATTN_IMPL", "pytorch", "refused")],
    "MODEL.DETR.POS_OFFSET": [w("conditional", "MODEL.DETR.POS_OFFSET", -0.5, "model")],
    "MODEL.DETR.HIDDEN_DIM": [w("conditional", "MODEL.DETR.HIDDEN_DIM", 64, "model")],
    "MODEL.DETR.NHEADS": [w("conditional", "MODEL.DETR.NHEADS", 4, "model")],
    "MODEL.DETR.ENC_LAYERS": [w("conditional", "MODEL.DETR.ENC_LAYERS", 3, "model")],
    "MODEL.DETR.DEC_LAYERS": [w("conditional", "MODEL.DETR.DEC_LAYERS", 3, "model")],
    "MODEL.DETR.DIM_FEEDFORWARD": [w("conditional", "MODEL.DETR.DIM_FEEDFORWARD", 64, "model")],
    "MODEL.DETR.DROPOUT": [w("conditional", "MODEL.DETR.DROPOUT", 0.0, "model")],
    "MODEL.DETR.ACTIVATION": [w("conditional", "MODEL.DETR.ACTIVATION", "gelu", "model")],
    "MODEL.DETR.NUM_QUERIES": [w("conditional", "MODEL.DETR.NUM_QUERIES", 5, "model")],
    "MODEL.DETR.NUM_TOPK_TEST": [w("conditional", "MODEL.DETR.NUM_TOPK_TEST", 3, "model")],
    "MODEL.DETR.POS_TEMPERATURE": [w("conditional", "MODEL.DETR.POS_TEMPERATURE", 20, "model")],
    "MODEL.DETR.CLASS_WEIGHT": [w("conditional", "MODEL.DETR.CLASS_WEIGHT", 1.0, "model")],
    "MODEL.DETR.BBOX_WEIGHT": [w("conditional", "MODEL.DETR.BBOX_WEIGHT", 1.0, "model")],
    "MODEL.DETR.GIOU_WEIGHT": [w("conditional", "MODEL.DETR.GIOU_WEIGHT", 1.0, "model")],
    "MODEL.DETR.COST_CLASS": [w("conditional", "MODEL.DETR.COST_CLASS", 20.0, "model")],
    "MODEL.DETR.COST_BBOX": [w("conditional", "MODEL.DETR.COST_BBOX", 0.0, "model")],
    "MODEL.DETR.COST_GIOU": [w("conditional", "MODEL.DETR.COST_GIOU", 20.0, "model")],
    "MODEL.DETR.FOCAL_ALPHA": [w("conditional", "MODEL.DETR.FOCAL_ALPHA", 0.5, "model")],
    "MODEL.DETR.FOCAL_GAMMA": [w("conditional", "MODEL.DETR.FOCAL_GAMMA", 1.0, "model")],
    "MODEL.DETR.AUX_LOSS": [w("conditional", "MODEL.DETR.AUX_LOSS", False, "model")],
    "MODEL.DETR.DECODER_PADDING_MASK": [w("conditional", "MODEL.DETR.DECODER_PADDING_MASK", False, "model"),
                                        w("deformable", "MODEL.DETR.DECODER_PADDING_MASK", False, "model")],
    "MODEL.DETR.EVAL_PAD_LAST_PIXEL": [w("conditional", "MODEL.DETR.EVAL_PAD_LAST_PIXEL", True, "model")],
    "MODEL.DETR.BOX_LOGIT_EPS": [w("dn_deformable", "MODEL.DETR.BOX_LOGIT_EPS", 1e-3, "model")],
    "MODEL.DETR.GIOU_EPS": [w("conditional", "MODEL.DETR.GIOU_EPS", 1e-6, "model")],
    "MODEL.DETR.CHANNELS_LAST": [w("conditional", "MODEL.DETR.CHANNELS_LAST", False, "model")],
    "MODEL.DETR.TWO_STAGE": [w("dn_deformable", "MODEL.DETR.TWO_STAGE", True, "model"),
                             w("deformable", "MODEL.DETR.TWO_STAGE", True, "model", MODEL__DETR__BOX_REFINE=True),
                             w("deformable", "MODEL.DETR.TWO_STAGE", True, "refused_build"),
                             w("conditional", "MODEL.DETR.TWO_STAGE", True, "refused_build"),
                             w("dino", "MODEL.DETR.TWO_STAGE", False, "refused_build")],
    "MODEL.DETR.BOX_REFINE": [w("deformable", "MODEL.DETR.BOX_REFINE", True, "model"),
                              w("conditional", "MODEL.DETR.BOX_REFINE", True, "refused"),
                              w("dn_deformable", "MODEL.DETR.BOX_REFINE", True, "refused")],
    "MODEL.DETR.DN.GROUPS": [w("dn_detr", "MODEL.DETR.DN.GROUPS", 2, "model"),
                             w("dn_deformable", "MODEL.DETR.DN.GROUPS", 0, "model"),
                             w("conditional", "MODEL.DETR.DN.GROUPS", 2, "refused"),
                             w("dino", "MODEL.DETR.DN.GROUPS", 2, "refused")],
    "MODEL.DETR.DN.LABEL_NOISE": [w("dn_deformable", "MODEL.DETR.DN.LABEL_NOISE", 0.5, "model"),
                                  w("deformable", "MODEL.DETR.DN.LABEL_NOISE", 0.0, "refused")],
    "MODEL.DETR.DN.BOX_NOISE": [w("dn_detr", "MODEL.DETR.DN.BOX_NOISE", 0.1, "model"),
                                w("conditional", "MODEL.DETR.DN.BOX_NOISE", 0.0, "refused")],
    "MODEL.DETR.DN.NUM_QUERIES": [w("dn_deformable", "MODEL.DETR.DN.NUM_QUERIES", 6, "model"),
                                  w("dino", "MODEL.DETR.DN.NUM_QUERIES", 12, "model"),
                                  w("conditional", "MODEL.DETR.DN.NUM_QUERIES", 6, "refused")],
    # ---- ours: MODEL.KS ----
    "MODEL.KS.ENABLED": [w("conditional", "MODEL.KS.ENABLED", True, "model"),
                         w("ks_conditional", "MODEL.KS.ENABLED", None, "model")],  # KS yaml, baseline arch: off
    "MODEL.KS.MODE": [w("ks_conditional", "MODEL.KS.MODE", "share_v", "model"),
                      w("ks_dn_deformable_two_stage", "MODEL.KS.MODE", "share_a", "model"),
                      w("conditional", "MODEL.KS.MODE", "share_v", "refused")],
    "MODEL.KS.ENCODER_LAYERS": [w("ks_conditional", "MODEL.KS.ENCODER_LAYERS", [0], "model")],
    "MODEL.KS.TEACHER_DECODER_LAYERS": [w("ks_conditional", "MODEL.KS.TEACHER_DECODER_LAYERS", 2, "model")],
    "MODEL.KS.TEACHER_LOSS_WEIGHT": [w("ks_conditional", "MODEL.KS.TEACHER_LOSS_WEIGHT", 0.5, "model")],
    "MODEL.KS.TEACHER_PROPOSALS": [w("ks_dn_deformable_two_stage", "MODEL.KS.TEACHER_PROPOSALS", "student", "model"),
                                   w("ks_conditional", "MODEL.KS.TEACHER_PROPOSALS", "student", "refused")],
    "MODEL.KS.RECOMPUTE_DECODER": [w("ks_conditional", "MODEL.KS.RECOMPUTE_DECODER", True, "model"),
                                   w("conditional", "MODEL.KS.RECOMPUTE_DECODER", True, "refused")],
    "MODEL.KS.RECOMPUTE_KS_LAYERS": [w("ks_conditional", "MODEL.KS.RECOMPUTE_KS_LAYERS", True, "model")],
    "MODEL.KS.EARLY_TEACHER_BACKWARD": [w("ks_conditional", "MODEL.KS.EARLY_TEACHER_BACKWARD", True, "model"),
                                        w("conditional", "MODEL.KS.EARLY_TEACHER_BACKWARD", True, "refused"),
                                        w("ks_conditional", "MODEL.KS.EARLY_TEACHER_BACKWARD", True, "refused",
                                          SOLVER__AMP__ENABLED=True, SOLVER__AMP__DTYPE="float16")],
    "MODEL.KS.MASK.PAD_PIXELS": [w("ks_conditional", "MODEL.KS.MASK.PAD_PIXELS", 16, "model")],
    "MODEL.KS.MASK.SAMPLING": [w("ks_conditional", "MODEL.KS.MASK.SAMPLING", "area", "model")],
    # ---- ours: elsewhere ----
    "MODEL.WEIGHTS_ALLOW_PARTIAL": [w("conditional", "MODEL.WEIGHTS_ALLOW_PARTIAL", True, "trainer",
                                      context=("MODEL.WEIGHTS", "<partial>"))],
    "MODEL.MOBILENET_V2.OUT_FEATURES": [w("mobilenet", "MODEL.MOBILENET_V2.OUT_FEATURES", ["res5"], "model",
                                          MODEL__DETR__IN_FEATURES=["res5"]),
                                        w("mobilenet", "MODEL.MOBILENET_V2.OUT_FEATURES", ["res3", "res4", "res5"],
                                          "refused")],
    "MODEL.MOBILENET_V2.PRETRAINED": [w("mobilenet", "MODEL.MOBILENET_V2.PRETRAINED", True, "model"),
                                      w("conditional", "MODEL.MOBILENET_V2.PRETRAINED", False, "refused")],
    "INPUT.CROP.PRE_RESIZE_SIZES": [w("conditional", "INPUT.CROP.PRE_RESIZE_SIZES", [300], "data")],
    "CPU_KEEP_FREED_MEMORY": [w("conditional", "CPU_KEEP_FREED_MEMORY", False, "setup")],
    "SOLVER.AMP.DTYPE": [w("conditional", "SOLVER.AMP.DTYPE", "float16", "trainer",
                           context=("SOLVER.AMP.ENABLED", True))],
    "SOLVER.OPTIMIZER": [w("conditional", "SOLVER.OPTIMIZER", "SGD", "optimizer")],
    "SOLVER.BACKBONE_MULTIPLIER": [w("conditional", "SOLVER.BACKBONE_MULTIPLIER", 0.5, "optimizer")],
    # ---- detectron2's keys read by our trainer, mapper, solver, evaluator, model and train_net ----
    "CUDNN_BENCHMARK": [w("conditional", "CUDNN_BENCHMARK", True, "setup")],
    "SEED": [w("conditional", "SEED", 7, "trainer")],
    "OUTPUT_DIR": [w("conditional", "OUTPUT_DIR", os.path.join(WORK, "other"), "trainer")],
    "DATALOADER.ASPECT_RATIO_GROUPING": [w("conditional", "DATALOADER.ASPECT_RATIO_GROUPING", False, "loader")],
    "DATALOADER.FILTER_EMPTY_ANNOTATIONS": [w("conditional", "DATALOADER.FILTER_EMPTY_ANNOTATIONS", False, "loader")],
    "DATALOADER.NUM_WORKERS": [w("conditional", "DATALOADER.NUM_WORKERS", 1, "loader")],
    "DATALOADER.SAMPLER_TRAIN": [w("conditional", "DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler", "loader")],
    "DATALOADER.REPEAT_THRESHOLD": [w("conditional", "DATALOADER.REPEAT_THRESHOLD", 0.9, "loader",
                                      context=("DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler"))],
    "DATALOADER.REPEAT_SQRT": [w("conditional", "DATALOADER.REPEAT_SQRT", False, "loader",
                                 context=("DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler",
                                          "DATALOADER.REPEAT_THRESHOLD", 0.9))],
    "DATASETS.TRAIN": [w("conditional", "DATASETS.TRAIN", f"('{OTHER}',)", "loader")],
    "DATASETS.TEST": [w("conditional", "DATASETS.TEST", f"('{TRAIN}', '{OTHER}')", "eval")],
    "INPUT.CROP.ENABLED": [w("conditional", "INPUT.CROP.ENABLED", False, "data")],
    "INPUT.CROP.TYPE": [w("conditional", "INPUT.CROP.TYPE", "absolute", "data")],
    "INPUT.CROP.SIZE": [w("conditional", "INPUT.CROP.SIZE", (200, 300), "data")],
    "INPUT.FORMAT": [w("conditional", "INPUT.FORMAT", "BGR", "data")],
    "INPUT.MIN_SIZE_TRAIN": [w("conditional", "INPUT.MIN_SIZE_TRAIN", (500,), "data")],
    "INPUT.MAX_SIZE_TRAIN": [w("conditional", "INPUT.MAX_SIZE_TRAIN", 1000, "data")],
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": [w("conditional", "INPUT.MIN_SIZE_TRAIN_SAMPLING", "range", "data",
                                        INPUT__MIN_SIZE_TRAIN=(480, 800))],
    "INPUT.MIN_SIZE_TEST": [w("conditional", "INPUT.MIN_SIZE_TEST", 600, "data")],
    "INPUT.MAX_SIZE_TEST": [w("conditional", "INPUT.MAX_SIZE_TEST", 1000, "data")],
    "INPUT.RANDOM_FLIP": [w("conditional", "INPUT.RANDOM_FLIP", "vertical", "data"),
                          w("conditional", "INPUT.RANDOM_FLIP", "none", "data")],
    "MODEL.BACKBONE.NAME": [w("conditional", "MODEL.BACKBONE.NAME", "build_mobilenet_v2_backbone", "model",
                              MODEL__MOBILENET_V2__PRETRAINED=False)],
    "MODEL.BACKBONE.FREEZE_AT": [w("conditional", "MODEL.BACKBONE.FREEZE_AT", 3, "model")],
    "MODEL.META_ARCHITECTURE": [w("conditional", "MODEL.META_ARCHITECTURE", "DABDETR", "model")],
    "MODEL.PIXEL_MEAN": [w("conditional", "MODEL.PIXEL_MEAN", [100.0, 110.0, 120.0], "model")],
    "MODEL.PIXEL_STD": [w("conditional", "MODEL.PIXEL_STD", [50.0, 50.0, 50.0], "model")],
    "MODEL.WEIGHTS": [w("conditional", "MODEL.WEIGHTS", "<full>", "trainer")],
    "MODEL.MASK_ON": [w("conditional", "MODEL.MASK_ON", True, "refused")],
    "MODEL.LOAD_PROPOSALS": [w("conditional", "MODEL.LOAD_PROPOSALS", True, "refused")],
    "MODEL.RESNETS.DEPTH": [w("conditional", "MODEL.RESNETS.DEPTH", 101, "model")],
    "MODEL.RESNETS.OUT_FEATURES": [w("conditional", "MODEL.RESNETS.OUT_FEATURES", ["res4", "res5"], "refused"),
                                   w("conditional", "MODEL.RESNETS.OUT_FEATURES", ["res4"], "model",
                                     MODEL__DETR__IN_FEATURES=["res4"])],
    "MODEL.RESNETS.NUM_GROUPS": [w("conditional", "MODEL.RESNETS.NUM_GROUPS", 2, "model")],
    "MODEL.RESNETS.NORM": [w("conditional", "MODEL.RESNETS.NORM", "BN", "model")],
    "MODEL.RESNETS.WIDTH_PER_GROUP": [w("conditional", "MODEL.RESNETS.WIDTH_PER_GROUP", 4, "model")],
    "MODEL.RESNETS.STRIDE_IN_1X1": [w("conditional", "MODEL.RESNETS.STRIDE_IN_1X1", True, "model")],
    "MODEL.RESNETS.RES5_DILATION": [w("conditional", "MODEL.RESNETS.RES5_DILATION", 2, "model")],
    "MODEL.RESNETS.RES2_OUT_CHANNELS": [w("conditional", "MODEL.RESNETS.RES2_OUT_CHANNELS", 16, "model")],
    "MODEL.RESNETS.STEM_OUT_CHANNELS": [w("conditional", "MODEL.RESNETS.STEM_OUT_CHANNELS", 8, "model")],
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE": [w("conditional", "MODEL.RESNETS.DEFORM_ON_PER_STAGE",
                                            [False, False, False, True], "refused")],
    "SOLVER.AMP.ENABLED": [w("conditional", "SOLVER.AMP.ENABLED", True, "trainer")],
    "SOLVER.BASE_LR": [w("conditional", "SOLVER.BASE_LR", 2e-4, "optimizer")],
    "SOLVER.BASE_LR_END": [w("conditional", "SOLVER.BASE_LR_END", 1e-5, "schedule",
                             context=("SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR"))],
    "SOLVER.BIAS_LR_FACTOR": [w("conditional", "SOLVER.BIAS_LR_FACTOR", 2.0, "optimizer")],
    "SOLVER.WEIGHT_DECAY_BIAS": [w("conditional", "SOLVER.WEIGHT_DECAY_BIAS", 0.0, "optimizer")],
    "SOLVER.WEIGHT_DECAY": [w("conditional", "SOLVER.WEIGHT_DECAY", 0.05, "optimizer")],
    "SOLVER.WEIGHT_DECAY_NORM": [w("conditional", "SOLVER.WEIGHT_DECAY_NORM", 1e-4, "optimizer")],
    "SOLVER.MOMENTUM": [w("conditional", "SOLVER.MOMENTUM", 0.8, "optimizer", context=("SOLVER.OPTIMIZER", "SGD")),
                        w("conditional", "SOLVER.MOMENTUM", 0.8, "refused")],
    "SOLVER.NESTEROV": [w("conditional", "SOLVER.NESTEROV", True, "optimizer", context=("SOLVER.OPTIMIZER", "SGD")),
                        w("conditional", "SOLVER.NESTEROV", True, "refused")],
    "SOLVER.CLIP_GRADIENTS.ENABLED": [w("conditional", "SOLVER.CLIP_GRADIENTS.ENABLED", False, "optimizer")],
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": [w("conditional", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm", "optimizer"),
                                        w("conditional", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "value", "optimizer")],
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": [w("conditional", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 0.05, "optimizer")],
    "SOLVER.CLIP_GRADIENTS.NORM_TYPE": [w("conditional", "SOLVER.CLIP_GRADIENTS.NORM_TYPE", 1.0, "optimizer"),
                                        w("conditional", "SOLVER.CLIP_GRADIENTS.NORM_TYPE", 1.0, "optimizer",
                                          context=("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm"))],
    "SOLVER.CHECKPOINT_PERIOD": [w("conditional", "SOLVER.CHECKPOINT_PERIOD", 100, "trainer")],
    "SOLVER.GAMMA": [w("conditional", "SOLVER.GAMMA", 0.5, "schedule")],
    "SOLVER.IMS_PER_BATCH": [w("conditional", "SOLVER.IMS_PER_BATCH", 1, "loader")],
    "SOLVER.LR_SCHEDULER_NAME": [w("conditional", "SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR", "schedule")],
    "SOLVER.MAX_ITER": [w("conditional", "SOLVER.MAX_ITER", 1000, "schedule"),
                        w("conditional", "SOLVER.MAX_ITER", 1000, "trainer")],
    "SOLVER.NUM_DECAYS": [w("conditional", "SOLVER.NUM_DECAYS", 2, "schedule",
                            context=("SOLVER.LR_SCHEDULER_NAME", "WarmupStepWithFixedGammaLR"))],
    "SOLVER.RESCALE_INTERVAL": [w("conditional", "SOLVER.RESCALE_INTERVAL", True, "schedule",
                                  context=("SOLVER.LR_SCHEDULER_NAME", "WarmupStepWithFixedGammaLR",
                                           *SCHEDULER_CONTEXT))],
    "SOLVER.REFERENCE_WORLD_SIZE": [w("conditional", "SOLVER.REFERENCE_WORLD_SIZE", 2, "trainer")],
    "SOLVER.STEPS": [w("conditional", "SOLVER.STEPS", (100000,), "schedule")],
    "SOLVER.WARMUP_FACTOR": [w("conditional", "SOLVER.WARMUP_FACTOR", 0.1, "schedule", context=SCHEDULER_CONTEXT)],
    "SOLVER.WARMUP_ITERS": [w("conditional", "SOLVER.WARMUP_ITERS", 1000, "schedule",
                              context=("SOLVER.WARMUP_FACTOR", 0.1))],
    "SOLVER.WARMUP_METHOD": [w("conditional", "SOLVER.WARMUP_METHOD", "constant", "schedule",
                               context=("SOLVER.WARMUP_FACTOR", 0.1, *SCHEDULER_CONTEXT))],
    "TEST.AUG.ENABLED": [w("conditional", "TEST.AUG.ENABLED", True, "refused")],
    "TEST.DETECTIONS_PER_IMAGE": [w("conditional", "TEST.DETECTIONS_PER_IMAGE", 300, "refused")],
    "TEST.EVAL_PERIOD": [w("conditional", "TEST.EVAL_PERIOD", 100, "trainer")],
    "TEST.EXPECTED_RESULTS": [w("conditional", "TEST.EXPECTED_RESULTS", [["bbox", "AP", 99.0, 0.1]], "verify")],
    "TEST.PRECISE_BN.ENABLED": [w("conditional", "TEST.PRECISE_BN.ENABLED", True, "trainer",
                                  context=("MODEL.RESNETS.NORM", "BN"))],
    "TEST.PRECISE_BN.NUM_ITER": [w("conditional", "TEST.PRECISE_BN.NUM_ITER", 10, "trainer",
                                   context=("MODEL.RESNETS.NORM", "BN", "TEST.PRECISE_BN.ENABLED", True))],
    # the DETR keys on detectron2's own detectors
    "MODEL.DETR.* on detectron2's detectors": [w("retinanet", "MODEL.DETR.NUM_QUERIES", 10, "refused"),
                                               w("retinanet", "MODEL.KS.MODE", "share_v", "refused")],
}
# detectron2's keys that no DETR family reads: every one refused on a DETR config (generated below)
D2_ONLY = ("MODEL.PROPOSAL_GENERATOR.", "MODEL.ANCHOR_GENERATOR.", "MODEL.RPN.", "MODEL.ROI_HEADS.",
           "MODEL.ROI_BOX_HEAD.", "MODEL.ROI_BOX_CASCADE_HEAD.", "MODEL.ROI_MASK_HEAD.", "MODEL.ROI_KEYPOINT_HEAD.",
           "MODEL.SEM_SEG_HEAD.", "MODEL.PANOPTIC_FPN.", "MODEL.RETINANET.", "MODEL.FPN.", "MODEL.KEYPOINT_ON",
           "TEST.KEYPOINT_OKS_SIGMAS", "INPUT.MASK_FORMAT", "VIS_PERIOD", "DATASETS.PROPOSAL_FILES_",
           "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_", "TEST.AUG.")
OUT_OF_SCOPE = {
    "VERSION": "the config schema's version (detectron2 upgrades old configs on merge), not a setting",
    "GLOBAL.HACK": "detectron2's placeholder; no code reads it",
    "MODEL.DEVICE": "the device (build_model, the engine's AMP and DDP); this test runs on CPU only",
    "MODEL.RESNETS.DEFORM_MODULATED": "a sub-key of MODEL.RESNETS.DEFORM_ON_PER_STAGE, refused without detectron2._C",
    "MODEL.RESNETS.DEFORM_NUM_GROUPS": "a sub-key of MODEL.RESNETS.DEFORM_ON_PER_STAGE, refused without detectron2._C",
}

# read by detectron2's code on our path, with every other value refused (by load_config)
READ_BUT_REFUSED = {
    "MODEL.LOAD_PROPOSALS": "detectron2's test loader reads it; True, its only other value, is refused",
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE": "detectron2's ResNet reads it; deformable stages are refused without "
                                         "detectron2._C (with the compiled ops they build)",
}


def _alternative(value):
    """A value of the same type that differs (for keys that are refused before anything reads them)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, (list, tuple)):
        return type(value)(list(value) + [list(value)[-1]] if value else [1])
    return None  # None-valued keys are walked by hand


def all_keys():
    cfg = get_cfg()
    add_ks_detr_config(cfg)
    return _flat(cfg)


def _flat(node, prefix=""):
    out = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


for _key, _value in all_keys().items():
    if _key.startswith(D2_ONLY) and _key not in WALK:
        WALK[_key] = [w("conditional", _key, _alternative(_value), "refused")]
if "INPUT.MAX_IMAGE_PIXELS" in all_keys():  # ks_detr.data.images.add_image_config: train_net.py sets the limit
    WALK["INPUT.MAX_IMAGE_PIXELS"] = [w("conditional", "INPUT.MAX_IMAGE_PIXELS", 1000, "setup")]


def walked_keys():
    return {k for entries in WALK.values() for e in entries for k in list(e["changes"])[:1]}


# ---- the tiny datasets and inputs ------------------------------------------------------------------
def _records(folder):
    """4 records on 2 images: landscape and portrait, one without boxes, categories 0-2 (repeat factors)."""
    rng = np.random.default_rng(0)
    files = []
    for i, (h, w_) in enumerate(((48, 64), (64, 48))):
        path = os.path.join(folder, f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w_, 3), dtype=np.uint8)).save(path)
        files.append((path, h, w_))

    def record(i, f, annos):
        path, h, w_ = files[f]
        return dict(file_name=path, height=h, width=w_, image_id=i, annotations=[
            dict(bbox=b, bbox_mode=BoxMode.XYWH_ABS, category_id=c, iscrowd=0) for b, c in annos])

    return [record(0, 0, [([4, 6, 20, 18], 0), ([30, 10, 20, 30], 1)]), record(1, 1, [([5, 5, 30, 40], 0)]),
            record(2, 0, []), record(3, 1, [([10, 20, 20, 20], 2), ([2, 2, 10, 10], 0)])]


def _register():
    if TRAIN in DatasetCatalog.list():
        return
    records = _records(WORK)
    DatasetCatalog.register(TRAIN, lambda: copy.deepcopy(records))
    DatasetCatalog.register(OTHER, lambda: copy.deepcopy(records[:2]))
    for name in (TRAIN, OTHER):
        MetadataCatalog.get(name).set(thing_classes=["a", "b", "c"], evaluator_type="coco")


_register()


def model_inputs():
    """A padded batch of three images with boxes (seeded). The padded size is 80 x 96: 3 x 3 tokens at stride
    32 (the padding mask is sampled at pixel rows 0, 26, 53 and columns 0, 32, 64): the second image's last
    row and column are sampled, the third image has padded tokens. The whole-image box clamps under
    denoising noise (box logits at MODEL.DETR.BOX_LOGIT_EPS)."""
    from detectron2.structures import Boxes, Instances
    g = torch.Generator().manual_seed(0)
    inputs = []
    for (h, w_), boxes, classes in (((80, 96), [[4.0, 6, 40, 50], [30, 20, 90, 70], [0, 0, 96, 80]], [1, 2, 3]),
                                     ((54, 65), [[10.0, 10, 50, 40]], [0]), ((40, 48), [[5.0, 5, 30, 35]], [1])):
        inst = Instances((h, w_))
        inst.gt_boxes, inst.gt_classes = Boxes(torch.tensor(boxes)), torch.tensor(classes)
        inputs.append({"image": torch.rand(3, h, w_, generator=g) * 255, "instances": inst})
    return inputs


# ---- building the configs ---------------------------------------------------------------------------
def _opts(changes):
    opts = []
    for key, value in changes.items():
        if value == "<full>" or value == "<partial>":
            value = _weights_file(value)
        opts += [key, value]
    return opts


def config(base, changes=None, context=()):
    path, base_opts = BASES[base]
    ctx = _opts(dict(zip(context[::2], context[1::2])))
    return make_cfg(path, *base_opts, *COMMON, *ctx, *_opts(changes or {}))


_WEIGHTS = {}


def _weights_file(kind):
    """A checkpoint of the conditional base model with other values (<full>), or with only its backbone
    (<partial>: fewer than half of the tensors, refused unless MODEL.WEIGHTS_ALLOW_PARTIAL)."""
    if kind not in _WEIGHTS:
        torch.manual_seed(123)
        state = build_model(config("conditional")).state_dict()
        if kind == "<partial>":
            state = {k: v for k, v in state.items() if k.startswith("backbone.")}
        path = os.path.join(WORK, f"weights_{kind.strip('<>')}.pth")
        torch.save({"model": state}, path)
        _WEIGHTS[kind] = path
    return _WEIGHTS[kind]


# ---- the probes: what a key is for, as comparable values ---------------------------------------------
def _checkpoint_counter():
    calls = [0]
    original = transformer.checkpoint

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    return calls, counting, original


def probe_model(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    out = {"params": {n: (tuple(p.shape), p.stride(), p.requires_grad, p.detach().clone())
                      for n, p in model.named_parameters()},
           "buffers": {n: b.clone() for n, b in model.named_buffers()}}
    out["deformable_attn_impl"] = [m.impl for m in model.modules() if isinstance(m, MSDeformAttn)]  # as configured
    calls, counting, original = _checkpoint_counter()
    transformer.checkpoint = counting
    decoder_calls = []
    hook = model.decoder.register_forward_pre_hook(lambda *_: decoder_calls.append(1))
    try:
        model.train()
        torch.manual_seed(1)
        with EventStorage():
            losses = model(model_inputs())
        out["losses"] = {k: v.detach() for k, v in losses.items()}
    finally:
        transformer.checkpoint = original
        hook.remove()
    out["recomputed"] = calls[0]
    out["decoder_calls"] = len(decoder_calls)
    # the matcher on a bigger seeded problem than the tiny batch (whose few boxes match alike under most costs)
    g = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(2, 40, model.num_classes, generator=g), torch.rand(2, 40, 4, generator=g) * 0.5 + 0.2
    targets = [dict(labels=torch.randint(0, model.num_classes, (8,), generator=g),
                    boxes=torch.rand(8, 4, generator=g) * 0.5 + 0.2) for _ in range(2)]
    out["matching"] = model.criterion.matcher(logits, boxes, targets)
    model.eval()
    with torch.no_grad():
        results = model([{"image": x["image"]} for x in model_inputs()])
    out["detections"] = [(r["instances"].pred_boxes.tensor, r["instances"].scores, r["instances"].pred_classes)
                         for r in results]
    return out


def probe_data(cfg):
    record = DatasetCatalog.get(TRAIN)[0]
    out = []
    for is_train, seeds in ((True, range(8)), (False, [0])):
        mapper = DetrDatasetMapper(cfg, is_train=is_train)
        for seed in seeds:
            np.random.seed(seed)
            x = mapper(copy.deepcopy(record))
            inst = x.get("instances")
            out.append((x["image"], None if inst is None else (inst.gt_boxes.tensor, inst.gt_classes)))
    return out


_MODELS = {}


def _solver_model(cfg):
    """One tiny model per architecture (solver keys do not change it)."""
    key = cfg.MODEL.META_ARCHITECTURE
    if key not in _MODELS:
        torch.manual_seed(0)
        _MODELS[key] = build_model(cfg)
    return _MODELS[key]


def probe_optimizer(cfg):
    model = _solver_model(cfg)
    names = {p: n for n, p in model.named_parameters()}
    optimizer = build_optimizer(cfg, model)
    groups = {names[p]: {k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups
              for p in g["params"]}
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) if p.requires_grad else None
    optimizer.step()
    stepped = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])
            p.grad = None
    return {"class": [c.__name__ for c in type(optimizer).__mro__], "groups": groups, "stepped": stepped}


def probe_schedule(cfg):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = Trainer.build_lr_scheduler(cfg, optimizer)
    iterations = sorted(set(range(0, 2000, 50)) | set(range(0, 400001, 500)))
    return [float(scheduler._multiplier(i / scheduler._max_iter)) for i in iterations if i < scheduler._max_iter]


def probe_loader(cfg):
    loader = build_resumable_train_loader(cfg, mapper=lambda record: record["image_id"])
    sampler = loader.batch_sampler
    sampler.set_start(0, 0)
    batches = [b for b, _ in zip(sampler, range(6))]
    return {"batches": batches, "num_workers": loader.num_workers, "batch_size": sampler.batch_size,
            "records": len(loader.dataset), "repeat": None if sampler.repeat_factors is None
            else sampler.repeat_factors.tolist()}


def _simple(obj):
    out = {}
    for k, v in vars(obj).items():
        if isinstance(v, (bool, int, float, str, type(None), torch.dtype)):
            out[k] = str(v) if isinstance(v, torch.dtype) else v
    return out


def probe_trainer(cfg):
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    try:
        trainer.resume_or_load(resume=False)
        loaded = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    except ConfigError as e:
        loaded = f"refused: {type(e).__name__}"
    except Exception as e:  # a checkpoint error (e.g. too partial a file) is a change too
        loaded = f"error: {type(e).__name__}"
    return {"hooks": [(type(h).__name__, _simple(h)) for h in trainer._hooks],
            "inner": (type(trainer._trainer).__name__, _simple(trainer._trainer),
                      getattr(trainer._trainer, "grad_scaler", None) is not None),
            "max_iter": trainer.max_iter, "seed": trainer.seed, "checkpointer": _simple(trainer.checkpointer),
            "save_dir": trainer.checkpointer.save_dir, "loaded": loaded}


def probe_eval(cfg):
    from detectron2.engine import defaults
    seen = []

    def fake_inference(model, loader, evaluator):
        seen.append((evaluator._metadata.name, len(loader.dataset), type(evaluator).__name__))
        return {"bbox": {"AP": 1.0}}

    original, defaults.inference_on_dataset = defaults.inference_on_dataset, fake_inference
    try:
        Trainer.test(cfg, _solver_model(cfg))
    finally:
        defaults.inference_on_dataset = original
    return seen


def probe_verify(cfg):
    try:
        return verify_results(cfg, {"bbox": {"AP": 50.0}})
    except SystemExit as e:
        return f"exit {e.code}"


def _train_net():
    spec = importlib.util.spec_from_file_location("ks_detr_train_net", os.path.join(REPO, "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def probe_setup(cfg):
    """train_net.py's setup of this config (loggers, seeds, cudnn.benchmark, the pixel limit, glibc's malloc)."""
    train_net = _train_net()
    path = os.path.join(WORK, "setup.yaml")  # default_setup logs the file's contents
    with open(path, "w") as f:
        f.write(cfg.dump())
    args = train_net.get_parser().parse_args(["--config-file", path])
    train_net.load_config = lambda *_: cfg.clone()
    benchmark, pixels = torch.backends.cudnn.benchmark, os.environ.get(MAX_PIXELS_ENV)
    try:
        train_net.setup(args)
        return {"cudnn.benchmark": torch.backends.cudnn.benchmark, "max_pixels": os.environ.get(MAX_PIXELS_ENV),
                "mallopt": keep_freed_cpu_memory(cfg)}
    finally:
        torch.backends.cudnn.benchmark = benchmark
        if pixels is None:
            os.environ.pop(MAX_PIXELS_ENV, None)
        else:
            os.environ[MAX_PIXELS_ENV] = pixels


PROBES = {"model": probe_model, "data": probe_data, "optimizer": probe_optimizer, "schedule": probe_schedule,
          "loader": probe_loader, "trainer": probe_trainer, "eval": probe_eval, "verify": probe_verify,
          "setup": probe_setup}


def same(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


_REFERENCES = {}


def reference(base, context, probe):
    key = (base, context, probe)
    if key not in _REFERENCES:
        _REFERENCES[key] = PROBES[probe](config(base, context=context))
    return _REFERENCES[key]


CASES = [(key, i) for key in WALK for i in range(len(WALK[key]))]


@pytest.mark.parametrize("key,i", CASES, ids=[f"{k}-{i}" for k, i in CASES])
def test_key_acts_or_is_refused(key, i):
    e = WALK[key][i]
    walked = list(e["changes"])[0]
    if e["probe"] == "refused":  # by load_config
        with pytest.raises(ConfigError) as err:
            config(e["base"], e["changes"], e["context"])
        assert walked in str(err.value), str(err.value)
        return
    if e["probe"] == "refused_build":  # by the model's constructor
        cfg = config(e["base"], e["changes"], e["context"])
        with pytest.raises(ConfigError) as err:
            build_model(cfg)
        assert walked in str(err.value), str(err.value)
        return
    before = reference(e["base"], e["context"], e["probe"])
    after = PROBES[e["probe"]](config(e["base"], e["changes"], e["context"]))
    assert not same(before, after), f"{e['changes']} changed nothing in the {e['probe']} of {e['base']}"


def test_every_key_is_walked_or_out_of_scope():
    keys = set(all_keys())
    missing = keys - walked_keys() - set(OUT_OF_SCOPE)
    assert not missing, f"walk these keys (or say why they are out of scope): {sorted(missing)}"
    stale = (walked_keys() | set(OUT_OF_SCOPE)) - keys
    assert not stale, f"no such keys: {sorted(stale)}"


@contextlib.contextmanager
def reads_of(cfg):
    """The set of full key names read (attribute access) from ``cfg`` and its clones while in the block."""
    def label(node, prefix):
        node.__dict__["_walk_path"] = prefix
        for k, v in node.items():
            if isinstance(v, CfgNode):
                label(v, f"{prefix}{k}.")

    label(cfg, "")
    reads, original = set(), CfgNode.__getattr__

    def traced(self, name):
        value = original(self, name)
        path = self.__dict__.get("_walk_path")
        if path is not None and not isinstance(value, CfgNode):
            reads.add(path + name)
        return value

    CfgNode.__getattr__ = traced
    try:
        yield reads
    finally:
        CfgNode.__getattr__ = original


def acting_keys():
    return {list(e["changes"])[0] for entries in WALK.values() for e in entries
            if e["probe"] not in ("refused", "refused_build")}


def test_every_key_read_is_walked():
    """Whatever every family's model (train and eval), the mappers, optimizer, scheduler and train loader, and
    (Conditional) the trainer, its evaluation and train_net's setup read from the config has a walk entry
    showing that it acts (or is out of scope with its reason)."""
    reads = set()
    for base in ("conditional", "ks_conditional", "dn_detr", "deformable", "ks_dn_deformable_two_stage", "dino",
                 "mobilenet"):
        cfg = config(base)
        with reads_of(cfg) as r:
            for probe in (probe_model, probe_data, probe_optimizer, probe_schedule, probe_loader):
                probe(cfg)
            if base == "conditional":
                for probe in (probe_trainer, probe_eval, probe_verify, probe_setup):
                    probe(cfg)
        reads |= r
    assert {"MODEL.DETR.HIDDEN_DIM", "SOLVER.BASE_LR", "INPUT.MIN_SIZE_TRAIN", "TEST.EVAL_PERIOD"} <= reads  # traced
    unwalked = reads - acting_keys() - set(OUT_OF_SCOPE) - set(READ_BUT_REFUSED)
    assert not unwalked, f"read but not shown to act: {sorted(unwalked)}"


# ---- the keys that were accepted and ignored before, checked for what they do --------------------------
def test_vertical_flip_is_detectron2s():
    """INPUT.RANDOM_FLIP vertical: each draw is the image or its rows reversed, with y -> H - y on the boxes,
    both occur, never a horizontal flip (detectron2's RandomFlip(horizontal=False, vertical=True))."""
    cfg = config("conditional", {"INPUT.RANDOM_FLIP": "vertical", "INPUT.CROP.ENABLED": False,
                                 "INPUT.MIN_SIZE_TRAIN": (48,), "INPUT.MAX_SIZE_TRAIN": 1000})
    record = DatasetCatalog.get(TRAIN)[0]
    plain = DetrDatasetMapper(config("conditional", {"INPUT.RANDOM_FLIP": "none", "INPUT.CROP.ENABLED": False,
                                                     "INPUT.MIN_SIZE_TRAIN": (48,)}))(copy.deepcopy(record))
    image, boxes = plain["image"], plain["instances"].gt_boxes.tensor
    H = image.shape[1]
    flipped_boxes = torch.stack([boxes[:, 0], H - boxes[:, 3], boxes[:, 2], H - boxes[:, 1]], 1)
    seen = set()
    mapper = DetrDatasetMapper(cfg)
    for seed in range(12):
        np.random.seed(seed)
        x = mapper(copy.deepcopy(record))
        flipped = torch.equal(x["image"], image.flip(1))
        assert flipped or torch.equal(x["image"], image)
        assert torch.allclose(x["instances"].gt_boxes.tensor, flipped_boxes if flipped else boxes)
        seen.add(flipped)
    assert seen == {True, False}


def test_bias_and_clipping_keys_as_detectron2():
    """SOLVER.BIAS_LR_FACTOR multiplies the lr of parameters named ``bias`` (with BACKBONE_MULTIPLIER on the
    trunk's), SOLVER.WEIGHT_DECAY_BIAS is their weight decay (also for a norm's bias, as detectron2's
    get_default_optimizer_params); full-model clipping takes the SOLVER.CLIP_GRADIENTS.NORM_TYPE norm."""
    model = torch.nn.Module()
    model.backbone, model.head, model.norm = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)
    cfg = get_cfg()
    add_ks_detr_config(cfg)
    cfg.merge_from_list(["SOLVER.OPTIMIZER", "SGD", "SOLVER.MOMENTUM", 0.0, "SOLVER.BASE_LR", 1.0,
                         "SOLVER.WEIGHT_DECAY", 0.1, "SOLVER.WEIGHT_DECAY_NORM", 0.01,
                         "SOLVER.BACKBONE_MULTIPLIER", 0.5,
                         "SOLVER.BIAS_LR_FACTOR", 2.0, "SOLVER.WEIGHT_DECAY_BIAS", 0.0,
                         "SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
                         "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 1.0, "SOLVER.CLIP_GRADIENTS.NORM_TYPE", float("inf")])
    optimizer = build_optimizer(cfg, model)
    names = {p: n for n, p in model.named_parameters()}
    groups = {names[p]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert groups == {"backbone.weight": (0.5, 0.1), "backbone.bias": (1.0, 0.0), "head.weight": (1.0, 0.1),
                      "head.bias": (2.0, 0.0), "norm.weight": (1.0, 0.01), "norm.bias": (2.0, 0.0)}
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0  # the step below is the clipped gradient alone
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    model.head.weight.grad[0, 0] = -6.0  # the largest: inf-norm 6 -> every gradient x 1/6 (an L2 norm would be ~13)
    optimizer.step()
    step = (before["head.weight"] - model.head.weight.detach()) / groups["head.weight"][0]
    assert torch.allclose(step, torch.tensor([[-1.0, 0.5], [0.5, 0.5]]))

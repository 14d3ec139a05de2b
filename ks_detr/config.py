"""Config keys of ks-detr: ``add_ks_detr_config(cfg)`` and ``check_ks_detr_config(cfg)``."""
import os

import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.modeling import META_ARCH_REGISTRY

from .data.images import DEFAULT_MAX_IMAGE_PIXELS
from .errors import ConfigError
from .modeling.ks import STREAMS
from .modeling.layers.deformable_attention import IMPLS as DEFORMABLE_ATTN_IMPLS

KS_MODES = tuple(STREAMS)  # the modes are the keys of the stream table (ks_detr/modeling/ks)
MASK_SAMPLINGS = ("bilinear", "area")
TEACHER_PROPOSALS = ("own", "student")
OPTIMIZERS = ("ADAMW", "SGD")
CLIP_TYPES = ("full_model", "value", "norm")
AMP_DTYPES = ("", "bfloat16", "float16")
ACTIVATIONS = ("relu", "prelu", "gelu")
FLIPS = ("horizontal", "vertical", "none")  # INPUT.RANDOM_FLIP, as detectron2


def add_ks_detr_config(cfg):
    """Add the DETR core (``MODEL.DETR``), the KS block (``MODEL.KS``) and solver keys to ``cfg``."""
    cfg.MODEL.DETR = CN()
    _C = cfg.MODEL.DETR
    _C.NUM_CLASSES = 80  # foreground classes (sigmoid focal head, no "no-object" row)
    _C.IN_FEATURES = ["res5"]  # backbone feature maps fed to the transformer (one per level)
    _C.NUM_FEATURE_LEVELS = 1  # levels; more than IN_FEATURES adds stride-2 convs (Deformable)
    _C.DEFORMABLE_POINTS = 4  # sampling points per head and level (Deformable family)
    # how multi-scale deformable attention samples (Deformable families and their KS triple attention):
    # auto (Triton kernels, forward and backward, on CUDA, once they match the PyTorch path on a small problem of the
    # same shape, checked at the first call; PyTorch elsewhere, while tracing/exporting/compiling, or after a failed
    # check, which is logged) | pytorch (grid_sample, the reference) | triton (CUDA tensors, no check; on CPU only
    # under TRITON_INTERPRET=1, set before Python starts)
    _C.DEFORMABLE_ATTN_IMPL = "auto"
    _C.POS_OFFSET = 0.0  # offset of the normalised sine position cumsum (Deformable: -0.5)
    _C.HIDDEN_DIM = 256  # transformer width C
    _C.NHEADS = 8  # attention heads
    _C.ENC_LAYERS = 6  # encoder layers
    _C.DEC_LAYERS = 6  # decoder layers
    _C.DIM_FEEDFORWARD = 2048  # FFN hidden width
    _C.DROPOUT = 0.1  # dropout in attention weights, FFN and residual branches
    _C.ACTIVATION = "relu"  # FFN activation: relu | prelu | gelu
    _C.NUM_QUERIES = 300  # object queries
    _C.NUM_TOPK_TEST = 300  # boxes kept per image at inference (top-k over queries x classes)
    _C.POS_TEMPERATURE = 10000  # temperature of the sine position embeddings
    _C.CLASS_WEIGHT = 2.0  # focal classification loss weight
    _C.BBOX_WEIGHT = 5.0  # L1 box loss weight
    _C.GIOU_WEIGHT = 2.0  # GIoU loss weight
    _C.COST_CLASS = 2.0  # Hungarian matcher: classification cost weight
    _C.COST_BBOX = 5.0  # Hungarian matcher: L1 cost weight
    _C.COST_GIOU = 2.0  # Hungarian matcher: GIoU cost weight
    _C.FOCAL_ALPHA = 0.25  # focal loss alpha (loss and matcher)
    _C.FOCAL_GAMMA = 2.0  # focal loss gamma (loss and matcher)
    _C.AUX_LOSS = True  # loss on every decoder layer, not only the last
    # official numerics: ours by default; ks_detr.config.official_numerics gives the reference code's values per family

    _C.DECODER_PADDING_MASK = True  # decoder cross-attention ignores padded memory tokens (official C/DAB/DN: False)
    _C.EVAL_PAD_LAST_PIXEL = False  # eval: last row and column of each image count as padding (official: True)
    _C.BOX_LOGIT_EPS = 1e-5  # clamp of inverse_sigmoid on boxes/anchors (official KS-DETR and detrex code, DINO: 1e-3)
    _C.GIOU_EPS = 0.0  # added to GIoU's union and enclosing area, loss and matcher (official and detrex code: 1e-6)
    # backbone weights and input in channels-last memory format: faster convolutions (oneDNN on CPU,
    # cuDNN); only the summation order of the convolutions changes. The MobileNet-V2 backbone
    # (ks_detr/modeling/backbone.py) is channels-last either way, also under detectron2's detectors
    _C.CHANNELS_LAST = True
    # Deformable DETR: one class/box head per decoder layer, each layer refines the reference points (the
    # original's and transformers' with_box_refine); the DN-Deformable family and DINO always refine
    _C.BOX_REFINE = False
    # anchors = top-k encoder proposals (query selection), with their own loss: DN-Deformable, DINO (required),
    # Deformable DETR (with BOX_REFINE; class-agnostic proposals give the queries' position and content)
    _C.TWO_STAGE = False
    _C.DN = CN()  # denoising queries (DN-DETR, DN-Deformable DETR, DINO)
    _C.DN.GROUPS = 5  # noised copies of every GT box per image (0 = off)
    _C.DN.LABEL_NOISE = 0.2  # probability of flipping a denoising query's label
    # box noise scale (DN: centre by up to scale*wh/2, size by up to scale*wh; DINO: each corner by up to
    # scale*(w/2 or h/2) for positives, between 1x and 2x that for negatives)
    _C.DN.BOX_NOISE = 0.4
    # > 0: groups per batch = NUM_QUERIES // (max GT boxes per image), at least 1, instead of GROUPS (DINO's dn_number)
    _C.DN.NUM_QUERIES = 0

    cfg.MODEL.KS = CN()
    _K = cfg.MODEL.KS
    # knowledge-sharing teachers in training (inference is always the student): True | False | None (unset:
    # off, except that the KS* names of META_ARCHITECTURE turn it on; KS* with False is an error)
    _K.ENABLED = None
    _K.MODE = "triple"  # triple | share_v (teacher weights only) | share_a (teacher values only)
    _K.ENCODER_LAYERS = [-1]  # encoder layers with triple attention (python indices, -1 = last)
    _K.TEACHER_DECODER_LAYERS = 1  # last N decoder layers of each teacher pass that get a loss
    _K.TEACHER_LOSS_WEIGHT = 1.0  # multiplier of the teacher outputs' losses (official: 1.0)
    # with MODEL.DETR.TWO_STAGE: "own" (each teacher stream selects the top-k proposals of its own memory,
    # and each stream's proposals get the _enc loss) | "student" (the teachers decode the student's selected
    # anchors, as the official code gives every pass identical decoder inputs; only the student's proposals get
    # the _enc loss)
    _K.TEACHER_PROPOSALS = "own"
    # recompute every decoder layer in the backward instead of keeping its activations (activation
    # checkpointing of the stacked student + teacher passes): less peak memory for more time (docs/benchmarks.md)
    _K.RECOMPUTE_DECODER = False
    # the same for the KS encoder layers, in two pieces (attention; norms and FFN) so that their three
    # streams' activations are never all held at once
    _K.RECOMPUTE_KS_LAYERS = False
    # decode and score each teacher stream in its own pass whose backward runs at once, inside the forward, so
    # that its decoder activations are freed before the next pass: the same gradients and FLOPs, peak memory
    # near the baseline's, more (smaller) kernel launches than the one stacked pass (docs/benchmarks.md)
    _K.EARLY_TEACHER_BACKWARD = False
    _K.MASK = CN()
    _K.MASK.PAD_PIXELS = 0  # grow every GT box by this many input pixels per side
    _K.MASK.SAMPLING = "bilinear"  # bilinear (official, align_corners) | area (any overlap)

    # load MODEL.WEIGHTS even if it fills fewer than half of the model's tensors or of those outside the backbone
    # (ks_detr.checkpoint.MIN_MATCH; backbone-only files and KS <-> baseline checkpoints load without it)
    cfg.MODEL.WEIGHTS_ALLOW_PARTIAL = False

    cfg.MODEL.MOBILENET_V2 = CN()  # MODEL.BACKBONE.NAME: "build_mobilenet_v2_backbone"
    cfg.MODEL.MOBILENET_V2.OUT_FEATURES = ["res5"]  # stages to output: stem, res2..res5 (strides 2..32)
    cfg.MODEL.MOBILENET_V2.PRETRAINED = True  # torchvision ImageNet weights (requirements-weights.txt)

    # DETR augmentation: with probability 0.5, resize to one of these shortest edges and crop
    # (INPUT.CROP.*) before the usual multi-scale resize.
    cfg.INPUT.CROP.PRE_RESIZE_SIZES = [400, 500, 600]
    # largest image (width x height) that training, the data check and the demo decode (0 = no limit): the guard
    # against decompression bombs; the default is where Pillow itself refuses an image
    cfg.INPUT.MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS

    # CPU training (MODEL.DEVICE "cpu") on glibc: keep freed memory in the heap for reuse instead of returning
    # it to the kernel (mallopt), so a step does not page-fault in again what the last one freed (docs/benchmarks.md)
    cfg.CPU_KEEP_FREED_MEMORY = True

    cfg.SOLVER.AMP.DTYPE = ""  # with SOLVER.AMP.ENABLED: bfloat16 | float16 ("" = bfloat16 on CPU, float16 on CUDA)
    cfg.SOLVER.OPTIMIZER = "ADAMW"  # ADAMW | SGD
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1  # lr factor of parameters under "backbone."
    # SOLVER.CLIP_GRADIENTS.CLIP_TYPE may also be "full_model": one norm (NORM_TYPE) over all parameters together.
    # SOLVER.BIAS_LR_FACTOR and WEIGHT_DECAY_BIAS apply to parameters named "bias" (ks_detr/solver.py).


def official_numerics(arch, source="ks-detr"):
    """``[KEY, VALUE, ...]`` making a model of META_ARCHITECTURE ``arch`` compute what the ``source`` code computes
    (``tools/convert_checkpoint.py`` prints them): the official KS-DETR code (df0f2f6) clamps box logits at 1e-3
    and adds 1e-6 in GIoU in every family, masks each image's last row and column in eval, and its
    Conditional/DAB/DN decoders attend to padded tokens; detrex (e244e6c) shares the first two and the
    decoders (its eval uses no padding mask: batch 1)."""
    family = arch.removeprefix("KS")
    opts = ["MODEL.DETR.BOX_LOGIT_EPS", 1e-3, "MODEL.DETR.GIOU_EPS", 1e-6]
    if family in ("ConditionalDETR", "DABDETR", "DNDETR"):
        opts += ["MODEL.DETR.DECODER_PADDING_MASK", False]
    if source == "ks-detr":
        opts += ["MODEL.DETR.EVAL_PAD_LAST_PIXEL", True]
    return opts


def amp_dtype_name(cfg):
    """The autocast dtype's name of ``SOLVER.AMP.DTYPE`` ("" = bfloat16 on CPU, float16 on CUDA)."""
    return cfg.SOLVER.AMP.DTYPE or ("float16" if cfg.MODEL.DEVICE.startswith("cuda") else "bfloat16")


def _fail(key, value, why):
    raise ConfigError(f"Invalid config {key}={value!r}: {why}")


def check_ks_detr_config(cfg):
    """Raise ``ValueError`` naming the key and value of any invalid or contradictory setting."""
    d, ks = cfg.MODEL.DETR, cfg.MODEL.KS
    for key in ("NUM_CLASSES", "HIDDEN_DIM", "NHEADS", "ENC_LAYERS", "DEC_LAYERS", "NUM_QUERIES"):
        if int(d[key]) < 1:
            _fail(f"MODEL.DETR.{key}", d[key], "must be >= 1")
    if d.NUM_FEATURE_LEVELS < len(d.IN_FEATURES) or not d.IN_FEATURES:
        _fail("MODEL.DETR.NUM_FEATURE_LEVELS", d.NUM_FEATURE_LEVELS,
              f"needs at least one level per MODEL.DETR.IN_FEATURES={list(d.IN_FEATURES)}")
    if d.DEFORMABLE_POINTS < 1:
        _fail("MODEL.DETR.DEFORMABLE_POINTS", d.DEFORMABLE_POINTS, "must be >= 1")
    if d.DEFORMABLE_ATTN_IMPL not in DEFORMABLE_ATTN_IMPLS:
        _fail("MODEL.DETR.DEFORMABLE_ATTN_IMPL", d.DEFORMABLE_ATTN_IMPL, f"choose one of {DEFORMABLE_ATTN_IMPLS}")
    if cfg.MODEL.BACKBONE.NAME == "build_mobilenet_v2_backbone" and not 0 <= cfg.MODEL.BACKBONE.FREEZE_AT <= 5:
        _fail("MODEL.BACKBONE.FREEZE_AT", cfg.MODEL.BACKBONE.FREEZE_AT, "MobileNet-V2 has 5 stages: use 0..5")
    if d.HIDDEN_DIM % d.NHEADS:
        _fail("MODEL.DETR.HIDDEN_DIM", d.HIDDEN_DIM, f"must be divisible by NHEADS={d.NHEADS}")
    if d.HIDDEN_DIM % 2:
        _fail("MODEL.DETR.HIDDEN_DIM", d.HIDDEN_DIM, "must be even (sine position embedding)")
    if not 0.0 <= d.DROPOUT < 1.0:
        _fail("MODEL.DETR.DROPOUT", d.DROPOUT, "must be in [0, 1)")
    if d.ACTIVATION not in ACTIVATIONS:
        _fail("MODEL.DETR.ACTIVATION", d.ACTIVATION, f"choose one of {ACTIVATIONS}")
    if not 0.0 < d.BOX_LOGIT_EPS < 0.5:
        _fail("MODEL.DETR.BOX_LOGIT_EPS", d.BOX_LOGIT_EPS, "must be in (0, 0.5)")
    if d.GIOU_EPS < 0:
        _fail("MODEL.DETR.GIOU_EPS", d.GIOU_EPS, "must be >= 0")
    if d.NUM_TOPK_TEST < 1:
        _fail("MODEL.DETR.NUM_TOPK_TEST", d.NUM_TOPK_TEST, "must be >= 1")
    if d.DN.GROUPS < 0:
        _fail("MODEL.DETR.DN.GROUPS", d.DN.GROUPS, "must be >= 0")
    if d.DN.NUM_QUERIES < 0:
        _fail("MODEL.DETR.DN.NUM_QUERIES", d.DN.NUM_QUERIES, "must be >= 0")
    for key in ("LABEL_NOISE", "BOX_NOISE"):
        if not 0.0 <= d.DN[key] <= 1.0:
            _fail(f"MODEL.DETR.DN.{key}", d.DN[key], "must be in [0, 1]")
    if ks.ENABLED not in (None, True, False):
        _fail("MODEL.KS.ENABLED", ks.ENABLED, "must be True, False or None (unset)")
    if ks.MODE not in KS_MODES:
        _fail("MODEL.KS.MODE", ks.MODE, f"choose one of {KS_MODES}")
    if not ks.ENCODER_LAYERS:
        _fail("MODEL.KS.ENCODER_LAYERS", ks.ENCODER_LAYERS, "needs at least one layer index")
    for i in ks.ENCODER_LAYERS:
        if not -d.ENC_LAYERS <= i < d.ENC_LAYERS:
            _fail("MODEL.KS.ENCODER_LAYERS", ks.ENCODER_LAYERS,
                  f"index {i} out of range for MODEL.DETR.ENC_LAYERS={d.ENC_LAYERS}")
    if len({i % d.ENC_LAYERS for i in ks.ENCODER_LAYERS}) != len(ks.ENCODER_LAYERS):
        _fail("MODEL.KS.ENCODER_LAYERS", ks.ENCODER_LAYERS, "names a layer twice")
    if not 1 <= ks.TEACHER_DECODER_LAYERS <= d.DEC_LAYERS:
        _fail("MODEL.KS.TEACHER_DECODER_LAYERS", ks.TEACHER_DECODER_LAYERS,
              f"must be in [1, MODEL.DETR.DEC_LAYERS={d.DEC_LAYERS}]")
    if ks.TEACHER_DECODER_LAYERS > 1 and not d.AUX_LOSS:
        _fail("MODEL.KS.TEACHER_DECODER_LAYERS", ks.TEACHER_DECODER_LAYERS,
              "more than one teacher layer needs MODEL.DETR.AUX_LOSS=True")
    if ks.TEACHER_LOSS_WEIGHT < 0:
        _fail("MODEL.KS.TEACHER_LOSS_WEIGHT", ks.TEACHER_LOSS_WEIGHT, "must be >= 0")
    if ks.TEACHER_PROPOSALS not in TEACHER_PROPOSALS:
        _fail("MODEL.KS.TEACHER_PROPOSALS", ks.TEACHER_PROPOSALS, f"choose one of {TEACHER_PROPOSALS}")
    if ks.MASK.PAD_PIXELS < 0:
        _fail("MODEL.KS.MASK.PAD_PIXELS", ks.MASK.PAD_PIXELS, "must be >= 0")
    if ks.MASK.SAMPLING not in MASK_SAMPLINGS:
        _fail("MODEL.KS.MASK.SAMPLING", ks.MASK.SAMPLING, f"choose one of {MASK_SAMPLINGS}")
    if cfg.SOLVER.OPTIMIZER.upper() not in OPTIMIZERS:
        _fail("SOLVER.OPTIMIZER", cfg.SOLVER.OPTIMIZER, f"choose one of {OPTIMIZERS}")
    if cfg.SOLVER.BACKBONE_MULTIPLIER < 0:
        _fail("SOLVER.BACKBONE_MULTIPLIER", cfg.SOLVER.BACKBONE_MULTIPLIER, "must be >= 0")
    if cfg.SOLVER.AMP.DTYPE not in AMP_DTYPES:
        _fail("SOLVER.AMP.DTYPE", cfg.SOLVER.AMP.DTYPE, f"choose one of {AMP_DTYPES}")
    if ks.EARLY_TEACHER_BACKWARD and cfg.SOLVER.AMP.ENABLED and amp_dtype_name(cfg) == "float16":
        _fail("MODEL.KS.EARLY_TEACHER_BACKWARD", ks.EARLY_TEACHER_BACKWARD,
              f"the teachers' gradients are taken in the forward, before the float16 gradient scaler scales them "
              f"(SOLVER.AMP.DTYPE={cfg.SOLVER.AMP.DTYPE!r} is float16 on {cfg.MODEL.DEVICE}); set SOLVER.AMP.DTYPE "
              "bfloat16 or turn the key off")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE not in CLIP_TYPES:
        _fail("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", clip.CLIP_TYPE, f"choose one of {CLIP_TYPES}")
    if cfg.TEST.AUG.ENABLED:
        _fail("TEST.AUG.ENABLED", cfg.TEST.AUG.ENABLED, "test-time augmentation is not supported")
    if cfg.MODEL.MASK_ON:
        _fail("MODEL.MASK_ON", cfg.MODEL.MASK_ON, "ks-detr models predict boxes only")
    if cfg.INPUT.RANDOM_FLIP not in FLIPS:
        _fail("INPUT.RANDOM_FLIP", cfg.INPUT.RANDOM_FLIP, f"choose one of {FLIPS}")
    check_keys_act(cfg)


# detectron2's keys of its own detectors' heads, proposals and other tasks: no DETR family reads them
D2_DETECTOR_KEYS = ("MODEL.PROPOSAL_GENERATOR.", "MODEL.ANCHOR_GENERATOR.", "MODEL.RPN.",
                    "MODEL.ROI_HEADS.", "MODEL.ROI_BOX_HEAD.", "MODEL.ROI_BOX_CASCADE_HEAD.", "MODEL.ROI_MASK_HEAD.",
                    "MODEL.ROI_KEYPOINT_HEAD.", "MODEL.SEM_SEG_HEAD.", "MODEL.PANOPTIC_FPN.", "MODEL.RETINANET.",
                    "MODEL.KEYPOINT_ON", "TEST.KEYPOINT_OKS_SIGMAS", "INPUT.MASK_FORMAT", "VIS_PERIOD")
_DEFAULTS = {}


def _flat(node, prefix=""):
    out = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _changed(cfg):
    """{key: value} of ``cfg``'s keys that differ from detectron2's + ks-detr's defaults."""
    if not _DEFAULTS:
        defaults = get_cfg()
        add_ks_detr_config(defaults)
        _DEFAULTS.update(_flat(defaults))
    return {k: v for k, v in _flat(cfg).items() if k in _DEFAULTS and v != _DEFAULTS[k]}


def check_keys_act(cfg):
    """Refuse, naming the key, what the model of ``MODEL.META_ARCHITECTURE`` would silently ignore (what it
    cannot do at all, e.g. ``MODEL.DETR.TWO_STAGE`` where query selection is not implemented, the model's
    constructor refuses).

    Keys under an on/off switch that a config may flip alone (``INPUT.CROP.*``, ``SOLVER.CLIP_GRADIENTS.*``,
    ``SOLVER.AMP.DTYPE``, the denoising noise under ``DN.GROUPS``/``DN.NUM_QUERIES`` 0, the lr schedulers' own
    keys) are accepted while their switch is off, as in detectron2; ``MODEL.KS.*`` is not (KS configs are
    separate files, and a KS key on a baseline is a forgotten switch)."""
    from .modeling.deformable_detr import DeformableDETR
    from .modeling.detr import DETRBase
    from .modeling.dn_deformable_detr import DNDeformableDETR
    from .modeling.dn_detr import DNDETR

    name = cfg.MODEL.META_ARCHITECTURE
    try:
        arch = META_ARCH_REGISTRY.get(name)
    except KeyError:
        return  # build_model names it
    changed = _changed(cfg)
    for key, value in changed.items():
        if key == "MODEL.LOAD_PROPOSALS" or key.startswith(("DATASETS.PROPOSAL_FILES_", "DATASETS.PRECOMPUTED_")):
            _fail(key, value, "the ks-detr data loader does not load precomputed proposals")
        if key.startswith("TEST.AUG."):
            _fail(key, value, "test-time augmentation is not supported")
    if cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE != _DEFAULTS["MODEL.RESNETS.DEFORM_ON_PER_STAGE"] and not _has_d2_ops():
        _fail("MODEL.RESNETS.DEFORM_ON_PER_STAGE", cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE,
              "deformable convolutions need detectron2's compiled ops (detectron2._C), which this install lacks")
    if not issubclass(arch, DETRBase):
        for key, value in changed.items():
            if key.startswith(("MODEL.DETR.", "MODEL.KS.")):
                _fail(key, value, f"configures the DETR families; MODEL.META_ARCHITECTURE={name} does not read it")
        return
    for key, value in changed.items():
        if key.startswith(D2_DETECTOR_KEYS) or (key.startswith("MODEL.FPN.") and "fpn" not in cfg.MODEL.BACKBONE.NAME):
            _fail(key, value, f"read by detectron2's own detectors (R-CNN, RetinaNet, segmentation, keypoints) or "
                              f"FPN backbones only; MODEL.META_ARCHITECTURE={name} with MODEL.BACKBONE.NAME="
                              f"{cfg.MODEL.BACKBONE.NAME} does not read it")
    d, ks = cfg.MODEL.DETR, cfg.MODEL.KS
    ks_on = ks.ENABLED or (ks.ENABLED is None and arch.FORCES_KS)
    if not ks_on:
        for key, value in changed.items():
            if key.startswith("MODEL.KS.") and key != "MODEL.KS.ENABLED":
                _fail(key, value, f"knowledge sharing is off (MODEL.KS.ENABLED={ks.ENABLED}, "
                                  f"MODEL.META_ARCHITECTURE={name}): set MODEL.KS.ENABLED True or leave MODEL.KS.* "
                                  "at their defaults")
    if "MODEL.KS.TEACHER_PROPOSALS" in changed and not d.TWO_STAGE:
        _fail("MODEL.KS.TEACHER_PROPOSALS", ks.TEACHER_PROPOSALS,
              "chooses the teachers' anchors among selected proposals: needs MODEL.DETR.TWO_STAGE True")
    if not issubclass(arch, (DNDETR, DNDeformableDETR)):
        for key, value in changed.items():
            if key.startswith("MODEL.DETR.DN."):
                _fail(key, value, f"MODEL.META_ARCHITECTURE={name} has no denoising queries (DN-DETR, "
                                  "DN-Deformable DETR and DINO have)")
    elif d.DN.NUM_QUERIES and "MODEL.DETR.DN.GROUPS" in changed:
        _fail("MODEL.DETR.DN.GROUPS", d.DN.GROUPS,
              f"not read while MODEL.DETR.DN.NUM_QUERIES={d.DN.NUM_QUERIES} > 0 sets the groups (NUM_QUERIES // "
              "most boxes per image); no denoising: set both 0")
    if "MODEL.DETR.BOX_REFINE" in changed and (not issubclass(arch, DeformableDETR)
                                               or issubclass(arch, DNDeformableDETR)):
        _fail("MODEL.DETR.BOX_REFINE", d.BOX_REFINE,
              f"read by Deformable DETR only (MODEL.META_ARCHITECTURE={name}: the DN-Deformable family and DINO "
              "always refine their boxes, the other families never)")
    if not issubclass(arch, DeformableDETR):
        for key in ("MODEL.DETR.NUM_FEATURE_LEVELS", "MODEL.DETR.DEFORMABLE_POINTS", "MODEL.DETR.DEFORMABLE_ATTN_IMPL"):
            if key in changed:
                _fail(key, changed[key], f"MODEL.META_ARCHITECTURE={name} attends to one feature map with plain "
                                         "attention (the Deformable families are multi-scale)")
    out = _backbone_out_features(cfg)
    unused = [f for f in out if f not in d.IN_FEATURES]
    if unused and set(d.IN_FEATURES) <= set(out):  # (an IN_FEATURE the backbone lacks: build_model names it)
        key = "MODEL.MOBILENET_V2.OUT_FEATURES" if "mobilenet_v2" in cfg.MODEL.BACKBONE.NAME else \
            "MODEL.RESNETS.OUT_FEATURES"
        _fail(key, list(out), f"{unused} not in MODEL.DETR.IN_FEATURES={list(d.IN_FEATURES)}: computed and never used")
    if "TEST.DETECTIONS_PER_IMAGE" in changed:
        _fail("TEST.DETECTIONS_PER_IMAGE", cfg.TEST.DETECTIONS_PER_IMAGE,
              f"the DETR families keep MODEL.DETR.NUM_TOPK_TEST={d.NUM_TOPK_TEST} detections per image (top-k over "
              "queries x classes): set that")
    if cfg.SOLVER.OPTIMIZER.upper() == "ADAMW":
        for key in ("SOLVER.MOMENTUM", "SOLVER.NESTEROV"):
            if key in changed:
                _fail(key, changed[key], "read by SOLVER.OPTIMIZER SGD only (ADAMW: betas (0.9, 0.999))")
    if "mobilenet_v2" not in cfg.MODEL.BACKBONE.NAME:  # (MODEL.RESNETS.* with MobileNet-V2: set by Base-DETR.yaml)
        for key, value in changed.items():
            if key.startswith("MODEL.MOBILENET_V2."):
                _fail(key, value, f"MODEL.BACKBONE.NAME={cfg.MODEL.BACKBONE.NAME} is not a MobileNet-V2 backbone")


def _backbone_out_features(cfg):
    name = cfg.MODEL.BACKBONE.NAME
    if name == "build_resnet_backbone":
        return cfg.MODEL.RESNETS.OUT_FEATURES
    if name == "build_mobilenet_v2_backbone":
        return cfg.MODEL.MOBILENET_V2.OUT_FEATURES
    return []  # other backbones: build_model checks MODEL.DETR.IN_FEATURES against what they give


def _has_d2_ops():
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def load_config(config_file, opts=()):
    """detectron2 config with our keys, ``config_file`` and ``KEY VALUE`` overrides merged and checked."""
    cfg = get_cfg()
    add_ks_detr_config(cfg)
    if not os.path.isfile(config_file):
        raise ConfigError(f"config file {config_file} does not exist (the shipped ones are under configs/)")
    try:
        cfg.merge_from_file(config_file)
    except (KeyError, ValueError, AssertionError, yaml.YAMLError) as e:  # yacs: unknown key, type mismatch
        raise ConfigError(f"{config_file}: {str(e).strip(chr(39))}") from e
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError, SyntaxError) as e:
        raise ConfigError(f"command-line override: {str(e).strip(chr(39))}") from e  # yacs names the key
    check_ks_detr_config(cfg)
    return cfg


def student_config(cfg):
    """A copy of ``cfg`` that builds the plain student (the baseline detector): ``MODEL.KS.ENABLED``
    False and a ``KS*`` meta-architecture name replaced by its family's."""
    cfg = cfg.clone()
    cfg.defrost()
    arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    if getattr(arch, "FORCES_KS", False):
        cfg.MODEL.META_ARCHITECTURE = arch.__mro__[1].__name__
    cfg.MODEL.KS.ENABLED = False
    return cfg

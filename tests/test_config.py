"""Shipped YAMLs load and build; invalid keys and values fail naming the key and the value."""
import glob
import os
import subprocess
import sys

import pytest
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from conftest import REPO, make_cfg
from ks_detr import add_ks_detr_config, check_ks_detr_config

CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"),
                                                               recursive=True))


def flat(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        out.update(flat(v, prefix + k + ".") if isinstance(v, dict) else {prefix + k: v})
    return out


@pytest.mark.parametrize("config", [c for c in CONFIGS if not os.path.basename(c).startswith("Base-")])
def test_every_shipped_yaml_loads_and_builds(config):
    detectron2_detector = os.path.basename(config).startswith(("faster_rcnn", "retinanet"))  # MODEL.DETR refused
    model = build_model(make_cfg(config, *(() if detectron2_detector else ("MODEL.DETR.NUM_QUERIES", 10))))
    assert getattr(model, "ks_enabled", False) == os.path.basename(config).startswith("ks_")  # False: detectron2 detectors
    quickstart = config.startswith(os.path.join("configs", "quickstart"))
    assert sum(p.numel() for p in model.parameters()) > (1e6 if quickstart else 20e6)  # MobileNet vs ResNet


def test_ks_config_differs_from_its_baseline_only_by_ks_keys():
    for ks in (c for c in CONFIGS if os.path.basename(c).startswith("ks_")):
        base = ks.replace("ks_", "", 1)
        a, b = flat(make_cfg(ks)), flat(make_cfg(base))
        allowed = {k for k in a if k.startswith("MODEL.KS.")} | {"OUTPUT_DIR"}
        assert {k for k in a if a[k] != b[k]} <= allowed, ks
        assert a["MODEL.KS.ENABLED"] and not b["MODEL.KS.ENABLED"]


def test_ks_meta_arch_name_turns_teachers_on():
    cfg = make_cfg("configs/conditional_detr_r50.yaml", "MODEL.META_ARCHITECTURE", "KSConditionalDETR",
                   "MODEL.DETR.NUM_QUERIES", 10)
    model = build_model(cfg)
    assert cfg.MODEL.KS.ENABLED is None and model.ks_enabled and hasattr(model, "ks_smlp")


def test_ks_meta_arch_name_with_ks_disabled_is_a_contradiction():
    """One switch: a KS* name with MODEL.KS.ENABLED False is an error naming both, not silently KS."""
    cfg = make_cfg("configs/conditional_detr_r50.yaml", "MODEL.META_ARCHITECTURE", "KSConditionalDETR",
                   "MODEL.KS.ENABLED", False, "MODEL.DETR.NUM_QUERIES", 10)
    with pytest.raises(ValueError, match="MODEL.KS.ENABLED=False: MODEL.META_ARCHITECTURE=KSConditionalDETR .* "
                                         "use ConditionalDETR"):
        build_model(cfg)


@pytest.mark.parametrize("arch", ["KSConditionalDETR", "KSDABDETR", "KSDNDETR", "KSDeformableDETR",
                                  "KSDNDeformableDETR", "DABDETR"])
def test_student_config_builds_the_baseline(arch):
    from ks_detr.config import student_config

    cfg = make_cfg("configs/conditional_detr_r50.yaml", "MODEL.META_ARCHITECTURE", arch, "MODEL.KS.ENABLED", True)
    student = student_config(cfg)
    assert student.MODEL.META_ARCHITECTURE == arch.removeprefix("KS") and student.MODEL.KS.ENABLED is False
    assert cfg.MODEL.META_ARCHITECTURE == arch and cfg.MODEL.KS.ENABLED  # the original is left alone


def test_unknown_key_is_rejected_with_its_name(tmp_path):
    cfg = get_cfg()
    add_ks_detr_config(cfg)
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.KS.TEACHERS"):
        cfg.merge_from_list(["MODEL.KS.TEACHERS", 2])  # command-line overrides
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_BASE_: {REPO}/configs/ks_conditional_detr_r50.yaml\nMODEL:\n  KS:\n    TEACHERS: 2\n")
    with pytest.raises(KeyError, match="MODEL.KS.TEACHERS"):
        cfg.merge_from_file(str(bad))


@pytest.mark.parametrize("key,value", [
    ("MODEL.KS.MODE", "quad"),
    ("MODEL.KS.ENCODER_LAYERS", [6]),
    ("MODEL.KS.ENCODER_LAYERS", [5, -1]),
    ("MODEL.KS.ENCODER_LAYERS", []),
    ("MODEL.KS.TEACHER_DECODER_LAYERS", 7),
    ("MODEL.KS.TEACHER_LOSS_WEIGHT", -1.0),
    ("MODEL.KS.MASK.SAMPLING", "nearest"),
    ("MODEL.KS.MASK.PAD_PIXELS", -2),
    ("MODEL.DETR.HIDDEN_DIM", 250),
    ("MODEL.DETR.NUM_QUERIES", 0),
    ("MODEL.DETR.ACTIVATION", "tanh"),
    ("MODEL.DETR.DROPOUT", 1.5),
    ("SOLVER.OPTIMIZER", "LAMB"),
    ("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full"),
    ("MODEL.MASK_ON", True),
    ("MODEL.DETR.DEFORMABLE_POINTS", 0),
    ("MODEL.DETR.DN.BOX_NOISE", 1.5),
    ("MODEL.DETR.DN.NUM_QUERIES", -1),
])
def test_invalid_values_name_key_and_value(key, value):
    cfg = make_cfg("configs/ks_conditional_detr_r50.yaml")
    cfg.merge_from_list([key, value])
    with pytest.raises(ValueError) as e:
        check_ks_detr_config(cfg)
    assert key in str(e.value) and repr(value) in str(e.value)


def test_bad_in_feature_is_named():
    cfg = make_cfg("configs/conditional_detr_r50.yaml", "MODEL.DETR.IN_FEATURES", ["res4"])
    with pytest.raises(ValueError, match=r"MODEL.DETR.IN_FEATURES=\['res4'\]"):
        build_model(cfg)


def test_mobilenet_freeze_at_out_of_range_is_named():
    cfg = make_cfg("configs/conditional_detr_r50.yaml", "MODEL.BACKBONE.NAME", "build_mobilenet_v2_backbone")
    cfg.merge_from_list(["MODEL.BACKBONE.FREEZE_AT", 6])
    with pytest.raises(ValueError, match="MODEL.BACKBONE.FREEZE_AT=6"):
        check_ks_detr_config(cfg)


@pytest.mark.parametrize("args,last", [
    (["--config-file", "configs/nope.yaml"], "error: config file configs/nope.yaml does not exist"),
    (["--config-file", "configs/quickstart/ks_trees.yaml", "MODEL.KS.TEACHERS", "2"],
     "error: command-line override: Non-existent key: MODEL.KS.TEACHERS"),
    (["--config-file", "configs/quickstart/ks_trees.yaml", "MODEL.KS.MODE", "quad"],
     "error: Invalid config MODEL.KS.MODE='quad': choose one of ('triple', 'share_v', 'share_a')"),
    (["--num-gpus", "2", "--config-file", "configs/quickstart/ks_trees.yaml", "MODEL.DEVICE", "cpu", "MODEL.KS.MODE",
      "quad"], "error: Invalid config MODEL.KS.MODE='quad'"),  # two workers: the launcher repeats it last
])
def test_train_net_config_errors_end_in_one_line(args, last):
    r = subprocess.run([sys.executable, "train_net.py", *args], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(last), r.stderr[-2000:]
    assert "Traceback" not in r.stderr

"""The KS owner (ks_detr.modeling.ks.KnowledgeSharing): teacher-only parameters come from the model's
structure and never leak into a student checkpoint; the loss plan; one KS switch."""
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

from conftest import REPO, family_config, make_cfg
from ks_detr.checkpoint import AtomicCheckpointer, is_teacher_only, teacher_only_keys
from ks_detr.config import student_config

FAMILIES = ["conditional_detr", "dab_detr", "dn_detr", "deformable_detr", "dn_deformable_detr", "dino"]
TINY = ("MODEL.DETR.NUM_QUERIES", 10, "MODEL.DETR.ENC_LAYERS", 2, "MODEL.DETR.DEC_LAYERS", 2,
        "MODEL.DETR.HIDDEN_DIM", 64, "MODEL.DETR.DIM_FEEDFORWARD", 64, "MODEL.RESNETS.DEPTH", 18,
        "MODEL.RESNETS.RES2_OUT_CHANNELS", 64)


def models(family, *opts):
    cfg = make_cfg(family_config(family, ks=True), *TINY, *opts)
    return build_model(cfg), build_model(student_config(cfg))


@pytest.mark.parametrize("mode", ["triple", "share_v", "share_a"])
@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_keys_are_exactly_what_the_baseline_lacks(family, mode):
    ks, base = models(family, "MODEL.KS.MODE", mode, "MODEL.KS.ENCODER_LAYERS", [0, 1])
    teacher = set(teacher_only_keys(ks))
    assert teacher and teacher <= set(ks.state_dict())
    assert set(ks.state_dict()) - teacher == set(base.state_dict())
    # the name rule for files without a list agrees with the structure
    assert {k for k in ks.state_dict() if is_teacher_only(k)} == teacher


def test_a_new_teacher_parameter_cannot_leak_into_the_student(tmp_path):
    """A teacher parameter added to a KS module is declared in its TEACHER_PARAMETERS: the checkpoint
    lists it and ks_to_student drops it, whatever its name. Undeclared, the baseline comparison above
    finds it (the KS model would have a key the baseline lacks)."""
    ks, base = models("conditional_detr")
    attn = ks.encoder.layers[1].self_attn
    attn.register_parameter("w_extra", nn.Parameter(torch.ones(3)))  # a name no rule would catch
    assert set(ks.state_dict()) - set(teacher_only_keys(ks)) != set(base.state_dict())  # caught undeclared
    attn.TEACHER_PARAMETERS = type(attn).TEACHER_PARAMETERS + ("w_extra",)
    assert "encoder.layers.1.self_attn.w_extra" in teacher_only_keys(ks)

    AtomicCheckpointer(ks, str(tmp_path)).save("model_ks")
    out = tmp_path / "student.pth"
    run = subprocess.run([sys.executable, "tools/ks_to_student.py", str(tmp_path / "model_ks.pth"), str(out)],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "dropped encoder.layers.1.self_attn.w_extra" in run.stdout
    student = torch.load(out, weights_only=True)["model"]
    assert set(student) == set(base.state_dict())
    base.load_state_dict(student)  # strict


def test_teacher_loss_plan():
    cfg = make_cfg("configs/ks_dab_detr_r50.yaml", *TINY, "MODEL.DETR.DEC_LAYERS", 4,
                   "MODEL.KS.TEACHER_DECODER_LAYERS", 2, "MODEL.KS.TEACHER_LOSS_WEIGHT", 0.5)
    ks = build_model(cfg).ks
    assert ks.teacher_outputs(4) == [(2, 1, "_ks_a_2", 0.5), (3, 1, "_ks_a", 0.5),
                                     (2, 2, "_ks_v_2", 0.5), (3, 2, "_ks_v", 0.5)]
    assert build_model(make_cfg("configs/ks_dab_detr_r50.yaml", *TINY, "MODEL.KS.MODE", "share_a")).ks.streams == ("s", "v")
    assert build_model(student_config(cfg)).ks is None

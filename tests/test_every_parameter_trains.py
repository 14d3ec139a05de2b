"""Every accepted config trains under DDP: after one backward, every trainable parameter has a
gradient (DDP without ``find_unused_parameters`` stops at the next step otherwise), for every family
config (baseline and KS) and the odd-but-accepted settings: no denoising (``DN.GROUPS 0``), one decoder
layer, no auxiliary losses, several teacher layers, each KS mode, two-stage selection, and batches
with an image without boxes or with no box at all. The 2-process DDP runs of some of these are in
``test_distributed.py``."""
import glob
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import REPO, make_cfg, toy_inputs

TINY = ("MODEL.DETR.HIDDEN_DIM", 32, "MODEL.DETR.NHEADS", 4, "MODEL.DETR.DIM_FEEDFORWARD", 32,
        "MODEL.DETR.ENC_LAYERS", 2, "MODEL.DETR.DEC_LAYERS", 2, "MODEL.DETR.NUM_QUERIES", 8,
        "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.DETR.CHANNELS_LAST", False)
SIZES = ((96, 128), (80, 112))  # toy_inputs' boxes lie within the first image; the second has none
# the family configs: configs/[ks_]<family>_r50.yaml and the DINO recipes (the 24-epoch ones build the
# 12-epoch model: with -m slow)
CONFIGS = sorted({os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "*_r50.yaml"))
                  + glob.glob(os.path.join(REPO, "configs", "*dino*.yaml"))})
DINO_TINY = ("MODEL.DETR.DN.NUM_QUERIES", 6)  # 2 contrastive groups for 3 boxes (detrex's 100: 33)
SETTINGS = {
    "default": (),
    "no denoising": ("MODEL.DETR.DN.GROUPS", 0),
    "one decoder layer": ("MODEL.DETR.DEC_LAYERS", 1),
    "no aux loss": ("MODEL.DETR.AUX_LOSS", False),
    "two teacher layers": ("MODEL.KS.TEACHER_DECODER_LAYERS", 2),
    "share_v": ("MODEL.KS.MODE", "share_v"),
    "share_a": ("MODEL.KS.MODE", "share_a"),
    "two-stage": ("MODEL.DETR.TWO_STAGE", True),
    "teachers decode the student's proposals": ("MODEL.DETR.TWO_STAGE", True, "MODEL.KS.TEACHER_PROPOSALS", "student"),
    "KS in every encoder layer": ("MODEL.KS.ENCODER_LAYERS", [0, 1]),
}



pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

def family(config):
    name = os.path.basename(config).removeprefix("ks_")
    return "dino" if name.startswith("dino") else name.removesuffix(".yaml").removesuffix("_r50")


def applies(config, setting):
    """The settings each config accepts (the others are refused by load_config, tested in test_config_keys.py)."""
    ks, fam = os.path.basename(config).startswith("ks_"), family(config)
    if fam in ("deformable_detr_refine", "deformable_detr_two_stage"):  # decoder forms: the KS encoder is Deformable's
        return setting == "default" or (setting == "no aux loss" and not ks and fam.endswith("refine")) or (
            setting == "teachers decode the student's proposals" and ks and fam.endswith("two_stage"))
    if setting in ("two teacher layers", "share_v", "share_a", "KS in every encoder layer"):
        return ks
    if setting == "no denoising":
        return fam in ("dn_detr", "dn_deformable_detr")
    if setting == "no denoising (DINO)":  # DN.GROUPS is not read while DN.NUM_QUERIES > 0
        return fam == "dino"
    if setting == "two-stage":
        return fam == "dn_deformable_detr"
    if setting == "teachers decode the student's proposals":
        return ks and fam in ("dn_deformable_detr", "dino")
    return True


SETTINGS["no denoising (DINO)"] = ("MODEL.DETR.DN.NUM_QUERIES", 0, "MODEL.DETR.DN.GROUPS", 0)
CASES = [(c, s) for c in CONFIGS for s in SETTINGS if applies(c, s)]


def unused_parameters(model, inputs):
    model.zero_grad(set_to_none=True)
    with EventStorage():
        losses = model(inputs)
    sum(losses.values()).backward()
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("config,setting", [pytest.param(*c, marks=pytest.mark.slow) if "24ep" in c[0] else c
                                            for c in CASES])
def test_every_trainable_parameter_gets_a_gradient(config, setting):
    torch.manual_seed(0)
    opts = TINY + (DINO_TINY if family(config) == "dino" else ()) + SETTINGS[setting]
    model = build_model(make_cfg(config, *opts)).train()
    assert not unused_parameters(model, toy_inputs(SIZES)), "a batch with an image without boxes"
    if setting == "default":
        assert not unused_parameters(model, toy_inputs(SIZES[:1])), "a batch without any box"

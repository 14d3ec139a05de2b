"""At inference a KS model costs what its student costs: its eval forward dispatches exactly the aten
operator sequence (operator, overload, in order) of the baseline model holding the same student weights,
and returns the same detections, in every family and the two-stage quickstart model.

A GPU runs one kernel per non-view operator, so an equal sequence means the same launches and the same
work; anything the KS model added at eval (a Fg-Bg mask, an sMLP call, a teacher projection, a stream
repeat, a cast) would show as an extra operator."""
import glob
import os

import pytest
import torch
from detectron2.modeling import build_model
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO, make_cfg
from ks_detr.checkpoint import student_state_dict
from ks_detr.config import student_config

# Small but complete: every module of the family runs (R18: BasicBlocks keep random features bounded).
TINY = ("MODEL.DETR.HIDDEN_DIM", 32, "MODEL.DETR.NHEADS", 4, "MODEL.DETR.DIM_FEEDFORWARD", 32,
        "MODEL.DETR.ENC_LAYERS", 2, "MODEL.DETR.DEC_LAYERS", 2, "MODEL.DETR.NUM_QUERIES", 12,
        "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64)
# every family and variant: the R50 configs (DINO: its 4-scale 12-epoch recipe) and the quickstart model
KS_CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "ks_*_r50.yaml"))) \
    + ["configs/ks_dino_r50_4scale_12ep.yaml"]
QUICKSTART = "configs/quickstart/ks_trees.yaml"
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


class OperatorLog(TorchDispatchMode):
    """Records every aten operator dispatched inside the block, as ``"aten.op.overload"``, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def ks_and_student(config, opts, device="cpu"):
    """A random-init KS model of ``config`` and the baseline model built from its student config holding
    its student weights (what tools/ks_to_student.py writes), both in eval mode on ``device``."""
    torch.manual_seed(0)
    cfg = make_cfg(config, "MODEL.DEVICE", device, *opts)
    ks = build_model(cfg).eval()
    student = build_model(student_config(cfg)).eval()
    student.load_state_dict(student_state_dict(ks.state_dict(), ks.ks.teacher_parameter_names(ks)))
    assert ks.ks_enabled and not student.ks_enabled
    return ks, student


@pytest.mark.parametrize("config", KS_CONFIGS + [QUICKSTART])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_ks_eval_dispatches_the_students_operators(device, config, one_thread):
    """On CUDA too: there the deformable families sample with the Triton kernels (``auto``)."""
    opts = ("MODEL.MOBILENET_V2.PRETRAINED", False, "MODEL.DETR.NUM_QUERIES", 12) if config == QUICKSTART else TINY
    ks, student = ks_and_student(config, opts, device)
    g = torch.Generator().manual_seed(0)
    images = [{"image": torch.rand(3, 96, 128, generator=g) * 255}, {"image": torch.rand(3, 80, 96, generator=g) * 255}]
    runs = {}
    for model in (ks, student):  # first calls: on CUDA the Triton kernels are checked (once) and compiled
        with torch.no_grad():
            model(images)
    for name, model in (("ks", ks), ("student", student)):
        with torch.no_grad(), OperatorLog() as log:
            out = model(images)
        runs[name] = log.ops, [r["instances"] for r in out]
    (ks_ops, ks_out), (ops, out) = runs["ks"], runs["student"]
    assert len(ops) > 300  # the whole forward was seen (backbone, encoder, decoder, heads, top-k)
    first = next(i for i, (a, b) in enumerate(zip(ks_ops + [None], ops + [None])) if a != b) if ks_ops != ops else None
    assert first is None, f"operator {first}: KS {ks_ops[first:first + 1]}, student {ops[first:first + 1]}"
    for a, b in zip(ks_out, out):
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)
        assert torch.equal(a.pred_classes, b.pred_classes) and a.scores.device.type == device

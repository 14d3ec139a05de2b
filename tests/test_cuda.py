"""The detectors on a CUDA GPU (``pytest -m cuda``; ``tools/gpu_check.sh`` runs them with the GPU benchmarks).

Every family, baseline and KS: one train step in float32, in float16 with the gradient scaler and in
bfloat16 (finite, close to float32 from the same weights and batch); the KS model's eval output equals its
exported student's; the deformable families train the same with the Triton kernels as with PyTorch's
``grid_sample``; the student exports to TorchScript on the GPU and runs there.

Each test takes the device as a parameter. The ``cuda`` cases are marked ``cuda`` and skipped without a GPU;
one cheap ``cpu`` case per test runs the same body in the default run (the Triton one has none: on CPU the
kernels need Triton's interpreter, tests/test_deformable_triton.py).
"""
import glob
import math
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import REPO, SameSelection, make_cfg, toy_batch
from ks_detr.export import ExportableDetector, build_student, export

# every family and variant, KS and baseline: the R50 configs (DINO: its 4-scale 12-epoch recipe)
KS_CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "ks_*_r50.yaml"))) \
    + ["configs/ks_dino_r50_4scale_12ep.yaml"]
BASELINES = [c.replace("configs/ks_", "configs/") for c in KS_CONFIGS]
DEFORMABLE = [c for c in BASELINES + KS_CONFIGS if "deformable" in c or "dino" in c]
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# Small but complete models: every module of the family runs, on a ResNet-18 (its random features stay
# bounded, |x| < 20 at res5, so float16 does not overflow).
TINY = ("MODEL.DETR.HIDDEN_DIM", 64, "MODEL.DETR.NHEADS", 4, "MODEL.DETR.DIM_FEEDFORWARD", 64,
        "MODEL.DETR.ENC_LAYERS", 2, "MODEL.DETR.DEC_LAYERS", 2, "MODEL.DETR.NUM_QUERIES", 20,
        "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64)
# 16-bit losses against float32 ones: bfloat16 rounds every operation to 2^-9 (float16 to 2^-11); the
# losses of these models move by at most 3.2e-3 relative under bfloat16 (measured on CPU, every config), while
# a float32-critical part run in 16 bits (reference points, box refinement, sampling locations, the losses)
# moves boxes by whole cells and their losses by far more than 5e-2. Terms near zero get 1e-3.
RTOL, ATOL = 5e-2, 1e-3
SCALE = 2.0**8  # the scaler's first scale: a step at it must not overflow (the step would be skipped)


def on_devices(values, cpu_value):
    """``(device, value)`` cases: ``cpu_value`` on the CPU (the default run's case), every value on cuda."""
    return [pytest.param("cpu", cpu_value)] + [pytest.param("cuda", v, marks=CUDA) for v in values]


def tiny_model(config, device, *opts):
    torch.manual_seed(0)
    return build_model(make_cfg(config, "MODEL.DEVICE", device, *TINY, *opts))


def flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


def train_step(model, inputs, dtype, device):
    """Forward (autocast to ``dtype`` unless float32), backward through a gradient scaler (enabled for float16)
    and one AdamW step. Returns the losses, the unscaled gradients ({name: float64 tensor}) and the scale after
    the step (None without float16)."""
    model.train()
    model.zero_grad(set_to_none=True)  # a run's gradients are its own, not added to the last run's
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device, init_scale=SCALE, enabled=dtype == torch.float16)
    torch.manual_seed(1)  # the same dropout masks and denoising noise in every run
    with EventStorage(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        losses = model(inputs)
    scaler.scale(sum(losses.values())).backward()
    scaler.unscale_(optimizer)
    grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    scaler.step(optimizer)
    scaler.update()
    return {k: v.item() for k, v in losses.items()}, grads, scaler.get_scale() if scaler.is_enabled() else None


@pytest.mark.parametrize("device, config", on_devices(BASELINES + KS_CONFIGS, "configs/ks_conditional_detr_r50.yaml"))
def test_train_step_16bit_matches_float32(device, config, one_thread):
    # CPU float16 convolutions have no fast backward: the CPU case freezes the backbone (the transformer, where
    # the float32-critical parts are, still trains). Dropout 0: on CUDA, attention dropout in float32 and in 16 bits
    # runs in different kernels, which draw other masks.
    model = tiny_model(config, device, "MODEL.DETR.DROPOUT", 0.0,
                       *(("MODEL.BACKBONE.FREEZE_AT", 5) if device == "cpu" else ()))
    inputs = toy_batch(model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    runs = {}
    with SameSelection(model) as selection:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            model.load_state_dict(start)
            runs[dtype] = train_step(model, inputs, dtype, device)
            selection.replay()
            after = [p for p in model.parameters() if p.requires_grad]
            assert all(torch.isfinite(p).all() for p in after), dtype
    ref, ref_grads, _ = runs[torch.float32]
    assert all(math.isfinite(v) for v in ref.values()) and all(torch.isfinite(g).all() for g in ref_grads.values())
    for dtype in (torch.float16, torch.bfloat16):
        losses, grads, _ = runs[dtype]
        assert losses.keys() == ref.keys()
        for name, value in losses.items():
            assert math.isclose(value, ref[name], rel_tol=RTOL, abs_tol=ATOL), (dtype, name, value, ref[name])
        assert grads.keys() == ref_grads.keys() and all(torch.isfinite(g).all() for g in grads.values())
        # the step points the same way: on CPU (frozen backbone) every config measures >= 0.9998 (Deformable
        # DETR's reference-point head runs in float32 for this: in bfloat16, deformable_detr_refine_r50 gave 0.971)
        cosine = torch.cosine_similarity(flat(grads), flat(ref_grads), 0).item()
        worst = sorted((torch.cosine_similarity(grads[n].flatten(), g.flatten(), 0).item(), n)
                       for n, g in ref_grads.items() if g.norm() > 0)[:3]
        assert cosine > 0.99, f"{dtype}: gradient cosine {cosine:.4f} to float32's; least aligned: {worst}"
    assert runs[torch.float16][2] == SCALE  # no overflow: the float16 step was taken, not skipped


@pytest.mark.parametrize("device, config", on_devices(KS_CONFIGS, "configs/ks_conditional_detr_r50.yaml"))
def test_ks_eval_equals_its_exported_student(device, config, tmp_path, one_thread):
    """The KS model's detections equal those of the baseline loading the checkpoint's student (teacher-only
    tensors dropped, as tools/ks_to_student.py and tools/export_model.py do)."""
    cfg = make_cfg(config, "MODEL.DEVICE", device, *TINY)
    torch.manual_seed(0)
    ks = build_model(cfg).eval()
    path = tmp_path / "model_ks.pth"
    torch.save({"model": ks.state_dict(), "teacher_only": sorted(ks.ks.teacher_parameter_names(ks))}, path)
    student, dropped = build_student(cfg, str(path))
    assert dropped > 0 and not student.ks_enabled and student.device.type == device
    images = [{"image": x["image"]} for x in toy_batch(ks)]
    with torch.no_grad():
        outs = [[r["instances"] for r in model(images)] for model in (ks, student)]
    for a, b in zip(*outs):
        assert len(a) == len(b) > 0
        for field in ("pred_boxes", "scores", "pred_classes"):
            x, y = (getattr(r, field) for r in (a, b))
            x, y = (t.tensor if field == "pred_boxes" else t for t in (x, y))
            assert x.device.type == device and torch.equal(x, y), field


@pytest.mark.parametrize("config", DEFORMABLE)
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA)])
def test_triton_train_step_equals_pytorch(device, config):
    """MODEL.DETR.DEFORMABLE_ATTN_IMPL triton against pytorch: the same losses and gradients from the same
    weights and batch (float32; the kernels' backward sums with atomics, in another order than grid_sample's)."""
    runs = {}
    for impl in ("pytorch", "triton"):
        model = tiny_model(config, device, "MODEL.DETR.DEFORMABLE_ATTN_IMPL", impl)
        runs[impl] = train_step(model, toy_batch(model), torch.float32, device)[:2]
    (losses, grads), (ref, ref_grads) = runs["triton"], runs["pytorch"]
    assert losses.keys() == ref.keys() and grads.keys() == ref_grads.keys()
    for name, value in losses.items():
        assert math.isclose(value, ref[name], rel_tol=1e-4, abs_tol=1e-6), (name, value, ref[name])
    grads, ref_grads = flat(grads), flat(ref_grads)
    assert ((grads - ref_grads).norm() / ref_grads.norm()).item() < 1e-3


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("device, config", on_devices(BASELINES, "configs/conditional_detr_r50.yaml"))
def test_torchscript_export_runs_on_the_device(device, config, tmp_path, one_thread):
    """tools/export_model.py's TorchScript path traced on ``device``: the loaded file gives the eager detections
    on the device, also for an image size other than the traced one."""
    opts = ("MODEL.DETR.NUM_CLASSES", 1, "MODEL.DETR.NUM_TOPK_TEST", 20)  # every query is a detection
    model = tiny_model(config, device, *opts).eval()
    path = str(tmp_path / "model.ts")
    g = torch.Generator().manual_seed(0)
    export(ExportableDetector(model), (torch.rand(3, 160, 192, generator=g) * 255).to(device), "torchscript", path)
    traced = torch.jit.load(path, map_location=device)
    for h, w in ((160, 192), (137, 211)):
        image = (torch.rand(3, h, w, generator=g) * 255).to(device)
        with torch.no_grad():
            ref = model([{"image": image}])[0]["instances"]
            boxes, scores, classes = traced(image)
        assert boxes.device.type == device and len(boxes) == len(ref) > 0
        # same order: equal scores up to float rounding keep their order
        torch.testing.assert_close(boxes, ref.pred_boxes.tensor, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(scores, ref.scores, atol=1e-5, rtol=1e-4)
        assert torch.equal(classes, ref.pred_classes)


EARLY_CASES = ["configs/ks_conditional_detr_r50.yaml", "configs/ks_dn_deformable_detr_r50.yaml",
               "configs/ks_dino_r50_4scale_12ep.yaml"]


@pytest.mark.parametrize("device, config", on_devices(EARLY_CASES, "configs/ks_dn_deformable_detr_r50.yaml"))
def test_early_teacher_backward_gives_the_stacked_gradients(device, config, one_thread):
    """``MODEL.KS.EARLY_TEACHER_BACKWARD`` (on CUDA the deformable teachers sample with the Triton kernels inside
    the forward's backward): the stacked step's gradients, in float32 and bfloat16 (relative norm of the
    difference; tests/test_early_backward.py compares every tensor on CPU)."""
    model = tiny_model(config, device, "MODEL.DETR.DROPOUT", 0.0, *(("MODEL.DETR.DN.NUM_QUERIES", 12)
                                                                    if "dino" in config else ()))
    inputs = toy_batch(model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2)):
        grads = []
        for early in (False, True):
            model.load_state_dict(start)
            model.ks.early_backward = early
            grads.append(flat(train_step(model, inputs, dtype, device)[1]))
        difference = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
        assert difference <= tolerance, (dtype, difference)

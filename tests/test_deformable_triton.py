"""The Triton kernels of multi-scale deformable attention (``MODEL.DETR.DEFORMABLE_ATTN_IMPL``) against the
PyTorch reference (``grid_sample``): outputs and the gradients of the values, sampling locations and attention
weights.

On CPU the kernels run under Triton's interpreter on tiny shapes. The bundled Triton (3.8) takes
``TRITON_INTERPRET=1`` only when it is first imported (it builds ``triton.language``'s own functions for one mode
then), and importing torch/detectron2/ks_detr imports it; so ``test_under_the_interpreter`` runs this file again in
a subprocess started with ``TRITON_INTERPRET=1``, where the tests using the ``interpreter`` fixture run (they skip in
a process without it: ``TRITON_INTERPRET=1 pytest tests/test_deformable_triton.py`` runs them directly). The ``cuda``
tests compile the kernels on a GPU when there is one and skip otherwise.
"""
import functools
import os
import subprocess
import sys
import types

import pytest
import torch

from ks_detr.errors import ConfigError
from ks_detr.modeling.ks import DeformableTripleAttention
from ks_detr.modeling.layers import MSDeformAttn, MultiScaleContext, deformable_sample
from ks_detr.modeling.layers import deformable_attention
from ks_detr.modeling.layers.deformable_attention import IMPL_KEY, resolve_impl

triton_deformable = pytest.importorskip("ks_detr.modeling.layers.triton_deformable",
                                        reason="Triton does not import with this torch")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-10)}


INTERPRETER_ONLY = "needs Triton's interpreter (TRITON_INTERPRET=1 before triton is imported): run in a subprocess " \
                   "by test_under_the_interpreter"


@pytest.fixture
def interpreter():
    if not triton_deformable.interpreting():
        pytest.skip(INTERPRETER_ONLY)


@pytest.mark.parametrize("marks", ["not slow", pytest.param("slow", marks=pytest.mark.slow)])
def test_under_the_interpreter(marks):
    """This file's interpreter tests (``marks``: the default run's, or the slow ones) in a process started with
    ``TRITON_INTERPRET=1``."""
    if triton_deformable.interpreting():
        pytest.skip("this is the interpreter run")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-m", marks,
                          "-k", "not under_the_interpreter and not cuda and not without_interpreter and not gets_the_key "
                          "and not compile", "-W", "ignore::pytest.PytestUnknownMarkWarning"],
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " skipped" not in run.stdout.splitlines()[-1], run.stdout[-3000:]  # every test ran interpreted


def inputs(shapes, B=2, H=2, D=4, Lq=5, P=3, sets=(), dtype=torch.float32, device="cpu", low=-0.25, high=1.25,
           seed=0, padded=True):
    """value (B, N, H, D) with image 1's padded tokens zero (as MSDeformAttn.values gives them), locations
    (B, Lq, H, L, P, 2) in [low, high] (some outside the maps), softmax weights (*sets, B, Lq, H, L, P)."""
    g = torch.Generator().manual_seed(seed)
    L, N = len(shapes), sum(h * w for h, w in shapes)
    value = torch.randn(B, N, H, D, generator=g, dtype=dtype)
    if padded and B > 1:
        start = 0
        for h, w in shapes:  # image 1: last row and last column of every level are padding
            level = value[1, start:start + h * w].view(h, w, H, D)
            level[-1], level[:, -1] = 0, 0
            start += h * w
    loc = torch.rand(B, Lq, H, L, P, 2, generator=g, dtype=dtype) * (high - low) + low
    weights = torch.randn(*sets, B, Lq, H, L * P, generator=g, dtype=dtype).softmax(-1).view(*sets, B, Lq, H, L, P)
    return [t.to(device).requires_grad_() for t in (value, loc, weights)]


def both(value, shapes, loc, weights, seed=1):
    """(outputs, gradients) of the PyTorch and the Triton paths, on the same upstream gradient."""
    results = []
    for impl in ("pytorch", "triton"):
        out = deformable_sample(value, shapes, loc, weights, impl)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype).to(out.device)
        results.append((out, torch.autograd.grad(out, (value, loc, weights), grad)))
    return results


def assert_match(value, shapes, loc, weights, tol):
    """Triton against PyTorch: output and gradients within ``tol`` (``atol`` scaled by each reference's largest
    magnitude when ``tol`` has ``of_max=True``)."""
    (ref, ref_grads), (out, grads) = both(value, shapes, loc, weights)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    of_max = tol.get("of_max", False)
    for name, a, b in zip(("output", "gradient of the value", "gradient of the locations", "gradient of the weights"),
                          (out, *grads), (ref, *ref_grads)):
        atol = tol["atol"] * (b.abs().max().item() if of_max else 1.0)
        torch.testing.assert_close(a, b, atol=atol, rtol=tol["rtol"], msg=lambda m: f"{name}: {m}")
    return max((out - ref).abs().max().item(), *((a - b).abs().max().item() for a, b in zip(grads, ref_grads)))


# ---- CPU, Triton interpreter -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_gradients_match_pytorch(interpreter, dtype):
    """Odd level sizes (one of width 1), padded tokens, points inside, across the border and far outside."""
    shapes = [(5, 7), (3, 4), (2, 1)]
    value, loc, weights = inputs(shapes, dtype=dtype, low=-0.4, high=1.4)
    assert_match(value, shapes, loc, weights, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pixel_centres_and_map_edges(interpreter, dtype):
    """Locations exactly on pixel centres (fx = fy = 0: the one-sided derivative of grid_sample's backward), on
    the map's edges (0, 1), half a cell outside (only the zero padding is read) and beyond; power-of-two sizes
    so every coordinate is exact in both paths."""
    shapes = [(4, 8), (2, 4)]
    value, loc, weights = inputs(shapes, Lq=6, P=4, dtype=dtype)
    special = []
    for h, w in shapes:
        xs = torch.tensor([0.5 / w, 3.5 / w, (w - 0.5) / w, 0.0, 1.0, -0.5 / w, 1 + 0.5 / w, -1.0], dtype=dtype)
        ys = torch.tensor([0.5 / h, (h - 0.5) / h, 1.5 / h, 1.0, 0.0, (h + 0.5) / h, -0.5 / h, 3.0], dtype=dtype)
        special.append(torch.stack(torch.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2))
    B, Lq, H, _, P, _ = loc.shape
    with torch.no_grad():  # the (query, head, point)s of a level cycle through its 64 special points
        for lvl, pts in enumerate(special):
            loc[:, :, :, lvl] = pts.repeat(B * Lq * H * P // len(pts) + 1, 1)[:B * Lq * H * P].view(B, Lq, H, P, 2)
    assert_match(value, shapes, loc, weights, TOL[dtype])


def test_weight_sets_share_the_samples(interpreter):
    """W sets of weights on the same locations (the KS triple attention's one-stream case): (W, B, Lq, H * D),
    location gradients summed over the sets."""
    shapes = [(3, 5), (2, 2)]
    value, loc, weights = inputs(shapes, sets=(3,), dtype=torch.float64)
    assert_match(value, shapes, loc, weights, TOL[torch.float64])


def test_16bit_inputs_sample_in_float32(interpreter):
    """As the PyTorch path: bfloat16 values/locations/weights are sampled in float32, output float32."""
    shapes = [(3, 5), (2, 2)]
    value, loc, weights = (t.detach().bfloat16() for t in inputs(shapes))
    ref = deformable_sample(value, shapes, loc, weights, "pytorch")
    out = deformable_sample(value, shapes, loc, weights, "triton")
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_gradcheck_float64(interpreter):
    shapes = [(2, 3), (1, 2)]
    value, loc, weights = inputs(shapes, B=1, H=1, D=2, Lq=2, P=2, dtype=torch.float64, low=0.05, high=0.95,
                                 padded=False)
    assert torch.autograd.gradcheck(lambda v, l, w: deformable_sample(v, shapes, l, w, "triton"),
                                    (value, loc, weights), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode", ["triple", "share_v"])
def test_modules_triton_equals_pytorch(interpreter, mode):
    """MSDeformAttn (encoder-style, with padding masks) and the KS triple attention (one incoming stream: the
    weight sets; several: one stacked batch) give the same outputs and parameter gradients either way."""
    torch.manual_seed(0)
    masks = [torch.zeros(2, 4, 6, dtype=torch.bool), torch.zeros(2, 2, 3, dtype=torch.bool)]
    masks[0][1, 3:], masks[0][1, :, 5:], masks[1][1, 1:], masks[1][1, :, 2:] = True, True, True, True
    ctx = MultiScaleContext.from_masks(masks)
    key_mask = torch.cat([m.flatten(1) for m in masks], 1)
    attn = DeformableTripleAttention(16, 2, 2, 3, mode=mode)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, pos, xt = (torch.randn(2, 30, 16) for _ in range(3))
    S = len(attn.streams)
    runs = {}
    for impl in ("pytorch", "triton"):
        attn.impl = impl
        attn.zero_grad()
        outs = [attn(x, pos, key_mask, ctx), attn.forward_ks(x, pos, xt, key_mask, 1, ctx),
                attn.forward_ks(x.repeat(S, 1, 1), pos.repeat(S, 1, 1), xt.repeat(S, 1, 1), key_mask, S,
                                ctx.repeat(S))]
        sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs).backward()
        runs[impl] = outs, {n: p.grad.clone() for n, p in attn.named_parameters()}
    for a, b in zip(runs["triton"][0], runs["pytorch"][0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for n, g in runs["pytorch"][1].items():
        torch.testing.assert_close(runs["triton"][1][n], g, atol=1e-4, rtol=1e-4, msg=lambda m: f"{n}: {m}")


# ---- choosing the implementation ---------------------------------------------------------------------------
def test_auto_takes_pytorch_on_cpu(interpreter):
    shapes = [(3, 5), (2, 2)]
    value, loc, weights = (t.detach() for t in inputs(shapes))
    assert resolve_impl("auto", value) == "pytorch" and resolve_impl("pytorch", value) == "pytorch"
    assert resolve_impl("triton", value) == "triton"  # under the interpreter
    assert torch.equal(deformable_sample(value, shapes, loc, weights, "auto"),
                       deformable_sample(value, shapes, loc, weights))


def test_triton_on_cpu_without_interpreter_names_the_key():
    if triton_deformable.interpreting():
        pytest.skip("runs without the interpreter")
    shapes = [(3, 5), (2, 2)]
    value, loc, weights = (t.detach() for t in inputs(shapes))
    with pytest.raises(ConfigError, match=f"{IMPL_KEY}='triton' needs CUDA tensors"):
        deformable_sample(value, shapes, loc, weights, "triton")
    attn = MSDeformAttn(16, 2, 2, 3, impl="triton")
    with pytest.raises(ConfigError, match=IMPL_KEY):
        attn.attend(torch.randn(2, 5, 16), torch.rand(2, 5, 2, 2), torch.randn(2, 19, 16), None,
                    MultiScaleContext(shapes, None, None))
    with pytest.raises(ConfigError, match=IMPL_KEY):
        resolve_impl("cuda", value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_kernels_pass_their_first_use_check(interpreter, dtype):
    """What "auto" runs once per signature on a GPU before using the kernels (here: interpreted, on CPU)."""
    deformable_attention._triton_check.cache_clear()
    assert deformable_attention._triton_check(torch.device("cpu"), dtype, 2, 4, 3, 2, "other", "other", "other")
    assert deformable_attention._triton_check(torch.device("cpu"), dtype, 3, 4, 2, 2, "1", "x16", "x16")


@pytest.fixture
def fake_kernels(monkeypatch):
    """Stand-in Triton modules for :func:`_triton_usable` (no kernel runs): ``fake_kernels(sample)``."""
    deformable_attention._triton_check.cache_clear()
    monkeypatch.setattr(deformable_attention, "_triton_check",
                        functools.lru_cache(maxsize=None)(deformable_attention._triton_check.__wrapped__))

    def install(sample):
        calls = []

        def counted(*args):
            calls.append(1)
            return sample(*args)

        monkeypatch.setattr(deformable_attention, "_triton_module",
                            lambda: (types.SimpleNamespace(triton_deformable_sample=counted), None))
        return calls
    return install


def test_auto_falls_back_to_pytorch_when_the_kernels_fail_their_check(fake_kernels, caplog):
    """On a GPU where the kernels fail (compiler error, no kernel image for the architecture) or compute
    something else, "auto" says why once and samples with the PyTorch path."""
    shapes = [(3, 5), (2, 2)]
    value, loc, weights = (t.detach() for t in inputs(shapes, D=8))
    usable = deformable_attention._triton_usable
    calls = fake_kernels(lambda *a: deformable_sample(*a))  # computes what the PyTorch path computes
    with torch.inference_mode():  # an evaluation's first call: the check makes its own tensors with gradients
        assert usable(value, loc, weights)
    assert usable(value, loc, weights) and len(calls) == 1  # checked once
    assert usable(value.double(), loc.double(), weights.double()) and len(calls) == 2  # per signature
    assert not caplog.records
    fake_kernels(lambda *a: deformable_sample(*a) * 1.001)
    assert not usable(value, loc[..., :1, :], weights[..., :1])  # another signature (P = 1): checked, fails
    assert "the output differs from the PyTorch path's" in caplog.text and IMPL_KEY in caplog.text
    caplog.clear()

    def no_kernel(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    fake_kernels(no_kernel)
    assert not usable(value[..., :4], loc, weights)
    assert "RuntimeError: no kernel image is available" in caplog.text and "PyTorch path instead" in caplog.text
    assert usable(value, loc, weights)  # a signature that passed stays usable


def test_the_check_compiles_what_the_call_compiles(fake_kernels):
    """The check's problem has the call's heads, head size, levels and points (compile-time constants of the
    kernels) and B, N and Lq of the same class Triton compiles integers for (1, a multiple of 16, other); each
    signature is checked once."""
    seen = []
    calls = fake_kernels(lambda v, s, loc, w: seen.append((v.shape, loc.shape)) or deformable_sample(v, s, loc, w))
    usable = deformable_attention._triton_usable
    for B, shapes, Lq, H in ((1, [(4, 8)], 16, 3), (2, [(3, 5), (2, 2)], 7, 8), (32, [(4, 4), (4, 4)], 1, 8)):
        g = torch.Generator().manual_seed(0)
        value = torch.randn(B, sum(h * w for h, w in shapes), H, 4, generator=g)
        loc = torch.rand(B, Lq, H, len(shapes), 2, 2, generator=g)
        weights = torch.rand(B, Lq, H, len(shapes), 2, generator=g)
        assert usable(value, loc, weights) and usable(value, loc, weights)
        (vb, vn, vh, vd), (lb, lq, lh, ll, lp, _) = seen[-1]
        assert (vh, vd, lh, ll, lp) == (H, 4, H, len(shapes), 2)
        for call, check in ((B, vb), (value.shape[1], vn), (Lq, lq)):
            assert deformable_attention._int_class(check) == deformable_attention._int_class(call), (call, check)
    assert len(calls) == 3


def test_the_check_inside_a_recomputed_layer(fake_kernels):
    """A first call inside a recomputed (checkpointed) layer: the check's own graph stays out of the checkpoint,
    the kernels pass, and the layer's backward recomputes and gives the gradient it gives without the check."""
    shapes = [(3, 5), (2, 2)]
    value, loc, weights = (t.detach() for t in inputs(shapes, D=8))
    calls = fake_kernels(lambda *a: deformable_sample(*a))

    def layer(x):
        y = x.sin()
        assert deformable_attention._triton_usable(value, loc, weights)
        return (y * y).sum()

    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).backward()
    torch.testing.assert_close(x.grad, 2 * x.sin() * x.cos())
    assert len(calls) == 1


def test_running_out_of_memory_in_the_check_is_raised_not_remembered(fake_kernels):
    shapes = [(3, 5), (2, 2)]
    value, loc, weights = (t.detach() for t in inputs(shapes, D=8))

    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    fake_kernels(oom)
    with pytest.raises(torch.OutOfMemoryError):
        deformable_attention._triton_usable(value, loc, weights)
    calls = fake_kernels(lambda *a: deformable_sample(*a))
    assert deformable_attention._triton_usable(value, loc, weights) and len(calls) == 1  # checked again


def test_every_deformable_attention_of_a_ks_model_gets_the_key():
    from detectron2.modeling import build_model

    from conftest import make_cfg
    cfg = make_cfg("configs/ks_dn_deformable_detr_r50.yaml", "MODEL.DETR.HIDDEN_DIM", 32, "MODEL.DETR.NHEADS", 2,
                   "MODEL.DETR.DIM_FEEDFORWARD", 32, "MODEL.DETR.ENC_LAYERS", 2, "MODEL.DETR.DEC_LAYERS", 2,
                   "MODEL.DETR.NUM_QUERIES", 6, "MODEL.DETR.NUM_TOPK_TEST", 6, "MODEL.DETR.DEFORMABLE_ATTN_IMPL",
                   "pytorch")
    modules = [m for m in build_model(cfg).modules() if isinstance(m, MSDeformAttn)]
    assert any(isinstance(m, DeformableTripleAttention) for m in modules) and len(modules) == 4
    assert {m.impl for m in modules} == {"pytorch"}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bigger_shapes_match_pytorch(interpreter, dtype):
    """Four levels, 8 heads of 32 channels, 4 points, more queries than one block: a few minutes interpreted."""
    shapes = [(12, 15), (6, 8), (3, 4), (2, 2)]
    value, loc, weights = inputs(shapes, B=2, H=8, D=32, Lq=70, P=4, dtype=dtype)
    assert_match(value, shapes, loc, weights, TOL[dtype])


# ---- CUDA ------------------------------------------------------------------------------------------------
@pytest.fixture
def compiled():
    if triton_deformable.interpreting():
        pytest.skip("Triton compiles nothing in an interpreter process")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shapes", [[(5, 7), (3, 4), (2, 1)], [(100, 134), (50, 67), (25, 34), (13, 17)]])
def test_cuda_matches_pytorch(compiled, dtype, shapes):
    Lq = 300 if len(shapes) == 4 else 37
    value, loc, weights = inputs(shapes, B=2, H=8, D=32, Lq=Lq, P=4, dtype=dtype, device="cuda")
    # float32: the value gradient is summed by atomic adds in another order than grid_sample's backward, and on
    # 134-wide maps both paths are ~5e-5 of the largest location gradient away from float64 (measured under the
    # interpreter: they differ from each other by up to 2e-6 of it, 5.5e-6 for the weight gradients)
    f32 = dict(atol=2e-5, rtol=1e-4, of_max=True)
    assert_match(value, shapes, loc, weights, TOL[dtype] if dtype == torch.float64 else f32)
    assert resolve_impl("auto", value) == "triton"
    assert resolve_impl("auto", value, loc, weights) == "triton"  # the kernels pass their first-use check


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_16bit_inputs(compiled, dtype):
    shapes = [(20, 27), (10, 14)]
    value, loc, weights = (t.detach().to(dtype) for t in inputs(shapes, H=8, D=32, Lq=64, P=4, device="cuda"))
    out = deformable_sample(value, shapes, loc, weights, "triton")
    torch.testing.assert_close(out, deformable_sample(value, shapes, loc, weights, "pytorch"), atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@needs_cuda
def test_cuda_weight_sets(compiled):
    shapes = [(9, 11), (5, 6)]
    value, loc, weights = inputs(shapes, H=8, D=32, Lq=50, P=4, sets=(3,), device="cuda")
    assert_match(value, shapes, loc, weights, dict(atol=2e-5, rtol=1e-4))



@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_kernels_compile_for_a_hopper_gpu(dtype):
    """Without a GPU: Triton compiles both kernels (R50 shapes: 8 heads of 32 channels, 4 levels, 4 points) down to
    an sm_90 cubin with its bundled ptxas (about a minute on a CPU)."""
    if triton_deformable.interpreting():
        pytest.skip("Triton compiles nothing in an interpreter process")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    kernels = triton_deformable._kernels(False)
    consts = {"H": 8, "D": 32, "L": 4, "P": 4, "BLOCK_Q": triton_deformable.BLOCK_Q, "BLOCK_D": 32}
    ints = {"B": "i32", "N": "i32", "Lq": "i32"}
    for kernel, pointers in ((kernels._forward_kernel, ("value", "loc", "attn", "out")),
                             (kernels._backward_kernel, ("value", "loc", "attn", "grad_out", "grad_value", "grad_loc",
                                                         "grad_attn"))):
        signature = {**{f"{p}_ptr": f"*{dtype}" for p in pointers}, "shapes_ptr": "*i32", "starts_ptr": "*i32",
                     **ints, **{c: "constexpr" for c in consts}}
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(list(signature).index(c),): v for c, v in consts.items()})
        assert compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"]

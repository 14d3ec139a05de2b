"""Multi-scale deformable attention (Zhu et al., ICLR 2021): the reference in pure PyTorch
(``grid_sample``), and the same sampling as Triton kernels (:mod:`.triton_deformable`), chosen by
``MODEL.DETR.DEFORMABLE_ATTN_IMPL`` (:func:`resolve_impl`).

Tokens of all levels are flattened and concatenated level by level: ``(B, N, C)`` with
N = sum(h_l * w_l); :class:`MultiScaleContext` records that layout.
"""
import functools
import logging
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from detectron2.layers import shapes_to_tensor
from torch import nn

from ...errors import ConfigError
from .transformer import upcast

IMPL_KEY = "MODEL.DETR.DEFORMABLE_ATTN_IMPL"
IMPLS = ("auto", "pytorch", "triton")
log = logging.getLogger(__name__)


@dataclass
class MultiScaleContext:
    """Layout of a flattened feature pyramid.

    shapes: [(h_l, w_l)] per level; valid_ratios: (B, L, 2) valid (w, h) fraction of each level;
    reference_points: (B, N, L, 2) every token's normalised centre, per level (encoder queries).
    """

    shapes: list
    valid_ratios: torch.Tensor
    reference_points: torch.Tensor

    def repeat(self, n):
        """The same layout for n stacked copies of the batch (stream-major)."""
        return replace(self, valid_ratios=self.valid_ratios.repeat(n, 1, 1),
                       reference_points=self.reference_points.repeat(n, 1, 1, 1))

    def first(self, n):
        """The layout of the first n rows (the student's in a stacked KS batch)."""
        return replace(self, valid_ratios=self.valid_ratios[:n], reference_points=self.reference_points[:n])

    @classmethod
    def from_masks(cls, masks):
        """masks: list of (B, h_l, w_l) bool, True = padding."""
        shapes = [tuple(m.shape[-2:]) for m in masks]
        valid_ratios = torch.stack(
            [torch.stack([(~m[:, 0, :]).sum(1) / m.shape[2], (~m[:, :, 0]).sum(1) / m.shape[1]], -1)
             for m in masks], 1).float()
        refs = []
        for lvl, (h, w) in enumerate(shapes):
            y, x = torch.meshgrid(torch.arange(h, device=masks[0].device) + 0.5,
                                  torch.arange(w, device=masks[0].device) + 0.5, indexing="ij")
            vr = valid_ratios[:, lvl]
            refs.append(torch.stack([x.reshape(1, -1) / (vr[:, :1] * w), y.reshape(1, -1) / (vr[:, 1:] * h)], -1))
        reference_points = torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]
        return cls(shapes, valid_ratios, reference_points)


@functools.lru_cache(maxsize=1)
def _triton_module():
    """:mod:`.triton_deformable`, or the reason it cannot be used (Triton missing or broken)."""
    try:
        from . import triton_deformable
    except Exception as e:  # noqa: BLE001 (ImportError, or a Triton that fails to initialise)
        return None, f"{type(e).__name__}: {e}"
    return triton_deformable, None


def sampling_dtype(value, locations, weights):
    """The dtype the Triton kernels sample in: the inputs' promoted dtype, at least float32."""
    return torch.promote_types(torch.promote_types(value.dtype, locations.dtype),
                               torch.promote_types(weights.dtype, torch.float32))


def _int_class(n):
    """How Triton compiles for an integer argument: "1", "x16" (a multiple of 16) or "other"."""
    return "1" if n == 1 else "x16" if n % 16 == 0 else "other"


def _check_problem(device, dtype, H, D, L, P, b_class, n_class, q_class):
    """A seeded small problem: value (B, N, H, D), locations (B, Lq, H, L, P, 2) in [-0.1, 1.1] (some outside the
    maps), softmax weights (B, Lq, H, L, P); B, N and Lq small, of the given :func:`_int_class` each."""
    g = torch.Generator().manual_seed(0)
    if n_class == "x16":
        shapes = [(4, 4)] * L
    elif n_class == "1":
        shapes = [(1, 1)] * L
    else:
        shapes = [(max(7 - 2 * lvl, 1), max(6 - 2 * lvl, 1)) for lvl in range(L)]  # (7, 6), (5, 4), ...
        if sum(h * w for h, w in shapes) % 16 == 0:
            shapes[0] = (7, 7)
    B, Lq = ({"1": 1, "x16": 16, "other": k}[c] for c, k in ((b_class, 2), (q_class, 9)))
    value = torch.randn(B, sum(h * w for h, w in shapes), H, D, generator=g, dtype=dtype)
    locations = torch.rand(B, Lq, H, L, P, 2, generator=g, dtype=dtype) * 1.2 - 0.1
    weights = torch.randn(B, Lq, H, L * P, generator=g, dtype=dtype).softmax(-1).view(B, Lq, H, L, P)
    return shapes, [t.to(device) for t in (value, locations, weights)]


@functools.lru_cache(maxsize=None)
def _triton_check(device, dtype, H, D, L, P, b_class, n_class, q_class):
    """Whether the Triton kernels, on ``device`` for this signature (compute dtype; H heads of size D, L levels and
    P points, which the kernels are compiled for; the :func:`_int_class` of B, N and Lq, which Triton compiles
    for), give what the PyTorch path gives on :func:`_check_problem`: the output and the gradients of value,
    locations and weights, to 1e-4 of their largest magnitude (float64: 1e-9). Run once per signature, on the
    first "auto" call, compiling the kernels that call would compile; on a failure or a difference it says why
    once and returns False. Running out of memory is raised, not remembered."""
    shapes, tensors = _check_problem(device, dtype, H, D, L, P, b_class, n_class, q_class)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    try:
        # its own tensors with gradients, also when the first call comes under no_grad, inference_mode, autocast
        # or saved-tensor hooks (a recomputed layer's: they would recompute the layer for this graph's backward)
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False), \
                torch.autograd.graph.saved_tensors_hooks(torch.Tensor.detach, lambda t: t):
            results = []
            for sample in (_triton_module()[0].triton_deformable_sample, deformable_sample):
                inputs = [t.clone().requires_grad_() for t in tensors]
                out = sample(inputs[0], shapes, inputs[1], inputs[2])
                grad_out = torch.ones_like(out).cumsum(-1).sin()  # a fixed, varied upstream gradient
                results.append([out.detach(), *torch.autograd.grad(out, inputs, grad_out)])
        for name, t, p in zip(("output", "value gradient", "location gradient", "weight gradient"), *results):
            scale = p.abs().max().item()
            if not (t.shape == p.shape and (t - p).abs().max().item() <= tol * max(scale, 1.0)):
                raise ValueError(f"the {name} differs from the PyTorch path's by "
                                 f"{(t - p).abs().max().item():.3g} (largest value {scale:.3g})")
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure means: do not use the kernels here
        log.warning("%s='auto': the Triton kernels failed their check on %s (%s, H=%d, D=%d, L=%d, P=%d): %s: %s. "
                    "Sampling with the PyTorch path instead ('triton' would use the kernels regardless, "
                    "'pytorch' skips the check).", IMPL_KEY, device, dtype, H, D, L, P, type(e).__name__, e)
        return False
    return True


def _triton_usable(value, locations=None, weights=None):
    """Triton imports and, given the locations and weights, its kernels passed :func:`_triton_check` for this
    signature on this device."""
    if _triton_module()[0] is None:
        return False
    if locations is None or weights is None:
        return True
    B, N, H, D = value.shape
    return _triton_check(value.device, sampling_dtype(value, locations, weights), H, D, locations.shape[-3],
                         locations.shape[-2], _int_class(B), _int_class(N), _int_class(locations.shape[1]))


def resolve_impl(impl, value, locations=None, weights=None):
    """The implementation that samples ``value``: "pytorch" or "triton".

    ``impl`` ("auto" | "pytorch" | "triton", ``MODEL.DETR.DEFORMABLE_ATTN_IMPL``): "auto" takes Triton for
    CUDA tensors when Triton imports and its kernels pass a check against the PyTorch path on the first call of
    each signature (given ``locations`` and ``weights``: :func:`_triton_check`), and PyTorch elsewhere and while
    tracing, exporting or compiling (``torch.jit.trace``, ``torch.export``, ``torch.compile`` see the PyTorch
    operators). "triton" on CPU tensors needs Triton's interpreter (``TRITON_INTERPRET=1`` in the environment
    before Python starts) and raises :class:`ConfigError` otherwise.
    """
    if impl == "pytorch":
        return "pytorch"
    if impl == "auto":
        if not value.is_cuda or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return "pytorch"
        return "triton" if _triton_usable(value, locations, weights) else "pytorch"
    if impl != "triton":
        raise ConfigError(f"Invalid config {IMPL_KEY}={impl!r}: choose one of {IMPLS}")
    module, why = _triton_module()
    if module is None:
        raise ConfigError(f"{IMPL_KEY}='triton' needs Triton (it ships with torch's CUDA wheels), which failed "
                          f"to import ({why}): use 'auto' or 'pytorch'")
    if not value.is_cuda and not module.interpreting():
        raise ConfigError(f"{IMPL_KEY}='triton' needs CUDA tensors; these are on {value.device} (Triton's "
                          "interpreter runs it on CPU, slowly, with TRITON_INTERPRET=1 in the environment before "
                          "Python starts): use 'auto' or 'pytorch'")
    return "triton"


def deformable_sample(value, shapes, locations, weights, impl="pytorch"):
    """Bilinearly sample every head's value maps at the sampling locations and sum with weights.

    Args:
        value: (B, N, H, D) per-head values of all levels; shapes: [(h_l, w_l)].
        locations: (B, Lq, H, L, P, 2) normalised (x, y) in [0, 1] (outside reads zeros).
        weights: (B, Lq, H, L, P) attention weights, or (W, B, Lq, H, L, P): W sets of weights
            applied to the same samples (sampled once).
        impl: "pytorch" (``grid_sample``, the reference), "triton" or "auto" (:func:`resolve_impl`).
    Returns:
        (B, Lq, H * D), or (W, B, Lq, H * D), in at least float32: 16-bit values and locations are
        sampled in float32 (a bfloat16 location near 1 is off by up to 0.2 cells of a 100-cell map).
    """
    if impl != "pytorch" and resolve_impl(impl, value, locations, weights) == "triton":
        return _triton_module()[0].triton_deformable_sample(value, shapes, locations, weights)
    B, _, H, D = value.shape
    Lq, L, P = locations.shape[1], locations.shape[3], locations.shape[4]
    grids = 2 * upcast(locations) - 1
    sets = weights.shape[:-5]
    weights = weights.transpose(-3, -4).reshape(*sets, B * H, 1, Lq, L, P)
    out = 0.0
    for lvl, v in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        h, w = shapes[lvl]
        v = upcast(v).permute(0, 2, 3, 1).reshape(B * H, D, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(B * H, Lq, P, 2)
        samples = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B*H, D, Lq, P)
        out = out + (samples * weights[..., lvl, :]).sum(-1)  # level by level: no stacked copy of the samples
    return out.view(*sets, B, H * D, Lq).transpose(-1, -2)


class MSDeformAttn(nn.Module):
    """Each query attends to ``n_points`` learned offsets around its reference point on every level.
    Parameter names follow the official code (``sampling_offsets``, ``attention_weights``,
    ``value_proj``, ``output_proj``). ``impl``: how it samples (``MODEL.DETR.DEFORMABLE_ATTN_IMPL``,
    :func:`resolve_impl`); the families set it on every deformable attention module after building."""

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4, impl="auto"):
        super().__init__()
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.impl = impl
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        """Official init: zero offset weights, offset bias on a ring of directions (point i at
        radius i + 1), uniform attention, xavier value/output projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2 * math.pi / self.n_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid[:, None, None, :].repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def locations(self, query, reference_points, ctx):
        """query (B, Lq, C), reference_points (B, Lq, L, 2) points or (B, Lq, L, 4) boxes (cxcywh)
        -> (B, Lq, H, L, P, 2) in at least float32. Offsets are in feature cells around points,
        and in fractions of half the box size (divided by the number of points) around boxes."""
        B, Lq, _ = query.shape
        off = upcast(self.sampling_offsets(query)).view(B, Lq, self.n_heads, self.n_levels, self.n_points, 2)
        ref = reference_points[:, :, None, :, None, :]
        if reference_points.shape[-1] == 4:
            return ref[..., :2] + off / self.n_points * ref[..., 2:] * 0.5
        wh = torch.stack([shapes_to_tensor([w, h], query.device) for h, w in ctx.shapes]).to(off.dtype)  # traceable
        return ref + off / wh[None, None, None, :, None, :]

    def weights(self, query, linear):
        """(B, Lq, C) -> softmax over levels x points: (B, Lq, H, L, P) in at least float32."""
        B, Lq, _ = query.shape
        w = upcast(linear(query)).view(B, Lq, self.n_heads, self.n_levels * self.n_points).softmax(-1)
        return w.view(B, Lq, self.n_heads, self.n_levels, self.n_points)

    def values(self, x, padding_mask, linear):
        """(B, N, C) -> per-head values (B, N, H, D), zero on padding tokens."""
        v = linear(x)
        if padding_mask is not None:
            v = v.masked_fill(padding_mask[..., None], 0.0)
        return v.view(*v.shape[:2], self.n_heads, -1)

    def attend(self, query, reference_points, value_in, padding_mask, ctx):
        """query (B, Lq, C), reference_points (B, Lq, L, 2), value_in (B, N, C) -> (B, Lq, C)."""
        loc = self.locations(query, reference_points, ctx)
        out = deformable_sample(self.values(value_in, padding_mask, self.value_proj), ctx.shapes, loc,
                                self.weights(query, self.attention_weights), self.impl)
        return self.output_proj(out)

    def forward(self, x, pos, key_padding_mask=None, ctx=None):
        """Encoder self-attention: queries x + pos at every token's reference point, values x."""
        return self.attend(x + pos, ctx.reference_points, x, key_padding_mask, ctx)

"""Multi-scale deformable attention sampling as two Triton kernels (forward, backward).

Same contract and numerics as :func:`ks_detr.modeling.layers.deformable_attention.deformable_sample`'s
PyTorch path (``grid_sample``, bilinear, ``align_corners=False``, zero padding): a location ``(x, y)`` in
[0, 1] of a level of ``h x w`` cells is read at pixel ``(x * w - 0.5, y * h - 0.5)``; each of its four
neighbouring pixels contributes its bilinear weight when it lies inside the map, zero otherwise.

Layout (one program per block of queries, one (batch, head) and one set of weights):

- value ``(B, N, H, D)``, all levels flattened level by level (``N = sum h_l * w_l``);
- locations ``(B, Lq, H, L, P, 2)``; weights ``(W, B, Lq, H, L, P)`` (W sets sampled at the same points);
- out ``(W, B, Lq, H * D)``.

The backward kernel recomputes the bilinear weights, writes the gradients of the attention weights and
of the locations (per weight set, summed over sets afterwards) and scatters the value gradient with
atomic adds. Computation runs in the promoted dtype of the inputs, at least float32 (as the PyTorch
path upcasts 16-bit inputs).

On CPU tensors the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` in the environment
when the process starts, :func:`interpreting`), which then runs every call, CUDA tensors too.
"""
import functools
import importlib.util
import os

import torch

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .deformable_attention import sampling_dtype

KERNELS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_deformable_kernels.py")
BLOCK_Q = 32  # queries per program


def interpreting():
    """Whether Triton runs kernels in its interpreter, which takes CPU tensors (and copies CUDA ones to the host).

    The bundled Triton decides when it is first imported: ``TRITON_INTERPRET=1`` must be in the environment
    before anything imports ``triton`` (torch and detectron2 do, so in practice: before Python starts), since
    ``triton.language``'s own functions are built for one mode then. Setting it later has no effect here."""
    return isinstance(tl.zeros, InterpretedFunction)


@functools.lru_cache(maxsize=2)
def _kernels(interpret):
    """The kernels module, loaded for the compiled mode or for the interpreter: ``triton.jit`` fixes the mode
    when it decorates, so each mode gets its own copy (the interpreter also writes its helpers into the
    globals of the functions it runs: they stay in that copy)."""
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        name = f"{__name__}_kernels_{'interpreted' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(name, KERNELS_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=64)
def _layout(shapes, device):
    """(L, 2) int32 level sizes (h, w) and (L,) int32 start offsets on ``device``, cached per layout."""
    sizes = torch.tensor(shapes, dtype=torch.int32).reshape(-1, 2)
    starts = torch.cat([sizes.new_zeros(1), (sizes[:, 0] * sizes[:, 1]).cumsum(0)[:-1]]).to(torch.int32)
    return sizes.to(device), starts.to(device)


def _launch_grid(B, Lq, H, W):
    return (triton.cdiv(Lq, BLOCK_Q), B * H, W)


class _DeformableSample(torch.autograd.Function):
    """value (B, N, H, D), locations (B, Lq, H, L, P, 2), weights (W, B, Lq, H, L, P), all contiguous in
    one floating dtype -> (W, B, Lq, H * D)."""

    @staticmethod
    def forward(ctx, value, locations, weights, shapes):
        B, N, H, D = value.shape
        W, _, Lq, _, L, P = weights.shape
        sizes, starts = _layout(shapes, value.device)
        out = value.new_empty(W, B, Lq, H * D)
        _kernels(interpreting())._forward_kernel[_launch_grid(B, Lq, H, W)](
            value, locations, weights, out, sizes, starts, B, N, Lq, H, D, L, P,
            BLOCK_Q=BLOCK_Q, BLOCK_D=triton.next_power_of_2(D))
        ctx.save_for_backward(value, locations, weights)
        ctx.shapes = shapes
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        value, locations, weights = ctx.saved_tensors
        B, N, H, D = value.shape
        W, _, Lq, _, L, P = weights.shape
        sizes, starts = _layout(ctx.shapes, value.device)
        grad_out = grad_out.contiguous().to(value.dtype)
        grad_value = torch.zeros_like(value)
        grad_loc = value.new_empty(W, *locations.shape)
        grad_attn = torch.empty_like(weights)
        _kernels(interpreting())._backward_kernel[_launch_grid(B, Lq, H, W)](
            value, locations, weights, grad_out, grad_value, grad_loc, grad_attn, sizes, starts,
            B, N, Lq, H, D, L, P, BLOCK_Q=BLOCK_Q, BLOCK_D=triton.next_power_of_2(D))
        return grad_value, grad_loc.sum(0) if W > 1 else grad_loc[0], grad_attn, None


def triton_deformable_sample(value, shapes, locations, weights):
    """:func:`deformable_sample` with the Triton kernels: value (B, N, H, D), locations (B, Lq, H, L, P, 2),
    weights (B, Lq, H, L, P) or (W, B, Lq, H, L, P) -> (B, Lq, H * D) or (W, B, Lq, H * D), in the
    promoted dtype of the inputs (at least float32)."""
    dtype = sampling_dtype(value, locations, weights)
    sets = weights.shape[:-5]
    B, _, H, D = value.shape
    Lq = locations.shape[1]
    out = _DeformableSample.apply(value.to(dtype).contiguous(), locations.to(dtype).contiguous(),
                                  weights.to(dtype).reshape(-1, *weights.shape[-5:]).contiguous(),
                                  tuple((int(h), int(w)) for h, w in shapes))
    return out.view(*sets, B, Lq, H * D)

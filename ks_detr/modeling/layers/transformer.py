"""The shared transformer core of every DETR family: attention, encoder layers, MLP, sine embeddings.

All tensors are batch-first: tokens ``(B, N, C)``, padding masks ``(B, N)`` with True = padding.
Knowledge-sharing training stacks the student and teacher streams along the batch axis
(``(S*B, N, C)``, stream-major), so every module here runs all streams in one call.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def build_activation(name):
    """``relu`` | ``prelu`` | ``gelu`` as a module."""
    return {"relu": nn.ReLU, "prelu": nn.PReLU, "gelu": nn.GELU}[name]()


def upcast(x):
    """A floating tensor in at least float32: 16-bit floats (autocast outputs) become float32,
    float32 and float64 tensors are returned as they are."""
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.to(torch.promote_types(x.dtype, torch.float32))


def inverse_sigmoid(x, eps=1e-5):
    """Numerically safe logit of ``x`` in [0, 1], in at least float32 (``1 - x`` and the ``eps``
    clamp are too coarse in 16-bit floats)."""
    x = upcast(x).clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (``layers.i`` as in DETR)."""

    def __init__(self, in_dim, hidden_dim, out_dim, num_layers):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def sine_position_embedding(mask, num_pos_feats, temperature, offset=0.0, scale=2 * math.pi, eps=1e-6):
    """DETR's normalised 2-D sine embedding of a padded feature map.

    Args:
        mask: (B, H, W) bool, True = padding.
        offset: added to the running count before normalising (Deformable DETR: -0.5).
    Returns:
        (B, H, W, 2 * num_pos_feats): y features then x features.
    """
    not_mask = (~mask).to(torch.float32)
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    y = (y + offset) / (y[:, -1:, :] + eps) * scale
    x = (x + offset) / (x[:, :, -1:] + eps) * scale
    return _sine(torch.stack([y, x], -1), num_pos_feats, temperature)


def _sine(values, num_feats, temperature):
    """(..., D) -> (..., D * num_feats): for each of the D values in turn, interleaved sin/cos of
    ``value / temperature^(2i/num_feats)`` (all D in one computation: a handful of operators)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=values.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    v = values[..., None] / dim_t
    return torch.stack((v[..., 0::2].sin(), v[..., 1::2].cos()), dim=-1).flatten(-3)


def sine_embed_points(points, num_feats, temperature=10000, scale=2 * math.pi, swap_xy=True):
    """Sine embedding of normalised points (Conditional / DAB-DETR query positions).

    Args:
        points: (..., D) in [0, 1], coordinates ordered (x, y[, w, h]).
        swap_xy: order the output (y, x[, w, h]) as the official code; False keeps the input order.
    Returns:
        (..., D * num_feats) in at least float32.
    """
    points = upcast(points)  # before the 2*pi scale: a bfloat16 angle near 2*pi is off by up to 0.016
    if swap_xy:
        swapped = points[..., :2].flip(-1)
        points = torch.cat([swapped, points[..., 2:]], -1) if points.shape[-1] > 2 else swapped
    return _sine(points * scale, num_feats, temperature)


class _ScaleByMask(torch.autograd.Function):
    """y = x * keep * scale, saving only the bool mask for backward (the product reads the bool mask as it is,
    in one operator)."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.mul(x, keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, keep).mul_(ctx.scale), None, None


def keep_mask(shape, p):
    """A CPU Bernoulli(1 - p) bool mask of ``shape``, drawn from 16-bit random integers (p rounded to
    1/65536): about 2x faster than torch's CPU dropout, whose random number generation dominates a
    CPU decoder step."""
    n = math.prod(shape)
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    return (bits.view(torch.int16)[:n] >= -32768 + round(p * 65536)).view(shape)


def dropout(x, p, training):
    """Inverted dropout; on CPU with :func:`keep_mask`, elsewhere ``F.dropout``."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or torch.jit.is_tracing():
        return F.dropout(x, p, True)
    return _ScaleByMask.apply(x, keep_mask(x.shape, p), 1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` through :func:`dropout` (same semantics, faster on CPU)."""

    def forward(self, x):
        return dropout(x, self.p, self.training)


def multihead_attention(q, k, v, num_heads, key_padding_mask=None, dropout_p=0.0, attn_mask=None):
    """Scaled dot-product attention split into heads (one fused SDPA call).

    Args:
        q: (B, Lq, E); k: (B, Lk, E); v: (B, Lk, Ev); E and Ev divisible by ``num_heads``.
        key_padding_mask: (B, Lk) bool, True = ignore this key.
        attn_mask: (Lq, Lk) bool, True = query i must not see key j (denoising groups).
    Returns:
        (B, Lq, Ev)
    """
    B, Lq, _ = q.shape
    Lk = k.shape[1]
    q = q.view(B, Lq, num_heads, -1).transpose(1, 2)
    k = k.view(B, Lk, num_heads, -1).transpose(1, 2)
    v = v.view(B, Lk, num_heads, -1).transpose(1, 2)
    blocked = None  # (B or 1, 1, Lq or 1, Lk), True = blocked
    if key_padding_mask is not None:
        blocked = key_padding_mask[:, None, None, :]
    if attn_mask is not None:
        blocked = attn_mask[None, None] if blocked is None else blocked | attn_mask[None, None]
    if dropout_p > 0.0 and q.device.type == "cpu" and not torch.jit.is_tracing():
        # CPU SDPA with dropout falls back to an unfused path with slow dropout: spell it out. The
        # 1/sqrt(d) and 1/(1-p) scales go on the small q and output, not on the (Lq, Lk) weights.
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
        if blocked is not None:
            logits = logits.masked_fill(blocked, float("-inf"))
        weights = logits.softmax(-1)
        out = (torch.mul(weights, keep_mask(weights.shape, dropout_p)) @ v) * (1.0 / (1.0 - dropout_p))
        return out.transpose(1, 2).reshape(B, Lq, -1)
    attn_mask = None if blocked is None else ~blocked  # SDPA's boolean mask: True = may attend
    if q.device.type == "cpu" and v.shape[-1] < q.shape[-1]:
        # CPU flash attention needs one head size for q, k and v; otherwise SDPA takes its unfused path,
        # which keeps the (Lq, Lk) weights for the backward. Zero columns of v give zero output columns.
        d_v = v.shape[-1]
        v = F.pad(v, (0, q.shape[-1] - d_v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)[..., :d_v]
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    return out.transpose(1, 2).reshape(B, Lq, -1)


class HeadsAttention(nn.Module):
    """Multi-head attention on already projected q/k/v, followed by ``out_proj`` (C_v -> C_v).

    The Conditional/DAB decoders project q, k, v themselves (content and position parts).
    """

    def __init__(self, value_dim, num_heads, dropout=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.out_proj = nn.Linear(value_dim, value_dim)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q, k, v, key_padding_mask=None, attn_mask=None):
        """q: (B, Lq, E), k: (B, Lk, E), v: (B, Lk, C_v) -> (B, Lq, C_v); masks as in
        :func:`multihead_attention`."""
        drop = self.dropout if self.training else 0.0
        return self.out_proj(multihead_attention(q, k, v, self.num_heads, key_padding_mask, drop, attn_mask))


class MultiheadAttention(HeadsAttention):
    """Self-attention with packed input projections; parameter names follow ``nn.MultiheadAttention``
    (``in_proj_weight`` (3C, C) rows [W_q; W_k; W_v], ``in_proj_bias``, ``out_proj``)."""

    def __init__(self, embed_dim, num_heads, dropout=0.0):
        super().__init__(embed_dim, num_heads, dropout)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        nn.init.xavier_uniform_(self.in_proj_weight)

    def project(self, x, pos, weight, bias):
        """Q = W_q(x+p), K = W_k(x+p), V = W_v x with the packed ``weight`` (3C, C)."""
        C = x.shape[-1]
        qk = F.linear(x + pos, weight[: 2 * C], bias[: 2 * C])
        v = F.linear(x, weight[2 * C :], bias[2 * C :])
        return qk[..., :C], qk[..., C:], v

    def forward(self, x, pos, key_padding_mask=None, ctx=None, attn_mask=None):
        """x, pos: (B, N, C) -> (B, N, C). ``ctx`` (multi-scale layout) is unused here;
        ``attn_mask``: (N, N) bool, True = blocked."""
        q, k, v = self.project(x, pos, self.in_proj_weight, self.in_proj_bias)
        return super().forward(q, k, v, key_padding_mask, attn_mask)


class LayerStack(nn.Module):
    """A stack of layers (``self.layers``) whose subclass runs a layer through :meth:`run`. With
    ``recompute`` (set by the model from ``MODEL.KS.RECOMPUTE_DECODER`` / ``RECOMPUTE_KS_LAYERS``) such a
    layer keeps only its inputs for the backward and recomputes its activations there
    (``torch.utils.checkpoint``; dropout draws the same masks again)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.recompute = False

    def run(self, layer, *args, **kwargs):
        """``layer(*args, **kwargs)``, recomputed in the backward when ``recompute`` and gradients are on."""
        return recomputed(layer, *args, **kwargs) if self.recompute and self.training else layer(*args, **kwargs)


def recomputed(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` keeping only its inputs for the backward, which recomputes the rest
    (``torch.utils.checkpoint``; dropout draws the same masks again); a plain call without gradients."""
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


class TransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: self-attention -> add & norm -> FFN -> add & norm."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation, attention=None):
        super().__init__()
        self.self_attn = attention or MultiheadAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.activation = build_activation(activation)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)

    def finish(self, residual, attn_out):
        """Add & norm, FFN, add & norm: (B, N, C) -> (B, N, C)."""
        x = self.norm1(residual + self.dropout1(attn_out))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.norm2(x + self.dropout2(ffn))

    def forward(self, x, pos, key_padding_mask=None, ctx=None):
        """x, pos: (B, N, C) -> (B, N, C); ``ctx``: token layout for multi-scale attention."""
        return self.finish(x, self.self_attn(x, pos, key_padding_mask, ctx))


class TransformerEncoder(LayerStack):
    """A stack of encoder layers; knowledge-sharing layers may widen the batch into streams.

    In KS training (``ks``, a :class:`ks_detr.modeling.ks.KSBatch`) the layers ``ks.layers`` are
    :class:`ks_detr.modeling.ks.KSEncoderLayer` and turn ``(B, N, C)`` into ``(S*B, N, C)``,
    S = ``ks.num_streams``; later layers then run on all streams. With ``pos_scale`` (DAB-DETR)
    every layer sees ``pos * pos_scale(x)``. ``recompute`` applies to the KS layers only, piece by piece
    (:meth:`ks_detr.modeling.ks.KSEncoderLayer.forward_ks`).
    """

    def __init__(self, layers, pos_scale=None):
        super().__init__(layers)
        self.query_scale = pos_scale

    def forward(self, x, pos, key_padding_mask, ks=None, ctx=None):
        """x, pos: (B, N, C), key_padding_mask (B, N) -> (S*B, N, C), S = 1 without teachers.

        ``ctx``: multi-scale token layout (:class:`~ks_detr.modeling.deformable_attention.MultiScaleContext`).
        """
        streams = 1
        pos_s, mask_s, ctx_s = pos, key_padding_mask, ctx  # repeated once per stream
        for i, layer in enumerate(self.layers):
            layer_pos = pos_s if self.query_scale is None else pos_s * self.query_scale(x)
            if ks is not None and i in ks.layers:
                x = layer.forward_ks(x, layer_pos, key_padding_mask, ks.fg, ks.smlp, streams, ctx_s,
                                     recompute=self.recompute and self.training)
                if streams == 1:
                    streams = ks.num_streams
                    if i + 1 < len(self.layers):  # the later layers run on every stream
                        pos_s = pos.repeat(streams, 1, 1)
                        mask_s = key_padding_mask.repeat(streams, 1)
                        ctx_s = None if ctx is None else ctx.repeat(streams)
            else:
                x = layer(x, layer_pos, mask_s, ctx_s)
        return x

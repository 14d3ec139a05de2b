"""Pure-PyTorch multi-scale deformable attention against a naive per-point bilinear reference,
and the deformable triple attention's three streams."""
import pytest
import torch

from ks_detr.modeling.layers import MSDeformAttn, MultiScaleContext, deformable_sample
from ks_detr.modeling.ks import DeformableTripleAttention


def bilinear(img, x, y):
    """img (D, h, w); (x, y) normalised in [0, 1] with pixel centres at (i + 0.5) / w; zeros outside."""
    D, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = int(torch.floor(px)), int(torch.floor(py))
    out = torch.zeros(D, dtype=img.dtype)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            if 0 <= xx < w and 0 <= yy < h:
                out += img[:, yy, xx] * (1 - abs(px - xx)) * (1 - abs(py - yy))
    return out


def naive(value, shapes, loc, weights):
    B, N, H, D = value.shape
    Lq, P = loc.shape[1], loc.shape[4]
    out = torch.zeros(B, Lq, H * D, dtype=value.dtype)
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    for b in range(B):
        for q in range(Lq):
            for hd in range(H):
                acc = torch.zeros(D, dtype=value.dtype)
                for lvl, (h, w) in enumerate(shapes):
                    img = value[b, starts[lvl]:starts[lvl + 1], hd].T.reshape(D, h, w)
                    for p in range(P):
                        x, y = loc[b, q, hd, lvl, p]
                        acc += weights[b, q, hd, lvl, p] * bilinear(img, x, y)
                out[b, q, hd * D:(hd + 1) * D] = acc
    return out


def test_deformable_sample_matches_naive_reference():
    torch.manual_seed(0)
    shapes = [(5, 7), (3, 4), (2, 1)]
    B, H, D, Lq, P = 2, 2, 3, 4, 3
    N = sum(h * w for h, w in shapes)
    value = torch.randn(B, N, H, D, dtype=torch.float64)
    loc = torch.rand(B, Lq, H, len(shapes), P, 2, dtype=torch.float64) * 1.2 - 0.1  # some outside
    weights = torch.rand(B, Lq, H, len(shapes), P, dtype=torch.float64)
    torch.testing.assert_close(deformable_sample(value, shapes, loc, weights), naive(value, shapes, loc, weights))
    # W sets of weights on the same samples: one output per set
    sets = torch.rand(3, B, Lq, H, len(shapes), P, dtype=torch.float64)
    out = deformable_sample(value, shapes, loc, sets)
    assert out.shape == (3, B, Lq, H * D)
    for i in range(3):
        torch.testing.assert_close(out[i], naive(value, shapes, loc, sets[i]))


def padded_context():
    masks = [torch.zeros(2, 6, 8, dtype=torch.bool), torch.zeros(2, 3, 4, dtype=torch.bool)]
    masks[0][1, 4:, :] = True  # image 1 is padded at the bottom and right
    masks[0][1, :, 6:] = True
    masks[1][1, 2:, :] = True
    masks[1][1, :, 3:] = True
    return masks, MultiScaleContext.from_masks(masks)


def test_context_valid_ratios_and_reference_points():
    masks, ctx = padded_context()
    torch.testing.assert_close(ctx.valid_ratios[1], torch.tensor([[6 / 8, 4 / 6], [3 / 4, 2 / 3]]))
    assert ctx.reference_points.shape == (2, 48 + 12, 2, 2)
    # token (row 1, col 2) of level 0 in image 1: centre (2.5 / 6, 1.5 / 4) of the valid area
    torch.testing.assert_close(ctx.reference_points[1, 1 * 8 + 2, 0], torch.tensor([2.5 / 6 * 6 / 8, 1.5 / 4 * 4 / 6]))


def test_msdeformattn_masks_padding_values_and_matches_manual_composition():
    torch.manual_seed(1)
    masks, ctx = padded_context()
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3).double()
    for p in attn.parameters():  # non-trivial offsets and weights
        torch.nn.init.normal_(p, std=0.3)
    key_mask = torch.cat([m.flatten(1) for m in masks], 1)
    x, pos = torch.randn(2, 60, 16, dtype=torch.float64), torch.randn(2, 60, 16, dtype=torch.float64)
    out = attn(x, pos, key_mask, ctx)
    q = x + pos
    off = attn.sampling_offsets(q).view(2, 60, 2, 2, 3, 2)
    wh = torch.tensor([[8.0, 6.0], [4.0, 3.0]], dtype=torch.float64)
    loc = ctx.reference_points.double()[:, :, None, :, None, :] + off / wh[None, None, None, :, None, :]
    w = attn.attention_weights(q).view(2, 60, 2, 6).softmax(-1).view(2, 60, 2, 2, 3)
    v = attn.value_proj(x).masked_fill(key_mask[..., None], 0).view(2, 60, 2, 8)
    torch.testing.assert_close(out, attn.output_proj(naive(v, ctx.shapes, loc, w)))


@pytest.mark.parametrize("mode", ["triple", "share_v", "share_a"])
def test_deformable_triple_attention_streams(mode):
    """Stream s: A V; a: A' V (teacher weights); v: A V' (teacher values); same locations. One
    incoming stream (each value map sampled once) and one per stream (a later KS layer)."""
    torch.manual_seed(2)
    masks, ctx = padded_context()
    key_mask = torch.cat([m.flatten(1) for m in masks], 1)
    attn = DeformableTripleAttention(16, 2, 2, 3, mode=mode).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ctx = MultiScaleContext(ctx.shapes, ctx.valid_ratios.double(), ctx.reference_points.double())
    S = len(attn.streams)
    x, pos, xt = (torch.randn(2, 60, 16, dtype=torch.float64) for _ in range(3))
    out = attn.forward_ks(x, pos, xt, key_mask, 1, ctx)
    assert out.shape == (2 * S, 60, 16)
    loc = attn.locations(x + pos, ctx.reference_points, ctx)
    A, V = attn.weights(x + pos, attn.attention_weights), attn.values(x, key_mask, attn.value_proj)
    parts = {"s": (A, V)}
    if "a" in attn.streams:
        parts["a"] = (attn.weights(xt + pos, attn.attention_weights_teacher), V)
    if "v" in attn.streams:
        parts["v"] = (A, attn.values(xt, key_mask, attn.value_proj_teacher))
    for s, kind in enumerate(attn.streams):
        w, v = parts[kind]
        torch.testing.assert_close(out[2 * s:2 * s + 2], attn.output_proj(naive(v, ctx.shapes, loc, w)))
    torch.testing.assert_close(out[:2], attn(x, pos, key_mask, ctx))  # the student is plain MSDeformAttn

    # S incoming streams: stream i reads its own input (its locations, the student's or the teacher's parts)
    xs, xts = torch.randn(2 * S, 60, 16, dtype=torch.float64), torch.randn(2 * S, 60, 16, dtype=torch.float64)
    ctx_s = ctx.repeat(S)
    out = attn.forward_ks(xs, pos.repeat(S, 1, 1), xts, key_mask, S, ctx_s)
    for s, kind in enumerate(attn.streams):
        x, xt = xs[2 * s:2 * s + 2], xts[2 * s:2 * s + 2]
        loc = attn.locations(x + pos, ctx.reference_points, ctx)
        w = attn.weights(x + pos, attn.attention_weights) if kind != "a" else \
            attn.weights(xt + pos, attn.attention_weights_teacher)
        v = attn.values(x, key_mask, attn.value_proj) if kind != "v" else \
            attn.values(xt, key_mask, attn.value_proj_teacher)
        torch.testing.assert_close(out[2 * s:2 * s + 2], attn.output_proj(naive(v, ctx.shapes, loc, w)))

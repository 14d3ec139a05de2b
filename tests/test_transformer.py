"""Shared transformer pieces: fast CPU dropout and the sine embeddings, against direct formulas."""
import math

import torch

from ks_detr.modeling.layers import dropout, multihead_attention, sine_embed_points, sine_position_embedding
from ks_detr.modeling.layers.transformer import keep_mask


def test_dropout_keeps_one_minus_p_and_rescales():
    torch.manual_seed(0)
    x = torch.randn(1000, 1000, requires_grad=True)
    y = dropout(x, 0.1, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003  # 1e6 draws: std 3e-4
    torch.testing.assert_close(y[kept], x[kept] / 0.9)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.9)
    assert dropout(x, 0.1, training=False) is x
    # different calls draw different masks
    assert not torch.equal(dropout(x, 0.5, True) != 0, dropout(x, 0.5, True) != 0)


def test_attention_dropout_path_matches_sdpa_without_dropout():
    """With p -> 0 the explicit CPU dropout path equals SDPA (padding masked in both)."""
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 5, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 8)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    ref = multihead_attention(q, k, v, 4, pad, 0.0)
    out = multihead_attention(q, k, v, 4, pad, 1e-9)  # explicit path, keeps every element
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_attention_dropout_path_against_the_formula_with_its_mask():
    """The CPU dropout path is softmax(q k^T / sqrt(d) + mask) * keep / (1 - p) @ v, per head, with the
    keep mask that :func:`keep_mask` draws from the same RNG state; the gradients follow."""
    torch.manual_seed(2)
    B, H, Lq, Lk, d = 2, 4, 5, 7, 4
    q = torch.randn(B, Lq, H * d, dtype=torch.float64, requires_grad=True)
    k, v = torch.randn(B, Lk, H * d, dtype=torch.float64), torch.randn(B, Lk, H * 2, dtype=torch.float64)
    pad = torch.zeros(B, Lk, dtype=torch.bool)
    pad[1, 5:] = True
    state = torch.get_rng_state()
    out = multihead_attention(q, k, v, H, pad, 0.3)
    torch.set_rng_state(state)
    keep = keep_mask((B, H, Lq, Lk), 0.3)
    assert 0.4 < keep.double().mean() < 0.95
    qh = q.view(B, Lq, H, d).transpose(1, 2)
    kh, vh = k.view(B, Lk, H, d).transpose(1, 2), v.view(B, Lk, H, 2).transpose(1, 2)
    logits = (qh @ kh.transpose(-1, -2) / math.sqrt(d)).masked_fill(pad[:, None, None], float("-inf"))
    ref = ((logits.softmax(-1) * keep / 0.7) @ vh).transpose(1, 2).reshape(B, Lq, H * 2)
    torch.testing.assert_close(out, ref)
    g_out, = torch.autograd.grad(out.sum(), q)
    g_ref, = torch.autograd.grad(ref.sum(), q)
    torch.testing.assert_close(g_out, g_ref)


def test_sine_position_embedding_formula():
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[0, :, 3] = True  # last column is padding
    pos = sine_position_embedding(mask, num_pos_feats=8, temperature=10000)
    assert pos.shape == (1, 3, 4, 16)
    i, j, c = 1, 2, 5  # row 1, column 2, channel 5 of the x half
    x = (j + 1) / (3 + 1e-6) * 2 * math.pi  # cumulative count over the 3 valid columns
    expect = math.cos(x / 10000 ** (2 * (c // 2) / 8))  # odd channel -> cos
    assert math.isclose(pos[0, i, j, 8 + c].item(), expect, rel_tol=1e-5)
    y = (i + 1) / (3 + 1e-6) * 2 * math.pi
    assert math.isclose(pos[0, i, j, 4].item(), math.sin(y / 10000 ** (4 / 8)), rel_tol=1e-5)


def test_sine_embed_points_orders_y_then_x():
    p = torch.tensor([[0.25, 0.75]])
    e = sine_embed_points(p, num_feats=4)
    y, x = 0.75 * 2 * math.pi, 0.25 * 2 * math.pi
    expect = [math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100),
              math.sin(x), math.cos(x), math.sin(x / 100), math.cos(x / 100)]
    torch.testing.assert_close(e[0], torch.tensor(expect), rtol=1e-5, atol=1e-6)


def test_attention_with_narrower_values_matches_the_formula_and_keeps_no_weights():
    """Conditional/DAB cross-attention: q, k heads of size 2d, v heads of size d. The result and its
    gradients equal softmax(q k^T / sqrt(2d) + masks) @ v per head, and the backward keeps no
    (Lq, Lk) attention weights (the fused SDPA path, with v zero-padded to the q/k head size)."""
    torch.manual_seed(3)
    B, H, Lq, Lk, d = 2, 4, 48, 40, 4
    q = torch.randn(B, Lq, H * 2 * d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Lk, H * 2 * d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Lk, H * d, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(B, Lk, dtype=torch.bool)
    pad[1, 30:] = True
    blocked = torch.rand(Lq, Lk) < 0.3
    blocked[:, 0] = False  # every query sees a key
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = multihead_attention(q, k, v, H, pad, 0.0, blocked)
    assert out.shape == (B, Lq, H * d)
    assert max(saved) < B * H * Lq * Lk
    qh, kh = (t.view(B, -1, H, 2 * d).transpose(1, 2) for t in (q, k))
    vh = v.view(B, Lk, H, d).transpose(1, 2)
    logits = (qh @ kh.transpose(-1, -2) / math.sqrt(2 * d)).masked_fill(pad[:, None, None] | blocked, float("-inf"))
    ref = (logits.softmax(-1) @ vh).transpose(1, 2).reshape(B, Lq, H * d)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b)

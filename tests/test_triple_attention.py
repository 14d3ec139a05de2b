"""Triple attention against a naive per-head loop written independently here."""
import math

import pytest
import torch

from ks_detr.modeling.ks import SMLP, KSEncoderLayer, TripleAttention
from ks_detr.modeling.layers import TransformerEncoderLayer


def naive_attention(q, k, v, pad, heads):
    """q, k: (N, C), v: (N, C), pad: (N,) bool -> (N, C), one head at a time, explicit softmax."""
    N, C = q.shape
    d = C // heads
    out = torch.zeros(N, v.shape[1], dtype=q.dtype)
    dv = v.shape[1] // heads
    for h in range(heads):
        qh, kh, vh = q[:, h * d:(h + 1) * d], k[:, h * d:(h + 1) * d], v[:, h * dv:(h + 1) * dv]
        for i in range(N):
            logits = torch.stack([(qh[i] * kh[j]).sum() / math.sqrt(d) for j in range(N)])
            logits = logits.masked_fill(pad, float("-inf"))
            w = logits.exp() / logits.exp().sum()
            out[i, h * dv:(h + 1) * dv] = (w[:, None] * vh).sum(0)
    return out


def reference(attn, x, pos, xt, pad):
    """Student, teacher-weights and teacher-values outputs for one image, from the raw parameters."""
    C = x.shape[-1]
    W, b = attn.in_proj_weight, attn.in_proj_bias
    Wt, bt = attn.teacher_in_proj_weight, attn.teacher_in_proj_bias
    lin = lambda z, i, W, b: z @ W[i * C:(i + 1) * C].T + b[i * C:(i + 1) * C]  # noqa: E731
    q, k, v = lin(x + pos, 0, W, b), lin(x + pos, 1, W, b), lin(x, 2, W, b)
    qt, kt, vt = lin(xt + pos, 0, Wt, bt), lin(xt + pos, 1, Wt, bt), lin(xt, 2, Wt, bt)
    o = lambda a: a @ attn.out_proj.weight.T + attn.out_proj.bias  # noqa: E731
    h = attn.num_heads
    return {
        "s": o(naive_attention(q, k, v, pad, h)),
        "a": o(naive_attention(qt, kt, v, pad, h)),
        "v": o(naive_attention(q, k, vt, pad, h)),
    }


@pytest.mark.parametrize("mode", ["triple", "share_v", "share_a"])
def test_triple_attention_matches_naive_reference(mode):
    torch.manual_seed(0)
    B, N, C, heads = 2, 7, 16, 4
    attn = TripleAttention(C, heads, dropout=0.0, mode=mode).double()
    with torch.no_grad():  # non-trivial biases
        attn.in_proj_bias.normal_()
        attn.teacher_in_proj_bias.normal_()
        attn.out_proj.bias.normal_()
    x, pos = torch.randn(B, N, C).double(), torch.randn(B, N, C).double()
    xt = torch.randn(B, N, C).double()
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, 5:] = True  # second image: last two tokens are padding
    out = attn.forward_ks(x, pos, xt, pad, streams_in=1)
    S = len(attn.streams)
    assert out.shape == (S * B, N, C)
    for b in range(B):
        ref = reference(attn, x[b], pos[b], xt[b], pad[b])
        for s, kind in enumerate(attn.streams):
            torch.testing.assert_close(out[s * B + b], ref[kind], rtol=1e-10, atol=1e-10)
    # the student stream is the plain attention
    torch.testing.assert_close(out[:B], attn(x, pos, pad), rtol=1e-10, atol=1e-10)


def test_later_ks_layer_keeps_each_stream_kind():
    """With 3 incoming streams, stream 'a' uses teacher q/k, stream 'v' the teacher values."""
    torch.manual_seed(1)
    B, N, C = 1, 5, 8
    attn = TripleAttention(C, 2).double()
    x, pos, xt = (torch.randn(3 * B, N, C).double() for _ in range(3))
    pad = torch.zeros(B, N, dtype=torch.bool)
    out = attn.forward_ks(x, pos, xt, pad, streams_in=3)
    for s, kind in enumerate("sav"):
        ref = reference(attn, x[s], pos[s], xt[s], pad[0])[kind]
        torch.testing.assert_close(out[s], ref, rtol=1e-10, atol=1e-10)


def test_ks_layer_without_mask_is_the_plain_layer():
    """Eval path: a KS encoder layer equals a TransformerEncoderLayer with the student weights."""
    torch.manual_seed(2)
    ks = KSEncoderLayer(16, 4, 32, 0.0, "relu").eval()
    plain = TransformerEncoderLayer(16, 4, 32, 0.0, "relu").eval()
    missing = plain.load_state_dict(ks.state_dict(), strict=False)
    assert sorted(missing.unexpected_keys) == ["self_attn.teacher_in_proj_bias", "self_attn.teacher_in_proj_weight"]
    assert missing.missing_keys == []
    x, pos = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, -1] = True
    torch.testing.assert_close(ks(x, pos, pad), plain(x, pos, pad))


def test_ks_layer_streams_share_norm_and_ffn():
    """Each stream = finish(x, attention_stream): same residual, shared norms and FFN."""
    torch.manual_seed(3)
    layer = KSEncoderLayer(16, 4, 32, 0.0, "relu").double()
    smlp = SMLP(16).double()
    x, pos = torch.randn(2, 6, 16).double(), torch.randn(2, 6, 16).double()
    pad = torch.zeros(2, 6, dtype=torch.bool)
    fg = torch.rand(2, 6) > 0.5
    out = layer.forward_ks(x, pos, pad, fg, smlp, 1)
    attn = layer.self_attn.forward_ks(x, pos, smlp(x, fg), pad, 1)
    for s in range(3):
        torch.testing.assert_close(out[2 * s:2 * s + 2], layer.finish(x, attn[2 * s:2 * s + 2]))


def test_smlp_replaces_only_foreground_tokens():
    torch.manual_seed(4)
    smlp = SMLP(8)
    x = torch.randn(2, 5, 8)
    fg = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = smlp(x, fg)
    for b in range(2):
        for n in range(5):
            expect = torch.relu(smlp.linear.weight @ x[b, n] + smlp.linear.bias) if fg[b, n] else x[b, n]
            torch.testing.assert_close(out[b, n], expect)

"""Triple attention (student + two teachers) and the knowledge-sharing encoder layer.

Streams are stacked along the batch axis, stream-major: ``(S*B, N, C)``. Stream kinds:
``"s"`` student (A V), ``"a"`` teacher attention weights with student values (A' V),
``"v"`` student attention weights with teacher values (A V'). With teachers on, every stream
runs through one SDPA call and one shared out-projection, norm and FFN.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..transformer import MultiheadAttention, TransformerEncoderLayer, multihead_attention

STREAMS = {"triple": ("s", "a", "v"), "share_v": ("s", "a"), "share_a": ("s", "v")}


class TripleAttention(MultiheadAttention):
    """Student self-attention plus teacher projections W'_q, W'_k, W'_v.

    Student: Q = W_q(x+p), K = W_k(x+p), V = W_v x. Teacher: Q' = W'_q(x~+p), K' = W'_k(x~+p),
    V' = W'_v x~. Outputs W_o(A V), W_o(A' V), W_o(A V') share ``out_proj``. In eval (or without a
    mask) only the student runs: exactly :class:`MultiheadAttention`.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, mode="triple"):
        super().__init__(embed_dim, num_heads, dropout)
        self.streams = STREAMS[mode]
        self.teacher_in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.teacher_in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.reset_packed()

    def reset_packed(self):
        """Official init: one xavier-uniform over the packed (6C, C) [student; teacher] tensor."""
        packed = torch.empty(2 * self.in_proj_weight.shape[0], self.in_proj_weight.shape[1])
        nn.init.xavier_uniform_(packed)
        with torch.no_grad():
            self.in_proj_weight.copy_(packed[: self.in_proj_weight.shape[0]])
            self.teacher_in_proj_weight.copy_(packed[self.in_proj_weight.shape[0] :])

    def forward_ks(self, x, pos, x_tilde, key_padding_mask, streams_in, ctx=None):
        """Attention of every stream before the residual.

        Args:
            x, pos: (S_in*B, N, C) layer input and its position embedding, S_in = 1 (only the
                student) or len(self.streams); x_tilde: sMLP(x); key_padding_mask: (B, N).
        Returns:
            (S*B, N, C), streams ordered as ``self.streams``.
        """
        S = len(self.streams)
        student = self.project(x, pos, self.in_proj_weight, self.in_proj_bias)
        teacher = self.project(x_tilde, pos, self.teacher_in_proj_weight, self.teacher_in_proj_bias)
        chunks = [[t.chunk(streams_in) for t in student], [t.chunk(streams_in) for t in teacher]]
        q, k, v = [], [], []
        for i, kind in enumerate(self.streams):
            j = i if streams_in == S else 0
            qk_src = chunks[kind == "a"]
            q.append(qk_src[0][j])
            k.append(qk_src[1][j])
            v.append(chunks[kind == "v"][2][j])
        drop = self.dropout if self.training else 0.0
        out = multihead_attention(
            torch.cat(q), torch.cat(k), torch.cat(v), self.num_heads,
            key_padding_mask.repeat(S, 1), drop,
        )
        return self.out_proj(out)


class KSEncoderLayer(TransformerEncoderLayer):
    """Encoder layer whose self-attention is a triple attention (:class:`TripleAttention` or the
    deformable one); the residual, norms and FFN are shared by all streams. Without a foreground
    mask it is the plain student layer."""

    is_ks_layer = True

    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation, mode="triple", attention=None):
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation,
                         attention=attention or TripleAttention(d_model, nhead, dropout, mode))

    def forward_ks(self, x, pos, key_padding_mask, fg_mask, smlp, streams_in, ctx=None):
        """x, pos: (S_in*B, N, C), masks (B, N) -> (S*B, N, C)."""
        x_tilde = smlp(x, fg_mask.repeat(streams_in, 1))
        attn = self.self_attn.forward_ks(x, pos, x_tilde, key_padding_mask, streams_in, ctx)
        S = len(self.self_attn.streams)
        residual = x if streams_in == S else x.repeat(S, 1, 1)
        return self.finish(residual, attn)

"""Triple attention (student + two teachers) and the knowledge-sharing encoder layer.

Streams are stacked along the batch axis, stream-major: ``(S*B, N, C)``. Stream kinds:
``"s"`` student (A V), ``"a"`` teacher attention weights with student values (A' V),
``"v"`` student attention weights with teacher values (A V'). With teachers on, every stream
runs through one SDPA call and one shared out-projection, norm and FFN.
"""
import torch
from torch import nn

from ..deformable_attention import MSDeformAttn, deformable_sample
from ..transformer import MultiheadAttention, TransformerEncoderLayer, multihead_attention

STREAMS = {"triple": ("s", "a", "v"), "share_v": ("s", "a"), "share_a": ("s", "v")}


def stack_streams(kinds, streams_in, student, teacher, teacher_parts):
    """Assemble the attention inputs of every stream along the batch.

    Args:
        kinds: stream kinds ("s", "a", "v"); streams_in: 1 or len(kinds) incoming streams.
        student, teacher: tuples of (S_in*B, ...) tensors (e.g. q, k, v), part by part.
        teacher_parts: kind -> indices of the parts this stream takes from the teacher (a teacher
            part that no stream takes may be None).
    Returns:
        tuple of (S*B, ...) tensors, streams in ``kinds`` order.
    """
    s = [t.chunk(streams_in) for t in student]
    t = [None if x is None else x.chunk(streams_in) for x in teacher]
    out = [[] for _ in student]
    for i, kind in enumerate(kinds):
        j = i if streams_in == len(kinds) else 0
        for p in range(len(student)):
            out[p].append((t if p in teacher_parts[kind] else s)[p][j])
    return tuple(torch.cat(o) for o in out)


class TripleAttention(MultiheadAttention):
    """Student self-attention plus teacher projections W'_q, W'_k, W'_v.

    Student: Q = W_q(x+p), K = W_k(x+p), V = W_v x. Teacher: Q' = W'_q(x~+p), K' = W'_k(x~+p),
    V' = W'_v x~. Outputs W_o(A V), W_o(A' V), W_o(A V') share ``out_proj``. In eval (or without a
    mask) only the student runs: exactly :class:`MultiheadAttention`.
    """

    TEACHER_PARTS = {"s": (), "a": (0, 1), "v": (2,)}  # (q, k, v) taken from the teacher

    def __init__(self, embed_dim, num_heads, dropout=0.0, mode="triple"):
        super().__init__(embed_dim, num_heads, dropout)
        self.streams = STREAMS[mode]
        self.teacher_in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.teacher_in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.reset_teacher()

    def reset_teacher(self):
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
        student = self.project(x, pos, self.in_proj_weight, self.in_proj_bias)
        teacher = self.project(x_tilde, pos, self.teacher_in_proj_weight, self.teacher_in_proj_bias)
        q, k, v = stack_streams(self.streams, streams_in, student, teacher, self.TEACHER_PARTS)
        drop = self.dropout if self.training else 0.0
        out = multihead_attention(q, k, v, self.num_heads, key_padding_mask.repeat(len(self.streams), 1), drop)
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


class DeformableTripleAttention(MSDeformAttn):
    """Deformable triple attention: the teachers add only their own attention-weight projection
    (from x~ + p) and value projection (from x~); sampling locations (from x + p) and
    ``output_proj`` are the student's. Streams: A V, A' V, A V' as in :class:`TripleAttention`.
    The ablation modes build only the projection they use (``share_v``: weights, ``share_a``:
    values), so every parameter gets a gradient (no unused parameters under DDP)."""

    TEACHER_PARTS = {"s": (), "a": (0,), "v": (1,)}  # (weights, values) taken from the teacher

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4, mode="triple"):
        super().__init__(d_model, n_levels, n_heads, n_points)
        self.streams = STREAMS[mode]
        if "a" in self.streams:
            self.attention_weights_teacher = nn.Linear(d_model, n_heads * n_levels * n_points)
        if "v" in self.streams:
            self.value_proj_teacher = nn.Linear(d_model, d_model)
        self.reset_teacher()

    def reset_teacher(self):
        """As the official code ends up: xavier weights, zero biases."""
        for name in ("attention_weights_teacher", "value_proj_teacher"):
            lin = getattr(self, name, None)
            if lin is None:
                continue
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward_ks(self, x, pos, x_tilde, key_padding_mask, streams_in, ctx):
        """x, pos, x_tilde: (S_in*B, N, C); key_padding_mask (B, N); ctx for S_in*B rows -> (S*B, N, C)."""
        S = len(self.streams)
        mask = key_padding_mask.repeat(streams_in, 1)
        q = x + pos
        loc = self.locations(q, ctx.reference_points, ctx)
        student = (self.weights(q, self.attention_weights), self.values(x, mask, self.value_proj))
        teacher = (self.weights(x_tilde + pos, self.attention_weights_teacher) if "a" in self.streams else None,
                   self.values(x_tilde, mask, self.value_proj_teacher) if "v" in self.streams else None)
        weights, values = stack_streams(self.streams, streams_in, student, teacher, self.TEACHER_PARTS)
        loc = loc.repeat(S // streams_in, *[1] * (loc.dim() - 1))
        return self.output_proj(deformable_sample(values, ctx.shapes, loc, weights))

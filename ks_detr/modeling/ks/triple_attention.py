"""Triple attention (student + two teachers) and the knowledge-sharing encoder layer.

Streams are stacked along the batch axis, stream-major: ``(S*B, N, C)``; their kinds
(:data:`~ks_detr.modeling.ks.sharing.STREAMS`): ``"s"`` student (A V), ``"a"`` teacher attention
weights with student values (A' V), ``"v"`` student attention weights with teacher values (A V').
With teachers on, every stream runs through one SDPA call and one shared out-projection, norm and FFN.
Each module lists its teacher-only parameters in ``TEACHER_PARAMETERS`` (dropped from a student
checkpoint) and calls ``observer`` (if set, :meth:`KnowledgeSharing.record`) with its per-stream weights.
"""
import torch
from torch import nn

from ..layers import (MSDeformAttn, MultiheadAttention, TransformerEncoderLayer, deformable_sample, multihead_attention,
                      recomputed)
from .sharing import STREAMS, repeat_streams


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
    TEACHER_PARAMETERS = ("teacher_in_proj_weight", "teacher_in_proj_bias")

    def __init__(self, embed_dim, num_heads, dropout=0.0, mode="triple"):
        super().__init__(embed_dim, num_heads, dropout)
        self.streams = STREAMS[mode]
        self.observer = None
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
        mask = repeat_streams(key_padding_mask, len(self.streams))
        if self.observer is not None:
            self.observer(self.stream_weights(q, k, mask))
        return self.out_proj(multihead_attention(q, k, v, self.num_heads, mask, drop))

    def stream_weights(self, q, k, key_padding_mask):
        """Softmax weights of the stacked streams' q, k (S*B, N, C), key_padding_mask (S*B, N) ->
        ``dict(key_padding_mask=(B, N), attn={kind: (B, heads, N, N)})``."""
        SB, N, _ = q.shape
        q = q.view(SB, N, self.num_heads, -1).transpose(1, 2)
        k = k.view(SB, N, self.num_heads, -1).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        weights = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf")).softmax(-1)
        return {"key_padding_mask": key_padding_mask.chunk(len(self.streams))[0],
                "attn": dict(zip(self.streams, weights.chunk(len(self.streams))))}


class KSEncoderLayer(TransformerEncoderLayer):
    """Encoder layer whose self-attention is a triple attention (:class:`TripleAttention` or the
    deformable one); the residual, norms and FFN are shared by all streams. Without a foreground
    mask it is the plain student layer."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation, mode="triple", attention=None):
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation,
                         attention=attention or TripleAttention(d_model, nhead, dropout, mode))

    def forward_ks(self, x, pos, key_padding_mask, fg_mask, smlp, streams_in, ctx=None, recompute=False):
        """x, pos: (S_in*B, N, C), masks (B, N) -> (S*B, N, C).

        ``recompute`` (``MODEL.KS.RECOMPUTE_KS_LAYERS``): the attention and the rest of the layer (norms,
        FFN) each keep only their inputs and are recomputed one after the other in the backward, so
        the three streams' activations are never all held at once.
        """
        run = recomputed if recompute else (lambda fn, *args: fn(*args))
        x_tilde = smlp(x, repeat_streams(fg_mask, streams_in))
        attn = run(self.self_attn.forward_ks, x, pos, x_tilde, key_padding_mask, streams_in, ctx)
        S = len(self.self_attn.streams)
        return run(self.finish, x if streams_in == S else repeat_streams(x, S), attn)


class DeformableTripleAttention(MSDeformAttn):
    """Deformable triple attention: the teachers add only their own attention-weight projection
    (from x~ + p) and value projection (from x~); sampling locations (from x + p) and
    ``output_proj`` are the student's. Streams: A V, A' V, A V' as in :class:`TripleAttention`.
    The ablation modes build only the projection they use (``share_v``: weights, ``share_a``:
    values), so every parameter gets a gradient (no unused parameters under DDP)."""

    TEACHER_PARTS = {"s": (), "a": (0,), "v": (1,)}  # (weights, values) taken from the teacher
    TEACHER_PARAMETERS = ("attention_weights_teacher", "value_proj_teacher")

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4, mode="triple", impl="auto"):
        super().__init__(d_model, n_levels, n_heads, n_points, impl)
        self.streams = STREAMS[mode]
        self.observer = None
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
        mask = repeat_streams(key_padding_mask, streams_in)
        q = x + pos
        loc = self.locations(q, ctx.reference_points, ctx)
        student = (self.weights(q, self.attention_weights), self.values(x, mask, self.value_proj))
        teacher = (self.weights(x_tilde + pos, self.attention_weights_teacher) if "a" in self.streams else None,
                   self.values(x_tilde, mask, self.value_proj_teacher) if "v" in self.streams else None)
        if self.observer is not None:
            weights, _ = stack_streams(self.streams, streams_in, student, teacher, self.TEACHER_PARTS)
            locations = repeat_streams(loc, S // streams_in)
            self.observer(dict(key_padding_mask=key_padding_mask,
                               weights=dict(zip(self.streams, weights.chunk(S))),
                               locations=dict(zip(self.streams, locations.chunk(S)))))
        if streams_in > 1:  # every stream has its own locations and values
            weights, values = stack_streams(self.streams, streams_in, student, teacher, self.TEACHER_PARTS)
            return self.output_proj(deformable_sample(values, ctx.shapes, loc, weights, self.impl))
        # One incoming stream: every stream samples at the same locations, so each value map (the
        # student's V, the teacher's V') is sampled once and weighed for every stream that reads it.
        out = {}
        for source, reads_teacher in ((student, False), (teacher, True)):
            kinds = [k for k in self.streams if (1 in self.TEACHER_PARTS[k]) == reads_teacher]
            if kinds:
                w = torch.stack([(teacher if 0 in self.TEACHER_PARTS[k] else student)[0] for k in kinds])
                out.update(zip(kinds, deformable_sample(source[1], ctx.shapes, loc, w, self.impl)))
        return self.output_proj(torch.cat([out[k] for k in self.streams]))

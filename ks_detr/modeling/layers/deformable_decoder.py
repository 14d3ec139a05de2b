"""Deformable decoders (Zhu et al., ICLR 2021): self-attention, then multi-scale deformable
cross-attention around each query's reference point; and the 4-D anchor form with box refinement
(DAB-/DN-Deformable DETR, detrex). Parameter names follow the official code (norm2 after self-attention,
norm1 after cross-attention)."""
import torch
from torch import nn

from .deformable_attention import MSDeformAttn
from .transformer import (MLP, Dropout, LayerStack, MultiheadAttention, build_activation, inverse_sigmoid,
                          sine_embed_points)


class DeformableDecoderLayer(nn.Module):
    """Self-attention (q = k = tgt + query_pos) -> deformable cross-attention around the query's
    reference point -> FFN, each with add & norm (official names: norm2, norm1, norm3)."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation, n_levels, n_points):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout)
        self.cross_attn = MSDeformAttn(d_model, n_levels, nhead, n_points)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.activation = build_activation(activation)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2 = Dropout(dropout), Dropout(dropout)
        self.dropout3, self.dropout4 = Dropout(dropout), Dropout(dropout)

    def forward(self, tgt, query_pos, reference_points, memory, memory_mask, ctx, self_attn_mask=None):
        """tgt, query_pos: (B, Q, C); reference_points (B, Q, L, 2 or 4); memory (B, N, C) -> (B, Q, C).

        ``self_attn_mask``: (Q, Q) bool, True = blocked (denoising groups)."""
        sa = self.self_attn(tgt, query_pos, attn_mask=self_attn_mask)
        tgt = self.norm2(tgt + self.dropout2(sa))
        cross = self.cross_attn.attend(tgt + query_pos, reference_points, memory, memory_mask, ctx)
        tgt = self.norm1(tgt + self.dropout1(cross))
        ffn = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


def refine_boxes(delta, reference, eps=1e-5):
    """Boxes of a box head's output around references: ``delta`` (..., 4) logits plus the reference's logit
    (a 2-D point moves the centre only), sigmoid, in at least float32.

    delta: (..., 4); reference: (..., 2 or 4) in [0, 1] -> (..., 4) cxcywh in [0, 1]."""
    ref = inverse_sigmoid(reference, eps)
    if ref.shape[-1] == 2:
        ref = torch.cat([ref, torch.zeros_like(ref)], -1)
    return (delta + ref).sigmoid()


class DeformableDecoder(LayerStack):
    """Deformable DETR's decoder (no final norm): the query positions stay fixed; the reference points
    too, or with box refinement (``bbox_embeds`` given, one head per layer) layer i's head refines them
    for layer i + 1 (detached): 2-D points become 4-D boxes after the first layer."""

    def __init__(self, num_layers, *layer_args, logit_eps=1e-5):
        super().__init__(DeformableDecoderLayer(*layer_args) for _ in range(num_layers))
        self.logit_eps = logit_eps

    def forward(self, tgt, query_pos, reference, memory, memory_mask, ctx, bbox_embeds=None):
        """tgt, query_pos (B, Q, C); reference (B, Q, 2 or 4) in [0, 1] -> hs (L, B, Q, C) and the
        reference each layer attended around, a list of L (B, Q, 2 or 4)."""
        hs, refs = [], []
        for i, layer in enumerate(self.layers):
            valid = ctx.valid_ratios if reference.shape[-1] == 2 else torch.cat([ctx.valid_ratios] * 2, -1)
            tgt = self.run(layer, tgt, query_pos, reference[:, :, None] * valid[:, None], memory, memory_mask, ctx)
            hs.append(tgt)
            refs.append(reference)
            if bbox_embeds is not None:
                reference = refine_boxes(bbox_embeds[i](tgt), reference, self.logit_eps).detach()
        return torch.stack(hs), refs


class DNDeformableDecoder(LayerStack):
    """Deformable decoder on 4-D anchor boxes refined by every layer (DAB/DN-Deformable style):
    query position = ref_point_head(sine(anchor)) x query_scale(content) (identity in layer 0);
    cross-attention samples around each box; layer i's box head refines the anchor (detached).

    DINO's form (``dino=True``): no query_scale, a final LayerNorm (``norm``) on every layer's output,
    and "look forward twice": layer i's prediction box refines the *undetached* box of layer i - 1's
    head, so a layer's box loss also trains the layer before it. Box logits clamp at ``logit_eps``."""

    def __init__(self, num_layers, d_model, *layer_args, dino=False, logit_eps=1e-5):
        super().__init__(DeformableDecoderLayer(d_model, *layer_args) for _ in range(num_layers))
        self.query_scale = None if dino else MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.norm = nn.LayerNorm(d_model) if dino else None
        self.look_forward_twice = dino
        self.logit_eps = logit_eps

    def forward(self, tgt, anchors, memory, memory_mask, ctx, bbox_embeds, self_attn_mask=None):
        """tgt (B, Q, C), anchors (B, Q, 4) unsigmoided -> hs (L, B, Q, C) (normalised with ``norm``)
        and the boxes each layer's prediction refines (L, B, Q, 4) in [0, 1]: the layer's input
        boxes, or with look forward twice the same values undetached."""
        ref = anchors.sigmoid()
        valid = torch.cat([ctx.valid_ratios, ctx.valid_ratios], -1)[:, None]  # (B, 1, L, 4)
        hs, refs, head_ref = [], [], ref
        for i, layer in enumerate(self.layers):
            refs.append(head_ref)
            ref_input = ref[:, :, None] * valid
            query_pos = self.ref_point_head(sine_embed_points(ref_input[:, :, 0], tgt.shape[-1] // 2))
            if self.query_scale is not None and i > 0:
                query_pos = query_pos * self.query_scale(tgt)
            tgt = self.run(layer, tgt, query_pos, ref_input, memory, memory_mask, ctx, self_attn_mask)
            hs.append(tgt)
            refined = (bbox_embeds[i](tgt) + inverse_sigmoid(ref, self.logit_eps)).sigmoid()
            ref = refined.detach()
            head_ref = refined if self.look_forward_twice else ref
        if self.query_scale is not None and len(self.layers) == 1:
            # query_scale scales layers 1.. only: a zero keeps it in the graph (DDP needs every parameter)
            hs[0] = hs[0] + 0.0 * sum(p.sum() for p in self.query_scale.parameters())
        hs = torch.stack(hs)
        return (hs if self.norm is None else self.norm(hs)), torch.stack(refs)

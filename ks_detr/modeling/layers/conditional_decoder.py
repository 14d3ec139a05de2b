"""Conditional-DETR-style decoders: conditional spatial cross-attention (Meng et al., ICCV 2021) and
its anchor-box form (DAB-DETR, Liu et al., ICLR 2022; also DN-DETR's decoder).

Parameter names follow the official Atten4Vis/ConditionalDETR and DAB-DETR code (``sa_*``, ``ca_*``,
``query_scale``, ``ref_point_head``, ``ref_anchor_head``) so their checkpoints map one to one.
"""
import torch
from torch import nn

from .transformer import (MLP, Dropout, HeadsAttention, LayerStack, build_activation, inverse_sigmoid,
                          sine_embed_points, upcast)


class ConditionalDecoderLayer(nn.Module):
    """Self-attention on content+position queries, then cross-attention whose per-head query is
    [content ; spatial sine embedding] and key [content ; position] (2C wide), then FFN."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation, first_layer):
        super().__init__()
        C = d_model
        self.nhead = nhead
        for name in ("sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj", "sa_v_proj",
                     "ca_qcontent_proj", "ca_kcontent_proj", "ca_kpos_proj", "ca_v_proj", "ca_qpos_sine_proj"):
            setattr(self, name, nn.Linear(C, C))
        # The content query gets a positional part only in the first layer (official default).
        self.ca_qpos_proj = nn.Linear(C, C) if first_layer else None
        self.self_attn = HeadsAttention(C, nhead, dropout)
        self.cross_attn = HeadsAttention(C, nhead, dropout)
        self.linear1 = nn.Linear(C, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, C)
        self.activation = build_activation(activation)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(C), nn.LayerNorm(C), nn.LayerNorm(C)
        self.dropout = Dropout(dropout)
        self.dropout1, self.dropout2, self.dropout3 = Dropout(dropout), Dropout(dropout), Dropout(dropout)

    def forward(self, tgt, memory, memory_mask, pos, query_pos, query_sine_embed, self_attn_mask=None):
        """tgt, query_pos, query_sine_embed: (B, Q, C); memory, pos: (B, N, C) -> (B, Q, C).

        ``self_attn_mask``: (Q, Q) bool, True = query i must not see query j (denoising groups).
        """
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        sa = self.self_attn(q, k, self.sa_v_proj(tgt), attn_mask=self_attn_mask)
        tgt = self.norm1(tgt + self.dropout1(sa))

        B, Q, C = tgt.shape
        N, h = memory.shape[1], self.nhead
        q = self.ca_qcontent_proj(tgt)
        k = self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.ca_qpos_proj is not None:
            q = q + self.ca_qpos_proj(query_pos)
            k = k + k_pos
        sine = self.ca_qpos_sine_proj(query_sine_embed)
        q = torch.cat([q.view(B, Q, h, -1), sine.view(B, Q, h, -1)], -1).view(B, Q, 2 * C)
        k = torch.cat([k.view(B, N, h, -1), k_pos.view(B, N, h, -1)], -1).view(B, N, 2 * C)
        tgt2 = self.cross_attn(q, k, self.ca_v_proj(memory), memory_mask)
        tgt = self.norm2(tgt + self.dropout2(tgt2))

        ffn = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(ffn))


class ConditionalDecoder(LayerStack):
    """Reference points from the query embeddings; each layer's spatial query is the sine
    embedding of its reference point scaled by ``query_scale(content)`` (identity in layer 0)."""

    def __init__(self, num_layers, d_model, nhead, dim_feedforward, dropout, activation):
        super().__init__(ConditionalDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation, i == 0)
                         for i in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(d_model, d_model, 2, 2)

    def forward(self, memory, memory_mask, pos, query_pos):
        """memory, pos: (B, N, C); query_pos: (B, Q, C).

        Returns hs (L, B, Q, C) after the final norm and reference points (B, Q, 2) in [0, 1].
        """
        reference = upcast(self.ref_point_head(query_pos)).sigmoid()
        sine = sine_embed_points(reference, memory.shape[-1] // 2)
        tgt = torch.zeros_like(query_pos)
        hs = []
        for i, layer in enumerate(self.layers):
            spatial = sine if i == 0 else sine * self.query_scale(tgt)  # the scale is 1 in layer 0
            tgt = self.run(layer, tgt, memory, memory_mask, pos, query_pos, spatial)
            hs.append(self.norm(tgt))
        return self.stack(hs), reference

    def stack(self, hs):
        """(L, B, Q, C) from the layers' outputs; with one layer ``query_scale`` (layers 1.. only) is kept
        in the graph by a zero (DDP needs a gradient for every parameter)."""
        if len(self.layers) == 1:
            hs = [hs[0] + 0.0 * sum(p.sum() for p in self.query_scale.parameters())]
        return torch.stack(hs)


class DABDecoder(ConditionalDecoder):
    """Each layer: sine(anchor) -> query position (``ref_point_head``); the spatial query is the
    (x, y) sine scaled by ``query_scale(content)`` and modulated by a predicted w/h over the anchor
    w/h (``ref_anchor_head``); after the layer the shared box head refines the anchor.

    Anchor rule (DAB-DETR, DN-DETR, official KS-DETR, detrex): layer i's boxes are predicted from the
    *undetached* refinement of layer i-1, so its box loss also trains layer i-1 and the box head through it;
    only the anchor fed to layer i as input is detached."""

    def __init__(self, num_layers, d_model, nhead, dim_feedforward, dropout, activation, logit_eps=1e-5):
        super().__init__(num_layers, d_model, nhead, dim_feedforward, dropout, activation)
        self.logit_eps = logit_eps  # clamp of inverse_sigmoid (MODEL.DETR.BOX_LOGIT_EPS)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)  # from sine(x, y, w, h)
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2)

    def forward(self, tgt, memory, memory_mask, pos, anchors, bbox_embed, self_attn_mask=None):
        """
        Args:
            tgt: (B, Q, C) content queries; anchors: (B, Q, 4) unsigmoided cxcywh anchor boxes.
            memory, pos: (B, N, C); memory_mask: (B, N); bbox_embed: the model's box head (shared).
        Returns:
            hs (L, B, Q, C) after the final norm and the anchors each layer's boxes refine (L, B, Q, 4) in
            [0, 1]: the initial anchors, then layer i-1's refinement (undetached) for layer i.
        """
        C = tgt.shape[-1]
        ref = anchors.sigmoid()
        hs, refs = [], [ref]
        for i, layer in enumerate(self.layers):
            sine = sine_embed_points(ref, C // 2)  # (B, Q, 2C): y, x, w, h
            query_pos = self.ref_point_head(sine)
            sine = sine[..., :C] if i == 0 else sine[..., :C] * self.query_scale(tgt)  # the scale is 1 in layer 0
            hw = self.ref_anchor_head(tgt).sigmoid()
            sine = torch.cat([sine[..., : C // 2] * (hw[..., 1] / ref[..., 3])[..., None],
                              sine[..., C // 2 :] * (hw[..., 0] / ref[..., 2])[..., None]], -1)
            tgt = self.run(layer, tgt, memory, memory_mask, pos, query_pos, sine, self_attn_mask)
            hs.append(self.norm(tgt))
            if i < len(self.layers) - 1:
                refined = (bbox_embed(tgt) + inverse_sigmoid(ref, self.logit_eps)).sigmoid()
                refs.append(refined)
                ref = refined.detach()
        return self.stack(hs), torch.stack(refs)

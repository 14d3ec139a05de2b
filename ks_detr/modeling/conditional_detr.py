"""Conditional DETR (Meng et al., ICCV 2021): conditional spatial cross-attention decoder.

Parameter names follow the official Atten4Vis/ConditionalDETR code (``sa_*``, ``ca_*``,
``query_scale``, ``ref_point_head``) so its checkpoints map one to one.
"""
import torch
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from .detr import DETRBase
from .transformer import MLP, Dropout, HeadsAttention, build_activation, inverse_sigmoid, sine_embed_points, upcast


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


class ConditionalDecoder(nn.Module):
    """Reference points from the query embeddings; each layer's spatial query is the sine
    embedding of its reference point scaled by ``query_scale(content)`` (identity in layer 0)."""

    def __init__(self, num_layers, d_model, nhead, dim_feedforward, dropout, activation):
        super().__init__()
        self.layers = nn.ModuleList(
            ConditionalDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation, i == 0)
            for i in range(num_layers)
        )
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
            scale = 1.0 if i == 0 else self.query_scale(tgt)
            tgt = layer(tgt, memory, memory_mask, pos, query_pos, sine * scale)
            hs.append(self.norm(tgt))
        return torch.stack(hs), reference


@META_ARCH_REGISTRY.register()
class ConditionalDETR(DETRBase):
    """Conditional DETR; with ``MODEL.KS.ENABLED`` it trains as KS-Conditional-DETR."""

    def build_decoder(self, cfg):
        d = cfg.MODEL.DETR
        self.query_embed = nn.Embedding(d.NUM_QUERIES, d.HIDDEN_DIM)
        return ConditionalDecoder(d.DEC_LAYERS, d.HIDDEN_DIM, d.NHEADS, d.DIM_FEEDFORWARD, d.DROPOUT, d.ACTIVATION)

    def decode(self, memory, memory_mask, pos, targets=None, ctx=None, streams=1):
        query_pos = self.query_embed.weight[None].expand(memory.shape[0], -1, -1)
        hs, reference = self.decoder(memory, memory_mask, pos, query_pos)
        boxes = upcast(self.bbox_embed(hs))  # reference + delta and the sigmoid in float32
        boxes = torch.cat([boxes[..., :2] + inverse_sigmoid(reference), boxes[..., 2:]], -1).sigmoid()
        return hs, boxes, {}


@META_ARCH_REGISTRY.register()
class KSConditionalDETR(ConditionalDETR):
    """KS-Conditional-DETR: :class:`ConditionalDETR` knowledge sharing on (``MODEL.KS.ENABLED`` unset or True)."""

    FORCES_KS = True

"""Deformable DETR (Zhu et al., ICLR 2021), single stage without box refinement: a 4-level feature
pyramid (res3-res5 + one stride-2 conv) with multi-scale deformable attention in the encoder and in the
decoder's cross-attention (:mod:`ks_detr.modeling.layers`). KS-Deformable-DETR puts the deformable
triple attention in the chosen encoder layers; the Fg-Bg mask covers every level."""
import torch
import torch.nn.functional as F
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from .detr import DETRBase
from .ks import DeformableTripleAttention
from .layers import (
    DeformableDecoder,
    MSDeformAttn,
    MultiScaleContext,
    sine_position_embedding,
    upcast,
)


@META_ARCH_REGISTRY.register()
class DeformableDETR(DETRBase):
    """Deformable DETR; with ``MODEL.KS.ENABLED`` it trains as KS-Deformable-DETR."""

    def __init__(self, cfg):
        super().__init__(cfg)
        for m in self.modules():  # encoder, decoder and KS triple attention (all deformable families)
            if isinstance(m, MSDeformAttn):
                m.impl = cfg.MODEL.DETR.DEFORMABLE_ATTN_IMPL

    def build_input_proj(self, cfg, shapes):
        """Per level: 1x1 conv + GroupNorm of a backbone map, or a stride-2 3x3 conv (+ GroupNorm) on
        the previous level for the extra levels; and a learned embedding added to each level's positions."""
        d = cfg.MODEL.DETR
        C, levels = d.HIDDEN_DIM, d.NUM_FEATURE_LEVELS
        level_embed = nn.Parameter(torch.empty(levels, C))
        proj = [nn.Sequential(nn.Conv2d(s.channels, C, 1), nn.GroupNorm(min(32, C), C)) for s in shapes]
        in_ch = shapes[-1].channels
        for _ in range(levels - len(shapes)):
            proj.append(nn.Sequential(nn.Conv2d(in_ch, C, 3, stride=2, padding=1), nn.GroupNorm(min(32, C), C)))
            in_ch = C
        return {"level_embed": level_embed, "input_proj": nn.ModuleList(proj)}

    def build_encoder_attention(self, cfg, ks_mode):
        d = cfg.MODEL.DETR
        args = (d.HIDDEN_DIM, d.NUM_FEATURE_LEVELS, d.NHEADS, d.DEFORMABLE_POINTS)
        return MSDeformAttn(*args) if ks_mode is None else DeformableTripleAttention(*args, mode=ks_mode)

    def build_queries(self, cfg):
        d = cfg.MODEL.DETR
        return {"query_embed": nn.Embedding(d.NUM_QUERIES, 2 * d.HIDDEN_DIM),  # [query_pos ; tgt]
                "reference_points": nn.Linear(d.HIDDEN_DIM, 2)}  # query_pos -> 2-D reference point

    def build_decoder(self, cfg):
        d = cfg.MODEL.DETR
        return DeformableDecoder(d.DEC_LAYERS, d.HIDDEN_DIM, d.NHEADS, d.DIM_FEEDFORWARD, d.DROPOUT,
                                 d.ACTIVATION, d.NUM_FEATURE_LEVELS, d.DEFORMABLE_POINTS)

    def reset_parameters(self):
        """Official: xavier transformer matrices, then deformable-attention init, normal level
        embedding, xavier input convs (shared by the deformable families), then the family's query
        and head init (:meth:`reset_queries`)."""
        super().reset_parameters()
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()  # the student part; teachers were reset by DETRBase
        nn.init.normal_(self.level_embed)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        self.reset_queries()

    def reset_queries(self):
        """Deformable DETR: xavier reference-point head, box-size bias -2."""
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        nn.init.constant_(self.bbox_embed.layers[-1].bias[2:], -2.0)

    def embed_features(self, features, pixel_mask):
        srcs = [proj(features[f]) for proj, f in zip(self.input_proj, self.in_features)]
        last = features[self.in_features[-1]]
        for proj in self.input_proj[len(self.in_features):]:
            last = proj(last)
            srcs.append(last)
        masks = [F.interpolate(pixel_mask[None].float(), size=s.shape[-2:])[0].bool() for s in srcs]
        pos = [sine_position_embedding(m, self.hidden_dim // 2, self.pos_temperature, self.pos_offset)
               + self.level_embed[lvl] for lvl, m in enumerate(masks)]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos = torch.cat([p.flatten(1, 2) for p in pos], 1)
        key_mask = torch.cat([m.flatten(1) for m in masks], 1)
        ctx = MultiScaleContext.from_masks(masks)
        return src, pos, key_mask, ctx.shapes, [~m for m in masks], ctx

    def decode(self, memory, memory_mask, pos, targets=None, ctx=None, streams=1):
        query_pos, tgt = self.query_embed.weight.split(self.hidden_dim, 1)
        rows = memory.shape[0]
        query_pos, tgt = query_pos[None].expand(rows, -1, -1), tgt[None].expand(rows, -1, -1)
        reference = upcast(self.reference_points(query_pos)).sigmoid()
        hs = self.decoder(tgt, query_pos, reference, memory, memory_mask, ctx)
        return hs, self.boxes_around_points(hs, reference), {}


@META_ARCH_REGISTRY.register()
class KSDeformableDETR(DeformableDETR):
    """KS-Deformable-DETR: :class:`DeformableDETR` knowledge sharing on (``MODEL.KS.ENABLED`` unset or True)."""

    FORCES_KS = True

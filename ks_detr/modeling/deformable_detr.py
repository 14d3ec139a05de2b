"""Deformable DETR (Zhu et al., ICLR 2021), single stage without box refinement, and
DN-Deformable DETR (4-D anchors, box refinement, denoising; detrex's recipe): a 4-level
feature pyramid (res3-res5 + one stride-2 conv) with multi-scale deformable attention in the
encoder and in the decoder's cross-attention. KS-Deformable-DETR puts the deformable triple
attention in the chosen encoder layers; the Fg-Bg mask covers every level."""
import math

import torch
import torch.nn.functional as F
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ..errors import ConfigError
from .deformable_attention import MSDeformAttn, MultiScaleContext
from .denoising import DenoisingQueries
from .detr import DETRBase
from .ks import DeformableTripleAttention
from .transformer import (
    MLP,
    Dropout,
    MultiheadAttention,
    build_activation,
    inverse_sigmoid,
    sine_embed_points,
    sine_position_embedding,
    upcast,
)


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


class DeformableDecoder(nn.Module):
    def __init__(self, num_layers, *layer_args):
        super().__init__()
        self.layers = nn.ModuleList(DeformableDecoderLayer(*layer_args) for _ in range(num_layers))

    def forward(self, tgt, query_pos, reference, memory, memory_mask, ctx):
        """reference: (B, Q, 2) in [0, 1], fixed across layers -> hs (L, B, Q, C) (no final norm)."""
        ref = reference[:, :, None] * ctx.valid_ratios[:, None]
        hs = []
        for layer in self.layers:
            tgt = layer(tgt, query_pos, ref, memory, memory_mask, ctx)
            hs.append(tgt)
        return torch.stack(hs)


@META_ARCH_REGISTRY.register()
class DeformableDETR(DETRBase):
    """Deformable DETR; with ``MODEL.KS.ENABLED`` it trains as KS-Deformable-DETR."""

    def build_input_proj(self, cfg, shapes):
        d = cfg.MODEL.DETR
        C, levels = d.HIDDEN_DIM, d.NUM_FEATURE_LEVELS
        self.num_levels, self.n_points = levels, d.DEFORMABLE_POINTS
        self.level_embed = nn.Parameter(torch.empty(levels, C))
        proj = [nn.Sequential(nn.Conv2d(s.channels, C, 1), nn.GroupNorm(32, C)) for s in shapes]
        in_ch = shapes[-1].channels
        for _ in range(levels - len(shapes)):  # extra levels: stride-2 3x3 convs on the last map
            proj.append(nn.Sequential(nn.Conv2d(in_ch, C, 3, stride=2, padding=1), nn.GroupNorm(32, C)))
            in_ch = C
        return nn.ModuleList(proj)

    def build_encoder_attention(self, cfg, ks_mode):
        d = cfg.MODEL.DETR
        args = (d.HIDDEN_DIM, d.NUM_FEATURE_LEVELS, d.NHEADS, d.DEFORMABLE_POINTS)
        return MSDeformAttn(*args) if ks_mode is None else DeformableTripleAttention(*args, mode=ks_mode)

    def build_decoder(self, cfg):
        d = cfg.MODEL.DETR
        self.query_embed = nn.Embedding(d.NUM_QUERIES, 2 * d.HIDDEN_DIM)  # [query_pos ; tgt]
        self.reference_points = nn.Linear(d.HIDDEN_DIM, 2)
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
        boxes = upcast(self.bbox_embed(hs))  # reference + delta and the sigmoid in float32
        boxes = torch.cat([boxes[..., :2] + inverse_sigmoid(reference), boxes[..., 2:]], -1).sigmoid()
        return hs, boxes, {}


@META_ARCH_REGISTRY.register()
class KSDeformableDETR(DeformableDETR):
    """KS-Deformable-DETR: :class:`DeformableDETR` knowledge sharing on (``MODEL.KS.ENABLED`` unset or True)."""

    FORCES_KS = True


class DNDeformableDecoder(nn.Module):
    """Deformable decoder on 4-D anchor boxes refined by every layer (DAB/DN-Deformable style):
    query position = ref_point_head(sine(anchor)) x query_scale(content) (identity in layer 0);
    cross-attention samples around each box; layer i's box head refines the anchor (detached)."""

    def __init__(self, num_layers, d_model, *layer_args):
        super().__init__()
        self.layers = nn.ModuleList(DeformableDecoderLayer(d_model, *layer_args) for _ in range(num_layers))
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)

    def forward(self, tgt, anchors, memory, memory_mask, ctx, bbox_embeds, self_attn_mask=None):
        """tgt (B, Q, C), anchors (B, Q, 4) unsigmoided -> hs (L, B, Q, C) and each layer's input
        boxes (L, B, Q, 4) in [0, 1]."""
        ref = anchors.sigmoid()
        valid = torch.cat([ctx.valid_ratios, ctx.valid_ratios], -1)[:, None]  # (B, 1, L, 4)
        hs, refs = [], []
        for i, layer in enumerate(self.layers):
            refs.append(ref)
            ref_input = ref[:, :, None] * valid
            query_pos = self.ref_point_head(sine_embed_points(ref_input[:, :, 0], tgt.shape[-1] // 2))
            if i > 0:
                query_pos = query_pos * self.query_scale(tgt)
            tgt = layer(tgt, query_pos, ref_input, memory, memory_mask, ctx, self_attn_mask)
            hs.append(tgt)
            ref = (bbox_embeds[i](tgt) + inverse_sigmoid(ref)).sigmoid().detach()
        return torch.stack(hs), torch.stack(refs)


@META_ARCH_REGISTRY.register()
class DNDeformableDETR(DeformableDETR):
    """DN-Deformable-DETR: learned content queries and 4-D anchors, per-layer heads with box
    refinement, denoising groups in training. With ``MODEL.KS.ENABLED``: KS-DN-Deformable-DETR.

    With ``MODEL.DETR.TWO_STAGE`` the anchors are not learned: every encoder token proposes a box
    (its cell centre, size 0.05 * 2^level, refined by a head on the memory), the top-Q proposals by
    class score become the anchors (detached; the content queries stay learned, as DINO's mixed
    query selection), and the selected proposals get the detection loss too."""

    SUPPORTS_TWO_STAGE = True

    def build_decoder(self, cfg):
        d = cfg.MODEL.DETR
        C = d.HIDDEN_DIM
        self.num_queries = d.NUM_QUERIES
        self.dn = DenoisingQueries(cfg)
        self.tgt_embed = nn.Embedding(d.NUM_QUERIES, C - 1)  # + indicator 0
        self.two_stage = d.TWO_STAGE
        if self.two_stage:
            self.enc_output = nn.Sequential(nn.Linear(C, C), nn.LayerNorm(C))
            self.enc_class_embed, self.enc_bbox_embed = nn.Linear(C, d.NUM_CLASSES), MLP(C, C, 4, 3)
        else:
            self.refpoint_embed = nn.Embedding(d.NUM_QUERIES, 4)
        return DNDeformableDecoder(d.DEC_LAYERS, d.HIDDEN_DIM, d.NHEADS, d.DIM_FEEDFORWARD, d.DROPOUT,
                                   d.ACTIVATION, d.NUM_FEATURE_LEVELS, d.DEFORMABLE_POINTS)

    def build_heads(self, cfg):
        """One classification and one box head per decoder layer (box refinement)."""
        heads = [super(DNDeformableDETR, self).build_heads(cfg) for _ in range(cfg.MODEL.DETR.DEC_LAYERS)]
        return nn.ModuleList(h[0] for h in heads), nn.ModuleList(h[1] for h in heads)

    def predict_logits(self, hs):
        return torch.stack([head(h) for head, h in zip(self.class_embed, hs)])

    def reset_queries(self):
        """As detrex: zero content queries, uniform anchors (in sigmoid space, logits clamped to
        [-3, 3]); only the first box head starts with the -2 size bias."""
        nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        nn.init.zeros_(self.tgt_embed.weight)
        if self.two_stage:  # proposal heads as the decoder heads: focal prior, zero box delta
            nn.init.constant_(self.enc_class_embed.bias, -math.log((1 - 0.01) / 0.01))
            nn.init.zeros_(self.enc_bbox_embed.layers[-1].weight)
            nn.init.zeros_(self.enc_bbox_embed.layers[-1].bias)
            return
        with torch.no_grad():
            self.refpoint_embed.weight.copy_(inverse_sigmoid(torch.rand_like(self.refpoint_embed.weight)).clamp(-3, 3))

    def topk_proposals(self, scores):
        """(B', N) proposal scores (-inf = invalid) -> (B', Q) indices of the selected proposals."""
        return scores.topk(self.num_queries, dim=1).indices

    def select_proposals(self, memory, memory_mask, ctx):
        """Two-stage query selection.

        memory (B', N, C), memory_mask (B', N) True = padding -> anchors (B', Q, 4) unsigmoided and
        detached, and the selected proposals ``dict(pred_logits (B', Q, K), pred_boxes (B', Q, 4))``.
        """
        N = memory.shape[1]
        if N < self.num_queries:
            raise ConfigError(f"MODEL.DETR.NUM_QUERIES={self.num_queries} exceeds the {N} encoder tokens "
                             "of this input: use fewer queries or larger images")
        level = torch.cat([torch.full((h * w,), lvl, device=memory.device) for lvl, (h, w) in enumerate(ctx.shapes)])
        centre = ctx.reference_points[:, torch.arange(N, device=memory.device), level] / ctx.valid_ratios[:, level]
        size = (0.05 * 2.0 ** level)[None, :, None].expand_as(centre)
        proposals = torch.cat([centre, size], -1)  # (B', N, 4) cxcywh of the valid image region
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1) & ~memory_mask
        feats = self.enc_output(memory.masked_fill(~valid[..., None], 0.0))
        logits = self.enc_class_embed(feats)
        coords = self.enc_bbox_embed(feats) + inverse_sigmoid(proposals)
        idx = self.topk_proposals(logits.max(-1).values.masked_fill(~valid, float("-inf")))
        logits = torch.gather(logits, 1, idx[..., None].expand(-1, -1, logits.shape[-1]))
        coords = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 4))
        return coords.detach(), dict(pred_logits=logits, pred_boxes=coords.sigmoid())

    def decode(self, memory, memory_mask, pos, targets=None, ctx=None, streams=1):
        rows = memory.shape[0]
        tgt = self.tgt_embed.weight
        tgt = torch.cat([tgt, torch.zeros_like(tgt[:, :1])], -1)[None].expand(rows, -1, -1)
        extras = {}
        if self.two_stage:
            # "student": the teachers decode the student's anchors; only the student's proposals get a loss
            own = streams if streams == 1 or self.ks.teacher_proposals == "own" else 1
            n = rows // streams * own
            anchors, extras["enc"] = self.select_proposals(memory[:n], memory_mask[:n], ctx.first(n))
            anchors = anchors.repeat(streams // own, 1, 1)
            extras["enc"]["streams"] = own
        else:
            anchors = self.refpoint_embed.weight[None].expand(rows, -1, -1)
        tgt, anchors, attn_mask, dn = self.dn.prepend(tgt, anchors, targets, streams)
        if dn:
            extras["dn"] = dn
        hs, refs = self.decoder(tgt, anchors, memory, memory_mask, ctx, self.bbox_embed, attn_mask)
        boxes = torch.stack([(head(h) + inverse_sigmoid(r)).sigmoid() for head, h, r in zip(self.bbox_embed, hs, refs)])
        return hs, boxes, extras


@META_ARCH_REGISTRY.register()
class KSDNDeformableDETR(DNDeformableDETR):
    """KS-DN-Deformable-DETR: :class:`DNDeformableDETR` knowledge sharing on (``MODEL.KS.ENABLED`` unset or True)."""

    FORCES_KS = True

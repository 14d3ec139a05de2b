"""Deformable DETR (Zhu et al., ICLR 2021): a 4-level feature pyramid (res3-res5 + one stride-2 conv) with
multi-scale deformable attention in the encoder and in the decoder's cross-attention
(:mod:`ks_detr.modeling.layers`); single stage, with iterative box refinement (``MODEL.DETR.BOX_REFINE``)
or two-stage (``MODEL.DETR.TWO_STAGE``, needs box refinement), as the original code and transformers'
``with_box_refine`` / ``two_stage``. KS-Deformable-DETR puts the deformable triple attention in the chosen
encoder layers; the Fg-Bg mask covers every level."""
import torch
import torch.nn.functional as F
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ..errors import ConfigError
from .detr import DETRBase
from .ks import DeformableTripleAttention
from .layers import (
    DeformableDecoder,
    MSDeformAttn,
    MultiScaleContext,
    QuerySelection,
    refine_boxes,
    sine_embed_points,
    sine_position_embedding,
    upcast,
)


@META_ARCH_REGISTRY.register()
class DeformableDETR(DETRBase):
    """Deformable DETR; with ``MODEL.KS.ENABLED`` it trains as KS-Deformable-DETR.

    ``MODEL.DETR.BOX_REFINE``: one class and one box head per decoder layer; each layer's box head refines
    the reference points of the next. ``MODEL.DETR.TWO_STAGE`` (with BOX_REFINE): the queries are the top-Q
    encoder proposals by objectness (:class:`~ks_detr.modeling.layers.QuerySelection`, class-agnostic
    loss on every token's proposal); their sine embedding gives both query position and content
    (``pos_trans``). In KS training the teachers select their own proposals or decode the student's
    (``MODEL.KS.TEACHER_PROPOSALS``)."""

    SUPPORTS_TWO_STAGE = True

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
        """Learned [query_pos ; tgt] and their 2-D reference point head; with ``MODEL.DETR.TWO_STAGE`` the
        query selection (class-agnostic) and ``pos_trans`` (+ norm) on the proposals' sine embedding."""
        d = cfg.MODEL.DETR
        C = d.HIDDEN_DIM
        if d.TWO_STAGE:
            if not d.BOX_REFINE:
                raise ConfigError("Invalid config MODEL.DETR.TWO_STAGE=True with MODEL.DETR.BOX_REFINE=False: "
                                  "Deformable DETR's two-stage form needs box refinement (as transformers' "
                                  "two_stage needs with_box_refine); set MODEL.DETR.BOX_REFINE True")
            return {"query_selection": QuerySelection(C, d.NUM_CLASSES, d.NUM_QUERIES, class_agnostic=True),
                    "pos_trans": nn.Linear(2 * C, 2 * C), "pos_trans_norm": nn.LayerNorm(2 * C)}
        return {"query_embed": nn.Embedding(d.NUM_QUERIES, 2 * C),  # [query_pos ; tgt]
                "reference_points": nn.Linear(C, 2)}  # query_pos -> 2-D reference point

    def build_decoder(self, cfg):
        d = cfg.MODEL.DETR
        return DeformableDecoder(d.DEC_LAYERS, d.HIDDEN_DIM, d.NHEADS, d.DIM_FEEDFORWARD, d.DROPOUT,
                                 d.ACTIVATION, d.NUM_FEATURE_LEVELS, d.DEFORMABLE_POINTS, logit_eps=d.BOX_LOGIT_EPS)

    def build_heads(self, cfg):
        """Heads shared by the decoder layers, or with ``MODEL.DETR.BOX_REFINE`` one per layer."""
        if not cfg.MODEL.DETR.BOX_REFINE:
            return super().build_heads(cfg)
        heads = [DETRBase.build_heads(self, cfg) for _ in range(cfg.MODEL.DETR.DEC_LAYERS)]
        return nn.ModuleList(h[0] for h in heads), nn.ModuleList(h[1] for h in heads)

    @property
    def box_refine(self):
        """True with one head per decoder layer (box refinement)."""
        return isinstance(self.bbox_embed, nn.ModuleList)

    def predict_logits(self, hs):
        if not isinstance(self.class_embed, nn.ModuleList):
            return super().predict_logits(hs)
        return torch.stack([head(h) for head, h in zip(self.class_embed, hs)])

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
        """As the original: xavier reference-point head and box-size bias -2 (on the first layer's head
        with box refinement); two-stage: xavier proposal and ``pos_trans`` projections, proposal heads
        as the decoder's, and no -2 size bias."""
        if self.two_stage:
            self.query_selection.reset_parameters()
            nn.init.xavier_uniform_(self.query_selection.enc_output[0].weight)
            nn.init.xavier_uniform_(self.pos_trans.weight)
            return
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        first = self.bbox_embed[0] if self.box_refine else self.bbox_embed
        nn.init.constant_(first.layers[-1].bias[2:], -2.0)

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

    def select_proposals(self, memory, memory_mask, ctx, streams):
        """Two-stage: the top-Q encoder proposals of every stream, or in KS training with
        ``MODEL.KS.TEACHER_PROPOSALS`` "student" the student's for every stream.

        memory (S*B, N, C) -> anchors (S*B, Q, 4) unsigmoided, detached; and the "enc" extra: the proposals that
        get a loss, of the S' streams that select their own (``streams`` = S')."""
        own = streams if streams == 1 or self.ks.teacher_proposals == "own" else 1
        n = memory.shape[0] // streams * own
        mask = None if memory_mask is None else memory_mask[:n]
        anchors, enc = self.query_selection(memory[:n], mask, ctx.first(n))
        return anchors.repeat(streams // own, 1, 1), dict(enc, streams=own)

    def prepare_queries(self, memory, memory_mask, targets=None, ctx=None, streams=1):
        rows, C = memory.shape[0], self.hidden_dim
        extras = {}
        if self.two_stage:  # queries from the proposals: [query_pos ; tgt] = norm(pos_trans(sine(x, y, w, h)))
            anchors, extras["enc"] = self.select_proposals(memory, memory_mask, ctx, streams)
            reference = anchors.sigmoid()
            embed = sine_embed_points(reference, C // 2, swap_xy=False)  # x, y, w, h as the original code
            query_pos, tgt = self.pos_trans_norm(self.pos_trans(embed.to(memory.dtype))).split(C, -1)
        else:
            query_pos, tgt = self.query_embed.weight.split(C, 1)
            query_pos, tgt = query_pos[None].expand(rows, -1, -1), tgt[None].expand(rows, -1, -1)
            with torch.autocast(memory.device.type, enabled=False):  # coordinates: a 16-bit matmul bends the
                reference = self.reference_points(upcast(query_pos)).sigmoid()  # gradient (bfloat16 cosine 0.97)
        return {"tgt": tgt, "query_pos": query_pos, "reference": reference}, {}, extras

    def run_decoder(self, rows, shared, memory, memory_mask, pos, ctx=None, streams=1):
        tgt, query_pos, reference = rows["tgt"], rows["query_pos"], rows["reference"]
        if not self.box_refine:
            hs, _ = self.decoder(tgt, query_pos, reference, memory, memory_mask, ctx)
            return hs, self.boxes_around_points(hs, reference)
        hs, refs = self.decoder(tgt, query_pos, reference, memory, memory_mask, ctx, self.bbox_embed)
        return hs, torch.stack([refine_boxes(upcast(head(h)), r, self.box_logit_eps)
                                for head, h, r in zip(self.bbox_embed, hs, refs)])


@META_ARCH_REGISTRY.register()
class KSDeformableDETR(DeformableDETR):
    """KS-Deformable-DETR: :class:`DeformableDETR` knowledge sharing on (``MODEL.KS.ENABLED`` unset or True)."""

    FORCES_KS = True

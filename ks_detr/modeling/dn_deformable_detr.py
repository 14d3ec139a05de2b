"""DN-Deformable DETR (detrex's recipe): Deformable DETR with learned content queries and 4-D
anchors, per-layer heads with box refinement (:class:`~ks_detr.modeling.layers.DNDeformableDecoder`),
denoising groups in training and optional two-stage query selection
(:class:`~ks_detr.modeling.layers.QuerySelection`). The quickstart model."""
import torch
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from .deformable_detr import DeformableDETR
from .layers import DenoisingQueries, DNDeformableDecoder, QuerySelection, inverse_sigmoid


@META_ARCH_REGISTRY.register()
class DNDeformableDETR(DeformableDETR):
    """DN-Deformable-DETR: learned content queries and 4-D anchors, per-layer heads with box
    refinement, denoising groups in training. With ``MODEL.KS.ENABLED``: KS-DN-Deformable-DETR.

    With ``MODEL.DETR.TWO_STAGE`` the anchors are the top-Q encoder proposals
    (:class:`~ks_detr.modeling.layers.QuerySelection`), which get the detection loss too; in KS training
    the teachers select their own or decode the student's (``MODEL.KS.TEACHER_PROPOSALS``)."""

    SUPPORTS_TWO_STAGE = True

    def build_queries(self, cfg):
        """Denoising queries, learned content queries (C - 1 wide: + indicator 0) and either learned
        anchors (``refpoint_embed``) or, with ``MODEL.DETR.TWO_STAGE``, the query selection."""
        d = cfg.MODEL.DETR
        C = d.HIDDEN_DIM
        queries = {"dn": DenoisingQueries(cfg, logit_eps=d.BOX_LOGIT_EPS), "tgt_embed": nn.Embedding(d.NUM_QUERIES, C - 1)}
        if d.TWO_STAGE:
            queries["query_selection"] = QuerySelection(C, d.NUM_CLASSES, d.NUM_QUERIES)
        else:
            queries["refpoint_embed"] = nn.Embedding(d.NUM_QUERIES, 4)
        return queries

    def build_decoder(self, cfg):
        d = cfg.MODEL.DETR
        return DNDeformableDecoder(d.DEC_LAYERS, d.HIDDEN_DIM, d.NHEADS, d.DIM_FEEDFORWARD, d.DROPOUT,
                                   d.ACTIVATION, d.NUM_FEATURE_LEVELS, d.DEFORMABLE_POINTS, logit_eps=d.BOX_LOGIT_EPS)

    def build_heads(self, cfg):
        """One classification and one box head per decoder layer (box refinement)."""
        heads = [super(DNDeformableDETR, self).build_heads(cfg) for _ in range(cfg.MODEL.DETR.DEC_LAYERS)]
        return nn.ModuleList(h[0] for h in heads), nn.ModuleList(h[1] for h in heads)

    def reset_queries(self):
        """As detrex: zero content queries, uniform anchors (in sigmoid space, logits clamped to
        [-3, 3]); only the first box head starts with the -2 size bias."""
        nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        nn.init.zeros_(self.tgt_embed.weight)
        if self.two_stage:
            self.query_selection.reset_parameters()
            return
        with torch.no_grad():
            self.refpoint_embed.weight.copy_(inverse_sigmoid(torch.rand_like(self.refpoint_embed.weight)).clamp(-3, 3))

    def content_queries(self, rows):
        """(rows, Q, C) learned content queries: [tgt_embed ; indicator 0]."""
        tgt = self.tgt_embed.weight
        return torch.cat([tgt, torch.zeros_like(tgt[:, :1])], -1)[None].expand(rows, -1, -1)

    def prepare_queries(self, memory, memory_mask, targets=None, ctx=None, streams=1):
        rows = memory.shape[0]
        tgt = self.content_queries(rows)
        extras = {}
        if self.two_stage:
            anchors, extras["enc"] = self.select_proposals(memory, memory_mask, ctx, streams)
        else:
            anchors = self.refpoint_embed.weight[None].expand(rows, -1, -1)
        tgt, anchors, attn_mask, dn = self.dn.prepend(tgt, anchors, targets, streams)
        if dn:
            extras["dn"] = dn
        return {"tgt": tgt, "anchors": anchors}, {"attn_mask": attn_mask}, extras

    def run_decoder(self, rows, shared, memory, memory_mask, pos, ctx=None, streams=1):
        hs, refs = self.decoder(rows["tgt"], rows["anchors"], memory, memory_mask, ctx, self.bbox_embed,
                                shared["attn_mask"])
        return hs, torch.stack([(head(h) + inverse_sigmoid(r, self.box_logit_eps)).sigmoid()
                                for head, h, r in zip(self.bbox_embed, hs, refs)])


@META_ARCH_REGISTRY.register()
class KSDNDeformableDETR(DNDeformableDETR):
    """KS-DN-Deformable-DETR: :class:`DNDeformableDETR` knowledge sharing on (``MODEL.KS.ENABLED`` unset or True)."""

    FORCES_KS = True

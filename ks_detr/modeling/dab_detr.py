"""DAB-DETR (Liu et al., ICLR 2022): learned 4-D anchor boxes as queries, refined layer by layer by
the anchor decoder (:class:`~ks_detr.modeling.layers.DABDecoder`), and a scale of the encoder's
position embeddings."""
import torch
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from .detr import DETRBase
from .ks import repeat_streams
from .layers import MLP, DABDecoder, inverse_sigmoid


@META_ARCH_REGISTRY.register()
class DABDETR(DETRBase):
    """DAB-DETR; with ``MODEL.KS.ENABLED`` it trains as KS-DAB-DETR."""

    RANDOM_XY_ANCHORS = True  # official KS-DAB config: anchor centres from U(0, 1); DN-DETR keeps N(0, 1)

    def build_encoder_pos_scale(self, cfg):
        C = cfg.MODEL.DETR.HIDDEN_DIM
        return MLP(C, C, C, 2)

    def build_queries(self, cfg):
        return {"refpoint_embed": nn.Embedding(cfg.MODEL.DETR.NUM_QUERIES, 4)}  # unsigmoided cxcywh anchors

    def build_decoder(self, cfg):
        d = cfg.MODEL.DETR
        return DABDecoder(d.DEC_LAYERS, d.HIDDEN_DIM, d.NHEADS, d.DIM_FEEDFORWARD, d.DROPOUT, d.ACTIVATION,
                          logit_eps=d.BOX_LOGIT_EPS)

    def reset_parameters(self):
        """As the official KS-DAB-DETR config: anchor centres uniform in [0, 1] (stored unsigmoided)."""
        super().reset_parameters()
        if self.RANDOM_XY_ANCHORS:
            with torch.no_grad():
                xy = self.refpoint_embed.weight[:, :2]
                xy.copy_(inverse_sigmoid(torch.rand_like(xy)))

    def queries(self, targets, rows, streams=1):
        """Content queries (rows, Q, C) (zeros), anchors (rows, Q, 4), self-attention mask, dn meta;
        rows = streams * B."""
        anchors = self.refpoint_embed.weight[None].expand(rows, -1, -1)
        return torch.zeros_like(anchors[..., :1]).expand(-1, -1, self.hidden_dim), anchors, None, None

    def prepare_queries(self, memory, memory_mask, targets=None, ctx=None, streams=1):
        tgt, anchors, attn_mask, dn = self.queries(targets, memory.shape[0], streams)
        return {"tgt": tgt, "anchors": anchors}, {"attn_mask": attn_mask}, {"dn": dn} if dn else {}

    def run_decoder(self, rows, shared, memory, memory_mask, pos, ctx=None, streams=1):
        pos = repeat_streams(pos, streams)
        hs, refs = self.decoder(rows["tgt"], memory, memory_mask, pos, rows["anchors"], self.bbox_embed,
                                shared["attn_mask"])
        return hs, (self.bbox_embed(hs) + inverse_sigmoid(refs, self.box_logit_eps)).sigmoid()


@META_ARCH_REGISTRY.register()
class KSDABDETR(DABDETR):
    """KS-DAB-DETR: :class:`DABDETR` knowledge sharing on (``MODEL.KS.ENABLED`` unset or True)."""

    FORCES_KS = True

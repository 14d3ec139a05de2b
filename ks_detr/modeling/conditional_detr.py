"""Conditional DETR (Meng et al., ICCV 2021): learned query positions, the conditional decoder
(:mod:`ks_detr.modeling.layers.conditional_decoder`), boxes relative to each query's reference point."""
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from .detr import DETRBase
from .ks import repeat_streams
from .layers import ConditionalDecoder


@META_ARCH_REGISTRY.register()
class ConditionalDETR(DETRBase):
    """Conditional DETR; with ``MODEL.KS.ENABLED`` it trains as KS-Conditional-DETR."""

    def build_queries(self, cfg):
        d = cfg.MODEL.DETR
        return {"query_embed": nn.Embedding(d.NUM_QUERIES, d.HIDDEN_DIM)}  # query positions

    def build_decoder(self, cfg):
        d = cfg.MODEL.DETR
        return ConditionalDecoder(d.DEC_LAYERS, d.HIDDEN_DIM, d.NHEADS, d.DIM_FEEDFORWARD, d.DROPOUT, d.ACTIVATION)

    def prepare_queries(self, memory, memory_mask, targets=None, ctx=None, streams=1):
        return {"query_pos": self.query_embed.weight[None].expand(memory.shape[0], -1, -1)}, {}, {}

    def run_decoder(self, rows, shared, memory, memory_mask, pos, ctx=None, streams=1):
        hs, reference = self.decoder(memory, memory_mask, repeat_streams(pos, streams), rows["query_pos"])
        return hs, self.boxes_around_points(hs, reference)


@META_ARCH_REGISTRY.register()
class KSConditionalDETR(ConditionalDETR):
    """KS-Conditional-DETR: :class:`ConditionalDETR` knowledge sharing on (``MODEL.KS.ENABLED`` unset or True)."""

    FORCES_KS = True

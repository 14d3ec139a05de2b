"""DAB-DETR (Liu et al., ICLR 2022): 4-D anchor boxes as queries, refined layer by layer, with
width/height-modulated positional cross-attention. Reuses the Conditional DETR decoder layer."""
import torch
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from .conditional_detr import ConditionalDecoder
from .detr import DETRBase
from .transformer import MLP, inverse_sigmoid, sine_embed_points


class DABDecoder(ConditionalDecoder):
    """Each layer: sine(anchor) -> query position (``ref_point_head``); the spatial query is the
    (x, y) sine scaled by ``query_scale(content)`` and modulated by a predicted w/h over the anchor
    w/h (``ref_anchor_head``); after the layer the shared box head refines the anchor (detached)."""

    def __init__(self, num_layers, d_model, nhead, dim_feedforward, dropout, activation):
        super().__init__(num_layers, d_model, nhead, dim_feedforward, dropout, activation)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)  # from sine(x, y, w, h)
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2)

    def forward(self, tgt, memory, memory_mask, pos, anchors, bbox_embed, self_attn_mask=None):
        """
        Args:
            tgt: (B, Q, C) content queries; anchors: (B, Q, 4) unsigmoided cxcywh anchor boxes.
            memory, pos: (B, N, C); memory_mask: (B, N); bbox_embed: the model's box head (shared).
        Returns:
            hs (L, B, Q, C) after the final norm and each layer's input anchors (L, B, Q, 4) in [0, 1].
        """
        C = tgt.shape[-1]
        ref = anchors.sigmoid()
        hs, refs = [], []
        for i, layer in enumerate(self.layers):
            refs.append(ref)
            sine = sine_embed_points(ref, C // 2)  # (B, Q, 2C): y, x, w, h
            query_pos = self.ref_point_head(sine)
            scale = 1.0 if i == 0 else self.query_scale(tgt)
            sine = sine[..., :C] * scale
            hw = self.ref_anchor_head(tgt).sigmoid()
            sine = torch.cat([sine[..., : C // 2] * (hw[..., 1] / ref[..., 3])[..., None],
                              sine[..., C // 2 :] * (hw[..., 0] / ref[..., 2])[..., None]], -1)
            tgt = layer(tgt, memory, memory_mask, pos, query_pos, sine, self_attn_mask)
            hs.append(self.norm(tgt))
            if i < len(self.layers) - 1:
                ref = (bbox_embed(tgt) + inverse_sigmoid(ref)).sigmoid().detach()
        return torch.stack(hs), torch.stack(refs)


@META_ARCH_REGISTRY.register()
class DABDETR(DETRBase):
    """DAB-DETR; with ``MODEL.KS.ENABLED`` it trains as KS-DAB-DETR."""

    def build_encoder_pos_scale(self, cfg):
        C = cfg.MODEL.DETR.HIDDEN_DIM
        return MLP(C, C, C, 2)

    def build_decoder(self, cfg):
        d = cfg.MODEL.DETR
        self.refpoint_embed = nn.Embedding(d.NUM_QUERIES, 4)
        return DABDecoder(d.DEC_LAYERS, d.HIDDEN_DIM, d.NHEADS, d.DIM_FEEDFORWARD, d.DROPOUT, d.ACTIVATION)

    RANDOM_XY_ANCHORS = True  # official KS-DAB config: anchor centres from U(0, 1); DN-DETR keeps N(0, 1)

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

    def decode(self, memory, memory_mask, pos, targets=None, ctx=None, streams=1):
        tgt, anchors, attn_mask, dn = self.queries(targets, memory.shape[0], streams)
        hs, refs = self.decoder(tgt, memory, memory_mask, pos, anchors, self.bbox_embed, attn_mask)
        boxes = (self.bbox_embed(hs) + inverse_sigmoid(refs)).sigmoid()
        return hs, boxes, {"dn": dn} if dn else {}


@META_ARCH_REGISTRY.register()
class KSDABDETR(DABDETR):
    """KS-DAB-DETR: :class:`DABDETR` knowledge sharing on (``MODEL.KS.ENABLED`` unset or True)."""

    FORCES_KS = True

"""DN-DETR (Li et al., CVPR 2022): DAB-DETR plus denoising query groups in training.

For KS-DN-DETR the same noised queries and attention mask go to the student and every teacher
decoder pass, and the denoising losses apply to every kept output.
"""
import torch
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from .dab_detr import DABDETR
from .denoising import dn_attention_mask, noised_queries
from .transformer import inverse_sigmoid


@META_ARCH_REGISTRY.register()
class DNDETR(DABDETR):
    """DN-DETR; with ``MODEL.KS.ENABLED`` it trains as KS-DN-DETR."""

    def build_decoder(self, cfg):
        dn = cfg.MODEL.DETR.DN
        self.dn_groups, self.dn_label_noise, self.dn_box_noise = dn.GROUPS, dn.LABEL_NOISE, dn.BOX_NOISE
        # labels 0..K-1 plus K = "unknown" (matching queries); the last channel is the indicator
        # (1 = denoising query, 0 = matching query)
        self.label_embed = nn.Embedding(cfg.MODEL.DETR.NUM_CLASSES + 1, cfg.MODEL.DETR.HIDDEN_DIM - 1)
        return super().build_decoder(cfg)

    def embed_labels(self, labels, indicator):
        """labels (...,) -> content queries (..., C): label embedding plus the indicator channel."""
        e = self.label_embed(labels)
        return torch.cat([e, torch.full_like(e[..., :1], indicator)], -1)

    def queries(self, targets, rows):
        Q = self.refpoint_embed.num_embeddings
        unknown = torch.full((Q,), self.num_classes, dtype=torch.int64, device=self.device)
        tgt = self.embed_labels(unknown, 0.0)[None].expand(rows, -1, -1)
        anchors = self.refpoint_embed.weight[None].expand(rows, -1, -1)
        if targets is None or self.dn_groups == 0 or not any(len(t["labels"]) for t in targets):
            return tgt, anchors, None, None
        labels, boxes, g = noised_queries(targets, self.dn_groups, self.dn_label_noise, self.dn_box_noise,
                                          self.num_classes)
        dn_tgt = self.embed_labels(labels, 1.0)
        padding = labels == self.num_classes  # empty slots: zero content, as the official code
        dn_tgt = dn_tgt.masked_fill(padding[..., None], 0.0)
        streams = rows // len(targets)  # KS: the same noised queries for every stream
        tgt = torch.cat([dn_tgt.repeat(streams, 1, 1), tgt], 1)
        anchors = torch.cat([inverse_sigmoid(boxes).repeat(streams, 1, 1), anchors], 1)
        mask = dn_attention_mask(self.dn_groups, g, Q, self.device)
        return tgt, anchors, mask, dict(groups=self.dn_groups, group_size=g)


@META_ARCH_REGISTRY.register()
class KSDNDETR(DNDETR):
    """KS-DN-DETR: :class:`DNDETR` with ``MODEL.KS.ENABLED`` forced on."""

    def __init__(self, cfg):
        super().__init__(cfg, ks_enabled=True)

"""DN-DETR (Li et al., CVPR 2022): DAB-DETR plus denoising query groups in training.

For KS-DN-DETR the same noised queries and attention mask go to the student and every teacher
decoder pass, and the denoising losses apply to every kept output.
"""
import torch
from detectron2.modeling import META_ARCH_REGISTRY

from .dab_detr import DABDETR
from .layers import DenoisingQueries


@META_ARCH_REGISTRY.register()
class DNDETR(DABDETR):
    """DN-DETR; with ``MODEL.KS.ENABLED`` it trains as KS-DN-DETR. Matching queries' content is the
    "unknown" label embedding with indicator 0."""

    RANDOM_XY_ANCHORS = False  # official KS-DN-DETR config: default N(0, 1) anchors

    def build_queries(self, cfg):
        return {"dn": DenoisingQueries(cfg), **super().build_queries(cfg)}

    def queries(self, targets, rows, streams=1):
        Q = self.refpoint_embed.num_embeddings
        unknown = torch.full((Q,), self.num_classes, dtype=torch.int64, device=self.device)
        tgt = self.dn.content(unknown, 0.0)[None].expand(rows, -1, -1)
        anchors = self.refpoint_embed.weight[None].expand(rows, -1, -1)
        return self.dn.prepend(tgt, anchors, targets, streams)


@META_ARCH_REGISTRY.register()
class KSDNDETR(DNDETR):
    """KS-DN-DETR: :class:`DNDETR` knowledge sharing on (``MODEL.KS.ENABLED`` unset or True)."""

    FORCES_KS = True

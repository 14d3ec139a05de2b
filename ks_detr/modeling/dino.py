"""DINO (Zhang et al., ICLR 2023) as detrex's ``projects/dino``: DN-Deformable DETR with contrastive
denoising (:class:`~ks_detr.modeling.layers.DenoisingQueries` with negatives), mixed query selection
(top-k encoder proposals as anchors, learned content queries) and look-forward-twice box refinement
(:class:`~ks_detr.modeling.layers.DNDeformableDecoder` in its DINO form). KS-DINO puts the deformable
triple attention in the chosen encoder layers, as every family."""
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ..errors import ConfigError
from .dn_deformable_detr import DNDeformableDETR
from .layers import DenoisingQueries, DNDeformableDecoder, QuerySelection


@META_ARCH_REGISTRY.register()
class DINO(DNDeformableDETR):
    """DINO; with ``MODEL.KS.ENABLED`` it trains as KS-DINO. Needs ``MODEL.DETR.TWO_STAGE`` (its
    anchors are the selected encoder proposals)."""


    def build_queries(self, cfg):
        """Contrastive denoising queries (K-row label embedding, C wide), learned content queries
        (C wide) and the query selection."""
        d = cfg.MODEL.DETR
        if not d.TWO_STAGE:
            raise ConfigError("Invalid config MODEL.DETR.TWO_STAGE=False: DINO's anchors are the top-k encoder "
                              "proposals (mixed query selection); set it True")
        return {"dn": DenoisingQueries(cfg, contrastive=True, logit_eps=d.BOX_LOGIT_EPS),
                "tgt_embed": nn.Embedding(d.NUM_QUERIES, d.HIDDEN_DIM),
                "query_selection": QuerySelection(d.HIDDEN_DIM, d.NUM_CLASSES, d.NUM_QUERIES)}

    def build_decoder(self, cfg):
        d = cfg.MODEL.DETR
        return DNDeformableDecoder(d.DEC_LAYERS, d.HIDDEN_DIM, d.NHEADS, d.DIM_FEEDFORWARD, d.DROPOUT,
                                   d.ACTIVATION, d.NUM_FEATURE_LEVELS, d.DEFORMABLE_POINTS, dino=True,
                                   logit_eps=d.BOX_LOGIT_EPS)

    def reset_queries(self):
        """As detrex: xavier content queries and proposal projection; zero last box layers (no -2 size
        bias); focal prior on the proposal classifier."""
        nn.init.xavier_uniform_(self.tgt_embed.weight)
        self.query_selection.reset_parameters()
        nn.init.xavier_uniform_(self.query_selection.enc_output[0].weight)

    def content_queries(self, rows):
        return self.tgt_embed.weight[None].expand(rows, -1, -1)


@META_ARCH_REGISTRY.register()
class KSDINO(DINO):
    """KS-DINO: :class:`DINO` knowledge sharing on (``MODEL.KS.ENABLED`` unset or True)."""

    FORCES_KS = True

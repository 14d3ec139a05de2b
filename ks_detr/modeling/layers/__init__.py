"""Reusable layers of the DETR families (as detrex's ``layers``): the transformer core, multi-scale
deformable attention, the decoders, denoising queries and two-stage query selection. The family files
(``ks_detr/modeling/<family>.py``) combine them; knowledge sharing lives in ``ks_detr/modeling/ks``."""
from .conditional_decoder import ConditionalDecoder, ConditionalDecoderLayer, DABDecoder
from .deformable_attention import MSDeformAttn, MultiScaleContext, deformable_sample
from .deformable_decoder import DeformableDecoder, DeformableDecoderLayer, DNDeformableDecoder, refine_boxes
from .denoising import DenoisingQueries, dn_attention_mask, noised_queries
from .query_selection import QuerySelection, token_proposals
from .transformer import (
    MLP,
    Dropout,
    HeadsAttention,
    LayerStack,
    MultiheadAttention,
    TransformerEncoder,
    TransformerEncoderLayer,
    build_activation,
    dropout,
    inverse_sigmoid,
    multihead_attention,
    recomputed,
    sine_embed_points,
    sine_position_embedding,
    upcast,
)

__all__ = ["ConditionalDecoder", "ConditionalDecoderLayer", "DABDecoder", "MSDeformAttn", "MultiScaleContext",
           "deformable_sample", "DeformableDecoder", "DeformableDecoderLayer", "DNDeformableDecoder", "refine_boxes",
           "DenoisingQueries", "dn_attention_mask", "noised_queries", "QuerySelection", "token_proposals", "MLP",
           "Dropout", "HeadsAttention", "LayerStack", "MultiheadAttention", "TransformerEncoder", "TransformerEncoderLayer",
           "build_activation", "dropout", "inverse_sigmoid", "multihead_attention", "recomputed", "sine_embed_points",
           "sine_position_embedding", "upcast"]

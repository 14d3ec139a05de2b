"""Knowledge-sharing (KS-DETR) parts: GT Fg-Bg mask, sMLP, triple attention encoder layer."""
from .fg_mask import box_canvas, fg_token_mask
from .smlp import SMLP
from .triple_attention import STREAMS, DeformableTripleAttention, KSEncoderLayer, TripleAttention

__all__ = ["box_canvas", "fg_token_mask", "SMLP", "STREAMS", "KSEncoderLayer", "TripleAttention", "DeformableTripleAttention"]

"""Knowledge sharing (KS-DETR): its owner (:class:`KnowledgeSharing`), the GT Fg-Bg mask, the sMLP, the
triple attention encoder layers and the teachers' early backward (:class:`EarlyBackward`)."""
from .early_backward import EarlyBackward
from .fg_mask import box_canvas, fg_token_mask
from .sharing import STREAMS, KnowledgeSharing, KSBatch, repeat_streams
from .smlp import SMLP
from .triple_attention import DeformableTripleAttention, KSEncoderLayer, TripleAttention

__all__ = ["EarlyBackward", "box_canvas", "fg_token_mask", "SMLP", "STREAMS", "KnowledgeSharing", "KSBatch",
           "repeat_streams", "KSEncoderLayer", "TripleAttention", "DeformableTripleAttention"]

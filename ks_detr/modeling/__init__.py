"""Models: the shared DETR core and the registered meta-architectures."""
from .conditional_detr import ConditionalDETR, KSConditionalDETR
from .detr import DETRBase

__all__ = ["DETRBase", "ConditionalDETR", "KSConditionalDETR"]

"""Models: the shared DETR core and the registered meta-architectures."""
from .conditional_detr import ConditionalDETR, KSConditionalDETR
from .dab_detr import DABDETR, KSDABDETR
from .deformable_detr import DeformableDETR, DNDeformableDETR, KSDeformableDETR, KSDNDeformableDETR
from .detr import DETRBase
from .dn_detr import DNDETR, KSDNDETR

__all__ = ["DETRBase", "ConditionalDETR", "KSConditionalDETR", "DABDETR", "KSDABDETR", "DNDETR", "KSDNDETR",
           "DeformableDETR", "KSDeformableDETR", "DNDeformableDETR", "KSDNDeformableDETR"]

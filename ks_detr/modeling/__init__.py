"""Models: the shared DETR core, the registered meta-architectures and the MobileNet-V2 backbone."""
from . import backbone  # noqa: F401  (registers build_mobilenet_v2_backbone)
from .conditional_detr import ConditionalDETR, KSConditionalDETR
from .dab_detr import DABDETR, KSDABDETR
from .deformable_detr import DeformableDETR, DNDeformableDETR, KSDeformableDETR, KSDNDeformableDETR
from .detr import DETRBase
from .dn_detr import DNDETR, KSDNDETR

__all__ = ["DETRBase", "ConditionalDETR", "KSConditionalDETR", "DABDETR", "KSDABDETR", "DNDETR", "KSDNDETR",
           "DeformableDETR", "KSDeformableDETR", "DNDeformableDETR", "KSDNDeformableDETR"]

"""Models: the shared meta-architecture (``detr.py``), one file per family (``<family>.py``, what differs),
the reusable layers (``layers/``), knowledge sharing (``ks/``), matcher, criterion and the MobileNet-V2 backbone."""
from . import backbone  # noqa: F401  (registers build_mobilenet_v2_backbone)
from .conditional_detr import ConditionalDETR, KSConditionalDETR
from .dab_detr import DABDETR, KSDABDETR
from .deformable_detr import DeformableDETR, KSDeformableDETR
from .detr import DETRBase
from .dino import DINO, KSDINO
from .dn_deformable_detr import DNDeformableDETR, KSDNDeformableDETR
from .dn_detr import DNDETR, KSDNDETR

__all__ = ["DETRBase", "ConditionalDETR", "KSConditionalDETR", "DABDETR", "KSDABDETR", "DNDETR", "KSDNDETR",
           "DeformableDETR", "KSDeformableDETR", "DNDeformableDETR", "KSDNDeformableDETR",
           "DINO", "KSDINO"]

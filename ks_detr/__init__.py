"""ks-detr: KS-DETR (knowledge sharing in attention learning) as a detectron2 extension.

Importing the package registers the meta-architectures (``ConditionalDETR``, ``DABDETR``,
``DNDETR``, ``DeformableDETR``, ``DNDeformableDETR`` and their ``KS*`` names) and the ``trees_train`` / ``trees_val`` datasets.
"""
from .config import add_ks_detr_config, check_ks_detr_config, load_config
from .data import DetrDatasetMapper
from .modeling import (
    DABDETR,
    DNDETR,
    ConditionalDETR,
    DeformableDETR,
    DETRBase,
    DNDeformableDETR,
    KSConditionalDETR,
    KSDABDETR,
    KSDeformableDETR,
    KSDNDeformableDETR,
    KSDNDETR,
)
from .solver import build_optimizer

__version__ = "0.2.0"
__all__ = [
    "add_ks_detr_config",
    "check_ks_detr_config",
    "load_config",
    "build_optimizer",
    "DetrDatasetMapper",
    "DETRBase",
    "ConditionalDETR",
    "KSConditionalDETR",
    "DABDETR",
    "KSDABDETR",
    "DNDETR",
    "KSDNDETR",
    "DeformableDETR",
    "KSDeformableDETR",
    "DNDeformableDETR",
    "KSDNDeformableDETR",
]

"""Data: DETR dataset mapper and the built-in small real dataset (``trees_train``/``trees_val``)."""
from . import datasets  # noqa: F401  (registers trees_train / trees_val)
from ..errors import DatasetError
from .custom import check_num_classes, register_checked_coco
from .dataset_mapper import DetrDatasetMapper

__all__ = ["DetrDatasetMapper", "DatasetError", "check_num_classes", "register_checked_coco"]

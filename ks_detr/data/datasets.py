"""Builtin datasets of ks-detr: the small real ``trees`` set made by ``tools/prepare_data.py``."""

import os
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances

__all__ = ["datasets_root", "register_trees", "PREPARE_COMMAND"]

PREPARE_COMMAND = "python tools/prepare_data.py"
TREES_CLASSES = ["tree"]


def datasets_root():
    """Return $KS_DETR_DATASETS, else $DETECTRON2_DATASETS, else ``<repo>/datasets``."""
    for var in ("KS_DETR_DATASETS", "DETECTRON2_DATASETS"):
        value = os.environ.get(var)
        if value:
            return Path(value).expanduser()
    return Path(__file__).resolve().parents[2] / "datasets"


def _missing_loader(name, json_file, image_root):
    """Return a loader for a not yet prepared split; it explains how to create ``json_file``."""

    def load():
        if json_file.is_file():  # prepared after registration
            return load_coco_json(str(json_file), image_root, name)
        raise FileNotFoundError(
            f"dataset annotation file {json_file} does not exist; prepare the data with "
            f"`{PREPARE_COMMAND}` (run from the repository root, add --root DIR for another "
            "location or set KS_DETR_DATASETS)"
        )

    return load


def register_trees(root=None, prefix="trees"):
    """Register ``<prefix>_train`` and ``<prefix>_val`` (COCO format) found under ``<root>/trees``.

    Names that are already registered are left alone. When a json file is missing the name is still
    registered, but loading it raises a FileNotFoundError naming ``tools/prepare_data.py``.
    """
    base = Path(root) if root is not None else datasets_root()
    base = base / "trees"
    image_root = str(base / "images")
    registered = set(DatasetCatalog.list())
    for split in ("train", "val"):
        name = f"{prefix}_{split}"
        if name in registered:
            continue
        json_file = base / "annotations" / f"{split}.json"
        if json_file.is_file():
            register_coco_instances(name, {}, str(json_file), image_root)
        else:
            DatasetCatalog.register(name, _missing_loader(name, json_file, image_root))
            MetadataCatalog.get(name).set(
                json_file=str(json_file), image_root=image_root, evaluator_type="coco"
            )
        # thing_classes is known up front so models can be built before the data is loaded.
        MetadataCatalog.get(name).set(thing_classes=list(TREES_CLASSES))


register_trees()

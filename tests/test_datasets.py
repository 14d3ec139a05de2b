"""Tests of the trees dataset (tools/prepare_data.py) and its registration in ks_detr."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ks_detr.data.datasets import datasets_root, register_trees

REPO_ROOT = Path(__file__).resolve().parents[1]
PREPARE = REPO_ROOT / "tools" / "prepare_data.py"
# prepare_data.py is deterministic (fixed wheel hash, fixed tiling): the exact default-tile counts
EXPECTED = {"train": (108, 2096), "val": (16, 299)}


def _load_prepare_module():
    spec = importlib.util.spec_from_file_location("prepare_data", PREPARE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trees_dir(trees_dataset):
    """The trees dataset in the default datasets root (prepared if missing)."""
    return datasets_root() / "trees"


@pytest.mark.parametrize("split", ["train", "val"])
def test_prepared_split(trees_dir, split):
    data = json.loads((trees_dir / "annotations" / f"{split}.json").read_text())
    assert data["categories"] == [{"id": 1, "name": "tree"}]
    assert (len(data["images"]), len(data["annotations"])) == EXPECTED[split]
    assert len({im["id"] for im in data["images"]}) == len(data["images"])
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    images = {im["id"]: im for im in data["images"]}
    for im in data["images"]:
        path = trees_dir / "images" / im["file_name"]
        assert path.is_file(), path
        with Image.open(path) as pil:
            assert pil.size == (im["width"], im["height"])
            assert pil.format == "JPEG"
    for ann in data["annotations"]:
        im = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0
        assert x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
        assert ann["category_id"] == 1 and ann["iscrowd"] == 0
        assert ann["area"] == pytest.approx(w * h)
    if split == "train":
        assert all((im["width"], im["height"]) == (400, 400) for im in data["images"])
    assert data["info"]["version"] == _load_prepare_module().SPLIT_VERSION


def test_train_val_disjoint(trees_dir):
    """No pixel of a val tile lies in a train tile of the same source image."""
    prep = _load_prepare_module()
    spans = {}
    for split in ("train", "val"):
        data = json.loads((trees_dir / "annotations" / f"{split}.json").read_text())
        for im in data["images"]:
            name, x0, y0 = im["file_name"][: -len(".jpg")].rsplit("_", 2)
            spans.setdefault((name, split), []).append((int(y0), int(y0) + im["height"]))
    for name, train_rows, val_rows in prep.SOURCES:
        train = spans[(name, "train")]
        assert min(a for a, _ in train) == train_rows[0] and max(b for _, b in train) == train_rows[1]
        if val_rows is None:
            assert (name, "val") not in spans
            continue
        val = spans[(name, "val")]
        assert max(b for _, b in train) <= min(a for a, _ in val)
        assert max(b for _, b in val) == val_rows[1]


def test_readme_credits_source(trees_dir):
    text = (trees_dir / "README.txt").read_text()
    assert "DeepForest" in text and "2.1.0" in text and "MIT" in text and "NEON" in text


def test_catalog_trees_val(trees_dir):
    dicts = DatasetCatalog.get("trees_val")
    assert len(dicts) == EXPECTED["val"][0]
    assert sum(len(d["annotations"]) for d in dicts) == EXPECTED["val"][1]
    for d in dicts:
        assert Path(d["file_name"]).is_file()
        assert d["annotations"]
        for ann in d["annotations"]:
            assert ann["bbox_mode"] == BoxMode.XYWH_ABS
            assert ann["category_id"] == 0
    meta = MetadataCatalog.get("trees_val")
    assert meta.thing_classes == ["tree"]
    assert meta.evaluator_type == "coco"
    assert MetadataCatalog.get("trees_train").thing_classes == ["tree"]


def test_missing_data_message(tmp_path):
    register_trees(root=tmp_path, prefix="trees_missing")
    for split in ("train", "val"):
        name = f"trees_missing_{split}"
        assert name in DatasetCatalog.list()
        with pytest.raises(FileNotFoundError) as err:
            DatasetCatalog.get(name)
        assert "tools/prepare_data.py" in str(err.value)
        assert f"{split}.json" in str(err.value)
        assert MetadataCatalog.get(name).thing_classes == ["tree"]
    register_trees(root=tmp_path, prefix="trees_missing")  # registering twice is harmless


def test_missing_then_prepared(tmp_path):
    register_trees(root=tmp_path, prefix="trees_late")
    trees = tmp_path / "trees"
    (trees / "images").mkdir(parents=True)
    (trees / "annotations").mkdir()
    Image.new("RGB", (8, 6)).save(trees / "images" / "a.jpg")
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 6}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 2], "area": 6}
        ],
        "categories": [{"id": 1, "name": "tree"}],
    }
    (trees / "annotations" / "val.json").write_text(json.dumps(coco))
    dicts = DatasetCatalog.get("trees_late_val")
    assert len(dicts) == 1 and dicts[0]["annotations"][0]["bbox"] == [1, 1, 3, 2]
    with pytest.raises(FileNotFoundError):
        DatasetCatalog.get("trees_late_train")


def test_tiling_helpers():
    prep = _load_prepare_module()
    assert prep.tile_starts(1249, 400) == [0, 400, 800, 849]
    assert prep.tile_starts(800, 400) == [0, 400]
    assert prep.tile_starts(300, 400) == [0]
    assert prep.tile_starts(1249, 400, 200) == [0, 200, 400, 600, 800, 849]
    boxes = [[390, 10, 420, 30], [395, 10, 440, 30], [0, 0, 10, 10]]
    # centre 405 -> second tile only, clipped to x in [400, 420]; centre 417.5 -> second tile
    assert prep.crop_boxes(boxes, 0, 0, 400, 400) == [[0, 0, 10, 10]]
    assert prep.crop_boxes(boxes, 400, 0, 800, 400) == [[0, 10, 20, 20], [0, 10, 40, 20]]


def test_prepare_is_idempotent(tmp_path):
    ann = tmp_path / "trees" / "annotations"
    ann.mkdir(parents=True)
    prep = _load_prepare_module()
    for split in ("train", "val"):
        (ann / f"{split}.json").write_text(json.dumps({"info": {"version": prep.SPLIT_VERSION}}))
    result = subprocess.run(
        [sys.executable, str(PREPARE), "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "already prepared" in result.stdout

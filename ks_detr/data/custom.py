"""The user's own COCO-format datasets: checked up front, then registered with detectron2.

``train_net.py --register-coco NAME JSON IMAGE_DIR`` calls :func:`register_checked_coco`. Bad
data stops the run before training with a message naming the file and the record; with
``--skip-bad-records`` such records are left out instead (counted in the log, the cleaned json written
to OUTPUT_DIR).
"""
import json
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image

from .images import image_info

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """Invalid user dataset; the message names the file and the record."""


def check_coco_json(json_file, image_root, skip_bad=False):
    """Validate a COCO detection json and its images.

    Raises :class:`DatasetError` for malformed json (file, line, column), a category id missing from
    ``categories``, a missing/unreadable image, or an image whose size differs from the json's
    width/height. The size compared is the *displayed* one (after EXIF orientation), which is what
    training reads (:mod:`ks_detr.data.images`); a json holding the stored, unrotated size of a
    rotated photo gets its own message. Only image headers are read. Returns counts of what the
    mapper will do silently: boxes with zero/negative size (dropped) and boxes reaching outside the
    image (clipped), images without boxes (kept as all-background), and images that are
    EXIF-rotated, have more than 8 bits per sample (min-max stretched) or have alpha (composited
    onto black).

    With ``skip_bad`` a bad image (with its annotations) or a bad annotation is left out instead of
    raising (malformed json still raises); the counts then include ``skipped_images`` and
    ``skipped_annotations``, and ``counts["data"]`` is the cleaned COCO dict.
    """
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{json_file}: malformed json at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except OSError as e:
        raise DatasetError(f"{json_file}: cannot read ({e.strerror})") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{json_file}: missing the '{key}' list")
    category_ids = {c["id"] for c in data["categories"]}
    images = {}
    counts = {"degenerate_boxes": 0, "clipped_boxes": 0, "images_without_boxes": 0,
              "exif_rotated_images": 0, "high_bit_depth_images": 0, "images_with_alpha": 0}
    skipped = {"images": 0, "annotations": 0}

    def bad(kind, error):
        """Raise ``error``, or with ``skip_bad`` count a skipped record of ``kind`` and log why."""
        if not skip_bad:
            raise error
        skipped[kind] += 1
        logger.warning("skipped: %s", error)

    for img in data["images"]:
        where = f"{json_file}: image id {img.get('id')} ({img.get('file_name')})"
        path = os.path.join(image_root, img["file_name"])
        try:
            with Image.open(path) as im:
                im.verify()
            info = image_info(path)
            _check_size(where, img, info)
        except (OSError, SyntaxError) as e:
            bad("images", DatasetError(f"{where}: cannot read {path}: {e}"))
            continue
        except DatasetError as e:
            bad("images", e)
            continue
        counts["exif_rotated_images"] += info.orientation != 1
        counts["high_bit_depth_images"] += info.high_bit_depth
        counts["images_with_alpha"] += info.alpha
        images[img["id"]] = img
    with_boxes, kept = set(), []
    known_image_ids = {img.get("id") for img in data["images"]}
    for ann in data["annotations"]:
        if ann.get("image_id") in known_image_ids and ann.get("image_id") not in images:
            continue  # its image was skipped
        if ann.get("category_id") not in category_ids:
            bad("annotations", DatasetError(
                f"{json_file}: annotation id {ann.get('id')} has category_id {ann.get('category_id')!r}, "
                f"not in categories {sorted(category_ids)}"))
            continue
        img = images.get(ann.get("image_id"))
        if img is None:
            bad("annotations", DatasetError(
                f"{json_file}: annotation id {ann.get('id')} refers to image_id {ann.get('image_id')!r}, not in images"))
            continue
        kept.append(ann)
        x, y, w, h = ann["bbox"]
        if w <= 0 or h <= 0:
            counts["degenerate_boxes"] += 1
            continue
        if x < 0 or y < 0 or x + w > img["width"] or y + h > img["height"]:
            counts["clipped_boxes"] += 1
        with_boxes.add(img["id"])
    counts["images_without_boxes"] = len(images) - len(with_boxes)
    if skip_bad:
        counts["skipped_images"], counts["skipped_annotations"] = skipped["images"], skipped["annotations"]
        counts["data"] = dict(data, images=list(images.values()), annotations=kept)
    return counts


def _check_size(where, img, info):
    """The json's width/height must be the displayed size (EXIF orientation applied)."""
    if not all(isinstance(img.get(k), (int, float)) and not isinstance(img.get(k), bool) for k in ("width", "height")):
        raise DatasetError(f"{where}: needs numeric 'width' and 'height' (got {img.get('width')!r}, "
                           f"{img.get('height')!r}); the image is {info.width}x{info.height} (width x height)")
    json_wh = (img["width"], img["height"])
    if json_wh == (info.width, info.height):
        return
    if info.orientation != 1 and json_wh == (info.stored_width, info.stored_height):
        raise DatasetError(
            f"{where}: json width x height {json_wh[0]}x{json_wh[1]} is the stored pixel grid, but the EXIF "
            f"orientation {info.orientation} displays (and training reads) the image as {info.width}x{info.height}. "
            f"If the boxes were drawn on the displayed image, set width={info.width}, height={info.height} in the "
            "json; if they were drawn on the stored pixels, remove the EXIF orientation tag from the file")
    rotated = f" after its EXIF orientation {info.orientation}" if info.orientation != 1 else ""
    raise DatasetError(f"{where}: json width x height {json_wh[0]}x{json_wh[1]} differs from the image's "
                       f"{info.width}x{info.height}{rotated}")


def register_checked_coco(name, json_file, image_root, skip_bad=False, out_dir=None):
    """Check the dataset (:func:`check_coco_json`), log what will be dropped or clipped, register it.

    With ``skip_bad``, records that fail the check are left out: when any is, the cleaned json is
    written to ``<out_dir>/<name>.checked.json`` and registered instead of ``json_file``.
    """
    counts = check_coco_json(json_file, image_root, skip_bad)
    data = counts.pop("data", None)
    if skip_bad:
        logger.info("dataset %s (%s): skipped %d bad images (with their annotations) and %d bad annotations",
                    name, json_file, counts["skipped_images"], counts["skipped_annotations"])
        if counts["skipped_images"] or counts["skipped_annotations"]:
            os.makedirs(out_dir or ".", exist_ok=True)
            json_file = os.path.join(out_dir or ".", f"{name}.checked.json")
            with open(json_file, "w") as f:
                json.dump(data, f)
            logger.info("dataset %s: registered the cleaned json %s", name, json_file)
    logger.info("dataset %s (%s): %d boxes with zero/negative size dropped, %d boxes clipped to the image, "
                "%d images without boxes (all background; training skips them while "
                "DATALOADER.FILTER_EMPTY_ANNOTATIONS is True)", name, json_file, counts["degenerate_boxes"],
                counts["clipped_boxes"], counts["images_without_boxes"])
    if counts["exif_rotated_images"] or counts["high_bit_depth_images"] or counts["images_with_alpha"]:
        logger.info("dataset %s: %d images rotated by their EXIF orientation (boxes refer to the displayed image), "
                    "%d images with more than 8 bits per sample (stretched to 0-255 by each image's min-max), "
                    "%d images with alpha (composited onto black)", name, counts["exif_rotated_images"],
                    counts["high_bit_depth_images"], counts["images_with_alpha"])
    register_coco_instances(name, {}, json_file, image_root)
    return counts


def check_num_classes(cfg):
    """Every train/test dataset must have exactly ``MODEL.DETR.NUM_CLASSES`` categories."""
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        meta = MetadataCatalog.get(name)
        if not hasattr(meta, "thing_classes") and hasattr(meta, "json_file"):
            DatasetCatalog.get(name)  # loading a COCO json fills thing_classes
        classes = getattr(meta, "thing_classes", None)
        if classes is not None and len(classes) != cfg.MODEL.DETR.NUM_CLASSES:
            raise ValueError(f"Invalid config MODEL.DETR.NUM_CLASSES={cfg.MODEL.DETR.NUM_CLASSES}: dataset {name} has "
                             f"{len(classes)} categories {classes[:10]}")

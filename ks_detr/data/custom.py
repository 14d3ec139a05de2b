"""The user's own COCO-format datasets: one validation pass, then registered with detectron2.

``train_net.py --register-coco NAME JSON IMAGE_DIR`` calls :func:`register_checked_coco`, which runs
:func:`check_coco_json` once before anything trains:

1. **Structure**: the json is an object with ``images``, ``annotations`` and ``categories`` lists;
   every record is an object whose fields have the right type, length and finite values
   (image: ``id``, ``file_name``, ``width``, ``height``; annotation: ``id``, ``image_id``,
   ``category_id``, ``bbox`` = 4 finite numbers, optional ``area`` and ``iscrowd``; category:
   ``id``, ``name``). Unique image ids, annotation ids, category ids and file names. A UTF-8 byte
   order mark at the start of the file is accepted.
2. **Images**: every file is decoded completely, the way training reads it
   (:mod:`ks_detr.data.images`), in parallel processes; a JPEG that libjpeg reports as corrupt
   (truncated, or data that decodes to garbage) counts as unreadable. Results are cached by path,
   size and modification time (``$KS_DETR_CACHE``, default ``~/.cache/ks_detr``), so a second run
   decodes nothing. The json's width/height must be the displayed size. A file declaring more pixels
   than ``INPUT.MAX_IMAGE_PIXELS`` is a bad record (never decoded, never cached).
3. **Boxes**, applied once, each with its own count in the log: zero or negative width/height ->
   dropped; no overlap with the image -> dropped; partly outside -> clipped to the image, its ``area``
   scaled by the kept fraction of the box. A missing ``area`` is filled with the box area and a
   missing ``iscrowd`` with 0 (COCO evaluation reads both), so a json whose images have only
   ``id``/``file_name``/``width``/``height`` and whose annotations have only
   ``id``/``image_id``/``category_id``/``bbox`` trains and evaluates.

Structural problems of the file (not json, no ``categories`` list, a bad category) always stop the
run. A problem of one record stops it too, with a one-line message naming the file, the record id,
the field, the value and the fix (the other problems are logged, and the message says where); with
``--skip-bad-records`` the record is left out and counted instead (the warnings then name no fix). A
left-out annotation takes its image with it (otherwise the image would train with an object labelled
as background). Whenever the check changed anything, the cleaned json is written to
``OUTPUT_DIR/<name>.checked.json`` and registered in place of the original, so training and
evaluation see exactly the checked boxes.
"""
import concurrent.futures
import json
import logging
import math
import os
import reprlib
import re
import tempfile
from collections import Counter

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from ..checkpoint import atomic_write
from ..errors import DatasetError, log_file
from .images import image_info, pixel_limit_problem, read_image, set_max_image_pixels

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
SKIP_HINT = "fix the record, or pass --skip-bad-records to leave it out"
# the fix a message offers, removed from the warnings of records that --skip-bad-records leaves out
_SKIP_HINT_RE = re.compile(r"(; re-export the file or fix the record|; fix the record|), or pass --skip-bad-records "
                           r"to leave (it|them|all of them) out( \(with (its|their) images?\))?")
TOO_LARGE = "too large: "  # prefix of the (never cached) pixel-limit problem of inspect_image
COUNT_KEYS = ("empty_boxes_dropped", "outside_boxes_dropped", "boxes_clipped", "areas_filled", "iscrowd_filled",
              "images_without_boxes", "exif_rotated_images", "high_bit_depth_images", "images_with_alpha",
              "skipped_images", "skipped_annotations", "annotations_of_skipped_images")
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_short = _repr.repr  # a value quoted in a message, shortened


def default_cache_file():
    """``$KS_DETR_CACHE/image_check_v<N>.json`` (default directory ``~/.cache/ks_detr``)."""
    root = os.environ.get("KS_DETR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ks_detr")
    return os.path.join(root, f"image_check_v{CACHE_VERSION}.json")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_id(v):
    return _is_int(v) or (isinstance(v, str) and v != "")


class _Problems:
    """Record-level problems: raised at the next :meth:`stop` unless skipping, else counted."""

    def __init__(self, json_file, skip_bad):
        self.json_file, self.skip_bad = json_file, skip_bad
        self.messages = []
        self.bad_images, self.bad_annotations = set(), set()  # record positions

    def image(self, index, record, message):
        self.bad_images.add(index)
        self.messages.append(f"{self.json_file}: {_describe_image(record, index)}: {message}")

    def annotation(self, index, record, message, image_index=None):
        self.bad_annotations.add(index)
        if image_index is not None:
            self.bad_images.add(image_index)
        self.messages.append(f"{self.json_file}: {_describe_annotation(record, index)}: {message}")

    def stop(self):
        """Raise the first problem (all of them logged) unless skipping; with skipping log them."""
        if not self.messages:
            return
        if self.skip_bad:
            for m in self.messages:
                logger.warning("skipped: %s", _SKIP_HINT_RE.sub("", m))
            self.messages = []
            return
        for m in self.messages[1:]:
            logger.error("%s", m)
        more = len(self.messages) - 1
        where = log_file(logger)
        where = f"in the log, {where}" if where else "in the log above"
        raise DatasetError(self.messages[0] + (f" ({more} more problems of this file are {where})" if more else ""))


def _describe_image(record, index):
    if isinstance(record, dict) and "id" in record:
        return f"image id {_short(record['id'])}" + (f" ({record['file_name']})" if isinstance(
            record.get("file_name"), str) else "")
    return f"images[{index}]"


def _describe_annotation(record, index):
    if isinstance(record, dict) and "id" in record:
        return f"annotation id {_short(record['id'])} (image id {_short(record.get('image_id'))})"
    return f"annotations[{index}]"


def _read_json(json_file):
    try:
        with open(json_file, "rb") as f:
            data = json.loads(f.read().decode("utf-8-sig"))  # a byte order mark is not an error
    except json.JSONDecodeError as e:
        raise DatasetError(f"{json_file}: malformed json at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"{json_file}: not a UTF-8 text file ({e.reason} at byte {e.start}); "
                           "give a COCO json file") from e
    except OSError as e:
        raise DatasetError(f"{json_file}: cannot read ({e.strerror})") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{json_file}: the top level is a json {type(data).__name__}, not an object with "
                           "'images', 'annotations' and 'categories' lists (COCO detection format)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            found = "missing" if key not in data else f"a {type(data[key]).__name__}"
            raise DatasetError(f"{json_file}: '{key}' must be a list of objects (COCO detection format), it is "
                               f"{found}")
    return data


def _check_categories(json_file, categories):
    ids = []
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
            raise DatasetError(f"{json_file}: categories[{i}] is {_short(c)}; each category needs an integer "
                               "'id' and a string 'name'")
        ids.append(c["id"])
    dup = [k for k, n in Counter(ids).items() if n > 1]
    if dup:
        raise DatasetError(f"{json_file}: category id {dup[0]} appears {ids.count(dup[0])} times in categories; "
                           "give every category its own id")
    return set(ids)


def _image_field_problem(img):
    if not isinstance(img, dict):
        return f"is a json {type(img).__name__}, not an object"
    if not _is_id(img.get("id")):
        return f"'id' is {_short(img.get('id'))}; it must be an integer (or a non-empty string)"
    if not isinstance(img.get("file_name"), str) or not img["file_name"]:
        return f"'file_name' is {_short(img.get('file_name'))}; it must be the image's path under the image folder"
    for key in ("width", "height"):
        v = img.get(key)
        if not (_is_number(v) and math.isfinite(v) and v > 0 and float(v).is_integer()):
            return f"'{key}' is {_short(v)}; it must be the image's {key} in pixels (a positive integer)"
    return None


def _annotation_field_problem(ann, category_ids):
    if not isinstance(ann, dict):
        return f"is a json {type(ann).__name__}, not an object"
    if not _is_id(ann.get("id")):
        return f"'id' is {_short(ann.get('id'))}; it must be an integer (or a non-empty string)"
    if not _is_int(ann.get("category_id")) or ann["category_id"] not in category_ids:
        return f"'category_id' is {_short(ann.get('category_id'))}, not in categories {sorted(category_ids)}"
    box = ann.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) and math.isfinite(v) for v in box)):
        return f"'bbox' is {_short(box)}; it must be [x, y, width, height]: 4 finite numbers in pixels"
    if "area" in ann and not (_is_number(ann["area"]) and math.isfinite(ann["area"]) and ann["area"] >= 0):
        return f"'area' is {_short(ann['area'])}; it must be a finite number >= 0 (or left out)"
    if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
        return f"'iscrowd' is {_short(ann['iscrowd'])}; it must be 0 or 1"
    return None


def _repeated(values):
    """Positions of every value that occurs more than once."""
    counts = Counter(values)
    return {i: counts[v] for i, v in enumerate(values) if counts[v] > 1}


def check_coco_json(json_file, image_root, skip_bad=False, cache_file=None, workers=None, max_pixels=None):
    """Validate a COCO detection json and its images (see the module docstring). ``max_pixels``: the
    pixel limit (:func:`ks_detr.data.images.set_max_image_pixels`; None = the one in force).

    Returns ``(counts, data)``: ``counts`` has every key of :data:`COUNT_KEYS` (what was dropped,
    clipped, filled, skipped, and how many images are rotated/high-bit/alpha), ``data`` is the cleaned
    COCO dict (only the kept records; clipped boxes, filled areas). Raises :class:`DatasetError`.
    """
    data = _read_json(json_file)
    category_ids = _check_categories(json_file, data["categories"])
    if image_root and not os.path.isdir(image_root):
        raise DatasetError(f"{json_file}: image folder {image_root} does not exist")
    problems = _Problems(json_file, skip_bad)
    images, annotations = data["images"], data["annotations"]

    # 1. records: fields and uniqueness
    for i, img in enumerate(images):
        why = _image_field_problem(img)
        if why:
            problems.image(i, img, f"{why}; {SKIP_HINT}")
    ok = [i for i in range(len(images)) if i not in problems.bad_images]
    for key, what in (("id", "image id"), ("file_name", "file_name")):
        values = [images[i][key] if key == "id" else os.path.normpath(images[i][key]) for i in ok]
        for pos, n in _repeated(values).items():
            problems.image(ok[pos], images[ok[pos]], f"its {what} is used by {n} image records, so boxes can't be "
                           f"told apart; give every image its own {what}, or pass --skip-bad-records to leave "
                           "all of them out")
    index_of_image = {images[i]["id"]: i for i in ok}
    any_image_ids = {img["id"] for img in images if isinstance(img, dict) and _is_id(img.get("id"))}
    for j, ann in enumerate(annotations):
        why = _annotation_field_problem(ann, category_ids)
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        image_id = image_id if _is_id(image_id) else None
        if why is None and image_id not in any_image_ids:
            why = f"'image_id' is {_short(ann.get('image_id'))}, not the id of any image record"
        if why:
            problems.annotation(j, ann, f"{why}; {SKIP_HINT} (with its image)", index_of_image.get(image_id))
    ok_anns = [j for j in range(len(annotations)) if j not in problems.bad_annotations]
    for pos, n in _repeated([annotations[j]["id"] for j in ok_anns]).items():
        j = ok_anns[pos]
        problems.annotation(j, annotations[j], f"its id is used by {n} annotations; give every annotation its own id, "
                            "or pass --skip-bad-records to leave them out (with their images)",
                            index_of_image.get(annotations[j]["image_id"]))
    problems.stop()

    # 2. image files, fully decoded
    todo = [i for i in range(len(images)) if i not in problems.bad_images]
    paths = [os.path.join(image_root, images[i]["file_name"]) for i in todo]
    set_max_image_pixels(max_pixels)
    infos = inspect_images(paths, cache_file or default_cache_file(), workers)
    for i, path, (info, problem) in zip(todo, paths, infos):
        if problem is None:  # a cached result: the pixel limit may be lower now
            too_large = pixel_limit_problem(info["width"], info["height"])
            problem = TOO_LARGE + too_large if too_large else None
        if problem and problem.startswith(TOO_LARGE):
            problem = f"{problem[len(TOO_LARGE):]}, or pass --skip-bad-records to leave it out"
        problem = f"{path}: {problem}" if problem else _size_problem(images[i], info)
        if problem:
            problems.image(i, images[i], problem)
    problems.stop()

    # 3. boxes
    counts = dict.fromkeys(COUNT_KEYS, 0)
    kept_images = [i for i in range(len(images)) if i not in problems.bad_images]
    kept_ids = {images[i]["id"] for i in kept_images}
    counts["skipped_images"] = len(images) - len(kept_images)
    if images and not kept_images:
        raise DatasetError(f"{json_file}: --skip-bad-records left out all {len(images)} images (see the warnings "
                           "above); nothing is left to register")
    counts["skipped_annotations"] = len(problems.bad_annotations)
    with_boxes, kept_annotations = set(), []
    for j, ann in enumerate(annotations):
        if j in problems.bad_annotations:
            continue
        if ann["image_id"] not in kept_ids:
            counts["annotations_of_skipped_images"] += 1
            continue
        img = images[index_of_image[ann["image_id"]]]
        box, rule = clip_box(ann["bbox"], img["width"], img["height"])
        if rule in ("empty_boxes_dropped", "outside_boxes_dropped"):
            counts[rule] += 1
            continue
        ann = dict(ann, bbox=box)
        if rule == "boxes_clipped":
            counts["boxes_clipped"] += 1
            if "area" in ann:  # COCO's small/medium/large buckets must see the clipped box
                w, h = annotations[j]["bbox"][2:]  # the box before clipping
                ann["area"] = ann["area"] * (box[2] * box[3]) / (w * h)
        if "area" not in ann:
            ann["area"] = box[2] * box[3]
            counts["areas_filled"] += 1
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
            counts["iscrowd_filled"] += 1
        if not ann.get("iscrowd", 0):
            with_boxes.add(ann["image_id"])
        kept_annotations.append(ann)
    counts["images_without_boxes"] = len(kept_ids - with_boxes)
    for i, (info, _) in zip(todo, infos):
        if i in kept_images:
            counts["exif_rotated_images"] += info["orientation"] != 1
            counts["high_bit_depth_images"] += info["high_bit_depth"]
            counts["images_with_alpha"] += info["alpha"]
    cleaned = dict(data, images=[images[i] for i in kept_images], annotations=kept_annotations)
    return counts, cleaned


def clip_box(bbox, width, height):
    """``[x, y, w, h]`` box -> (box clipped to the image, rule): rule is None (inside),
    ``"boxes_clipped"``, ``"empty_boxes_dropped"`` (w or h <= 0) or ``"outside_boxes_dropped"``."""
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return None, "empty_boxes_dropped"
    x0, y0 = min(max(x, 0), width), min(max(y, 0), height)
    x1, y1 = min(max(x + w, 0), width), min(max(y + h, 0), height)
    if x1 <= x0 or y1 <= y0:
        return None, "outside_boxes_dropped"
    clipped = [x0, y0, x1 - x0, y1 - y0]
    return (list(bbox), None) if (x0, y0, x1, y1) == (x, y, x + w, y + h) else (clipped, "boxes_clipped")


def _size_problem(img, info):
    """The json's width/height must be the displayed size (EXIF orientation applied)."""
    json_wh = (img["width"], img["height"])
    if json_wh == (info["width"], info["height"]):
        return None
    w, h, o = info["width"], info["height"], info["orientation"]
    if o != 1 and json_wh == (info["stored_width"], info["stored_height"]):
        return (f"json width x height {json_wh[0]}x{json_wh[1]} is the stored pixel grid, but the EXIF orientation "
                f"{o} displays (and training reads) the image as {w}x{h}. If the boxes were drawn on the displayed "
                f"image, set width={w}, height={h} in the json; if they were drawn on the stored pixels, remove the "
                "EXIF orientation tag from the file")
    rotated = f" after its EXIF orientation {o}" if o != 1 else ""
    return (f"json width x height {json_wh[0]}x{json_wh[1]} differs from the image's {w}x{h}{rotated}; "
            f"{SKIP_HINT}")


# ---- image decoding: worker processes with libjpeg's warnings captured, cached by (size, mtime)

_stderr_file = None  # a worker's stderr file, kept open


def _capture_stderr():
    """Worker initializer: fd 2 (where libjpeg prints its warnings) goes to a private temp file."""
    global _stderr_file
    _stderr_file = tempfile.TemporaryFile()
    os.dup2(_stderr_file.fileno(), 2)


def _libjpeg_warnings(path):
    """libjpeg's warnings while OpenCV decodes a JPEG (e.g. 'Corrupt JPEG data: ...'); '' if none."""
    import cv2

    start = os.lseek(2, 0, os.SEEK_END)
    decoded = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
    end = os.lseek(2, 0, os.SEEK_END)
    text = os.pread(2, end - start, start).decode(errors="replace").strip() if end > start else ""
    if decoded is None and not text:
        text = "OpenCV cannot decode it"
    return text


def inspect_image(path):
    """Decode ``path`` completely as training does: ``(info dict, None)`` or ``(None, problem)``. A
    file above the pixel limit is not decoded (its problem starts with :data:`TOO_LARGE`)."""
    try:
        info = image_info(path, check_pixels=False)
        too_large = pixel_limit_problem(info.width, info.height)
        if too_large:
            return None, TOO_LARGE + too_large
        pixels = read_image(path)
    except FileNotFoundError:
        return None, "file not found"
    except (OSError, SyntaxError, ValueError) as e:  # Pillow: unidentified, truncated, broken data
        return None, f"cannot decode the image ({e}); re-export the file or {SKIP_HINT}"
    if pixels.shape[:2] != (info.height, info.width):
        return None, f"decodes to {pixels.shape[1]}x{pixels.shape[0]}, its header says {info.width}x{info.height}"
    with open(path, "rb") as f:
        is_jpeg = f.read(2) == b"\xff\xd8"
    warnings = _libjpeg_warnings(path) if is_jpeg else ""
    if warnings:
        return None, (f"corrupt JPEG data (libjpeg: {' / '.join(warnings.splitlines()[:2])}): parts of it would "
                      f"train as garbage; re-export the file or {SKIP_HINT}")
    return info._asdict(), None


def _file_key(path):
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def inspect_images(paths, cache_file, workers=None):
    """:func:`inspect_image` of every path, in worker processes, cached in ``cache_file`` by path,
    size and modification time (a missing file is not cached)."""
    try:
        with open(cache_file) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    results, todo = [None] * len(paths), []
    for k, path in enumerate(paths):
        try:
            key = _file_key(path)
        except OSError:
            results[k] = (None, "file not found")
            continue
        hit = cache.get(os.path.abspath(path))
        if hit and hit[0] == key:
            results[k] = tuple(hit[1])
        else:
            todo.append((k, key))
    if todo:
        n = workers or min(len(todo), os.cpu_count() or 1, 16)
        logger.info("decoding %d images (%d processes; the next run reads %s instead)", len(todo), n, cache_file)
        with concurrent.futures.ProcessPoolExecutor(n, initializer=_capture_stderr) as pool:
            chunk = max(1, len(todo) // (4 * n))
            for (k, key), result in zip(todo, pool.map(inspect_image, [paths[k] for k, _ in todo], chunksize=chunk)):
                results[k] = result
                if not (result[1] or "").startswith(TOO_LARGE):  # that one depends on the limit
                    cache[os.path.abspath(paths[k])] = [key, list(result)]
        try:
            os.makedirs(os.path.dirname(cache_file) or ".", exist_ok=True)
            atomic_write(cache_file, lambda f: f.write(json.dumps(cache).encode()))
        except OSError as e:
            logger.warning("could not write the image check cache %s (%s)", cache_file, e)
    return results


def register_checked_coco(name, json_file, image_root, skip_bad=False, out_dir=None, cache_file=None,
                          max_pixels=None):
    """Check the dataset (:func:`check_coco_json`), log the counts, register it under ``name``.

    When the check left out, dropped, clipped or filled anything, the cleaned json is written to
    ``<out_dir>/<name>.checked.json`` and registered instead of ``json_file``. Returns the counts.
    """
    if name in DatasetCatalog.list():
        raise DatasetError(f"--register-coco {name} {json_file}: the name {name!r} is already registered (a builtin "
                           "dataset, or the same name given twice); choose another name")
    counts, data = check_coco_json(json_file, image_root, skip_bad, cache_file, max_pixels=max_pixels)
    logger.info(
        "dataset %s (%s): %d images, %d boxes kept; dropped %d boxes with zero or negative size and %d boxes "
        "outside the image, clipped %d boxes to the image, filled %d missing areas and %d missing iscrowd (0); "
        "%d images without boxes (left out of training while DATALOADER.FILTER_EMPTY_ANNOTATIONS is True)", name,
        json_file, len(data["images"]), len(data["annotations"]), counts["empty_boxes_dropped"],
        counts["outside_boxes_dropped"], counts["boxes_clipped"], counts["areas_filled"], counts["iscrowd_filled"],
        counts["images_without_boxes"])
    if skip_bad:
        logger.info("dataset %s: --skip-bad-records left out %d images and %d bad annotations (plus the %d "
                    "annotations of those images)", name, counts["skipped_images"], counts["skipped_annotations"],
                    counts["annotations_of_skipped_images"])
    if counts["exif_rotated_images"] or counts["high_bit_depth_images"] or counts["images_with_alpha"]:
        logger.info("dataset %s: %d images rotated by their EXIF orientation (boxes refer to the displayed image), "
                    "%d images with more than 8 bits per sample (stretched to 0-255 by each image's min-max), "
                    "%d images with alpha (composited onto black)", name, counts["exif_rotated_images"],
                    counts["high_bit_depth_images"], counts["images_with_alpha"])
    changed = ("skipped_images", "skipped_annotations", "empty_boxes_dropped", "outside_boxes_dropped",
               "boxes_clipped", "areas_filled", "iscrowd_filled")
    if any(counts[k] for k in changed):
        os.makedirs(out_dir or ".", exist_ok=True)
        json_file = os.path.join(out_dir or ".", f"{name}.checked.json")
        atomic_write(json_file, lambda f: f.write(json.dumps(data).encode()))
        logger.info("dataset %s: registered the checked json %s", name, json_file)
    register_coco_instances(name, {}, json_file, image_root)
    return counts


def check_num_classes(cfg):
    """Every train/test dataset must have exactly as many categories as the model's classes key
    (``MODEL.DETR.NUM_CLASSES``; detectron2's ``MODEL.RETINANET`` / ``MODEL.ROI_HEADS`` for its detectors)."""
    key = {"RetinaNet": "RETINANET", "GeneralizedRCNN": "ROI_HEADS"}.get(cfg.MODEL.META_ARCHITECTURE, "DETR")
    num_classes = cfg.MODEL[key].NUM_CLASSES
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        meta = MetadataCatalog.get(name)
        if not hasattr(meta, "thing_classes") and hasattr(meta, "json_file"):
            DatasetCatalog.get(name)  # loading a COCO json fills thing_classes
        classes = getattr(meta, "thing_classes", None)
        if classes is not None and len(classes) != num_classes:
            raise DatasetError(f"Invalid config MODEL.{key}.NUM_CLASSES={num_classes}: dataset {name} "
                               f"has {len(classes)} categories {classes[:10]}; set MODEL.{key}.NUM_CLASSES "
                               f"{len(classes)}")

"""Property-based checks of the --register-coco validation pass (ks_detr/data/custom.py): random
mutations of a valid COCO json and of valid image files end either in a one-line DatasetError that
names the json file, or in a cleaned dataset whose every box lies inside its image with positive size
and whose counts add up exactly; never in another exception."""
import itertools
import json
import math
import os
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ks_detr.data import DatasetError
from ks_detr.data.custom import check_coco_json
from ks_detr.data.images import read_image

W, H, N_IMAGES = 48, 40, 3
FIELDS = {"images": ["id", "file_name", "width", "height"],
          "annotations": ["id", "image_id", "category_id", "bbox", "area", "iscrowd"],
          "categories": ["id", "name"]}
WEIRD = st.one_of(
    st.none(), st.booleans(), st.integers(-100, 200), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4), st.lists(st.integers(-60, 120), max_size=6),
    st.lists(st.one_of(st.floats(-1e3, 1e3), st.just(float("nan"))), min_size=4, max_size=4),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
COORD = st.one_of(st.integers(-60, 120), st.floats(-60, 120), st.sampled_from([float("nan"), float("inf"), 0]))


def valid_coco():
    anns = [{"id": 10 * i + k, "image_id": i, "category_id": 1 + k % 2, "bbox": [4 + 9 * k, 5, 12, 10],
             "area": 120, "iscrowd": 0} for i in range(N_IMAGES) for k in range(3)]
    return {"images": [{"id": i, "file_name": f"{i}.jpg", "width": W, "height": H} for i in range(N_IMAGES)],
            "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


@st.composite
def json_mutation(draw):
    """A function that mutates a COCO dict in place (and returns the json to write)."""
    kind = draw(st.sampled_from(["set", "delete", "duplicate", "drop", "replace_record", "replace_list", "coord",
                                 "top_level"]))
    section = draw(st.sampled_from(sorted(FIELDS)))
    index = draw(st.integers(0, 8))
    field = draw(st.sampled_from(FIELDS[section] + ["extra"]))
    value = draw(WEIRD)
    coord = (draw(st.integers(0, 3)), draw(COORD))

    def mutate(data):
        if not isinstance(data, dict):  # an earlier mutation replaced the whole file
            return data
        records = data.get(section)
        if kind == "top_level":
            return value
        if kind == "replace_list":
            data[section] = value
            return data
        if not isinstance(records, list) or not records:
            return data
        i = index % len(records)
        if kind == "replace_record":
            records[i] = value
        elif kind == "duplicate":
            records.append(json.loads(json.dumps(records[i])))
        elif kind == "drop":
            del records[i]
        elif not isinstance(records[i], dict):
            return data
        elif kind == "set":
            records[i][field] = value
        elif kind == "delete":
            records[i].pop(field, None)
        elif kind == "coord" and isinstance(data.get("annotations"), list) and data["annotations"]:
            ann = data["annotations"][index % len(data["annotations"])]
            if isinstance(ann, dict) and isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4:
                ann["bbox"][coord[0]] = coord[1]
        return data

    return mutate


def assert_valid_outcome(json_file, image_root, original, skip_bad):
    """The property: a named one-line DatasetError, or a clean dataset with exact counts."""
    try:
        counts, data = check_coco_json(json_file, image_root, skip_bad=skip_bad)
    except DatasetError as e:
        message = str(e)
        assert "\n" not in message and message.startswith(json_file + ": "), message
        return None
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    assert len(sizes) == len(data["images"])  # unique image ids
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        width, height = sizes[a["image_id"]]
        assert all(math.isfinite(v) for v in a["bbox"]) and w > 0 and h > 0
        assert 0 <= x and 0 <= y and x + w <= width and y + h <= height, (a, width, height)
    assert len(data["images"]) + counts["skipped_images"] == len(original["images"])
    assert (len(data["annotations"]) + counts["empty_boxes_dropped"] + counts["outside_boxes_dropped"]
            + counts["skipped_annotations"] + counts["annotations_of_skipped_images"]) == len(original["annotations"])
    if not skip_bad:
        assert counts["skipped_images"] == counts["skipped_annotations"] == 0
    return data


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / f"{i}.jpg", quality=90)
    return root


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(json_mutation(), min_size=1, max_size=3), skip_bad=st.booleans())
def test_random_json_mutations_end_in_named_error_or_exact_counts(image_root, mutations, skip_bad):
    data = valid_coco()
    for mutate in mutations:
        data = mutate(data)
    json_file = image_root / "mutated.json"
    json_file.write_text(json.dumps(data))
    original = data if isinstance(data, dict) else {}
    assert_valid_outcome(str(json_file), str(image_root), original, skip_bad)


_example = itertools.count()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, N_IMAGES - 1), kind=st.sampled_from(["truncate", "zero_run", "random_bytes", "flip",
                                                                  "text", "delete"]),
       where=st.floats(0.05, 0.95), length=st.integers(1, 400), skip_bad=st.booleans())
def test_random_image_damage_ends_in_named_error_or_readable_images(image_root, which, kind, where, length,
                                                                    skip_bad):
    folder = image_root / f"damaged{next(_example)}"  # a fresh path: the cache must not answer for it
    shutil.copytree(image_root, folder, ignore=shutil.ignore_patterns("damaged*", "*.json"))
    path = folder / f"{which}.jpg"
    raw = bytearray(path.read_bytes())
    at = int(where * len(raw))
    if kind == "truncate":
        raw = raw[:at]
    elif kind == "zero_run":
        raw[at:at + length] = bytes(len(raw[at:at + length]))
    elif kind == "random_bytes":
        raw = bytearray(np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8).tobytes())
    elif kind == "flip":
        raw[at] ^= 0xFF
    elif kind == "text":
        raw = bytearray(b"not an image\n")
    if kind == "delete":
        os.remove(path)
    else:
        path.write_bytes(bytes(raw))
    original = valid_coco()
    json_file = folder / "train.json"
    json_file.write_text(json.dumps(original))
    data = assert_valid_outcome(str(json_file), str(folder), original, skip_bad)
    if data is not None:  # whatever was kept decodes to the size the json gives
        for im in data["images"]:
            assert read_image(str(folder / im["file_name"])).shape == (im["height"], im["width"], 3)
    if kind in ("truncate", "text", "delete", "random_bytes"):  # certainly unreadable: never kept
        assert data is None or which not in {im["id"] for im in data["images"]}

"""Images of users' datasets in unusual modes: 16-bit, grayscale, palette, alpha, EXIF-rotated JPEGs.

Each test writes a small image with PIL (or OpenCV for 16-bit colour) whose content is known, then
reads it through ks_detr.data.images.read_image, the dataset mapper and/or the pre-training check
and asserts pixel values, shapes and that a marked square lands on its box.
"""
import json

import cv2
import numpy as np
import pytest
from detectron2.structures import BoxMode
from PIL import Image

from conftest import make_cfg
from ks_detr.data import DatasetError, DetrDatasetMapper
from ks_detr.data.custom import check_coco_json
from ks_detr.data.images import image_info, read_image

H, W = 48, 80  # displayed image: landscape, so a 90-degree EXIF rotation swaps width and height
BOX = (50, 8, 70, 24)  # XYXY of the marked square in the displayed image; asymmetric under flips


@pytest.fixture(scope="module")
def mappers():
    """Mappers that neither flip, crop nor resize a 48 x 80 image."""
    cfg = make_cfg("configs/conditional_detr_r50.yaml", "INPUT.RANDOM_FLIP", "none", "INPUT.CROP.ENABLED", False,
                   "INPUT.MIN_SIZE_TRAIN", (H,), "INPUT.MAX_SIZE_TRAIN", 1000,
                   "INPUT.MIN_SIZE_TEST", H, "INPUT.MAX_SIZE_TEST", 1000)
    return DetrDatasetMapper(cfg, is_train=True), DetrDatasetMapper(cfg, is_train=False)


def record(path, box=BOX, width=W, height=H):
    x0, y0, x1, y1 = box
    return {"file_name": str(path), "image_id": 0, "width": width, "height": height,
            "annotations": [{"bbox": [x0, y0, x1 - x0, y1 - y0], "bbox_mode": BoxMode.XYWH_ABS,
                             "category_id": 0, "iscrowd": 0}]}


def mask_box(mask):
    """XYXY (exclusive end) of the True pixels of a 2-D mask."""
    ys, xs = np.nonzero(mask)
    assert len(xs), "marker not found"
    return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def write_json(tmp_path, file_name, width, height):
    data = {"images": [{"id": 1, "file_name": file_name, "width": width, "height": height}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "area": 320, "iscrowd": 0,
                             "bbox": [BOX[0], BOX[1], BOX[2] - BOX[0], BOX[3] - BOX[1]]}],
            "categories": [{"id": 1, "name": "marker"}]}
    path = tmp_path / f"{file_name}.json"
    path.write_text(json.dumps(data))
    return str(path)


# --- more than 8 bits per sample -------------------------------------------------------------------

@pytest.mark.parametrize("background,square", [(1000, 60000), (100, 4000)], ids=["full-range", "12-bit"])
def test_16bit_gray_png_is_stretched_not_saturated(tmp_path, mappers, background, square):
    pixels = np.full((H, W), background, np.uint16)
    pixels[BOX[1]:BOX[3], BOX[0]:BOX[2]] = square
    path = tmp_path / "gray16.png"
    Image.fromarray(pixels).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"  # what users' 16-bit PNGs open as
        clipped = np.asarray(im.convert("RGB"))  # Pillow's own conversion clips at 255
        assert clipped[0, 0, 0] == min(background, 255) and clipped[BOX[1], BOX[0], 0] == 255
    train, test = mappers
    for mapper in (train, test):
        out = mapper(record(path))
        image = out["image"].numpy()
        assert image.shape == (3, H, W) and image.dtype == np.uint8
        assert (image[0] == image[1]).all() and (image[0] == image[2]).all()  # gray -> 3 equal channels
        assert set(np.unique(image)) == {0, 255}  # min -> 0, max -> 255
        assert mask_box(image[0] == 255) == BOX
    assert out["width"] == W and out["height"] == H
    assert train(record(path))["instances"].gt_boxes.tensor.tolist() == [list(map(float, BOX))]
    counts, _ = check_coco_json(write_json(tmp_path, "gray16.png", W, H), str(tmp_path))
    assert counts["high_bit_depth_images"] == 1 and counts["images_with_alpha"] == 0


def test_16bit_stretch_is_linear_min_max(tmp_path):
    ramp = np.linspace(300, 3300, W).round().astype(np.uint16)[None].repeat(H, axis=0)  # 300 .. 3300
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    got = read_image(str(path))[:, :, 0].astype(int)
    expected = np.round((ramp.astype(float) - 300) * 255 / 3000).astype(int)
    assert np.array_equal(got, expected)
    assert got[0, 0] == 0 and got[0, -1] == 255 and 120 < got[0, W // 2] < 135


def test_32bit_int_and_float_tiffs(tmp_path):
    ints = np.full((H, W), -70000, np.int32)
    ints[BOX[1]:BOX[3], BOX[0]:BOX[2]] = 2_000_000
    Image.fromarray(ints).save(tmp_path / "i32.tif")
    floats = np.full((H, W), 0.25, np.float32)
    floats[BOX[1]:BOX[3], BOX[0]:BOX[2]] = 0.75
    floats[0, 0], floats[0, 1] = np.nan, np.inf  # non-finite values are ignored and read as 0
    Image.fromarray(floats).save(tmp_path / "f32.tif")
    for name, mode in (("i32.tif", "I"), ("f32.tif", "F")):
        with Image.open(tmp_path / name) as im:
            assert im.mode == mode
        image = read_image(str(tmp_path / name))
        assert image.shape == (H, W, 3)
        assert mask_box(image[:, :, 0] == 255) == BOX
        assert (image[:, :, 0][image[:, :, 0] != 255] == 0).all()
        assert image_info(str(tmp_path / name)).high_bit_depth


@pytest.mark.parametrize("alpha", [False, True], ids=["rgb48", "rgba64"])
def test_16bit_colour_png_keeps_low_bits_and_channel_order(tmp_path, alpha):
    rgb = np.zeros((H, W, 3), np.uint16)
    rgb[BOX[1]:BOX[3], BOX[0]:BOX[2]] = (4000, 1000, 0)  # 12-bit red-orange square on black
    path = tmp_path / "colour16.png"
    bgr = rgb[:, :, ::-1]
    if alpha:
        a = np.full((H, W, 1), 65535, np.uint16)
        a[:, :10] = 0  # transparent left strip over non-black stored colour
        bgr = bgr.copy()
        bgr[:, :10] = (1000, 2000, 3000)
        bgr = np.concatenate([bgr, a], axis=2)
    assert cv2.imwrite(str(path), np.ascontiguousarray(bgr))
    with Image.open(path) as im:
        assert np.asarray(im)[:, 10:, :3].max() == 15  # Pillow alone keeps the high byte: 4000 -> 15
    image = read_image(str(path))
    assert image.shape == (H, W, 3)
    assert tuple(image[BOX[1] + 2, BOX[0] + 2]) == (255, 64, 0)  # 1000 * 255 / 4000 = 63.75
    assert (image[:, :10] == 0).all() and (image[:2, 10:] == 0).all()
    assert tuple(read_image(str(path), format="BGR")[BOX[1] + 2, BOX[0] + 2]) == (0, 64, 255)
    info = image_info(str(path))
    assert info.high_bit_depth and info.alpha == alpha


# --- 8-bit modes -----------------------------------------------------------------------------------

def test_grayscale_bilevel_and_palette(tmp_path):
    gray = np.arange(H * W, dtype=np.uint32).reshape(H, W) % 251
    Image.fromarray(gray.astype(np.uint8), "L").save(tmp_path / "l.png")
    image = read_image(str(tmp_path / "l.png"))
    assert image.shape == (H, W, 3) and all(np.array_equal(image[:, :, c], gray) for c in range(3))

    Image.fromarray(gray > 100).save(tmp_path / "bilevel.png")
    with Image.open(tmp_path / "bilevel.png") as im:
        assert im.mode == "1"
    assert np.array_equal(read_image(str(tmp_path / "bilevel.png"))[:, :, 1], np.where(gray > 100, 255, 0))

    palette = Image.new("P", (W, H), 0)
    palette.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    palette.paste(1, BOX)
    palette.save(tmp_path / "p.png")
    image = read_image(str(tmp_path / "p.png"))
    assert tuple(image[0, 0]) == (10, 20, 30) and tuple(image[BOX[1], BOX[0]]) == (200, 0, 0)
    assert mask_box(image[:, :, 0] == 200) == BOX

    palette.save(tmp_path / "p_transparent.png", transparency=0)  # index 0 is transparent
    image = read_image(str(tmp_path / "p_transparent.png"))
    assert tuple(image[0, 0]) == (0, 0, 0) and tuple(image[BOX[1], BOX[0]]) == (200, 0, 0)
    assert image_info(str(tmp_path / "p_transparent.png")).alpha


def test_rgba_and_la_alpha_composited_onto_black(tmp_path, mappers):
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., :3] = (90, 180, 250)  # colour stored under the transparent region
    rgba[..., 3] = 0
    rgba[BOX[1]:BOX[3], BOX[0]:BOX[2]] = (200, 100, 50, 255)  # opaque square
    rgba[0:4, 0:4] = (200, 100, 50, 128)  # half transparent corner
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    image = mappers[1](record(tmp_path / "rgba.png"))["image"].numpy().transpose(1, 2, 0)
    assert image.shape == (H, W, 3)
    assert tuple(image[BOX[1], BOX[0]]) == (200, 100, 50)  # opaque: unchanged
    assert tuple(image[1, 1]) == (100, 50, 25)  # 128/255 of the colour
    assert tuple(image[H - 1, 0]) == (0, 0, 0)  # transparent: black, not the stored (90, 180, 250)
    assert mask_box(image[:, :, 0] == 200) == BOX

    la = np.zeros((H, W, 2), np.uint8)
    la[..., 0] = 170
    la[:, W // 2:, 1] = 255
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    image = read_image(str(tmp_path / "la.png"))
    assert (image[:, :W // 2] == 0).all() and (image[:, W // 2:] == 170).all()
    counts, _ = check_coco_json(write_json(tmp_path, "rgba.png", W, H), str(tmp_path))
    assert counts["images_with_alpha"] == 1 and counts["high_bit_depth_images"] == 0


def test_cmyk_jpeg_and_bgr_format(tmp_path):
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[BOX[1]:BOX[3], BOX[0]:BOX[2]] = (255, 0, 0)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95, subsampling=0)
    image = read_image(str(tmp_path / "cmyk.jpg"))
    assert image.shape == (H, W, 3)
    assert mask_box((image[:, :, 0] > 200) & (image[:, :, 1] < 60)) == BOX
    assert np.array_equal(read_image(str(tmp_path / "cmyk.jpg"), format="BGR"), image[:, :, ::-1])


# --- EXIF orientation ------------------------------------------------------------------------------

# stored pixels for each EXIF orientation, given the displayed image (the inverse of what a viewer does)
STORED_FROM_DISPLAYED = {
    1: lambda d: d,
    2: lambda d: d[:, ::-1],
    3: lambda d: np.rot90(d, 2),
    4: lambda d: d[::-1],
    5: lambda d: d.transpose(1, 0, 2),  # 0th row = visual left, 0th column = visual top
    6: lambda d: np.rot90(d, 1),  # displayed = stored rotated 90 degrees clockwise
    7: lambda d: np.rot90(d.transpose(1, 0, 2), 2),
    8: lambda d: np.rot90(d, -1),  # displayed = stored rotated 90 degrees counter-clockwise
}


def write_exif_jpeg(path, orientation):
    displayed = np.zeros((H, W, 3), np.uint8)
    displayed[:] = (40, 90, 160)
    displayed[BOX[1]:BOX[3], BOX[0]:BOX[2]] = (230, 20, 20)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = np.ascontiguousarray(STORED_FROM_DISPLAYED[orientation](displayed))
    Image.fromarray(stored).save(path, quality=95, subsampling=0, exif=exif.tobytes())
    return stored.shape[:2]


def red(image_hwc):
    return (image_hwc[:, :, 0] > 180) & (image_hwc[:, :, 1] < 80) & (image_hwc[:, :, 2] < 80)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_rotated_jpeg_square_lands_on_its_box(tmp_path, mappers, orientation):
    path = tmp_path / f"o{orientation}.jpg"
    stored_hw = write_exif_jpeg(path, orientation)
    assert stored_hw == ((W, H) if orientation >= 5 else (H, W))
    image = read_image(str(path))
    assert image.shape == (H, W, 3)
    assert mask_box(red(image)) == BOX
    out = mappers[0](record(path))  # training mapper: json size and box refer to the displayed image
    image = out["image"].numpy().transpose(1, 2, 0)
    assert image.shape == (H, W, 3)
    assert mask_box(red(image)) == BOX
    assert out["instances"].gt_boxes.tensor.tolist() == [list(map(float, BOX))]

    counts, _ = check_coco_json(write_json(tmp_path, path.name, W, H), str(tmp_path))
    assert counts["exif_rotated_images"] == (orientation != 1) and counts["boxes_clipped"] == 0
    if orientation >= 5:  # the json holds the stored (unrotated) size: a clear error, before training
        with pytest.raises(DatasetError, match=rf"{path.name}\): json width x height {H}x{W} is the stored pixel "
                                               rf"grid, but the EXIF orientation {orientation} displays .* as {W}x{H}"):
            check_coco_json(write_json(tmp_path, path.name, H, W), str(tmp_path))


def test_size_mismatch_and_missing_size_are_reported(tmp_path):
    write_exif_jpeg(tmp_path / "plain.jpg", 1)
    with pytest.raises(DatasetError, match=r"json width x height 81x48 differs from the image's 80x48; fix the record"):
        check_coco_json(write_json(tmp_path, "plain.jpg", W + 1, H), str(tmp_path))
    write_exif_jpeg(tmp_path / "rot.jpg", 6)
    with pytest.raises(DatasetError, match=r"differs from the image's 80x48 after its EXIF orientation 6"):
        check_coco_json(write_json(tmp_path, "rot.jpg", W, H + 2), str(tmp_path))
    with pytest.raises(DatasetError, match=r"plain.jpg\): 'width' is None; it must be the image's width in pixels"):
        check_coco_json(write_json(tmp_path, "plain.jpg", None, H), str(tmp_path))

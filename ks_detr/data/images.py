"""Reading the images of users' datasets as 8-bit RGB, whatever mode they are stored in.

The dataset mapper (training and evaluation), the pre-training check of ``--register-coco`` and the
demo all read images through :func:`read_image` / :func:`image_info`, so they agree on the size and
orientation of every image. The rules:

- **EXIF orientation** (all eight values) is applied first. The pixels, the width/height compared
  with the json and the box coordinates all refer to the image *as displayed* by viewers and
  annotation tools, not to the stored pixel grid.
- **Grayscale** (``L``, ``1``): the gray value is replicated to three equal channels.
- **Palette** (``P``): looked up in the palette (a palette with a transparent index counts as alpha).
- **Alpha** (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, or a PNG ``tRNS`` colour key):
  composited onto **black**, i.e. ``rgb * alpha / max_alpha``. Opaque pixels are unchanged; fully
  transparent ones become black whatever colour they store (those colours are often left-over
  garbage that no viewer shows).
- **More than 8 bits per sample** (16-bit gray PNG/TIFF, modes ``I;16*``; 32-bit ``I``; float
  ``F``; 16-bit-per-channel RGB/RGBA PNG or TIFF): a linear **min-max stretch per image**,
  ``round(255 * (v - min) / (max - min))`` with min/max taken over all colour channels together
  (hues are kept). Chosen over a fixed ``>> 8`` because 16-bit containers usually hold 10-14-bit
  data (thermal, medical, scientific cameras): ``>> 8`` would turn 12-bit data into values 0-15,
  an almost black image for an ImageNet-pretrained backbone. The cost: the mapping differs from
  image to image (one very bright pixel darkens the rest of its image). A constant image maps to 0;
  NaN/inf (float images) map to 0 and are excluded from min/max. Pillow's own ``convert("RGB")``
  clips 16-bit gray values above 255 to white, and it keeps only the high byte of 16-bit colour, so
  16-bit colour files are decoded with OpenCV (a pinned requirement) instead.
- Everything else Pillow can convert (``CMYK``, ``YCbCr``, ...) goes through ``convert("RGB")``.
- **Pixel limit** (decompression bombs): a file whose header declares more than
  ``INPUT.MAX_IMAGE_PIXELS`` pixels (default 178,956,970, where Pillow itself refuses) raises
  :class:`ImageTooLargeError` before any pixel is decoded. The limit is set by
  :func:`set_max_image_pixels` (also for worker processes started later, through
  ``$KS_DETR_MAX_IMAGE_PIXELS``); Pillow's own check is replaced by this one.
"""
import os
from collections import namedtuple

import numpy as np
from detectron2.data import detection_utils
from detectron2.utils.file_io import PathManager
from PIL import Image

EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the Pillow transpose that turns the stored pixels into the displayed image.
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_WIDTH_HEIGHT = (5, 6, 7, 8)
_HIGH_BIT_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
DEFAULT_MAX_IMAGE_PIXELS = 2 * 89_478_485  # where Pillow raises DecompressionBombError by default
MAX_PIXELS_ENV = "KS_DETR_MAX_IMAGE_PIXELS"
Image.MAX_IMAGE_PIXELS = None  # our own check (_check_pixels) names the file, the size and the config key


class ImageTooLargeError(ValueError):
    """An image whose declared size exceeds the pixel limit (a possible decompression bomb)."""


def add_image_config(cfg):
    """Add ``INPUT.MAX_IMAGE_PIXELS`` (the pixel limit of every image read; 0 = no limit) to ``cfg``."""
    if "MAX_IMAGE_PIXELS" not in cfg.INPUT:
        cfg.INPUT.MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS


def set_max_image_pixels(limit):
    """Set the pixel limit for this process and the processes it starts from now on (None: unchanged)."""
    if limit is None:
        return
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        from ..errors import ConfigError

        raise ConfigError(f"Invalid config INPUT.MAX_IMAGE_PIXELS={limit!r}: give a pixel count >= 0 (0 = no limit)")
    os.environ[MAX_PIXELS_ENV] = str(limit)


def max_image_pixels():
    """The pixel limit in force (0 = none)."""
    value = os.environ.get(MAX_PIXELS_ENV, "")
    return int(value) if value.isdigit() else DEFAULT_MAX_IMAGE_PIXELS


def pixel_limit_problem(width, height):
    """What is wrong with an image of ``width`` x ``height`` under the pixel limit, or None."""
    limit = max_image_pixels()
    if limit and width * height > limit:
        return (f"{width}x{height} = {width * height:,} pixels, more than INPUT.MAX_IMAGE_PIXELS = {limit:,} (the "
                "guard against decompression bombs); if the image is genuine, raise INPUT.MAX_IMAGE_PIXELS")
    return None


def _check_pixels(im, file_name):
    problem = pixel_limit_problem(*im.size)
    if problem:
        raise ImageTooLargeError(f"{file_name}: {problem}")

ImageInfo = namedtuple("ImageInfo", "width height stored_width stored_height orientation high_bit_depth alpha")
ImageInfo.__doc__ = """What :func:`read_image` will do with a file, read from its header: displayed size
(after EXIF orientation), stored size, EXIF orientation (1 = none), whether it has more than 8 bits
per sample (min-max stretched) and whether it has alpha (composited onto black)."""


def exif_orientation(im):
    """EXIF orientation 1-8 of an open Pillow image (1 when absent or unreadable)."""
    try:
        value = im.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # broken EXIF blocks are common in the wild; they must not stop training
        return 1
    return value if value in _ORIENTATION_TRANSPOSE else 1


def _is_high_bit_colour(im):
    """16-bit-per-channel RGB/RGBA, which Pillow silently reduces to its high byte."""
    if im.mode not in ("RGB", "RGBA") or not im.tile:
        return False
    args = im.tile[0][3]  # (codec, extents, offset, args); args holds the raw mode
    rawmode = args if isinstance(args, str) else (args[0] if args else "")
    return isinstance(rawmode, str) and ";16" in rawmode


def _has_alpha(im):
    if im.mode in _HIGH_BIT_GRAY_MODES:
        return False
    return "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info


def stretch_to_uint8(values):
    """Linear min-max stretch of any numeric array to uint8 (see the module docstring)."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    out = np.zeros(values.shape, dtype=np.float64)
    if finite.any():
        lo, hi = values[finite].min(), values[finite].max()
        if hi > lo:
            out = (np.where(finite, values, lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _decode_high_bit_colour(data):
    import cv2  # opencv-python-headless is in requirements.txt; only needed for 16-bit colour

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # no EXIF rotation here
    if pixels is None:
        raise OSError("OpenCV cannot decode this 16-bit colour image")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    full = np.iinfo(pixels.dtype).max if pixels.dtype.kind in "ui" else 1.0
    if pixels.shape[2] == 4:
        rgb = pixels[:, :, 2::-1].astype(np.float64) * (pixels[:, :, 3:].astype(np.float64) / full)
    else:
        rgb = pixels[:, :, ::-1] if pixels.shape[2] == 3 else np.repeat(pixels[:, :, :1], 3, axis=2)
    return stretch_to_uint8(rgb)


def _to_rgb8(im):
    """(H, W, 3) uint8 RGB of an open Pillow image, stored orientation."""
    if im.mode in _HIGH_BIT_GRAY_MODES:
        gray = stretch_to_uint8(np.asarray(im))
        return np.repeat(gray[:, :, None], 3, axis=2)
    if _has_alpha(im):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        return np.round(rgba[:, :, :3] * (rgba[:, :, 3:] / 255.0)).astype(np.uint8)
    return np.asarray(im.convert("RGB"))


def read_image(file_name, format="RGB"):
    """Read an image as displayed (EXIF orientation applied), 8-bit, following the module's rules.

    Returns an (H, W, 3) uint8 array in ``format`` ("RGB" or "BGR"); other detectron2 formats
    ("L", "YUV-BT.601", ...) are converted from the 8-bit RGB result by detectron2.
    """
    with PathManager.open(file_name, "rb") as f:
        with Image.open(f) as im:
            _check_pixels(im, file_name)
            high_bit_colour = _is_high_bit_colour(im)  # before getexif(): a PNG may load() there
            orientation = exif_orientation(im)
            if high_bit_colour:
                f.seek(0)
                rgb = _decode_high_bit_colour(f.read())
            else:
                rgb = _to_rgb8(im)
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    if method is not None:
        rgb = np.asarray(Image.fromarray(rgb).transpose(method))
    if format in (None, "RGB"):
        return rgb
    if format == "BGR":
        return rgb[:, :, ::-1]
    return detection_utils.convert_PIL_to_numpy(Image.fromarray(rgb), format)


def image_info(file_name, check_pixels=True):
    """:class:`ImageInfo` of a file without decoding its pixels (a PNG's EXIF may need a decode);
    ``check_pixels``: raise :class:`ImageTooLargeError` above the pixel limit (before any decode)."""
    with PathManager.open(file_name, "rb") as f:
        with Image.open(f) as im:
            if check_pixels:
                _check_pixels(im, file_name)
            high_bit = im.mode in _HIGH_BIT_GRAY_MODES or _is_high_bit_colour(im)
            alpha = _has_alpha(im)
            stored_w, stored_h = im.size
            orientation = exif_orientation(im)
    w, h = (stored_h, stored_w) if orientation in _SWAPS_WIDTH_HEIGHT else (stored_w, stored_h)
    return ImageInfo(w, h, stored_w, stored_h, orientation, high_bit, alpha)

#!/usr/bin/env python
"""Predict boxes on images and write PNGs drawn with detectron2's Visualizer.

    python demo/demo.py --config-file configs/ks_conditional_detr_r50.yaml --input a.jpg photos/ 'more/**/*.jpg' \\
        --output out/ [--confidence 0.3] MODEL.WEIGHTS output/model_final.pth

``--input`` takes image files, folders (every image inside, recursively) and glob patterns (quote them; ``**``
matches any depth). Symbolic links are followed, each real folder and file once: a link to a folder above it
(a loop) adds nothing, and an image reached by several paths is predicted once. In folders and pattern matches
only images count (extensions .jpg .jpeg .png .bmp .tif .tiff .webp, any case); a file named directly is
always tried. Each PNG mirrors its image's path below the deepest folder holding all images: ``a/x.jpg b/x.jpg
-> out/a/x.png out/b/x.png``. Where two images would still get the same PNG (``x.jpg`` and ``x.png``), they
keep their extension: ``x.jpg.png``, ``x.png.png``. An input that is missing, matches nothing or cannot be
read is reported on stderr and skipped; the exit status is then 1 (`--debug` adds tracebacks). If no input
names any file at all, nothing is predicted and the exit status is 2.
A KS config predicts with the student only (exactly the baseline model); no annotations needed.
"""
import argparse
import glob
import os
import sys
import traceback
from collections import Counter

import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import Visualizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ks_detr import load_config  # noqa: E402
from ks_detr.checkpoint import AtomicCheckpointer  # noqa: E402
from ks_detr.data.images import read_image  # noqa: E402  (EXIF, 16-bit, alpha as in training)
from ks_detr.errors import InputError, report_user_errors  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def is_image_name(path):
    """Whether the file name has one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def walk_once(base):
    """``os.walk(base, followlinks=True)`` in sorted order, entering each real folder once (a symlink loop is
    not followed round and round): yields (folder, its file names)."""
    seen = set()
    for root, dirs, files in os.walk(base, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(root, d)) not in seen)
        yield root, files


def images_in(folder):
    """Image files below ``folder``, recursively, in sorted order; linked folders are followed, each
    real folder once (a link to a folder above it is not entered again)."""
    return [os.path.join(root, f) for root, files in walk_once(folder) for f in sorted(files) if is_image_name(f)]


def glob_once(pattern):
    """``glob(pattern, recursive=True)``, sorted, but ``**`` enters each real folder once (a symlink loop
    is not followed round and round)."""
    if "**" not in pattern:
        return sorted(glob.glob(pattern, recursive=True))
    head, _, tail = pattern.partition("**")
    tail = tail.lstrip("/" + os.sep)
    roots = sorted(glob.glob(head, recursive=True)) if glob.has_magic(head) else [head or os.curdir]
    found = []
    for base in roots:
        for root, _ in walk_once(base):
            prefix = glob.escape(root if head else os.path.relpath(root))
            found += glob_once(os.path.join(prefix, tail)) if tail else [root]
    return sorted(dict.fromkeys(found))


def resolve_inputs(inputs):
    """``--input`` values -> (image files without duplicates, [(input, why it gave no file)])."""
    files, failures = [], []
    for spec in inputs:
        if os.path.exists(spec):
            matches, explicit = [spec], True
        elif glob.has_magic(spec):
            matches, explicit = glob_once(spec), False
        else:
            failures.append((spec, "does not exist"))
            continue
        found = []
        for m in matches:
            if os.path.isdir(m):
                found += images_in(m)
            elif explicit or is_image_name(m):
                found.append(m)
        if found:
            files += found
        else:
            failures.append((spec, "contains no image file" if explicit else "matches no image file"))
    unique = {}
    for f in files:
        unique.setdefault(os.path.realpath(f), f)  # one prediction per real file, whatever links lead to it
    return list(unique.values()), failures


def output_names(files):
    """Relative PNG path per file: its path below the files' common folder, extension -> ``.png``;
    the whole file name + ``.png`` where that short name equals another file's short or long name."""
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    long_names = [os.path.relpath(os.path.abspath(f), root) for f in files]
    short_names = [os.path.splitext(n)[0] for n in long_names]
    counts = Counter(short_names)
    return [(n if counts[s] > 1 or s in long_names else s) + ".png" for s, n in zip(short_names, long_names)]


def predict_all(args):
    """Write one PNG per readable input image; return how many inputs failed."""
    files, failures = resolve_inputs(args.input)
    for spec, reason in failures:
        print(f"skipped {spec}: {reason}", file=sys.stderr)
    if not files:
        raise InputError(f"no image file found in --input {' '.join(args.input)}: "
                         + "; ".join(f"{spec} {reason}" for spec, reason in failures))
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    if not cfg.MODEL.WEIGHTS:
        print("warning: MODEL.WEIGHTS is empty, predicting with a randomly initialised model", file=sys.stderr)
    bare = cfg.clone()
    bare.defrost()
    bare.MODEL.WEIGHTS = ""  # loaded below by our checked loader (one-line errors naming the file)
    predictor = DefaultPredictor(bare)
    AtomicCheckpointer(predictor.model, allow_partial=cfg.MODEL.WEIGHTS_ALLOW_PARTIAL,
                       require_all=True).load(cfg.MODEL.WEIGHTS)  # no random heads in the pictures
    names = cfg.DATASETS.TEST or cfg.DATASETS.TRAIN
    metadata = MetadataCatalog.get(names[0]) if names else None
    written, failed = 0, len(failures)
    for path, name in zip(files, output_names(files)):
        try:
            image = read_image(path, format="BGR")  # DefaultPredictor converts to cfg.INPUT.FORMAT
        except Exception as e:  # not an image, truncated, unsupported: report it and go on with the others
            if args.debug:
                traceback.print_exc()
            print(f"skipped {path}: cannot read it as an image ({type(e).__name__}: {e})", file=sys.stderr)
            failed += 1
            continue
        with torch.no_grad():
            inst = predictor(image)["instances"].to("cpu")
        inst = inst[inst.scores >= args.confidence]
        out = os.path.join(args.output, name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        Visualizer(image[:, :, ::-1], metadata).draw_instance_predictions(inst).save(out)
        written += 1
        print(f"{path}: {len(inst)} boxes with score >= {args.confidence} -> {out}")
    print(f"{written} PNG(s) written to {args.output}, {failed} input(s) failed",
          file=sys.stderr if failed else sys.stdout)
    return failed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", nargs="+", required=True, help="image files, folders or quoted glob patterns")
    parser.add_argument("--output", required=True, help="folder for the PNGs (created)")
    parser.add_argument("--confidence", type=float, default=0.3, help="minimum score drawn")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of input errors")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    with report_user_errors(args.debug):
        failed = predict_all(args)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

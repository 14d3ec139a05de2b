#!/usr/bin/env python
"""Export a trained detector (a KS checkpoint exports its student) to TorchScript or ONNX.

    python tools/export_model.py --config-file configs/quickstart/ks_trees.yaml --format torchscript \\
        --output exported/ [--check a.jpg b.jpg] MODEL.WEIGHTS output/quickstart/ks_trees/model_final.pth

Writes ``model.ts`` (``torch.jit.load``) or ``model.onnx`` (onnxruntime, opset ``--opset``) into ``--output``, each
with its own metadata file ``model.ts.json`` / ``model.onnx.json`` (so both formats can share a folder).
``tools/run_exported.py`` runs an exported file on images and draws its boxes as ``demo/demo.py`` does. The
exported function takes one image (3, H, W) float32, any H and W, in the config's ``INPUT.FORMAT`` channel order,
0-255, after the config's test resize (shortest side ``INPUT.MIN_SIZE_TEST``, longest at most
``INPUT.MAX_SIZE_TEST``, as detectron2's DefaultPredictor), and returns ``boxes`` (n, 4) xyxy in that image's
pixels, ``scores`` (n,) and ``classes`` (n,): what the eager model returns for it, best first.
``--check`` runs eager and exported on the given images and prints one JSON line per image: detections,
the largest box (pixels) and score differences (same order), and the median CPU latency of each.
"""
import argparse
import json
import os
import re
import statistics
import sys
import time
import warnings

# torch's deprecation of torch.jit.script, used inside detectron2/fvcore: nothing to act on here
warnings.filterwarnings("ignore", message=r"`torch.jit.(script|load)` is deprecated", category=FutureWarning)

import torch  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ks_detr import load_config  # noqa: E402
from ks_detr.data.images import read_image  # noqa: E402
from ks_detr.errors import ConfigError, InputError, report_user_errors  # noqa: E402
from ks_detr.export import FORMATS, ExportableDetector, build_student, export, load_exported  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the exported model")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (GridSample needs >= 16)")
    parser.add_argument("--sample-image", metavar="FILE",
                        help="image to trace with (default: the first --check image, else a random one)")
    parser.add_argument("--check", nargs="+", default=[], metavar="IMAGE",
                        help="compare exported and eager outputs and latency on these images")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per image and model for --check")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    # ``--check a.jpg b.jpg MODEL.WEIGHTS x``: the first config key (A.B in capitals) ends the image list
    keys = [i for i, v in enumerate(args.check) if re.fullmatch(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+", v)]
    if keys:
        args.check, args.opts = args.check[: keys[0]], args.check[keys[0]:] + args.opts
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    return args


def test_image(cfg, path):
    """An image file as DefaultPredictor gives it to the model: (3, H, W) float32 after the test resize."""
    image = read_image(path, cfg.INPUT.FORMAT)
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    image = resize.get_transform(image).apply_image(image)
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))


def class_names(cfg):
    """The category names of the config's test (else train) dataset, if it is registered; else None."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    names = cfg.DATASETS.TEST or cfg.DATASETS.TRAIN
    if not names:
        return None
    try:
        meta = MetadataCatalog.get(names[0])
        if not hasattr(meta, "thing_classes") and hasattr(meta, "json_file"):
            DatasetCatalog.get(names[0])  # loading a COCO json fills thing_classes
        return list(meta.get("thing_classes", None) or []) or None
    except Exception:  # a dataset that cannot be loaded here (not downloaded): the names are optional
        return None


def median_ms(fn, image, repeat):
    fn(image)  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(image)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def check(model, exported, image, repeat):
    """One --check line: eager vs exported on ``image`` (3, H, W)."""
    def eager(x):
        with torch.no_grad():
            r = model([{"image": x}])[0]["instances"]
        return r.pred_boxes.tensor, r.scores, r.pred_classes

    ref, out = eager(image), exported(image)
    line = {"size": list(image.shape[-2:]), "detections": [len(ref[0]), len(out[0])]}
    if len(ref[0]) == len(out[0]):
        line.update(max_box_diff_px=(ref[0] - out[0]).abs().max().item() if len(ref[0]) else 0.0,
                    max_score_diff=(ref[1] - out[1]).abs().max().item() if len(ref[0]) else 0.0,
                    same_classes=bool((ref[2] == out[2]).all()))
    line.update(eager_ms=round(median_ms(eager, image, repeat), 1), exported_ms=round(median_ms(exported, image, repeat), 1))
    return line


def main(argv=None):
    args = parse_args(argv)
    with report_user_errors(args.debug):
        run(args)


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config_file, ["MODEL.DEVICE", "cpu", *args.opts])
    if not cfg.MODEL.WEIGHTS:
        raise ConfigError("MODEL.WEIGHTS is empty: give the checkpoint to export (MODEL.WEIGHTS path/model_final.pth)")
    missing = [p for p in [cfg.MODEL.WEIGHTS, args.sample_image, *args.check] if p and not os.path.isfile(p)]
    if missing:
        raise InputError(f"no such file: {', '.join(missing)}")
    model, dropped = build_student(cfg, cfg.MODEL.WEIGHTS)
    images = {p: test_image(cfg, p) for p in args.check}
    if args.sample_image:
        sample = test_image(cfg, args.sample_image)
    elif images:
        sample = next(iter(images.values()))
    else:
        h = cfg.INPUT.MIN_SIZE_TEST
        sample = torch.rand(3, h, min(h * 4 // 3, cfg.INPUT.MAX_SIZE_TEST), generator=torch.Generator().manual_seed(0)) * 255
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, FORMATS[args.format])
    export(ExportableDetector(model), sample, args.format, path, args.opset)
    info = {"format": args.format, "file": FORMATS[args.format], "config_file": args.config_file,
            "weights": cfg.MODEL.WEIGHTS, "meta_architecture": model.__class__.__name__,
            "teacher_tensors_dropped": dropped, "input": {"image": "(3, H, W) float32", "format": cfg.INPUT.FORMAT,
                                                          "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
                                                          "max_size_test": cfg.INPUT.MAX_SIZE_TEST},
            "outputs": {"boxes": "(n, 4) xyxy pixels", "scores": "(n,)", "classes": "(n,) int64"},
            "classes": cfg.MODEL.DETR.NUM_CLASSES, "class_names": class_names(cfg),
            "opset": args.opset if args.format == "onnx" else None, "torch": torch.__version__}
    with open(path + ".json", "w") as f:
        json.dump(info, f, indent=2)
    print(f"wrote {path} ({model.__class__.__name__}, {dropped} teacher tensors dropped)", flush=True)
    exported = load_exported(path, args.threads)
    for p, image in images.items():
        print(json.dumps({"image": p, **check(model, exported, image, args.repeat)}), flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Run a file written by tools/export_model.py (``model.ts`` or ``model.onnx``) on images and draw its boxes
the way demo/demo.py draws the eager model's: same reading (EXIF, 16-bit, alpha), same test resize, boxes
scaled back to the image, same Visualizer.

    python tools/run_exported.py exported/model.ts photo.jpg more.png --output vis/ [--confidence 0.3]

Needs the metadata file written next to the model (``model.ts.json`` / ``model.onnx.json``: input format,
test sizes, class names); no config and no checkpoint. Prints one line per image and writes ``<name>.png``.
"""
import argparse
import json
import os
import sys
import warnings

# torch's deprecation of torch.jit.script, used inside detectron2/fvcore: nothing to act on here
warnings.filterwarnings("ignore", message=r"`torch.jit.(script|load)` is deprecated", category=FutureWarning)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.data.catalog import Metadata  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ks_detr.data.images import read_image  # noqa: E402
from ks_detr.errors import InputError, report_user_errors  # noqa: E402
from ks_detr.export import load_exported  # noqa: E402


def read_metadata(model_path):
    """The metadata json written next to an exported file."""
    path = model_path + ".json"
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path} not found: run the {os.path.basename(model_path)} that tools/export_model.py wrote "
                         "next to its metadata file") from None
    except ValueError as e:
        raise InputError(f"{path}: not a json file ({e})") from e


def predict(run, meta, path):
    """Detections of the exported function ``run`` on the image file ``path``, in its pixels, as
    DefaultPredictor + detector_postprocess give them: (BGR image, Instances)."""
    fmt = meta["input"]["format"]
    image = read_image(path, format="BGR")
    model_input = image[:, :, ::-1] if fmt == "RGB" else image
    h, w = image.shape[:2]
    resize = T.ResizeShortestEdge([meta["input"]["min_size_test"]] * 2, meta["input"]["max_size_test"])
    resized = resize.get_transform(model_input).apply_image(model_input)
    boxes, scores, classes = run(torch.as_tensor(np.ascontiguousarray(resized.astype("float32").transpose(2, 0, 1))))
    boxes = Boxes(torch.as_tensor(boxes).clone())
    boxes.scale(w / resized.shape[1], h / resized.shape[0])
    boxes.clip((h, w))
    inst = Instances((h, w), pred_boxes=boxes, scores=torch.as_tensor(scores), pred_classes=torch.as_tensor(classes))
    return image, inst[boxes.nonempty()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model.ts or model.onnx written by tools/export_model.py")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--output", required=True, help="folder for the PNGs (created)")
    parser.add_argument("--confidence", type=float, default=0.3, help="minimum score drawn")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    with report_user_errors(args.debug):
        return run(args)


def run(args):
    if not os.path.isfile(args.model):
        raise InputError(f"no such file: {args.model}")
    meta = read_metadata(args.model)
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        raise InputError(f"no such file: {', '.join(missing)}")
    exported = load_exported(args.model)
    names = meta.get("class_names")
    metadata = Metadata(thing_classes=names) if names else Metadata()
    os.makedirs(args.output, exist_ok=True)
    written = []
    for path in args.images:
        image, inst = predict(exported, meta, path)
        inst = inst[inst.scores >= args.confidence]
        out = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".png")
        Visualizer(image[:, :, ::-1], metadata).draw_instance_predictions(inst).save(out)
        written.append(out)
        print(f"{path}: {len(inst)} boxes with score >= {args.confidence} -> {out}")
    print(f"{len(written)} PNG(s) written to {args.output}")
    return written


if __name__ == "__main__":
    main()

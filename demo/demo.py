#!/usr/bin/env python
"""Predict boxes on images and write PNGs drawn with detectron2's Visualizer.

    python demo/demo.py --config-file configs/ks_conditional_detr_r50.yaml --input a.jpg b.jpg \\
        --output out/ [--confidence 0.3] MODEL.WEIGHTS output/model_final.pth

A KS config predicts with the student only (exactly the baseline model); no annotations needed.
"""
import argparse
import os
import sys

import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import Visualizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ks_detr import load_config  # noqa: E402
from ks_detr.data.images import read_image  # noqa: E402  (EXIF, 16-bit, alpha as in training)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", nargs="+", required=True, help="image files")
    parser.add_argument("--output", required=True, help="folder for the PNGs (created)")
    parser.add_argument("--confidence", type=float, default=0.3, help="minimum score drawn")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    missing = [p for p in args.input if not os.path.isfile(p)]
    if missing:
        parser.error(f"input image(s) not found: {missing}")
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    if not cfg.MODEL.WEIGHTS:
        print("warning: MODEL.WEIGHTS is empty, predicting with a randomly initialised model", file=sys.stderr)
    predictor = DefaultPredictor(cfg)
    names = cfg.DATASETS.TEST or cfg.DATASETS.TRAIN
    metadata = MetadataCatalog.get(names[0]) if names else None
    os.makedirs(args.output, exist_ok=True)
    for path in args.input:
        image = read_image(path, format="BGR")  # DefaultPredictor converts to cfg.INPUT.FORMAT
        with torch.no_grad():
            inst = predictor(image)["instances"].to("cpu")
        inst = inst[inst.scores >= args.confidence]
        vis = Visualizer(image[:, :, ::-1], metadata)
        out = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".png")
        vis.draw_instance_predictions(inst).save(out)
        print(f"{path}: {len(inst)} boxes with score >= {args.confidence} -> {out}")


if __name__ == "__main__":
    main()

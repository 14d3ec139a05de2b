#!/usr/bin/env python
"""Plot losses and COCO AP from a detectron2 ``metrics.json`` to PNG.

    python tools/plot_metrics.py OUTPUT_DIR [--out OUTPUT_DIR/metrics.png]

Top: total loss and the student's last-layer losses (plus the teachers' when present) per iteration;
bottom: bbox AP and AP50 at every evaluation.
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOSSES = ("total_loss", "loss_class", "loss_bbox", "loss_giou", "loss_class_ks_a", "loss_class_ks_v")


def read_metrics(path):
    """metrics.json (one json object per line) -> list of dicts; names the file and line on errors."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{i}: not json ({e.msg})")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a train_net.py OUTPUT_DIR holding metrics.json")
    parser.add_argument("--out", help="PNG to write (default OUTPUT_DIR/metrics.png)")
    args = parser.parse_args(argv)
    path = os.path.join(args.output_dir, "metrics.json")
    if not os.path.isfile(path):
        sys.exit(f"{path} does not exist: is {args.output_dir!r} a train_net.py OUTPUT_DIR?")
    rows = read_metrics(path)
    fig, (ax_loss, ax_ap) = plt.subplots(2, 1, figsize=(8, 7))
    for key in LOSSES:
        pts = [(r["iteration"], r[key]) for r in rows if key in r]
        if pts:
            ax_loss.plot(*zip(*pts), marker=".", label=key)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=8)
    for key in ("bbox/AP", "bbox/AP50"):
        pts = [(r["iteration"], r[key]) for r in rows if key in r]
        if pts:
            ax_ap.plot(*zip(*pts), marker="o", label=key)
    ax_ap.set_xlabel("iteration")
    ax_ap.set_ylabel("COCO AP (%)")
    ax_ap.legend(fontsize=8)
    fig.suptitle(os.path.abspath(args.output_dir), fontsize=9)
    fig.tight_layout()
    out = args.out or os.path.join(args.output_dir, "metrics.png")
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

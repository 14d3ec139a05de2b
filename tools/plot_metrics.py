#!/usr/bin/env python
"""Plot losses and COCO AP from a detectron2 ``metrics.json`` to PNG.

    python tools/plot_metrics.py OUTPUT_DIR [OUTPUT_DIR ...] [--x minutes] [--out OUTPUT_DIR/metrics.png]

Top: total loss and the student's last-layer losses (plus the teachers' when present); bottom: bbox
AP and AP50 at every evaluation; against the iteration or, with ``--x minutes``, the wall-clock minutes
that train_net.py records. Several OUTPUT_DIRs (e.g. baseline and KS) share one figure.
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
    parser.add_argument("output_dirs", nargs="+", metavar="OUTPUT_DIR",
                        help="train_net.py OUTPUT_DIRs holding metrics.json")
    parser.add_argument("--x", choices=("iteration", "minutes"), default="iteration", help="x axis")
    parser.add_argument("--out", help="PNG to write (default: metrics.png in the first OUTPUT_DIR)")
    args = parser.parse_args(argv)
    x_key = "iteration" if args.x == "iteration" else "wall_minutes"
    runs = {}
    for d in args.output_dirs:
        path = os.path.join(d, "metrics.json")
        if not os.path.isfile(path):
            sys.exit(f"{path} does not exist: is {d!r} a train_net.py OUTPUT_DIR?")
        runs[d] = read_metrics(path)
        if not any(x_key in r for r in runs[d]):
            sys.exit(f"{path} has no {x_key!r} values (written by train_net.py since the wall clock was added)")
    fig, (ax_loss, ax_ap) = plt.subplots(2, 1, figsize=(8, 7))
    for d, rows in runs.items():
        tag = f"{os.path.basename(os.path.normpath(d))}: " if len(runs) > 1 else ""
        for ax, keys, marker in ((ax_loss, LOSSES, "."), (ax_ap, ("bbox/AP", "bbox/AP50"), "o")):
            for key in keys:
                pts = [(r[x_key], r[key]) for r in rows if key in r and x_key in r]
                if pts:
                    ax.plot(*zip(*pts), marker=marker, label=tag + key)
    x_label = "iteration" if args.x == "iteration" else "wall-clock minutes"
    ax_loss.set_xlabel(x_label)
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=7)
    ax_ap.set_xlabel(x_label)
    ax_ap.set_ylabel("COCO AP (%)")
    ax_ap.legend(fontsize=8)
    fig.suptitle(", ".join(os.path.abspath(d) for d in runs), fontsize=8)
    fig.tight_layout()
    out = args.out or os.path.join(args.output_dirs[0], "metrics.png")
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

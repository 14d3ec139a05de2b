#!/usr/bin/env python
"""Show what knowledge sharing sees on one annotated image: the GT Fg-Bg mask and the encoder
attention of the student and of each teacher.

    python tools/visualize_ks.py --config-file configs/ks_conditional_detr_r50.yaml \\
        --dataset trees_val --index 3 [--tokens 120,80 300,40] [--layer -1] [--per-head] --output vis/ \\
        MODEL.WEIGHTS output/model_final.pth MODEL.DEVICE cpu

The image gets the test resize (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST) and its GT boxes; the model
runs one KS training-style forward (teachers need GT boxes) without dropout or gradients. PNGs:

- ``<image>_fgmask.png``: the Fg-Bg mask as the model built it, one panel per feature level, each
  token drawn over its stride-sized cell (with MASK.SAMPLING bilinear a token is decided by one
  align-corners sample point, so coarse levels can look shifted by up to half a cell);
- ``<image>_layer<L>_token<k>.png`` per query token (x,y in image pixels; default: the centre of the
  largest box and the background token farthest from every box): the attention of that token in
  KS encoder layer L, one panel per stream (#1 student A, #2 teacher A' from the GT-masked tokens,
  #3 student A with teacher values), heads averaged; ``--per-head`` adds ``..._heads.png``.
  Deformable families attend sparsely: their panels scatter the sampling locations, one colour per
  level, marker area proportional to the attention weight.
"""
import argparse
import os
import sys
import textwrap

import matplotlib
import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import BoxMode

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ks_detr import load_config  # noqa: E402
from ks_detr.checkpoint import AtomicCheckpointer  # noqa: E402
from ks_detr.data.custom import register_checked_coco  # noqa: E402
from ks_detr.data.images import read_image  # noqa: E402
from ks_detr.errors import UserError, report_user_errors  # noqa: E402

PANEL, TITLE, HEADER, DPI = 360, 44, 36, 100  # panel width, title and header heights (pixels)
STREAM_TITLES = {  # (dense, deformable) panel titles per stream kind
    "s": (r"#1 student: $A$ = softmax($QK^\top/\sqrt{d}$)", r"#1 student: $A$ = softmax($W_A(x+p)$)"),
    "a": (r"#2 teacher: $A'$ = softmax($Q'K'^\top/\sqrt{d}$) of $\tilde{x}$",
          r"#2 teacher: $A'$ = softmax($W'_A(\tilde{x}+p)$)"),
    "v": (r"#3 teacher: $A$ with values $V'$ of $\tilde{x}$",) * 2,
}
LEVEL_COLORS = ("tab:red", "tab:cyan", "tab:orange", "tab:green", "tab:purple", "tab:olive")


class VisualizeError(UserError, ValueError):
    """A config, dataset or option this tool cannot show (exit status 2, one line)."""


def ks_config_suggestion(config_file):
    """What to use instead of a baseline config: its ks_ sibling when there is one."""
    folder, name = os.path.split(config_file)
    sibling = os.path.join(folder, "ks_" + name)
    if os.path.isfile(sibling):
        return f"use its KS version {sibling}"
    return ("use a KS config (a ks_*.yaml: configs/ks_<family>_r50.yaml, configs/quickstart/ks_trees.yaml, ...) or "
            "add MODEL.KS.ENABLED True")


# ---- recording ------------------------------------------------------------------------------
def resolve_layer(model, layer=None):
    """Index in [0, n) of the KS encoder layer ``layer`` (a python index; None = the last KS layer)."""
    ks = sorted(model.ks.encoder_layers)
    n = len(model.encoder.layers)
    if layer is None:
        return ks[-1]
    if not -n <= layer < n or layer % n not in ks:
        raise VisualizeError(f"--layer {layer} is not a KS encoder layer (KS layers: {ks} of {n})")
    return layer % n


def record_ks(model, layer_index=None):
    """Record what KS encoder layer ``layer_index`` (default the last) sees during the forwards inside
    the block, through the model's :meth:`~ks_detr.modeling.ks.KnowledgeSharing.record` (a context
    manager yielding ``padded_size``, ``token_shapes``, ``fg``, ``key_padding_mask``, ``streams`` and
    ``attn`` (dense) or ``weights`` / ``locations`` (deformable) per stream kind)."""
    return model.ks.record(model, resolve_layer(model, layer_index))


def ks_forward(model, batched_inputs):
    """One KS training-style forward: the top-level module in training mode (it builds the Fg-Bg
    mask, runs the teachers and returns the loss dict), every submodule in eval (no dropout), no
    gradients. The model's train/eval flags are restored afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    model.training = True
    try:
        with torch.no_grad():
            return model(batched_inputs)
    finally:
        for m, flag in flags.items():
            m.training = flag


# ---- input ----------------------------------------------------------------------------------
def pick_record(dataset, index=None, file_name=None):
    """The dataset dict of ``dataset`` at ``index`` or with basename ``file_name``."""
    if dataset not in DatasetCatalog.list():
        raise VisualizeError(f"dataset {dataset!r} is not registered (known: {sorted(DatasetCatalog.list())}; "
                             "add --register-coco NAME JSON IMAGE_DIR)")
    records = DatasetCatalog.get(dataset)
    if file_name is not None:
        hits = [r for r in records if os.path.basename(r["file_name"]) == os.path.basename(file_name)]
        if not hits:
            raise VisualizeError(f"--image {file_name!r} is not in dataset {dataset!r} "
                                 f"(e.g. {[os.path.basename(r['file_name']) for r in records[:3]]})")
        return hits[0]
    if not 0 <= index < len(records):
        raise VisualizeError(f"--index {index} out of range: dataset {dataset!r} has {len(records)} images")
    return records[index]


def load_example(cfg, record):
    """Model input for one dataset dict (test resize, GT instances) and what the figures draw.

    Returns (input dict with "image" (3, h, w) and "instances", RGB image (H0, W0, 3) uint8,
    GT boxes (M, 4) xyxy in image pixels).
    """
    rgb = read_image(record["file_name"], format="RGB")  # as training reads it (EXIF, 16-bit, alpha)
    image = rgb if cfg.INPUT.FORMAT == "RGB" else read_image(record["file_name"], format=cfg.INPUT.FORMAT)
    utils.check_image_size(record, image)
    annos = [a for a in record.get("annotations", []) if a.get("iscrowd", 0) == 0]
    bad = [a["category_id"] for a in annos if not 0 <= a["category_id"] < cfg.MODEL.DETR.NUM_CLASSES]
    if bad:
        raise VisualizeError(f"{record['file_name']} has category ids {sorted(set(bad))}, outside "
                             f"MODEL.DETR.NUM_CLASSES={cfg.MODEL.DETR.NUM_CLASSES}")
    boxes = np.array([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos],
                     dtype=np.float32).reshape(-1, 4)
    aug = T.AugInput(image)
    transforms = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)(aug)
    size = aug.image.shape[:2]
    instances = utils.annotations_to_instances(
        [utils.transform_instance_annotations(dict(a), transforms, size) for a in annos], size)
    inputs = {"image": torch.as_tensor(np.ascontiguousarray(aug.image.transpose(2, 0, 1))),
              "instances": utils.filter_empty_instances(instances)}
    return inputs, rgb, boxes


# ---- geometry -------------------------------------------------------------------------------
class Geometry:
    """Maps between image pixels (H0, W0), the model input (h, w) padded to (H_pad, W_pad) and the
    token grids: each level's grid spans the padded input uniformly, as the model's own
    normalised coordinates do."""

    def __init__(self, image_size, input_size, padded_size, token_shapes):
        (self.H0, self.W0), (h, w) = image_size, input_size
        self.sx, self.sy = self.W0 / w, self.H0 / h  # input pixel -> image pixel
        self.H_pad, self.W_pad = padded_size
        self.shapes = token_shapes
        self.offsets = np.cumsum([0] + [a * b for a, b in token_shapes])

    def extent(self):
        """imshow extent (left, right, bottom, top) of any token grid, in image pixels."""
        return (0, self.W_pad * self.sx, self.H_pad * self.sy, 0)

    def token(self, x, y, level):
        """Token index (into the concatenated levels) of image pixel (x, y) on ``level``."""
        if not (0 <= x < self.W0 and 0 <= y < self.H0):
            raise VisualizeError(f"token ({x:g}, {y:g}) is outside the image (width {self.W0}, height {self.H0})")
        h, w = self.shapes[level]
        i = int(y / self.sy / self.H_pad * h)
        j = int(x / self.sx / self.W_pad * w)
        return int(self.offsets[level]) + i * w + j

    def cell(self, token):
        """(level, x0, y0, x1, y1) image-pixel rectangle of a token's cell."""
        level = int(np.searchsorted(self.offsets, token, side="right")) - 1
        h, w = self.shapes[level]
        i, j = divmod(token - int(self.offsets[level]), w)
        cw, ch = self.W_pad * self.sx / w, self.H_pad * self.sy / h
        return level, j * cw, i * ch, (j + 1) * cw, (i + 1) * ch

    def grid(self, values, level):
        """(N,) values of all tokens -> (h_l, w_l) array of ``level``."""
        h, w = self.shapes[level]
        return values[self.offsets[level]: self.offsets[level + 1]].reshape(h, w)


def default_tokens(geo, fg, boxes, level):
    """Image-pixel (x, y) of the default query tokens on ``level``: the centre of the largest GT box
    (M, 4) and the centre of the background token (fg: (N,) bool) farthest from every box, among
    tokens centred inside the image."""
    tokens = []
    if len(boxes):
        x1, y1, x2, y2 = boxes[np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))]
        tokens.append(((x1 + x2) / 2, (y1 + y2) / 2))
    h, w = geo.shapes[level]
    cy, cx = np.meshgrid((np.arange(h) + 0.5) * geo.H_pad * geo.sy / h, (np.arange(w) + 0.5) * geo.W_pad * geo.sx / w,
                         indexing="ij")
    cx, cy = cx.ravel(), cy.ravel()
    candidate = ~geo.grid(fg, level).ravel() & (cx < geo.W0) & (cy < geo.H0)
    if candidate.any():
        dist = np.zeros_like(cx)
        if len(boxes):
            dx = np.maximum(np.maximum(boxes[None, :, 0] - cx[:, None], cx[:, None] - boxes[None, :, 2]), 0)
            dy = np.maximum(np.maximum(boxes[None, :, 1] - cy[:, None], cy[:, None] - boxes[None, :, 3]), 0)
            dist = np.hypot(dx, dy).min(1)
        t = int(np.argmax(np.where(candidate, dist, -1.0)))
        tokens.append((float(cx[t]), float(cy[t])))
    return tokens


# ---- figures --------------------------------------------------------------------------------
def panel_grid(rows, cols, aspect, header):
    """Figure of rows x cols image panels of aspect ``aspect`` (height / width), a header line and a
    title above every panel. Size in pixels: (cols * PANEL, HEADER + rows * (round(PANEL * aspect) + TITLE))."""
    ph = round(PANEL * aspect)
    W, H = cols * PANEL, HEADER + rows * (ph + TITLE)
    fig = plt.figure(figsize=(W / DPI, H / DPI), dpi=DPI)
    lines = textwrap.wrap(header, width=W // 7)
    fig.text(0.5, 1 - 4 / H, "\n".join(lines[:2]), ha="center", va="top", fontsize=8)
    axes = [[fig.add_axes((c * PANEL / W, 1 - (HEADER + r * (ph + TITLE) + TITLE + ph) / H, PANEL / W, ph / H))
             for c in range(cols)] for r in range(rows)]
    return fig, axes


def show_image(ax, rgb, boxes, title):
    """Image, GT box outlines and a title on ``ax``."""
    ax.imshow(rgb, extent=(0, rgb.shape[1], rgb.shape[0], 0))
    for x1, y1, x2, y2 in boxes:
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", lw=0.6))
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def finish_panel(ax, geo):
    """Crop the panel to the image (overlays may cover the padding)."""
    ax.set_xlim(0, geo.W0)
    ax.set_ylim(geo.H0, 0)


def mark_token(ax, geo, token):
    """Outline the token's cell and star its centre."""
    _, x0, y0, x1, y1 = geo.cell(token)
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", lw=1.2, ls="--"))
    ax.plot((x0 + x1) / 2, (y0 + y1) / 2, marker="*", ms=14, mfc="white", mec="black", mew=1.0)


def save(fig, path):
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def draw_mask(path, rgb, boxes, geo, fg, header, sampling):
    """One panel per feature level: foreground tokens (fg (N,) bool) in red over the image."""
    fig, axes = panel_grid(1, len(geo.shapes), rgb.shape[0] / rgb.shape[1], header)
    for level, ax in enumerate(axes[0]):
        m = geo.grid(fg, level)
        overlay = np.zeros((*m.shape, 4))
        overlay[m] = (1.0, 0.0, 0.0, 0.45)
        h, w = geo.shapes[level]
        show_image(ax, rgb, boxes, f"Fg-Bg mask, level {level}: {h}x{w} tokens\n"
                                   f"{int(m.sum())} foreground (MASK.SAMPLING={sampling})")
        ax.imshow(overlay, extent=geo.extent(), interpolation="nearest")
        finish_panel(ax, geo)
    return save(fig, path)


def draw_dense(ax, geo, attn, token):
    """Heat map of one query row (N,) of dense attention, colour and opacity stretched from its
    minimum to its maximum; returns the panel title's range text."""
    m = geo.grid(attn, 0)
    lo, hi = m.min(), m.max()
    norm = (m - lo) / max(hi - lo, 1e-12)
    rgba = plt.get_cmap("jet")(norm)
    rgba[..., 3] = 0.1 + 0.7 * norm
    ax.imshow(rgba, extent=geo.extent(), interpolation="bilinear")
    mark_token(ax, geo, token)
    return f"weights {lo:.3g} to {hi:.3g} (uniform {1 / np.count_nonzero(attn):.3g})"


def draw_deformable(ax, geo, weights, locations, token):
    """Scatter of sampling locations (heads, L, P, 2) of one query, area ~ weight (heads, L, P);
    returns the panel title's range text."""
    scale = 150.0 / weights.max()
    for level in reversed(range(weights.shape[1])):  # finest level on top
        xy = locations[:, level].reshape(-1, 2)
        ax.scatter(xy[:, 0] * geo.W_pad * geo.sx, xy[:, 1] * geo.H_pad * geo.sy, s=weights[:, level].ravel() * scale,
                   c=LEVEL_COLORS[level % len(LEVEL_COLORS)], alpha=0.7, edgecolors="black", linewidths=0.3,
                   label=f"level {level}")
    mark_token(ax, geo, token)
    return f"max weight {weights.max():.3g} ({weights.size} points)"


def draw_token(path, rgb, boxes, geo, rec, token, header, per_head=False):
    """The query ``token``'s attention in every stream (``rec`` from :func:`record_ks`, on the CPU):
    one row, heads averaged, or with ``per_head`` one row per stream and one column per head."""
    streams = rec["streams"]
    deformable = "weights" in rec
    n_heads = (rec["weights"] if deformable else rec["attn"])[streams[0]].shape[2 if deformable else 1]
    rows, cols = (len(streams), n_heads) if per_head else (1, len(streams))
    fig, axes = panel_grid(rows, cols, rgb.shape[0] / rgb.shape[1], header)
    for s, kind in enumerate(streams):
        for h in range(n_heads if per_head else 1):
            ax = axes[s][h] if per_head else axes[0][s]
            sel = slice(h, h + 1) if per_head else slice(None)
            label = STREAM_TITLES[kind][deformable] + (f", head {h}" if per_head else ", heads averaged")
            show_image(ax, rgb, boxes, "")
            if deformable:
                w = rec["weights"][kind][0, token, sel].numpy() / (1 if per_head else n_heads)
                info = draw_deformable(ax, geo, w, rec["locations"][kind][0, token, sel].numpy(), token)
                if s == 0 and h == 0:
                    ax.legend(loc="lower right", fontsize=6, markerscale=0.5)
            else:
                info = draw_dense(ax, geo, rec["attn"][kind][0, sel, token].mean(0).numpy(), token)
            ax.set_title(f"{label}\n{info}", fontsize=8)
            finish_panel(ax, geo)
    return save(fig, path)


# ---- main -----------------------------------------------------------------------------------
def parse_point(text):
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"token {text!r} is not x,y (two numbers, image pixels); "
                                         "KEY VALUE overrides cannot follow --tokens directly")
    return x, y


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="a KS config (configs/ks_*.yaml)")
    parser.add_argument("--dataset", required=True, help="registered dataset name, e.g. trees_val")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--index", type=int, default=0, help="image index in the dataset (default 0)")
    which.add_argument("--image", help="image file name in the dataset (basename)")
    parser.add_argument("--register-coco", nargs=3, action="append", metavar=("NAME", "JSON", "IMAGE_DIR"),
                        help="register a COCO-format dataset first; repeatable")
    parser.add_argument("--output", required=True, help="folder for the PNGs (created)")
    parser.add_argument("--tokens", nargs="+", type=parse_point, metavar="X,Y",
                        help="query tokens in image pixels (default: a box centre and a background token)")
    parser.add_argument("--layer", type=int, help="KS encoder layer index (python index; default the last KS layer)")
    parser.add_argument("--query-level", type=int, default=0, help="feature level of the query tokens (multi-scale)")
    parser.add_argument("--per-head", action="store_true", help="also write one panel per head")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def build_ks_model(cfg, config_file):
    """The model of ``cfg`` with MODEL.WEIGHTS loaded; rejects a model without KS layers."""
    model = build_model(cfg)
    if not getattr(model, "ks_enabled", False):
        raise VisualizeError(f"{config_file} is not a KS config (MODEL.META_ARCHITECTURE="
                             f"{cfg.MODEL.META_ARCHITECTURE!r}, MODEL.KS.ENABLED={cfg.MODEL.KS.ENABLED}): "
                             f"{ks_config_suggestion(config_file)}")
    if cfg.MODEL.WEIGHTS:
        AtomicCheckpointer(model, allow_partial=cfg.MODEL.WEIGHTS_ALLOW_PARTIAL).load(cfg.MODEL.WEIGHTS)
    else:
        print("warning: MODEL.WEIGHTS is empty, visualising a randomly initialised model", file=sys.stderr)
    return model


def main(argv=None):
    """Run the tool; returns the paths of the written PNGs."""
    args = build_parser().parse_args(argv)
    with report_user_errors(args.debug):
        return run(args)


def run(args):
    for name, json_file, image_root in args.register_coco or []:
        register_checked_coco(name, json_file, image_root)
    cfg = load_config(args.config_file, args.opts)
    model = build_ks_model(cfg, args.config_file)
    layer = resolve_layer(model, args.layer)

    record = pick_record(args.dataset, args.index, args.image)
    inputs, rgb, boxes = load_example(cfg, record)
    with record_ks(model, layer) as rec:
        ks_forward(model, [inputs])
    geo = Geometry(rgb.shape[:2], inputs["image"].shape[-2:], rec["padded_size"], rec["token_shapes"])
    if not 0 <= args.query_level < len(geo.shapes):
        raise VisualizeError(f"--query-level {args.query_level} out of range: the model has "
                             f"{len(geo.shapes)} feature level(s)")
    fg = rec["fg"][0].cpu()
    rec = {k: ({s: t.float().cpu() for s, t in v.items()} if isinstance(v, dict) else v) for k, v in rec.items()}
    points = args.tokens or default_tokens(geo, fg.numpy(), boxes, args.query_level)
    tokens = [geo.token(x, y, args.query_level) for x, y in points]

    os.makedirs(args.output, exist_ok=True)
    stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
    name = os.path.basename(args.config_file)
    paths = [draw_mask(os.path.join(args.output, f"{stem}_fgmask.png"), rgb, boxes, geo, fg.numpy(),
                       f"{stem}: GT Fg-Bg mask ({name})", cfg.MODEL.KS.MASK.SAMPLING)]
    for k, ((x, y), token) in enumerate(zip(points, tokens)):
        header = f"{stem}: encoder layer {layer}, query token {k} at ({x:.0f}, {y:.0f}) ({name})"
        base = os.path.join(args.output, f"{stem}_layer{layer}_token{k}")
        paths.append(draw_token(base + ".png", rgb, boxes, geo, rec, token, header))
        if args.per_head:
            paths.append(draw_token(base + "_heads.png", rgb, boxes, geo, rec, token, header, per_head=True))
    for p in paths:
        print(p)
    return paths


if __name__ == "__main__":
    main()

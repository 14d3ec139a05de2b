"""The student detector as a tensor function, for TorchScript tracing and ONNX (``tools/export_model.py``).

:class:`ExportableDetector` wraps an eval-mode :class:`~ks_detr.modeling.detr.DETRBase` (the plain
student: a KS checkpoint is exported through :func:`build_student`, teachers dropped). Its input is one
image as detectron2's ``DefaultPredictor`` hands it to the model, i.e. after the config's test resize;
its outputs are what ``model([{"image": image}])`` returns, as tensors.

Tracing warns where Python branches on a tensor. The branches listed in :data:`SAFE_TRACE_BRANCHES`
depend only on the model's configuration (head sizes, layer counts, queries x classes), never on the
image size, so the trace holds for every size (tests/test_export.py traces one size and compares
others); their warnings are not shown. Any other tracer warning is shown as it is. Also not shown:
torch's deprecation notes on ``torch.jit.trace`` / the TorchScript-based ONNX exporter (chosen on
purpose: it exports the traced graph with dynamic H and W) and the ONNX note that advanced indexing
becomes several ONNX operators (the results are compared with the eager model in the tests).
"""
import linecache
import warnings

import torch
from detectron2.layers import shapes_to_tensor
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from torch import nn
from torchvision.ops import box_convert

from .checkpoint import _rename_moved_keys, load_checkpoint, student_state_dict
from .config import student_config
from .errors import CheckpointError


class ExportableDetector(nn.Module):
    """image (3, H, W) float, in ``MODEL.PIXEL_MEAN``'s channel order and scale, H and W free ->
    boxes (n, 4) xyxy in the image's pixels, scores (n,), classes (n,) int64: the top
    ``MODEL.DETR.NUM_TOPK_TEST`` (query, class) pairs, best first, clipped to the image, empty boxes
    dropped (as detectron2's ``detector_postprocess``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, image):
        m = self.model
        size = shapes_to_tensor(image.shape[-2:], image.device)  # (h, w), traced as the input's size
        images = ImageList.from_tensors([(image - m.pixel_mean) / m.pixel_std], m.backbone.size_divisibility)
        H, W = images.tensor.shape[-2:]
        last = 1 if m.eval_pad_last_pixel else 0
        rows = torch.arange(H, device=image.device)[:, None] >= size[0] - last
        cols = torch.arange(W, device=image.device)[None, :] >= size[1] - last
        logits, boxes = m.predict(images.tensor, (rows | cols)[None])
        scores, classes, boxes = m.top_k(logits, boxes)
        wh = size.flip(0).to(boxes.dtype)
        xyxy = box_convert(boxes[0], "cxcywh", "xyxy") * wh.repeat(2)
        xyxy = torch.minimum(xyxy.clamp(min=0), wh.repeat(2))
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        return xyxy[keep], scores[0][keep], classes[0][keep]


def build_student(cfg, weights):
    """The eval-mode student of ``cfg`` (a KS config builds its baseline) with ``weights`` loaded strictly;
    a KS checkpoint's teacher-only tensors are dropped (the checkpoint's own list, else the name rule).

    Returns (model, number of teacher tensors dropped)."""
    model = build_model(student_config(cfg))
    state, teacher_only = load_checkpoint(weights, with_teacher_keys=True)
    student = student_state_dict(state, teacher_only)
    _rename_moved_keys(student)
    own = model.state_dict()
    problems = {"missing": [k for k in own if k not in student],
                "unexpected": [k for k in student if k not in own],
                "reshaped": [k for k in own if k in student and student[k].shape != own[k].shape]}
    if any(problems.values()):
        detail = ", ".join(f"{len(v)} {what} {v[:3]}{' ...' if len(v) > 3 else ''}" for what, v in problems.items() if v)
        raise CheckpointError(f"{weights} does not fit {model.__class__.__name__} (the student of "
                              f"{cfg.MODEL.META_ARCHITECTURE}): {detail}")
    model.load_state_dict(student)
    return model.eval(), len(state) - len(student)


# (file path ending, code on the warned line) of tracer warnings that are safe for every image size
SAFE_TRACE_BRANCHES = (
    ("detectron2/structures/image_list.py", "t.shape[:-2] == tensors[0].shape[:-2]"),  # channel dims only
    ("torch/nn/functional.py", "size_prods == 1"),  # batch norm's check of more than one value per channel
    ("deformable_attention.py", "reference_points.shape[-1] == 4"),  # boxes or points: fixed per model
    ("query_selection.py", "N < self.num_queries"),  # a config check (enough tokens for the queries)
    ("layers/transformer.py", "v.shape[-1] < q.shape[-1]"),  # head sizes: fixed per model
    ("modeling/dn_deformable_detr.py", "zip(self."),  # one head per decoder layer: a fixed count
    ("modeling/deformable_detr.py", "zip(self."),  # the same (box refinement)
    ("layers/deformable_decoder.py", "shape[-1] == 2"),  # 2-D points in layer 0, boxes after: fixed per model
    ("modeling/detr.py", "min(self.num_topk, Q * K)"),  # queries x classes: fixed per model
)
QUIET_MESSAGES = ("`torch.jit.trace` is deprecated", "`torch.jit.trace_method` is deprecated",
                  "`torch.jit.save` is deprecated", "You are using the legacy TorchScript-based ONNX export",
                  "The feature will be removed", "Exporting aten::index operator of advanced indexing")


def is_known_safe(warning):
    """Whether a recorded warning is one of :data:`SAFE_TRACE_BRANCHES` / :data:`QUIET_MESSAGES`."""
    message = str(warning.message)
    if message.startswith(QUIET_MESSAGES):
        return True
    if warning.category is not torch.jit.TracerWarning:
        return False
    line = linecache.getline(warning.filename, warning.lineno)
    path = warning.filename.replace("\\", "/")
    return any(path.endswith(tail) and code in line for tail, code in SAFE_TRACE_BRANCHES)


FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx"}
OUTPUT_NAMES = ("boxes", "scores", "classes")


def export(detector, sample, fmt, path, opset=17):
    """Trace ``detector`` (an :class:`ExportableDetector`) on ``sample`` (3, H, W) and write it to ``path``
    as TorchScript (``torch.jit.trace``) or ONNX (``torch.onnx.export`` of the same trace, H and W dynamic).
    Warnings other than the known-safe ones (:func:`is_known_safe`) are shown; returns how many were
    known-safe."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _export(detector, sample, fmt, path, opset)
    known = 0
    for w in caught:
        if is_known_safe(w):
            known += 1
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return known


def _export(detector, sample, fmt, path, opset):
    with torch.no_grad():
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(detector, (sample,), check_trace=False), path)
        elif fmt == "onnx":
            n = {0: "detections"}
            torch.onnx.export(detector, (sample,), path, dynamo=False, opset_version=opset, input_names=["image"],
                              output_names=list(OUTPUT_NAMES),
                              dynamic_axes={"image": {1: "height", 2: "width"}, **dict.fromkeys(OUTPUT_NAMES, n)})
        else:
            raise ValueError(f"unknown export format {fmt!r}: expected one of {sorted(FORMATS)}")


def load_exported(path, threads=None):
    """An exported detector (``.ts`` or ``.onnx``, ONNX through onnxruntime on the CPU with ``threads``
    intra-op threads, default torch's) as a function image (3, H, W) float tensor -> (boxes, scores, classes)."""
    if path.endswith(".onnx"):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return lambda image: tuple(torch.from_numpy(a) for a in session.run(None, {"image": image.numpy()}))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch.jit.load` is deprecated", category=FutureWarning)
        module = torch.jit.load(path, map_location="cpu")

    def run(image):
        with torch.no_grad():
            return module(image)

    return run

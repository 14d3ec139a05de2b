"""Exported students (tools/export_model.py, ks_detr/export.py) give the eager model's detections on
images of other sizes than the one traced: TorchScript for every family, ONNX (onnxruntime) for the
quickstart model on real photos and for Conditional DETR; a KS checkpoint exports its student."""
import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model
from scipy.optimize import linear_sum_assignment

from ks_detr.checkpoint import AtomicCheckpointer, is_teacher_only
from ks_detr.config import student_config
from ks_detr.data.datasets import datasets_root
from ks_detr.export import ExportableDetector, build_student, export, load_exported

from conftest import REPO, family_config, make_cfg, tame_random_backbone

# one class and NUM_TOPK_TEST = NUM_QUERIES: every query is returned, so the two sides hold the same
# detections and only the order of (nearly) tied scores can differ; matching takes care of it
ONE_CLASS = ("MODEL.DETR.NUM_CLASSES", 1, "MODEL.DETR.NUM_QUERIES", 30, "MODEL.DETR.NUM_TOPK_TEST", 30)
TOL = 1e-4


def eager(model, image):
    with torch.no_grad():
        r = model([{"image": image}])[0]["instances"]
    return r.pred_boxes.tensor, r.scores, r.pred_classes


def assert_same_detections(ref, out, image):
    """Match exported to eager detections (same class; box L1 + score distance, Hungarian), then every
    box within TOL of the image size and every score within TOL."""
    (rb, rs, rc), (ob, os_, oc) = ref, [torch.as_tensor(t) for t in out]
    assert len(rb) == len(ob) > 0
    scale = max(image.shape[-2:])
    cost = (rb[:, None] - ob[None]).abs().sum(-1) / scale + (rs[:, None] - os_[None]).abs()
    cost = cost + 1e6 * (rc[:, None] != oc[None])
    rows, cols = linear_sum_assignment(cost.numpy())
    assert (rc[rows] == oc[cols]).all()
    assert (rb[rows] - ob[cols]).abs().max().item() / scale <= TOL
    assert (rs[rows] - os_[cols]).abs().max().item() <= TOL
    # inside the image, non-empty, best first (as detector_postprocess + top-k)
    h, w = image.shape[-2:]
    assert (ob[:, 0] >= 0).all() and (ob[:, 2] <= w).all() and (ob[:, 1] >= 0).all() and (ob[:, 3] <= h).all()
    assert (ob[:, 2] > ob[:, 0]).all() and (ob[:, 3] > ob[:, 1]).all()
    assert (os_[:-1] >= os_[1:]).all()


def photos(cfg):
    """Real photos of the trees val split after the test resize: 400x400 -> 512x512, 300x400 -> 512x683,
    and a 333x290 crop -> 512x588."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    from export_model import test_image

    trees_dir = datasets_root() / "trees"
    with open(trees_dir / "annotations" / "val.json") as f:
        files = {(im["height"], im["width"]): im["file_name"] for im in json.load(f)["images"]}
    paths = [str(trees_dir / "images" / files[s]) for s in [(400, 400), (300, 400)]]
    images = [test_image(cfg, p) for p in paths]
    crop = images[1][:, 50:383, 100:390]  # 333 x 290 of the photo, resized as the test resize would
    images.append(torch.nn.functional.interpolate(crop[None], size=(512, 588), mode="bilinear")[0])
    return paths, images


def random_image(h, w, seed):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


@pytest.mark.parametrize("family", ["conditional_detr", "dab_detr", "dn_detr", "deformable_detr",
                                    "dn_deformable_detr", "dino"])
def test_torchscript_every_family_other_sizes(family, tmp_path):
    torch.manual_seed(0)
    opts = ("MODEL.DETR.NUM_QUERIES", 100) if family == "dino" else ()  # fits the tokens of a 192 x 256 image
    model = tame_random_backbone(build_model(make_cfg(family_config(family), *ONE_CLASS, *opts))).eval()
    path = str(tmp_path / "model.ts")
    export(ExportableDetector(model), random_image(192, 256, 0), "torchscript", path)
    exported = load_exported(path)
    for i, (h, w) in enumerate([(192, 256), (224, 160), (201, 299)]):
        image = random_image(h, w, i + 1)
        assert_same_detections(eager(model, image), exported(image), image)


def test_onnx_conditional_detr_other_sizes(tmp_path):
    torch.manual_seed(0)
    model = tame_random_backbone(build_model(make_cfg("configs/conditional_detr_r50.yaml", *ONE_CLASS))).eval()
    path = str(tmp_path / "model.onnx")
    export(ExportableDetector(model), random_image(192, 256, 0), "onnx", path)
    exported = load_exported(path)
    for i, (h, w) in enumerate([(224, 160), (201, 299)]):
        image = random_image(h, w, i + 1)
        assert_same_detections(eager(model, image), exported(image), image)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_quickstart_ks_student_on_real_photos(fmt, tmp_path, trees_dataset):
    """The KS quickstart model in eval (the student) against its export traced on a random image."""
    cfg = make_cfg("configs/quickstart/ks_trees.yaml")
    torch.manual_seed(0)
    ks_model = build_model(cfg).eval()
    student = build_model(student_config(cfg)).eval()
    student.load_state_dict({k: v for k, v in ks_model.state_dict().items() if not is_teacher_only(k)})
    path = str(tmp_path / ("model.ts" if fmt == "torchscript" else "model.onnx"))
    export(ExportableDetector(student), random_image(512, 640, 0), fmt, path)
    exported = load_exported(path)
    _, images = photos(cfg)
    for image in images:
        assert_same_detections(eager(ks_model, image), exported(image), image)


def test_export_tool_ks_checkpoint(tmp_path, trees_dataset):
    """tools/export_model.py on a KS checkpoint written by the trainer's checkpointer: the teachers are
    dropped (not in the TorchScript module), model.ts.json says so, --check reports eager == exported."""
    cfg = make_cfg("configs/quickstart/ks_trees.yaml")
    torch.manual_seed(0)
    ks_model = build_model(cfg)
    AtomicCheckpointer(ks_model, str(tmp_path)).save("model_ks")
    paths, _ = photos(cfg)
    out = tmp_path / "exported"
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "export_model.py"), "--config-file",
                        "configs/quickstart/ks_trees.yaml", "--format", "torchscript", "--output", str(out),
                        "--repeat", "1", "--check", *paths, "MODEL.WEIGHTS", str(tmp_path / "model_ks.pth")],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert [x["size"] for x in lines] == [[512, 512], [512, 683]]
    for x in lines:
        assert x["detections"] == [100, 100] and x["same_classes"]
        assert x["max_box_diff_px"] <= TOL * 683 and x["max_score_diff"] <= TOL
        assert x["eager_ms"] > 0 and x["exported_ms"] > 0
    info = json.loads((out / "model.ts.json").read_text())
    assert info["file"] == "model.ts" and info["class_names"] == ["tree"]
    teacher = [k for k in ks_model.state_dict() if is_teacher_only(k)]
    assert info["meta_architecture"] == "DNDeformableDETR" and info["teacher_tensors_dropped"] == len(teacher) > 0
    module = torch.jit.load(str(out / "model.ts"))
    names = set(module.state_dict()) - {"model.pixel_mean", "model.pixel_std"}  # buffers the trace keeps
    assert not any(is_teacher_only(k.removeprefix("model.")) for k in names)
    student = {k for k in ks_model.state_dict() if not is_teacher_only(k)}
    assert {k.removeprefix("model.") for k in names} == student
    # the exported module holds the checkpoint's student tensors
    sd, ks_sd = module.state_dict(), ks_model.state_dict()
    for k in student:
        torch.testing.assert_close(sd["model." + k], ks_sd[k], rtol=0, atol=0)


def test_build_student_rejects_other_config(tmp_path):
    torch.manual_seed(0)
    AtomicCheckpointer(build_model(make_cfg("configs/quickstart/trees.yaml")), str(tmp_path)).save("m")
    with pytest.raises(Exception, match=r"m.pth does not fit ConditionalDETR \(the student of ConditionalDETR\): \d+ missing \["):
        build_student(make_cfg("configs/conditional_detr_r50.yaml"), str(tmp_path / "m.pth"))


def test_export_tool_errors(tmp_path):
    tool = [sys.executable, os.path.join(REPO, "tools", "export_model.py"), "--config-file",
            "configs/quickstart/trees.yaml", "--output", str(tmp_path)]
    r = subprocess.run(tool + ["--format", "torchscript"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "MODEL.WEIGHTS is empty" in r.stderr
    r = subprocess.run(tool + ["--format", "tflite"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'tflite'" in r.stderr
    r = subprocess.run(tool + ["--format", "onnx", "--check", "nope.jpg", "MODEL.WEIGHTS", "missing.pth"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1] == "error: no such file: missing.pth, nope.jpg"
    assert not (tmp_path / "model.ts").exists() and not (tmp_path / "model.onnx").exists()


@pytest.mark.slow  # 30-40 s on 2 cores
def test_run_exported_draws_the_demos_boxes(tmp_path, trees_dataset):
    """tools/export_model.py writes model.ts and model.onnx into one folder, each with its own metadata
    file and without tracer warnings; tools/run_exported.py runs each on a photo and finds the demo's
    boxes (same count line; boxes within 1e-3 px, scores within 1e-4 of DefaultPredictor's) and draws them."""
    import numpy as np
    from detectron2.engine import DefaultPredictor
    from PIL import Image

    sys.path.insert(0, os.path.join(REPO, "tools"))
    import run_exported

    tiny = ["MODEL.MOBILENET_V2.PRETRAINED", "False", "MODEL.DETR.HIDDEN_DIM", "32", "MODEL.DETR.NHEADS", "2",
            "MODEL.DETR.ENC_LAYERS", "1", "MODEL.DETR.DEC_LAYERS", "2", "MODEL.DETR.DIM_FEEDFORWARD", "64",
            "MODEL.DETR.NUM_QUERIES", "20", "MODEL.DETR.NUM_TOPK_TEST", "20", "INPUT.MIN_SIZE_TEST", "160",
            "INPUT.MAX_SIZE_TEST", "256"]
    cfg = make_cfg("configs/quickstart/trees.yaml", *tiny)
    torch.manual_seed(0)
    AtomicCheckpointer(build_model(cfg), str(tmp_path)).save("model")
    weights = ["MODEL.WEIGHTS", str(tmp_path / "model.pth")]
    out = tmp_path / "exported"
    for fmt in ("torchscript", "onnx"):
        r = subprocess.run([sys.executable, "tools/export_model.py", "--config-file", "configs/quickstart/trees.yaml",
                            "--format", fmt, "--output", str(out), *tiny, *weights], cwd=REPO, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "Warning" not in r.stderr, r.stderr[-3000:]  # the known-safe tracer branches are not shown
    assert sorted(os.listdir(out)) == ["model.onnx", "model.onnx.json", "model.ts", "model.ts.json"]
    assert json.loads((out / "model.onnx.json").read_text())["file"] == "model.onnx"

    photo = str(datasets_root() / "trees" / "images" / "SOAP_061_0_0.jpg")
    demo = subprocess.run([sys.executable, "demo/demo.py", "--config-file", "configs/quickstart/trees.yaml",
                           "--input", photo, "--output", str(tmp_path / "demo"), "--confidence", "0.0", *tiny,
                           *weights], cwd=REPO, capture_output=True, text=True)
    assert demo.returncode == 0, demo.stderr[-2000:]
    eager = DefaultPredictor(cfg.clone())
    AtomicCheckpointer(eager.model).load(str(tmp_path / "model.pth"))
    from ks_detr.data.images import read_image
    ref = eager(read_image(photo, format="BGR"))["instances"]
    with Image.open(tmp_path / "demo" / "SOAP_061_0_0.png") as im:
        demo_png = np.asarray(im.convert("RGB"))
    photo_pixels = read_image(photo)
    for name in ("model.ts", "model.onnx"):
        model = str(out / name)
        r = subprocess.run([sys.executable, "tools/run_exported.py", model, photo, "--output", str(tmp_path / name),
                            "--confidence", "0.0"], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.splitlines()[0].split(" -> ")[0] == demo.stdout.splitlines()[0].split(" -> ")[0]
        assert r.stdout.strip().splitlines()[-1] == f"1 PNG(s) written to {tmp_path / name}"
        _, inst = run_exported.predict(load_exported(model), run_exported.read_metadata(model), photo)
        assert len(inst) == len(ref) > 0
        assert (inst.pred_boxes.tensor - ref.pred_boxes.tensor).abs().max() < 1e-3
        assert (inst.scores - ref.scores).abs().max() < 1e-4 and torch.equal(inst.pred_classes, ref.pred_classes)
        with Image.open(tmp_path / name / "SOAP_061_0_0.png") as im:
            png = np.asarray(im.convert("RGB"))
        # same size as the demo's PNG, boxes drawn (the Visualizer picks random colours, so pixels differ)
        assert png.shape == demo_png.shape and (png != photo_pixels).any(-1).mean() > 0.01


def test_export_shows_tracer_warnings_it_does_not_know(tmp_path):
    """A branch on image values (not in SAFE_TRACE_BRANCHES) keeps its TracerWarning; the count of
    known-safe ones hidden is returned (the deprecation notes of torch.jit.trace / save)."""
    import warnings

    class ValueBranch(torch.nn.Module):
        def forward(self, image):
            return image * 2 if image.sum() > 0 else image

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        known = export(ValueBranch(), torch.ones(3, 4, 4), "torchscript", str(tmp_path / "m.ts"))
    shown = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    assert len(shown) == 1 and "Python boolean" in str(shown[0].message) and known >= 1

"""demo/demo.py, tools/plot_metrics.py and tools/convert_torchvision_resnet.py write what they promise."""
import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from PIL import Image

from conftest import REPO, make_cfg
from ks_detr.data.datasets import datasets_root

pytestmark = pytest.mark.usefixtures("trees_dataset")  # real images (prepared if missing)

_spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "demo", "demo.py"))
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)
TINY_DEMO = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.DETR.NUM_CLASSES", "1", "MODEL.DETR.NUM_QUERIES", "10",
             "DATASETS.TEST", '("trees_val",)', "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"]


def run_demo(output, *inputs):
    """demo/demo.py on ``inputs`` with a tiny random Conditional DETR on CPU."""
    return subprocess.run([sys.executable, "demo/demo.py", "--config-file", "configs/conditional_detr_r50.yaml",
                           "--input", *map(str, inputs), "--output", str(output), "--confidence", "0.0", *TINY_DEMO],
                          cwd=REPO, capture_output=True, text=True)


def save_image(path, size, fmt=None):
    """A random RGB image of ``size`` (w, h) at ``path`` (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(size[0]).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def test_demo_writes_png_per_image(tmp_path):
    image = str(datasets_root() / "trees" / "images" / "SOAP_061_0_0.jpg")
    r = subprocess.run([sys.executable, "demo/demo.py", "--config-file", "configs/ks_conditional_detr_r50.yaml",
                        "--input", image, "--output", str(tmp_path), "--confidence", "0.0",
                        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.DETR.NUM_CLASSES", "1",
                        "MODEL.DETR.NUM_QUERIES", "10", "DATASETS.TEST", '("trees_val",)',
                        "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "10 boxes with score >= 0.0" in r.stdout  # top-k = min(300, 10 queries x 1 class)
    with Image.open(tmp_path / "SOAP_061_0_0.png") as out, Image.open(image) as src:
        assert out.size == src.size


def test_demo_folders_globs_and_clashing_names(tmp_path):
    src = tmp_path / "in"
    sizes = {"a/x.jpg": (40, 30), "a/sub/y.PNG": (24, 36), "b/x.jpg": (32, 32), "b/x.png": (36, 20),
             "c/deep/z.jpg": (28, 44)}
    for rel, size in sizes.items():
        save_image(src / rel, size)
    (src / "a" / "notes.txt").write_text("not an image, skipped silently inside a folder")
    r = run_demo(tmp_path / "out", src / "a", src / "b" / "x.*", src / "c" / "**" / "*.jpg", src / "a" / "x.jpg")
    assert r.returncode == 0, r.stderr[-2000:]
    expected = {"a/x.png": "a/x.jpg", "a/sub/y.png": "a/sub/y.PNG", "b/x.jpg.png": "b/x.jpg",
                "b/x.png.png": "b/x.png", "c/deep/z.png": "c/deep/z.jpg"}  # a/x.jpg given twice: one PNG
    written = {str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert written == set(expected)
    for out, rel in expected.items():
        with Image.open(tmp_path / "out" / out) as im:
            assert im.size == sizes[rel]
    assert "5 PNG(s) written" in r.stdout


def test_demo_output_names_never_clash():
    files = ["/d/a/x.jpg", "/d/a/x.png", "/d/a/x.jpg.png", "/d/b/x.jpg", "/d/b/y.jpeg"]
    assert demo.output_names(files) == ["a/x.jpg.png", "a/x.png.png", "a/x.jpg.png.png", "b/x.png", "b/y.png"]
    assert demo.output_names(["/d/a/x.jpg"]) == ["x.png"]


def test_demo_skips_unreadable_inputs(tmp_path):
    save_image(tmp_path / "in" / "good.jpg", (30, 20))
    save_image(tmp_path / "in" / "good2.png", (20, 30))
    (tmp_path / "in" / "text.jpg").write_text("a text file, not a JPEG")
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (tmp_path / "in" / "cut.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    r = run_demo(tmp_path / "out", tmp_path / "in", tmp_path / "missing.jpg")
    assert r.returncode == 1, r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["good.png", "good2.png"]
    for bad in ("text.jpg", "cut.jpg", "missing.jpg: does not exist"):
        assert bad in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("2 PNG(s) written")
    assert "3 input(s) failed" in r.stderr


def test_demo_no_input_found(tmp_path):
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "demo/demo.py", "--config-file", "configs/conditional_detr_r50.yaml",
                        "--input", str(tmp_path / "nope.jpg"), str(tmp_path / "*.png"), str(tmp_path / "empty"),
                        "--output", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no image file found") and "nope.jpg does not exist" in last
    assert "matches no image file" in last and "contains no image file" in last
    assert not (tmp_path / "out").exists()


def test_demo_follows_a_symlink_loop_once(tmp_path):
    """dir/ holds a.jpg, sub/b.jpg and self -> dir (a loop): 'dir/**/*.jpg' and dir itself predict each
    image once (plain glob finds a.jpg again at every depth of self/self/...)."""
    src = tmp_path / "dir"
    save_image(src / "a.jpg", (40, 30))
    save_image(src / "sub" / "b.jpg", (30, 40))
    os.symlink(src, src / "self")
    assert demo.glob_once(str(src / "**" / "*.jpg")) == [str(src / "a.jpg"), str(src / "sub" / "b.jpg")]
    assert demo.images_in(str(src)) == [str(src / "a.jpg"), str(src / "sub" / "b.jpg")]
    r = run_demo(tmp_path / "out", src / "**" / "*.jpg", src)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == f"2 PNG(s) written to {tmp_path / 'out'}, 0 input(s) failed"
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written == ["a.png", "sub/b.png"]


def test_plot_metrics(tmp_path):
    rows = [{"iteration": i, "total_loss": 10.0 / (i + 1), "loss_class": 1.0 / (i + 1)} for i in range(0, 40, 20)]
    rows.append({"iteration": 39, "bbox/AP": 1.5, "bbox/AP50": 4.0})
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    subprocess.run([sys.executable, "tools/plot_metrics.py", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True)
    with Image.open(tmp_path / "metrics.png") as im:
        assert im.size == (800, 700)
    r = subprocess.run([sys.executable, "tools/plot_metrics.py", str(tmp_path), "--x", "minutes"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "wall_minutes" in r.stderr  # an old metrics.json has no wall clock
    for row, minutes in zip(rows, (0.1, 0.5, 0.6)):
        row["wall_minutes"] = minutes
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    other = tmp_path / "ks"
    other.mkdir()
    (other / "metrics.json").write_text((tmp_path / "metrics.json").read_text())
    subprocess.run([sys.executable, "tools/plot_metrics.py", str(tmp_path), str(other), "--x", "minutes",
                    "--out", str(tmp_path / "both.png")], cwd=REPO, check=True, capture_output=True)
    with Image.open(tmp_path / "both.png") as im:
        assert im.size == (800, 700)
    r = subprocess.run([sys.executable, "tools/plot_metrics.py", str(tmp_path / "missing")], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "metrics.json does not exist" in r.stderr


def test_convert_torchvision_resnet(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet50().eval()  # random init: no download
    with torch.no_grad():  # BatchNorms that are not the identity, so a wrong norm mapping shows
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for tensor, low, high in ((m.weight, 0.5, 1.0), (m.bias, -0.1, 0.1), (m.running_mean, -0.1, 0.1),
                                          (m.running_var, 1.0, 2.0)):
                    tensor.uniform_(low, high)
    torch.save(net.state_dict(), tmp_path / "tv.pth")
    out = tmp_path / "weights" / "R-50.pkl"
    subprocess.run([sys.executable, "tools/convert_torchvision_resnet.py", "--arch", "resnet50",
                    "--input", str(tmp_path / "tv.pth"), "--output", str(out)], cwd=REPO, check=True,
                   capture_output=True)
    with open(out, "rb") as f:
        data = pickle.load(f)
    assert data["__author__"] == "torchvision" and data["matching_heuristics"] is True
    # the backbone keys of the R101 configs (STRIDE_IN_1X1 False, FrozenBN, res5), at depth 50
    cfg = make_cfg("configs/conditional_detr_r101.yaml", "MODEL.RESNETS.DEPTH", 50)
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    DetectionCheckpointer(backbone).load(str(out))
    assert set(data["model"]) == set(backbone.state_dict())
    pairs = [(net.conv1, backbone.stem.conv1), (net.bn1, backbone.stem.conv1.norm)]
    for i in range(1, 5):
        for tv_block, d2_block in zip(getattr(net, f"layer{i}"), getattr(backbone, f"res{i + 1}"), strict=True):
            for k in (1, 2, 3):
                conv = getattr(d2_block, f"conv{k}")
                pairs += [(getattr(tv_block, f"conv{k}"), conv), (getattr(tv_block, f"bn{k}"), conv.norm)]
            if tv_block.downsample is not None:
                pairs += [(tv_block.downsample[0], d2_block.shortcut), (tv_block.downsample[1], d2_block.shortcut.norm)]
    checked = 0
    for tv_module, d2_module in pairs:
        for name, tensor in [*d2_module.named_parameters(recurse=False), *d2_module.named_buffers(recurse=False)]:
            assert torch.equal(tensor, getattr(tv_module, name)), name
            checked += 1
    assert checked == len(backbone.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = torch.nn.Sequential(*list(net.children())[:-2])(x)  # up to layer4: no pooling, no fc
        torch.testing.assert_close(backbone(x)["res5"], expected, rtol=1e-4, atol=1e-4)


def test_convert_torchvision_resnet_rejects_other_files(tmp_path):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with torch.device("meta"):
        keys = torchvision.models.resnet50().state_dict().keys()
    torch.save({k: torch.zeros(1) for k in keys}, tmp_path / "flat.pth")
    for path, why in (("notes.pth", "cannot read --input"), ("flat.pth", "is not a torchvision resnet101")):
        r = subprocess.run([sys.executable, "tools/convert_torchvision_resnet.py", "--input", str(tmp_path / path),
                            "--output", str(tmp_path / "out.pkl")], cwd=REPO, capture_output=True, text=True)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and last.startswith("error: ") and path in last and why in last, r.stderr[-2000:]
    assert not (tmp_path / "out.pkl").exists()


def test_benchmark_variant_needs_key_value_pairs():
    """tools/benchmark.py --variant with a key and no value: exit 2 with one line naming what it got."""
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "benchmark.py"), "--config-file",
                        "configs/quickstart/ks_trees.yaml", "--variant", "MODEL.KS.RECOMPUTE_DECODER"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    assert "--variant takes KEY VALUE pairs, got ['MODEL.KS.RECOMPUTE_DECODER']" in r.stderr.strip().splitlines()[-1]


def test_benchmark_overrides_before_the_variant_go_to_every_model():
    spec = importlib.util.spec_from_file_location("benchmark", os.path.join(REPO, "tools", "benchmark.py"))
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    args = benchmark.parse_args(["--config-file", "c.yaml", "--iters", "1", "MODEL.DETR.HIDDEN_DIM", "64",
                                 "--variant", "MODEL.KS.EARLY_TEACHER_BACKWARD", "True"])
    assert args.opts == ["MODEL.DETR.HIDDEN_DIM", "64"] and args.variant == ["MODEL.KS.EARLY_TEACHER_BACKWARD", "True"]
    args = benchmark.parse_args(["--config-file", "c.yaml", "--variant", "MODEL.KS.RECOMPUTE_DECODER", "True",
                                 "--iters", "1", "MODEL.DETR.HIDDEN_DIM", "64"])
    assert args.opts == ["MODEL.DETR.HIDDEN_DIM", "64"] and args.variant == ["MODEL.KS.RECOMPUTE_DECODER", "True"]


def test_benchmark_peak_allocated_counts_step_start_and_transients():
    """benchmark.py's CPU peak of allocated memory: the tensors alive when a step starts (parameters,
    gradients, optimizer state, inputs) plus the largest net allocation inside the step; memory that
    was freed before a larger allocation does not add up."""
    spec = importlib.util.spec_from_file_location("benchmark", os.path.join(REPO, "tools", "benchmark.py"))
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    MiB = 2**20

    class StepOfKnownPeak:
        def __init__(self):
            self.model = torch.nn.Linear(512, 512)  # 1 MiB of weights
            self.optimizer = torch.optim.AdamW(self.model.parameters())
            self.model(torch.ones(1, 512)).sum().backward()
            self.optimizer.step()  # now: weights, gradients, exp_avg, exp_avg_sq (and 2 step counters)
            self.train_inputs = []

        def train_step(self):
            a = torch.ones(8 * MiB // 4)
            b = torch.ones(24 * MiB // 4)  # 32 MiB alive here
            del a, b
            c = torch.ones(4 * MiB // 4)
            return float(c[0])

    runner = StepOfKnownPeak()
    param_mib = sum(p.numel() * p.element_size() for p in runner.model.parameters()) / MiB
    start = benchmark.step_start_mib(runner)
    assert 4 * param_mib <= start < 4 * param_mib + 1e-3
    assert abs(benchmark.peak_allocated_mib(runner) - (start + 32)) < 1e-3


@pytest.mark.slow  # 30-40 s on 2 cores
def test_side_by_side_runs_our_models_in_a_worker(tmp_path):
    """tools/side_by_side.py with only our KS-DAB and its baseline: one round, each model's step timed in the
    worker process, the KS model with the teachers' extra losses and parameters, the ratios written."""
    out = tmp_path / "sbs.json"
    r = subprocess.run([sys.executable, "tools/side_by_side.py", "--models", "ours_ks_dab,ours_base_dab",
                        "--rounds", "1", "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    ks, base = res["models"]["ours_ks_dab"], res["models"]["ours_base_dab"]
    assert len(ks["samples"]) == len(base["samples"]) == 1 and min(ks["samples"] + base["samples"]) > 0
    assert ks["params"] == 43_931_858 and base["params"] == 43_668_690  # the official models' counts
    assert ks["loss_terms"] == 24 and base["loss_terms"] == 18  # + 3 losses x 2 teacher streams
    of_medians, per_round = res["ratios"]["ours_ks_dab/ours_base_dab"]
    assert of_medians == pytest.approx(ks["samples"][0] / base["samples"][0]) == per_round


def test_side_by_side_names_a_missing_checkout(tmp_path):
    r = subprocess.run([sys.executable, "tools/side_by_side.py", "--models", "official_ks_dab",
                        "--official-root", str(tmp_path / "nowhere")], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "--official-root" in r.stderr and "nowhere" in r.stderr
    r = subprocess.run([sys.executable, "tools/side_by_side.py", "--models", "ours_ks_detr"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "ours_ks_detr" in r.stderr


@pytest.mark.slow  # 30-40 s on 2 cores
def test_benchmark_times_ks_and_variant_each_against_the_baseline(tmp_path):
    """tools/benchmark.py end to end (quickstart model, tiny images): KS and the variant are each timed in
    their own pass beside the baseline, the paired ratios come from those passes, and the FLOP floor
    compares train FLOPs (KS eval FLOPs equal the baseline's)."""
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "tools/benchmark.py", "--config-file", "configs/quickstart/ks_trees.yaml",
                        "--size", "160", "--batch", "1", "--boxes", "3", "--iters", "3", "--warmup", "0",
                        "--threads", "1", "--variant", "MODEL.KS.RECOMPUTE_DECODER", "True", "--output", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    m = rep["models"]
    base = m["baseline"]["train_step_s"]["samples"]
    ks, var = m["ks"]["train_step_s"]["samples"], m["ks_variant"]["train_step_s"]["samples"]
    var_base = m["ks_variant"]["baseline_train_step_s"]
    assert len(base) == len(ks) == len(var) == len(var_base) == 3
    assert var_base != base  # the variant's pass timed the baseline again
    assert rep["ratios_ks_over_baseline"]["train_step_paired"] == pytest.approx(
        float(np.median([k / b for k, b in zip(ks, base)])))
    assert rep["ratios_variant_over_baseline"]["train_step_paired"] == pytest.approx(
        float(np.median([v / b for v, b in zip(var, var_base)])))
    assert rep["ratios_ks_over_baseline"]["eval_flops"] == 1.0
    floor = rep["flop_floor"]
    assert floor["train_flop_ratio"] == pytest.approx(m["ks"]["train_gflops"] / m["baseline"]["train_gflops"])
    assert floor["train_flop_ratio"] > 1.2
    assert floor["time_over_floor"] == pytest.approx(floor["train_time_ratio"] / floor["train_flop_ratio"])



KEEP_FREED_PROBE = """
import resource, sys
sys.path.insert(0, "tools")
import benchmark
from ks_detr.engine import keep_freed_cpu_memory
args = benchmark.parse_args(["--config-file", "configs/quickstart/ks_trees.yaml", "--size", "800", *sys.argv[1:]])
cfg = benchmark.build_cfg(args, "ks")
print(keep_freed_cpu_memory(cfg))
runner = benchmark.Runner(cfg, "ks", args, benchmark.to_inputs(*benchmark.make_tensors(args, 1)), None)
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    runner.train_step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.slow  # 30-40 s on 2 cores
def test_keep_freed_cpu_memory_spares_the_page_faults_of_later_steps():
    """CPU_KEEP_FREED_MEMORY (default on): KS train steps at 2 x 800² (activations above glibc's 32 MiB mmap
    ceiling) after the first two reuse the heap the earlier steps freed (the fewest faults of steps 3-5: 1 to
    about 20,000 measured); with the key off (glibc's defaults) those blocks are mapped afresh and
    page-faulted in again every step (about 230,000)."""
    def run(*opts):
        r = subprocess.run([sys.executable, "-c", KEEP_FREED_PROBE, *opts], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        applied, *faults = r.stdout.split()
        return applied, [int(f) for f in faults]
    applied, faults = run()
    assert applied == "True" and min(faults[2:]) < 30_000, faults
    applied, faults = run("CPU_KEEP_FREED_MEMORY", "False")
    assert applied == "False" and min(faults[2:]) > 60_000, faults

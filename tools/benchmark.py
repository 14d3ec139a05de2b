#!/usr/bin/env python
"""Measure what knowledge sharing costs: KS vs baseline train step, eval forward, memory, FLOPs.

    python tools/benchmark.py --config-file configs/ks_conditional_detr_r50.yaml --iters 3

Both models run interleaved in one process on the same random images and boxes (random init).
Peak memory is read in one fresh child process per model. Prints one JSON line to stdout: times,
FLOPs, memory, the KS/baseline ratios and the FLOP floor (``--profile``: time per phase too).
"""

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ks_detr  # noqa: E402
from ks_detr.engine import keep_freed_cpu_memory  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from fvcore.nn import FlopCountAnalysis  # noqa: E402
from fvcore.nn.jit_handles import get_shape  # noqa: E402
from torch.profiler import ProfilerActivity, record_function  # noqa: E402
from torch.profiler import profile as torch_profile  # noqa: E402

MODELS = ("baseline", "ks", "ks_variant")  # the variant runs only with --variant


def models(args):
    """The models this run measures: baseline, KS and, with ``--variant``, KS with those overrides."""
    return MODELS if args.variant else MODELS[:2]


def log(*args):
    print("[benchmark]", *args, file=sys.stderr, flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="KS config")
    parser.add_argument(
        "--baseline-config", help="default: the KS config with knowledge sharing off"
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=512, help="square image side in pixels")
    parser.add_argument("--boxes", type=int, default=10, help="GT boxes per image")
    parser.add_argument("--iters", type=int, default=5, help="timed repetitions per model")
    parser.add_argument("--warmup", type=int, default=5, help="untimed repetitions per model")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast around the forward")
    parser.add_argument("--variant", nargs="+", metavar="KEY VALUE",
                        help="also measure the KS model with these extra overrides (model ks_variant), "
                             "e.g. --variant MODEL.KS.RECOMPUTE_DECODER True; its pairs run to the next flag or "
                             "the end, so config overrides for every model go before it")
    parser.add_argument("--profile", action="store_true",
                        help="also profile 2 train steps per model (torch.profiler): time per phase")
    parser.add_argument("--output", help="also write the JSON here")
    parser.add_argument("--memory-child", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if "--variant" in args.opts:  # "KEY VALUE ... --variant KEY VALUE": the overrides took the rest along
        i = args.opts.index("--variant")
        args.opts, args.variant = args.opts[:i], (args.variant or []) + args.opts[i + 1:]
    if args.variant and len(args.variant) % 2:
        parser.error(f"--variant takes KEY VALUE pairs, got {args.variant!r}")
    return args


def build_cfg(args, which):
    """Frozen config of ``which`` model (``ks_detr.load_config``): random init, ``--device``, the overrides;
    the baseline is ``--baseline-config`` or else the KS config with knowledge sharing off."""
    path = args.baseline_config if which == "baseline" and args.baseline_config else args.config_file
    variant = args.variant if which == "ks_variant" else []
    cfg = ks_detr.load_config(path, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device, *args.opts, *variant])
    if which == "baseline" and not args.baseline_config:
        cfg = ks_detr.config.student_config(cfg)
    cfg.freeze()
    return cfg


def make_tensors(args, num_classes):
    """Seeded images (B, 3, S, S) in [0, 255] and per image ``--boxes`` xyxy boxes of 20-150 px."""
    g = torch.Generator().manual_seed(0)
    n, s = args.boxes, args.size
    images = torch.randint(0, 256, (args.batch, 3, s, s), generator=g).float()
    wh = torch.randint(20, min(150, s) + 1, (args.batch, n, 2), generator=g).float()
    xy0 = torch.rand(args.batch, n, 2, generator=g) * (s - wh)
    boxes = torch.cat([xy0, xy0 + wh], -1)
    classes = torch.randint(0, num_classes, (args.batch, n), generator=g)
    return images, boxes, classes


def to_inputs(images, boxes=None, classes=None):
    """detectron2 input dicts; with ``boxes`` and ``classes`` each gets GT ``instances``."""
    inputs = []
    for i, image in enumerate(images):
        x = {"image": image}
        if boxes is not None:
            inst = Instances(tuple(image.shape[-2:]))
            inst.gt_boxes = Boxes(boxes[i])
            inst.gt_classes = classes[i]
            x["instances"] = inst
        inputs.append(x)
    return inputs


class Runner:
    """One model with its optimizer; ``train_step`` and ``eval_step`` return wall seconds."""

    def __init__(self, cfg, which, args, train_inputs, eval_inputs):
        torch.manual_seed(0)
        self.model = build_model(cfg)
        if self.model.ks_enabled != (which != "baseline"):
            raise ValueError(
                f"{which} config builds a model with ks_enabled={self.model.ks_enabled}"
            )
        self.optimizer = ks_detr.build_optimizer(cfg, self.model)
        self.device = args.device
        self.autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16)
        self.train_inputs, self.eval_inputs = train_inputs, eval_inputs

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def train_step(self):
        """Forward, backward and optimizer step (AdamW of the recipe, with its clipping)."""
        self.model.train()
        self._sync()
        t = time.perf_counter()
        with EventStorage():
            self.optimizer.zero_grad(set_to_none=True)
            with self.autocast:
                losses = self.model(self.train_inputs)
            sum(losses.values()).backward()
            self.optimizer.step()
        self._sync()
        return time.perf_counter() - t

    def eval_step(self):
        """Inference forward on images without annotations."""
        self.model.eval()
        self._sync()
        t = time.perf_counter()
        with torch.no_grad(), self.autocast:
            self.model(self.eval_inputs)
        self._sync()
        return time.perf_counter() - t


class FlopWrapper(nn.Module):
    """Tensor-only interface for tracing: rebuilds the input dicts, returns the summed loss in
    training and the predictions in eval."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, boxes, classes):
        if self.training:
            return sum(self.model(to_inputs(images, boxes, classes)).values())
        out = [r["instances"] for r in self.model(to_inputs(images))]
        return tuple(t for r in out for t in (r.pred_boxes.tensor, r.scores, r.pred_classes))


def sdpa_flop_jit(inputs, outputs):
    """fvcore has no handle for SDPA: Q K^T and A V multiply-adds, B*H*Lq*Lk*(E + Ev)."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    return q[0] * q[1] * q[2] * k[2] * (q[3] + v[3])


def count_gflops(model, tensors, train):
    """fvcore GFLOPs (one multiply-add = one flop) of the train or eval forward; on failure
    ``(None, error string)``. With ``MODEL.KS.EARLY_TEACHER_BACKWARD`` the forward is traced as the stacked one
    (the same network and FLOPs; the tracer cannot follow a backward taken inside the forward)."""
    wrapper = FlopWrapper(model).train(train)
    early = model.ks is not None and model.ks.early_backward
    try:
        if early:
            model.ks.early_backward = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flops = FlopCountAnalysis(wrapper, tensors)
            flops.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
            flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            with EventStorage():
                return flops.total() / 1e9, None
    except Exception as e:  # noqa: BLE001 - reported in the JSON instead of crashing
        return None, f"{type(e).__name__}: {e}"
    finally:
        if early:
            model.ks.early_backward = True


# (attribute path on the model, method, phase): the forward phases a profile reports separately
PHASES = (
    ("backbone", "forward", "backbone"),
    ("", "embed_features", "input_proj"),
    ("ks", "batch", "ks_mask"),
    ("encoder", "forward", "encoder"),
    ("query_selection", "forward", "query_selection"),
    ("dn", "prepend", "denoising"),
    ("decoder", "forward", "decoder"),
    ("", "predict_logits", "heads"),
    ("criterion.matcher", "forward", "matcher"),
    ("criterion", "forward", "criterion"),
)


@contextlib.contextmanager
def phase_labels(model, optimizer):
    """Label each forward phase (``PHASES``) and the optimizer step for the profiler; restores the
    methods on exit."""
    patched = [(optimizer, "step", "optimizer")]
    for path, method, phase in PHASES:
        obj = model
        for name in filter(None, path.split(".")):
            obj = getattr(obj, name, None)
        if obj is not None:
            patched.append((obj, method, phase))

    def labelled(fn, phase):
        @functools.wraps(fn)
        def run(*a, **k):
            with record_function("phase::" + phase):
                return fn(*a, **k)
        return run

    for obj, method, phase in patched:
        setattr(obj, method, labelled(getattr(obj, method), phase))
    try:
        yield
    finally:
        for obj, method, _ in patched:
            delattr(obj, method)  # the instance attribute: the class method shows again


def profile_train(runner, steps=2):
    """Per train step: milliseconds of each forward phase (``criterion`` includes ``matcher``), of the
    whole backward (autograd), of the optimizer step, and the 12 ops with most self time."""
    with phase_labels(runner.model, runner.optimizer), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.train_step()
    events = prof.key_averages()
    ms = {}
    for e in events:
        if e.key.startswith("phase::"):
            ms[e.key[len("phase::"):]] = e.cpu_time_total / 1e3 / steps
    ms["backward"] = sum(e.cpu_time_total for e in events
                         if e.key.startswith("autograd::engine::evaluate_function")) / 1e3 / steps
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {"phase_ms": ms, "top_self_ms": {e.key: e.self_cpu_time_total / 1e3 / steps for e in top}}


def memory_child(args):
    """Peak memory of ``--warmup`` + 1 train steps in this fresh process; prints one JSON line."""
    cfg = build_cfg(args, args.memory_child)
    keep_freed_cpu_memory(cfg)
    images, boxes, classes = make_tensors(args, cfg.MODEL.DETR.NUM_CLASSES)
    images, boxes, classes = images.to(args.device), boxes.to(args.device), classes.to(args.device)
    runner = Runner(cfg, args.memory_child, args, to_inputs(images, boxes, classes), None)
    rss_before = proc_status_mib("VmRSS")
    for _ in range(args.warmup):
        runner.train_step()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runner.train_step()
    result = {"peak_rss_mib": proc_status_mib("VmHWM"), "rss_before_train_mib": rss_before}
    result["train_rss_delta_mib"] = result["peak_rss_mib"] - rss_before
    if args.device == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:  # after the RSS peak was read: the profiler's own memory does not count
        result["peak_allocated_mib"] = peak_allocated_mib(runner)
    print(json.dumps(result))


def step_start_mib(runner):
    """MiB of the distinct tensor storages a train step starts with: parameters, gradients, buffers,
    optimizer state and the inputs."""
    sizes = {}
    tensors = [*runner.model.parameters(), *runner.model.buffers(),
               *(p.grad for p in runner.model.parameters()),
               *(v for state in runner.optimizer.state.values() for v in state.values())]
    for x in runner.train_inputs:
        tensors += [x["image"], x["instances"].gt_boxes.tensor, x["instances"].gt_classes]
    for t in tensors:
        if isinstance(t, torch.Tensor):
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(sizes.values()) / 2**20


def peak_allocated_mib(runner):
    """The CPU counterpart of CUDA's ``max_memory_allocated`` over one train step: the tensors alive
    at its start plus the most that PyTorch's allocator had handed out, net, at any time during the
    step (``torch.profiler`` memory events). Unlike the RSS peak it does not count memory that the C
    allocator keeps after PyTorch freed it."""
    start = step_start_mib(runner)
    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.train_step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return start + peak / 2**20


def proc_status_mib(key):
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process from Linux
    ``/proc/self/status``; unlike ``ru_maxrss`` the peak does not inherit the parent's."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def run_memory_child(which, argv):
    """Re-run this script as a fresh process measuring ``which``; returns its JSON dict."""
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", which, *argv]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def summary(samples):
    """Median and every sample."""
    return {"median": statistics.median(samples), "samples": samples}


def machine_info(args):
    """Platform, CPU count and threads, torch version and the device name."""
    cpuinfo = {}
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpuinfo = dict(
                (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in f)
            )
    cpu = cpuinfo.get("model name", platform.processor())
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_avx512_bf16": "avx512_bf16" in cpuinfo.get("flags", "").split(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else cpu,
        "loadavg_1_5_15min_at_end": os.getloadavg(),
    }


def ratio(results, key, which="ks"):
    """``which`` / baseline of ``key`` (its median for timings); None when either is missing."""
    base, ks = (results[w].get(key) for w in ("baseline", which))
    base, ks = (v["median"] if isinstance(v, dict) else v for v in (base, ks))
    return ks / base if base and ks is not None else None


def paired_ratio(results, which):
    """Median over timed repetitions of ``which``'s train step / the baseline's in the same repetition
    (of the pass that timed ``which``)."""
    base = results[which].get("baseline_train_step_s") or results["baseline"]["train_step_s"]["samples"]
    return statistics.median(k / b for k, b in zip(results[which]["train_step_s"]["samples"], base))


def time_pair(runners, results, pair, args):
    """Alternate the two models of ``pair`` (baseline first) for ``--warmup`` + ``--iters`` repetitions, a
    train and an eval step each; record the second model's timed samples in ``results`` and return the
    baseline's (train, eval) samples of this pass."""
    base_train, base_eval = [], []
    for rep in range(args.warmup + args.iters):
        order = pair if rep % 2 == 0 else pair[::-1]
        times = {which: (runners[which].train_step(), runners[which].eval_step()) for which in order}
        phase = "warmup" if rep < args.warmup else "timed"
        log(f"{phase} {rep}: " + ", ".join(f"{w} train {t:.2f}s eval {e:.2f}s" for w, (t, e) in times.items()))
        if rep >= args.warmup:
            results[pair[1]]["train_step_s"].append(times[pair[1]][0])
            results[pair[1]]["eval_s"].append(times[pair[1]][1])
            base_train.append(times[pair[0]][0])
            base_eval.append(times[pair[0]][1])
    return base_train, base_eval


def main():
    argv = sys.argv[1:]
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    cfgs = {which: build_cfg(args, which) for which in models(args)}
    kept = keep_freed_cpu_memory(cfgs["ks"])  # process-wide, as train_net.py does
    tensors = tuple(
        t.to(args.device) for t in make_tensors(args, cfgs["baseline"].MODEL.DETR.NUM_CLASSES)
    )
    train_inputs, eval_inputs = to_inputs(*tensors), to_inputs(tensors[0])
    runners = {
        which: Runner(cfgs[which], which, args, train_inputs, eval_inputs) for which in models(args)
    }
    results = {
        which: {
            "config": (
                args.baseline_config
                if which == "baseline" and args.baseline_config
                else args.config_file
            ),
            "ks_enabled": runners[which].model.ks_enabled,
            "params_m": sum(p.numel() for p in runners[which].model.parameters()) / 1e6,
            "train_step_s": [],
            "eval_s": [],
        }
        for which in models(args)
    }

    # KS and the variant are each timed against the baseline in their own pass: two models alternating.
    # (With all three interleaved in one loop, the Conditional DETR KS step measured 3.00 s instead of 2.76 s.)
    for which in models(args)[1:]:
        baseline_samples = time_pair(runners, results, ("baseline", which), args)
        if which == "ks":
            results["baseline"]["train_step_s"], results["baseline"]["eval_s"] = baseline_samples
        else:
            results[which]["baseline_train_step_s"] = baseline_samples[0]
    for which in models(args):
        r = results[which]
        r["train_step_s"], r["eval_s"] = summary(r["train_step_s"]), summary(r["eval_s"])
        for mode, train in (("eval", False), ("train", True)):
            log(f"counting {mode} FLOPs of {which}")
            r[f"{mode}_gflops"], error = count_gflops(runners[which].model, tensors, train)
            if error:
                r[f"{mode}_gflops_error"] = error
    if args.profile:
        for which in models(args):
            log(f"profiling 2 train steps of {which}")
            results[which]["profile"] = profile_train(runners[which])
    del runners
    for which in models(args):
        log(f"measuring peak memory of {which} in a child process")
        results[which].update(run_memory_child(which, argv))

    memory_key = "peak_cuda_mib" if args.device == "cuda" else "peak_rss_mib"
    allocated_key = "peak_cuda_mib" if args.device == "cuda" else "peak_allocated_mib"
    report = {
        "machine": machine_info(args),
        "config_file": args.config_file,
        "baseline_config": args.baseline_config,
        "overrides": args.opts,
        "batch": args.batch,
        "size": args.size,
        "boxes_per_image": args.boxes,
        "iters": args.iters,
        "warmup": args.warmup,
        "device": args.device,
        "bf16": args.bf16,
        "cpu_keep_freed_memory": kept,
        "models": results,
        "ratios_ks_over_baseline": {
            "train_step": ratio(results, "train_step_s"),
            "eval": ratio(results, "eval_s"),
            "memory": ratio(results, memory_key),
            "memory_allocated": ratio(results, allocated_key),
            "train_rss_delta": ratio(results, "train_rss_delta_mib"),
            "eval_flops": ratio(results, "eval_gflops"),
            "train_flops": ratio(results, "train_gflops"),
        },
    }
    # each timed repetition runs the models back to back: the median of those paired ratios is less
    # sensitive to a machine whose speed drifts than the ratio of the two medians
    report["ratios_ks_over_baseline"]["train_step_paired"] = paired_ratio(results, "ks")
    if args.variant:
        report["variant"] = args.variant
        report["ratios_variant_over_baseline"] = {
            "train_step_paired": paired_ratio(results, "ks_variant"),
            "memory": ratio(results, memory_key, "ks_variant"),
            "memory_allocated": ratio(results, allocated_key, "ks_variant"),
            "train_flops": ratio(results, "train_gflops", "ks_variant"),
        }
    floor = report["ratios_ks_over_baseline"]["train_flops"]
    step = report["ratios_ks_over_baseline"]["train_step_paired"]
    report["flop_floor"] = {
        "train_flop_ratio": floor,
        "train_time_ratio": step,
        "time_over_floor": step / floor if floor and step else None,
    }
    print(json.dumps(report))  # one JSON line per run
    if args.output:
        with open(args.output, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

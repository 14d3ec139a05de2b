#!/usr/bin/env python
"""Train-step time of our KS-Conditional / KS-DAB DETR and baselines beside the official KS-DETR code and detrex.

Setup, once (the two codebases are read from their own checkouts, never from this package):

    git clone https://github.com/edocanonymous/KS-DETR OFFICIAL && git -C OFFICIAL checkout df0f2f6
    git clone https://github.com/IDEA-Research/detrex DETREX && git -C DETREX checkout e244e6c
    ln -sfn ../../configs OFFICIAL/detrex/config/configs   # what their `setup.py develop` links; the
    ln -sfn ../../configs DETREX/detrex/config/configs     # fork commits a link to its author's disk
    pip install timm wandb fairscale einops "setuptools<81"  # their imports; their C++ ops are not needed

Run (R50, 2 images of 512², 10 boxes each, fp32, 2 threads, random init):

    python tools/side_by_side.py --official-root OFFICIAL --detrex-root DETREX --rounds 5

One timed step is forward + loss dict + ``sum(losses).backward()``, no optimizer step; gradients are reset
outside the timer. Every model gets the same batch (``tools/benchmark.py``'s seeded one). Each codebase runs in
its own worker process (they register clashing names); after one warmup step per model, each round times one
step of every model, the first model of the order moving on by one each round. Prints a table and the ratios
(ratio of the medians, median of the per-round ratios); ``--output`` writes all samples as JSON.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)  # `import benchmark` (its seeded batch, configs, inputs) only where ours run: it imports
# ks_detr, which the official and detrex workers must not load beside their own registrations
BENCH_ARGS = ["--batch", "2", "--size", "512", "--boxes", "10"]
THREADS = 2
NUM_CLASSES = 80
_KS = "projects/ks_detr/configs/ks_{0}_detr/ks_{0}_detr_r50_50ep"
# name -> (codebase, spec): ours (config, KS on?); official / detrex: LazyConfig path in that checkout
MODELS = {}
for _f in ("conditional", "dab"):
    MODELS.update({
        f"ours_ks_{_f}": ("ours", (f"configs/ks_{_f}_detr_r50.yaml", True)),
        f"official_ks_{_f}": ("official", _KS.format(_f) + "_smlp_qkv_triple_attn.py"),
        f"ours_base_{_f}": ("ours", (f"configs/ks_{_f}_detr_r50.yaml", False)),
        f"official_base_{_f}": ("official", _KS.format(_f) + ".py"),
        f"detrex_base_{_f}": ("detrex", f"projects/{_f}_detr/configs/{_f}_detr_r50_50ep.py"),
    })


def build_ours(spec, tensors):
    """``tools/benchmark.py``'s model (random init; the baseline is the KS config with KS off) and inputs."""
    import torch
    from detectron2.modeling import build_model
    import benchmark as bm
    config, ks = spec
    cfg = bm.build_cfg(bm.parse_args(["--config-file", os.path.join(REPO, config)]), "ks" if ks else "baseline")
    torch.manual_seed(0)
    model = build_model(cfg)
    if model.ks_enabled != ks:
        raise ValueError(f"{config} built ks_enabled={model.ks_enabled}, wanted {ks}")
    return model, bm.to_inputs(*tensors)


def build_lazy(spec, tensors):
    """A detrex-style LazyConfig model on the CPU (``train.init_checkpoint`` is never read: random init)."""
    import torch
    from detectron2.config import LazyConfig, instantiate
    from detectron2.structures import Boxes, Instances
    cfg = LazyConfig.load(spec)
    cfg.model.device = "cpu"
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    inputs = []
    for image, boxes, classes in zip(*tensors):
        inst = Instances(tuple(image.shape[-2:]))
        inst.gt_boxes, inst.gt_classes = Boxes(boxes), classes
        inputs.append({"image": image, "height": image.shape[-2], "width": image.shape[-1], "instances": inst})
    return model, inputs


def worker(codebase, names, tensor_file):
    """Build ``names``, then answer each ``{"step": name}`` line on stdin with one JSON line (the models'
    own prints go to stderr)."""
    answer = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import torch
    from detectron2.utils.events import EventStorage
    torch.set_num_threads(THREADS)
    if codebase != "ours":
        sys.path.insert(0, os.getcwd())  # the checkout's `detrex` and `projects` packages
    tensors = torch.load(tensor_file, weights_only=True)
    models, params = {}, {}
    for name in names:
        model, inputs = (build_ours if codebase == "ours" else build_lazy)(MODELS[name][1], tensors)
        models[name] = (model.train(), inputs)
        params[name] = sum(p.numel() for p in model.parameters())
    answer.write(json.dumps({"params": params}) + "\n")
    for line in sys.stdin:
        model, inputs = models[json.loads(line)["step"]]
        with EventStorage():
            t = time.perf_counter()
            losses = model(inputs)
            sum(losses.values()).backward()
            seconds = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        answer.write(json.dumps({"seconds": seconds, "losses": len(losses)}) + "\n")


class Worker:
    """One codebase's worker process."""

    def __init__(self, codebase, names, root, tensor_file):
        env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
        env.pop("PYTHONPATH", None)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", codebase, "--names", ",".join(names),
               "--tensor-file", tensor_file]
        self.codebase = codebase
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.params = self.read()["params"]

    def read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.codebase} worker exited with {self.proc.wait()} (its stderr is above)")
        return json.loads(line)

    def step(self, name):
        self.proc.stdin.write(json.dumps({"step": name}) + "\n")
        return self.read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def ratios(res):
    """``"a/b"`` -> (ratio of the medians, median of the per-round ratios), for every pair the table compares."""
    out = {}
    for f in ("conditional", "dab"):
        pairs = [(f"ours_ks_{f}", f"official_ks_{f}"), (f"ours_base_{f}", f"official_base_{f}"),
                 (f"ours_base_{f}", f"detrex_base_{f}"), (f"ours_ks_{f}", f"ours_base_{f}"),
                 (f"official_ks_{f}", f"official_base_{f}")]
        for a, b in pairs:
            if a in res and b in res:
                per_round = [x / y for x, y in zip(res[a]["samples"], res[b]["samples"])]
                out[f"{a}/{b}"] = (res[a]["median"] / res[b]["median"], statistics.median(per_round))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-root", help="checkout of edocanonymous/KS-DETR (needed for official_* models)")
    p.add_argument("--detrex-root", help="checkout of IDEA-Research/detrex (needed for detrex_* models)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    p.add_argument("--output", help="also write the samples and ratios here (JSON)")
    p.add_argument("--worker", choices=("ours", "official", "detrex"), help=argparse.SUPPRESS)
    p.add_argument("--names", help=argparse.SUPPRESS)
    p.add_argument("--tensor-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.names.split(","), args.tensor_file)
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown --models {unknown}; choose from {list(MODELS)}")
    roots = {"ours": REPO, "official": args.official_root, "detrex": args.detrex_root}
    for codebase in {MODELS[n][0] for n in names} - {"ours"}:
        if not roots[codebase] or not os.path.isdir(os.path.join(roots[codebase], "detrex")):
            p.error(f"--{codebase}-root {roots[codebase]!r} is not a checkout with a detrex/ package")

    import torch
    import benchmark as bm
    tensor_file = os.path.join(tempfile.mkdtemp(prefix="side_by_side_"), "batch.pt")
    torch.save(bm.make_tensors(bm.parse_args(["--config-file", "-", *BENCH_ARGS]), NUM_CLASSES), tensor_file)
    workers = {}
    try:
        for codebase in dict.fromkeys(MODELS[n][0] for n in names):
            workers[codebase] = Worker(codebase, [n for n in names if MODELS[n][0] == codebase], roots[codebase],
                                       tensor_file)
        owner = {n: workers[MODELS[n][0]] for n in names}
        losses = {n: owner[n].step(n)["losses"] for n in names}  # warmup
        samples = {n: [] for n in names}
        for r in range(args.rounds):
            for n in names[r % len(names):] + names[: r % len(names)]:
                samples[n].append(owner[n].step(n)["seconds"])
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        for w in workers.values():
            w.close()
    res = {n: {"median": statistics.median(samples[n]), "samples": samples[n], "loss_terms": losses[n],
               "params": owner[n].params[n]} for n in names}
    print(f"{'model':26s} {'median s':>9s} {'params':>11s} loss terms  samples")
    for n in names:
        r = res[n]
        print(f"{n:26s} {r['median']:9.3f} {r['params']:11,d} {r['loss_terms']:10d}  "
              + " ".join(f"{s:.2f}" for s in r["samples"]))
    pairs = ratios(res)
    for k, (of_medians, per_round) in pairs.items():
        print(f"{k:42s} {of_medians:.3f} (ratio of medians), {per_round:.3f} (median per round)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"models": res, "ratios": pairs, "rounds": args.rounds, "platform": platform.platform(),
                       "torch": torch.__version__, "threads": THREADS}, f, indent=1)


if __name__ == "__main__":
    main()

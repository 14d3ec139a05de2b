#!/usr/bin/env python
"""Train-step time of our KS-Conditional / KS-DAB DETR and baselines beside the official KS-DETR code and detrex,
or (``--against transformers``) of our Conditional / DAB / Deformable DETR beside Hugging Face transformers'.

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

Against transformers (installed from requirements.txt; R50, random init, nothing downloaded):

    python tools/side_by_side.py --against transformers --rounds 5 [--device cuda] [--families conditional,dab]

Each family's transformers model (its ResNet-50 backbone, auxiliary loss on) is saved and converted to ours with
``tools/convert_checkpoint.py``'s code, with the config keys it derives and transformers' loss weights: the two hold
the same weights. Both run in this process on the same batch (ours normalises and pads it in its forward; theirs gets
that normalised, padded tensor and its pixel mask). Per round, every model's train step (forward, loss, backward)
and eval step (forward and top-100 post-processing) is timed, the order moving on by one each round. One extra
train step per model is counted with ``ks_detr.op_count`` (aten operators, non-view kernels, copies, host syncs).
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
BENCH_ARGS = ["--boxes", "10"]  # with --batch and --size
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


HF_FAMILIES = {"conditional": ("ConditionalDetr", "configs/conditional_detr_r50.yaml"),
               "dab": ("DabDetr", "configs/dab_detr_r50.yaml"),
               "deformable": ("DeformableDetr", "configs/deformable_detr_r50.yaml")}


def build_transformers_pair(family, folder, num_classes, device):
    """(transformers model, our model with the same weights) of ``family``, both random init and on ``device``."""
    import torch
    import transformers
    from detectron2.modeling import build_model
    import convert_checkpoint as cc
    from ks_detr import load_config
    from ks_detr import transformers_layout as hf
    prefix, config = HF_FAMILIES[family]
    outs = ["stage2", "stage3", "stage4"] if family == "deformable" else ["stage4"]
    hf_cfg = getattr(transformers, f"{prefix}Config")(
        backbone_config=transformers.ResNetConfig(out_features=outs), use_timm_backbone=False,
        use_pretrained_backbone=False, num_labels=num_classes, auxiliary_loss=True,
        dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)  # ours has one rate for the three
    torch.manual_seed(0)
    theirs = getattr(transformers, f"{prefix}ForObjectDetection")(hf_cfg)
    theirs.save_pretrained(folder)
    sd, c, pre = hf.read_transformers(folder)
    path = os.path.join(REPO, config)
    opts = cc.transformers_keys(sd, path, [], c, pre)
    opts += ["MODEL.DETR.AUX_LOSS", True, "MODEL.DETR.CLASS_WEIGHT", 1.0]  # transformers' loss (as it prints)
    for key, theirs_key in (("COST_CLASS", "class_cost"), ("COST_BBOX", "bbox_cost"), ("COST_GIOU", "giou_cost"),
                            ("BBOX_WEIGHT", "bbox_loss_coefficient"), ("GIOU_WEIGHT", "giou_loss_coefficient"),
                            ("FOCAL_ALPHA", "focal_alpha")):
        opts += [f"MODEL.DETR.{key}", float(c[theirs_key])]
    cfg = load_config(path, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device, *opts])
    ours = build_model(cfg)
    ours.load_state_dict(cc.convert(sd, cfg, cc.expected_state(cfg), "transformers", c))
    # the same backbone parameters train in both (transformers freezes its whole ResNet in some families)
    family_name = {v: k for k, v in hf.MODEL_TYPES.items()}[c["model_type"]]
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    for name, p in theirs.named_parameters():
        if ".backbone." in name:
            p.requires_grad_(hf.our_name(name, family_name) in trainable)
    processor = getattr(transformers, f"{'Deformable' if family == 'deformable' else 'Conditional'}DetrImageProcessor")()
    return theirs.to(device), ours, processor


class TransformersPair:
    """One family's two models and their steps on one batch: ``step(who, phase)`` returns wall seconds."""

    def __init__(self, family, tensors, device, folder):
        import torch
        import benchmark as bm
        self.device = device
        self.theirs, self.ours, self.processor = build_transformers_pair(family, folder, NUM_CLASSES, device)
        images, boxes, classes = (t.to(device) for t in tensors)
        self.train_inputs, self.eval_inputs = bm.to_inputs(images, boxes, classes), bm.to_inputs(images)
        padded, pixel_mask = self.ours.preprocess_image(self.train_inputs)  # ours' normalised, padded batch
        self.pixel_values, self.pixel_mask = padded.tensor, (~pixel_mask).long()
        H, W = images.shape[-2:]
        scale = torch.tensor([W, H, W, H], dtype=torch.float32, device=device)
        self.labels = [{"class_labels": c, "boxes": torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1)
                        / scale} for b, c in zip(boxes, classes)]
        self.sizes = [(H, W)] * len(images)

    def train(self, who):
        """Forward, the summed loss and its backward (no optimizer)."""
        from detectron2.utils.events import EventStorage
        if who == "ours":
            self.ours.train()
            with EventStorage():
                losses = self.ours(self.train_inputs)
                sum(losses.values()).backward()
            self.ours.zero_grad(set_to_none=True)
        else:
            self.theirs.train()
            self.theirs(pixel_values=self.pixel_values, pixel_mask=self.pixel_mask, labels=self.labels).loss.backward()
            self.theirs.zero_grad(set_to_none=True)

    def eval(self, who):
        """Inference forward and the top-100 detections per image."""
        import torch
        with torch.no_grad():
            if who == "ours":
                self.ours.eval()(self.eval_inputs)
            else:
                out = self.theirs.eval()(pixel_values=self.pixel_values, pixel_mask=self.pixel_mask)
                self.processor.post_process_object_detection(out, threshold=0.0, target_sizes=self.sizes, top_k=100)

    def step(self, who, phase):
        import torch
        if self.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        getattr(self, phase)(who)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def count(self, who):
        """``ks_detr.op_count`` summary of one train step."""
        from ks_detr.op_count import OpCounter
        with OpCounter() as counter:
            self.train(who)
        return counter.summary()


def against_transformers(args):
    """Build every family's pair, count one train step of each model, then time ``--rounds`` interleaved rounds."""
    import torch
    import benchmark as bm
    torch.set_num_threads(THREADS)
    tensors = bm.make_tensors(bm.parse_args(["--config-file", "-", "--batch", str(args.batch), "--size",
                                             str(args.size), *BENCH_ARGS]), NUM_CLASSES)
    families = args.families.split(",")
    with tempfile.TemporaryDirectory(prefix="side_by_side_") as work:  # the save_pretrained folders
        pairs = {f: TransformersPair(f, tensors, args.device, os.path.join(work, f)) for f in families}
    jobs = [(f, who, phase) for f in families for who in ("ours", "theirs") for phase in ("train", "eval")]
    for f, who, phase in jobs:  # warmup
        pairs[f].step(who, phase)
    counts = {f"{f}/{who}": pairs[f].count(who) for f in families for who in ("ours", "theirs")}
    samples = {job: [] for job in jobs}
    for r in range(args.rounds):
        for job in jobs[r % len(jobs):] + jobs[: r % len(jobs)]:
            samples[job].append(pairs[job[0]].step(*job[1:]))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    res = {}
    for f in families:
        row = {"counts": {who: counts[f"{f}/{who}"] for who in ("ours", "theirs")}}
        for phase in ("train", "eval"):
            a, b = samples[(f, "ours", phase)], samples[(f, "theirs", phase)]
            row[phase] = {"ours_s": a, "theirs_s": b,
                          "ratio_of_medians": statistics.median(a) / statistics.median(b),
                          "median_of_ratios": statistics.median([x / y for x, y in zip(a, b)])}
        res[f] = row
    print(f"{'family':12s} {'train ours/theirs':>18s} {'eval ours/theirs':>17s}   per train step, ours | transformers: "
          "ops, kernels, copies, syncs")
    for f, row in res.items():
        tr, ev = row["train"], row["eval"]
        c = row["counts"]
        print(f"{f:12s} {statistics.median(tr['ours_s']):7.3f}/{statistics.median(tr['theirs_s']):.3f} s "
              f"{statistics.median(ev['ours_s']):6.3f}/{statistics.median(ev['theirs_s']):.3f} s   "
              + " | ".join(", ".join(f"{c[w][k]:,d}" for k in ("ops", "kernels", "copies", "syncs"))
                           for w in ("ours", "theirs")))
        print(f"{'':12s} train ratio {tr['ratio_of_medians']:.3f} (of medians), {tr['median_of_ratios']:.3f} "
              f"(median per round); eval ratio {ev['ratio_of_medians']:.3f}, {ev['median_of_ratios']:.3f}")
    if args.output:
        import transformers
        with open(args.output, "w") as f:
            json.dump({"families": res, "rounds": args.rounds, "device": args.device, "batch": args.batch,
                       "size": args.size, "platform": platform.platform(), "torch": torch.__version__,
                       "transformers": transformers.__version__, "threads": THREADS}, f, indent=1)


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
    p.add_argument("--against", choices=("official", "transformers"), default="official",
                   help="official: the official KS-DETR code and detrex (--models); transformers: Hugging Face "
                        "transformers' models (--families)")
    p.add_argument("--families", default=",".join(HF_FAMILIES),
                   help="with --against transformers: comma-separated subset of " + ", ".join(HF_FAMILIES))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="with --against transformers")
    p.add_argument("--batch", type=int, default=2, help="images per step")
    p.add_argument("--size", type=int, default=512, help="square image side in pixels")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    p.add_argument("--output", help="also write the samples and ratios here (JSON)")
    p.add_argument("--worker", choices=("ours", "official", "detrex"), help=argparse.SUPPRESS)
    p.add_argument("--names", help=argparse.SUPPRESS)
    p.add_argument("--tensor-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.names.split(","), args.tensor_file)
    if args.against == "transformers":
        unknown = [f for f in args.families.split(",") if f not in HF_FAMILIES]
        if unknown:
            p.error(f"unknown --families {unknown}; choose from {list(HF_FAMILIES)}")
        return against_transformers(args)
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
    work = tempfile.TemporaryDirectory(prefix="side_by_side_")
    tensor_file = os.path.join(work.name, "batch.pt")
    torch.save(bm.make_tensors(bm.parse_args(["--config-file", "-", "--batch", str(args.batch), "--size",
                                              str(args.size), *BENCH_ARGS]), NUM_CLASSES), tensor_file)
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
        work.cleanup()
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

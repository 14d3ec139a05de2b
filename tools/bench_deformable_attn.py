#!/usr/bin/env python
"""Time multi-scale deformable attention, PyTorch (grid_sample) vs Triton kernels, on a CUDA GPU.

    python tools/bench_deformable_attn.py                      # R50 4 levels, 2 x 1024^2, 8 heads, 4 points
    python tools/bench_deformable_attn.py --size 800 --queries 900 --iters 50

Workloads at the 4-level feature pyramid of ``--batch`` images of ``--size``^2 pixels (strides 8, 16, 32, 64):

- ``sample``: ``deformable_sample`` alone (values, locations and weights as inputs), forward + backward;
- ``encoder``/``decoder``: one ``MSDeformAttn`` layer (projections included), forward + backward, with every
  token (encoder self-attention) or ``--queries`` queries (decoder cross-attention) attending.

For each, both implementations on the same inputs: median milliseconds of forward + backward, peak memory
above what the inputs hold, the largest difference of the output and of each input gradient (absolute, and
relative to the largest magnitude of the PyTorch one), and the Triton/PyTorch ratios. Prints a table to stderr and one JSON line to stdout. Needs a CUDA GPU: without one
it prints one line and exits with status 2.
"""
import argparse
import json
import os
import statistics
import sys

import torch

USER_ERROR_EXIT_CODE = 2  # as ks_detr.errors (imported only once a GPU is there: detectron2's import warns)
IMPLS = ("pytorch", "triton")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024, help="square image side in pixels")
    parser.add_argument("--dim", type=int, default=256, help="model width C")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--points", type=int, default=4, help="sampling points per head and level")
    parser.add_argument("--queries", type=int, default=300, help="decoder queries")
    parser.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"), default="float32",
                        help="inputs of the sample workload; the layers run in float32 under autocast to it")
    parser.add_argument("--workloads", nargs="+", choices=("sample", "encoder", "decoder"),
                        default=["sample", "encoder", "decoder"])
    parser.add_argument("--iters", type=int, default=20, help="timed repetitions")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (Triton compiles)")
    return parser.parse_args(argv)


def fail(message):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USER_ERROR_EXIT_CODE)


def level_shapes(size, levels=4):
    """(h, w) per level of a ResNet-50 pyramid for a ``size``^2 image: res3, res4, res5 (strides 8, 16, 32) and
    the extra stride-2 convs; every stride-2 layer (stem conv, max-pool, ...) gives ceil(side / 2)."""
    side, shapes = size, []
    for i in range(2 + levels):
        side = (side + 1) // 2
        if i >= 2:
            shapes.append((side, side))
    return shapes


def timed(step, iters, warmup):
    """Median ms of ``step()`` and the peak memory it allocates above what was allocated before (MiB)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def sample_workload(args, shapes, device):
    from ks_detr.modeling.layers import deformable_sample

    dtype = getattr(torch, args.dtype)
    B, H, D, L, P = args.batch, args.heads, args.dim // args.heads, len(shapes), args.points
    N = sum(h * w for h, w in shapes)
    g = torch.Generator(device=device).manual_seed(0)
    value = torch.randn(B, N, H, D, device=device, generator=g).to(dtype).requires_grad_()
    loc = (torch.rand(B, N, H, L, P, 2, device=device, generator=g) * 1.1 - 0.05).to(dtype).requires_grad_()
    weights = torch.rand(B, N, H, L, P, device=device, generator=g).to(dtype).requires_grad_()
    inputs = {"value": value, "locations": loc, "weights": weights}
    grad = torch.randn(B, N, H * D, device=device, generator=g)

    def run(impl):
        out = deformable_sample(value, shapes, loc, weights, impl)
        grads = torch.autograd.grad(out, list(inputs.values()), grad)
        return out, dict(zip(inputs, grads))

    return run


def layer_workload(args, shapes, device, decoder):
    from ks_detr.modeling.layers import MSDeformAttn, MultiScaleContext

    B, C = args.batch, args.dim
    masks = [torch.zeros(B, h, w, dtype=torch.bool, device=device) for h, w in shapes]
    ctx = MultiScaleContext.from_masks(masks)
    N = sum(h * w for h, w in shapes)
    torch.manual_seed(0)
    attn = MSDeformAttn(C, len(shapes), args.heads, args.points).to(device)
    for p in attn.parameters():  # away from the init (zero offsets, uniform weights): spread, uneven points
        torch.nn.init.normal_(p, std=0.05)
    memory = torch.randn(B, N, C, device=device, requires_grad=True)
    Lq = args.queries if decoder else N
    query = torch.randn(B, Lq, C, device=device, requires_grad=True)
    ref = torch.rand(B, Lq, len(shapes), 2, device=device) if decoder else ctx.reference_points
    inputs = {"memory": memory, "query": query, **dict(attn.named_parameters())}
    autocast = args.dtype in ("bfloat16", "float16")

    def run(impl):
        attn.impl = impl
        with torch.autocast("cuda", dtype=getattr(torch, args.dtype), enabled=autocast):
            out = attn.attend(query, ref, memory, None, ctx)
        grads = torch.autograd.grad(out.float().square().mean(), list(inputs.values()))
        return out, dict(zip(inputs, grads))

    return run


def compare(run, args):
    """Per implementation: time, memory; the differences of the Triton run from the PyTorch one."""
    results = {impl: run(impl) for impl in IMPLS}
    (ref, ref_grads), (out, grads) = results["pytorch"], results["triton"]
    pairs = {"output": (out, ref), **{f"grad_{k}": (grads[k], ref_grads[k]) for k in ref_grads}}
    diffs = {k: (a.float() - b.float()).abs().max().item() for k, (a, b) in pairs.items()}
    scale = {k: b.float().abs().max().item() for k, (a, b) in pairs.items()}
    del results, ref, ref_grads, out, grads, pairs
    row = {"max_abs_diff": diffs, "max_rel_diff": {k: v / max(scale[k], 1e-30) for k, v in diffs.items()}}
    for impl in IMPLS:
        ms, mib = timed(lambda: run(impl), args.iters, args.warmup)
        row[impl] = {"ms": round(ms, 3), "peak_mib": round(mib, 1)}
    row["time_ratio"] = round(row["triton"]["ms"] / row["pytorch"]["ms"], 3)
    row["memory_ratio"] = round(row["triton"]["peak_mib"] / max(row["pytorch"]["peak_mib"], 1e-9), 3)
    return row


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        fail("tools/bench_deformable_attn.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001
        fail(f"Triton does not import ({type(e).__name__}: {e}); it ships with torch's CUDA wheels")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        fail("TRITON_INTERPRET is set: unset it to time the compiled kernels")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    device = torch.device("cuda")
    shapes = level_shapes(args.size)
    workloads = {"sample": lambda: sample_workload(args, shapes, device),
                 "encoder": lambda: layer_workload(args, shapes, device, decoder=False),
                 "decoder": lambda: layer_workload(args, shapes, device, decoder=True)}
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "shapes": shapes, "args": vars(args), "workloads": {}}
    for name in args.workloads:
        report["workloads"][name] = row = compare(workloads[name](), args)
        torch.cuda.empty_cache()
        print(f"{name:8s} pytorch {row['pytorch']['ms']:9.2f} ms {row['pytorch']['peak_mib']:9.1f} MiB | "
              f"triton {row['triton']['ms']:9.2f} ms {row['triton']['peak_mib']:9.1f} MiB | "
              f"time x{row['time_ratio']:.3f} memory x{row['memory_ratio']:.3f} | max diff / max |reference| "
              + " ".join(f"{k}={v:.1e}" for k, v in row["max_rel_diff"].items() if not k.startswith("grad_")
                         or k in ("grad_value", "grad_locations", "grad_weights", "grad_memory", "grad_query")),
              file=sys.stderr, flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

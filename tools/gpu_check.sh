#!/usr/bin/env bash
# The GPU checks in one run, sized for about 8 minutes on one NVIDIA H200; every result lands under $OUT.
#
#   bash tools/gpu_check.sh                      # on the GPU machine (docs/benchmarks.md: "Running the GPU checks")
#   GPU_CHECK_TINY=1 bash tools/gpu_check.sh     # CPU, tiny sizes: tries every step of the script here
#   bash tools/gpu_check.sh --prepare            # here, before a run on a GPU machine that reaches no registry:
#                                                # copies pytest and its pure-Python dependencies from .venv into
#                                                # .gpu/site (the folder that carries the other dependencies)
#
# Steps, in this order (each under its own time limit, none past GPU_CHECK_BUDGET_S seconds in all, default 480;
# a step that fails or times out is recorded and the next one runs):
#   preflight               (GPU only) torch sees a CUDA GPU; if not, the script stops there
#   cuda_tests              pytest -m cuda on the test files that have cuda tests (cuda_tests.xml, cuda_tests.log);
#                           on a GPU, cuda_tests_all_ran then fails if any of them skipped
#   bench_deformable_attn   tools/bench_deformable_attn.py: PyTorch vs Triton deformable attention, 2 x 1024^2
#   ks_eval_vs_student      eval time of KS-DN-Deformable against the same weights loaded as its student, and
#                           against a baseline of its own random init (what tools/benchmark.py compares), evals
#                           back to back and each right after a train step of the same model
#   benchmark_<family>      tools/benchmark.py --device cuda, KS and baseline, 2 x 1024^2, fp32: first for
#                           DN-Deformable DETR, then (after side_by_side) Conditional, DAB and Deformable DETR;
#                           DN-Deformable and Conditional also with MODEL.KS.EARLY_TEACHER_BACKWARD True (the
#                           "ks_variant" of their JSON)
#   side_by_side            tools/side_by_side.py --against transformers --device cuda
# summary.tsv lists each step's status (ok, failed rc=N, timed out, cut by budget, not run: budget) and seconds.
# Environment: OUT (default output/gpu_check), PYTHON (default .venv/bin/python if present, else python3),
# GPU_CHECK_TINY, GPU_CHECK_BUDGET_S, GPU_CHECK_STEPS (step names to run, space-separated, e.g.
# "cuda_tests benchmark_dab_detr" to rerun those; default all). Exit status: 0 if every step that ran passed, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --prepare ]; then
  site=$(ls -d .venv/lib/python3*/site-packages | head -n 1)
  mkdir -p .gpu/site
  for p in pytest _pytest pluggy iniconfig pygments packaging; do
    rm -rf ".gpu/site/$p"; cp -r "$site/$p" .gpu/site/
  done
  find .gpu/site -name __pycache__ -type d -prune -exec rm -rf {} +
  echo "copied pytest and its dependencies into .gpu/site ($(du -sh .gpu/site | cut -f1) in all)"
  exit 0
fi
OUT=${OUT:-output/gpu_check}
mkdir -p "$OUT"
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
BUDGET=${GPU_CHECK_BUDGET_S:-480}
TINY=${GPU_CHECK_TINY:-0}
STEPS=${GPU_CHECK_STEPS:-}
START=$SECONDS
FAILED=0
printf 'step\tstatus\tseconds\n' > "$OUT/summary.tsv"

if [ "$TINY" = 1 ]; then
  DEVICE=cpu SIZE=128 BATCH=1 ITERS=1 WARMUP=0 ROUNDS=1 REPS=1 SIDE_FAMILIES=conditional
  # benchmark.py overrides: a small R18 model (its memory children build the same)
  MODEL_OPTS=(MODEL.DETR.HIDDEN_DIM 64 MODEL.DETR.NHEADS 4 MODEL.DETR.DIM_FEEDFORWARD 64 MODEL.DETR.ENC_LAYERS 2
              MODEL.DETR.DEC_LAYERS 2 MODEL.DETR.NUM_QUERIES 20 MODEL.RESNETS.DEPTH 18
              MODEL.RESNETS.RES2_OUT_CHANNELS 64)
else
  DEVICE=cuda SIZE=1024 BATCH=2 ITERS=5 WARMUP=2 ROUNDS=5 REPS=10 SIDE_FAMILIES=conditional,dab,deformable
  MODEL_OPTS=()
fi

# step NAME LIMIT_S COMMAND...: run COMMAND with stdout+stderr in $OUT/NAME.log, killed after LIMIT_S seconds or
# when the budget runs out, whichever comes first; one summary.tsv line
step() {
  local name=$1 limit=$2; shift 2
  if [ -n "$STEPS" ] && [[ " $STEPS " != *" $name "* ]]; then return; fi
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then
    printf '%s\tnot run: budget\t0\n' "$name" >> "$OUT/summary.tsv"; echo "== $name: not run (budget spent)"; return
  fi
  local timeout_status="timed out"
  if [ "$limit" -gt "$left" ]; then limit=$left; timeout_status="cut by budget"; fi
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS rc status
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=$timeout_status; FAILED=1 ;;
    *) status="failed rc=$rc"; FAILED=1 ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" $((SECONDS - t0)) >> "$OUT/summary.tsv"
  echo "   $status in $((SECONDS - t0))s"; tail -n 3 "$OUT/$name.log" | cut -c1-300
  return $rc
}

{
  date -u; uname -a; nvidia-smi 2>&1 | head -n 15
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda",
            torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())'
  git log -1 --format='%H %cd' 2>/dev/null || true
} > "$OUT/environment.txt" 2>&1

if [ "$DEVICE" = cuda ]; then  # without a GPU that torch sees, nothing below is worth the machine's time
  step preflight 60 "$PY" -c 'import torch; assert torch.cuda.is_available(), "torch sees no CUDA GPU"
print(torch.cuda.get_device_name())' || { echo "== stopped: no usable CUDA GPU"; cat "$OUT/summary.tsv"; exit 1; }
fi

CUDA_TEST_FILES=$(grep -l 'mark\.cuda' tests/test_*.py | tr '\n' ' ')
# shellcheck disable=SC2086
step cuda_tests 210 "$PY" -m pytest -m cuda $CUDA_TEST_FILES -v -rs -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml"
if [ "$DEVICE" = cuda ]; then  # on a GPU every cuda test runs: a skip (Triton not importing...) is a failure
  step cuda_tests_all_ran 20 "$PY" -c 'import sys, xml.etree.ElementTree as E
suite = E.parse(sys.argv[1]).getroot(); suite = suite if suite.tag == "testsuite" else suite[0]
print(suite.get("tests"), "tests,", suite.get("skipped"), "skipped"); sys.exit(int(suite.get("skipped")) > 0)' \
    "$OUT/cuda_tests.xml"
fi

if [ "$DEVICE" = cuda ]; then
  step bench_deformable_attn 60 "$PY" tools/bench_deformable_attn.py --size "$SIZE" --batch "$BATCH" --iters 10 \
    --warmup 3
else  # the tool needs a GPU: on CPU it must refuse with its usage status (2) and one line
  step bench_deformable_attn 60 \
    bash -c '"$0" tools/bench_deformable_attn.py --size 128 --iters 1 --warmup 0; test $? = 2' "$PY"
fi

step ks_eval_vs_student 90 "$PY" - "$DEVICE" "$SIZE" "$BATCH" "$REPS" "$OUT/ks_eval_vs_student.json" \
  "${MODEL_OPTS[@]}" <<'EOF'
"""Eval forward time of KS-DN-Deformable DETR (R50), of the same weights loaded as its student, and of the
baseline of its own random init, on the same images, the models taking turns: "eval_only" (evals back to back) and
"after_train" (each eval right after a train forward + backward of the same model, as tools/benchmark.py times it;
no optimizer step, so the weights stay equal). Medians in ms and the ratios to the student."""
import json, statistics, sys, time
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from ks_detr import load_config
from ks_detr.checkpoint import student_state_dict
from ks_detr.config import student_config
sys.path.insert(0, "tools")
import benchmark as bm

device, (size, batch, reps), out, opts = sys.argv[1], map(int, sys.argv[2:5]), sys.argv[5], sys.argv[6:]
cfg = load_config("configs/ks_dn_deformable_detr_r50.yaml", ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device, *opts])
torch.manual_seed(0)
models = {"ks": build_model(cfg), "student": build_model(student_config(cfg))}
ks = models["ks"]
models["student"].load_state_dict(student_state_dict(ks.state_dict(), ks.ks.teacher_parameter_names(ks)))
torch.manual_seed(0)
models["own_init_baseline"] = build_model(student_config(cfg))
args = bm.parse_args(["--config-file", "-", "--batch", str(batch), "--size", str(size)])
images, boxes, classes = (t.to(device) for t in bm.make_tensors(args, cfg.MODEL.DETR.NUM_CLASSES))
train_inputs, eval_inputs = bm.to_inputs(images, boxes, classes), bm.to_inputs(images)
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)


def train(model):
    model.train()
    with EventStorage():
        sum(model(train_inputs).values()).backward()
    model.zero_grad(set_to_none=True)
    sync()


def timed_eval(model):
    model.eval()
    sync()
    t = time.perf_counter()
    with torch.no_grad():
        model(eval_inputs)
    sync()
    return 1000 * (time.perf_counter() - t)


report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "size": size, "batch": batch}
for phase in ("eval_only", "after_train"):
    times = {k: [] for k in models}
    for rep in range(2 + reps):
        for name in (list(models) if rep % 2 == 0 else list(models)[::-1]):
            if phase == "after_train":
                train(models[name])
            ms = timed_eval(models[name])
            if rep >= 2:
                times[name].append(ms)
    med = {k: statistics.median(v) for k, v in times.items()}
    report[phase] = {"median_ms": med, "over_student": {k: v / med["student"] for k, v in med.items()},
                     "samples_ms": times}
print(json.dumps({k: v["over_student"] if isinstance(v, dict) else v for k, v in report.items()}))
with open(out, "w") as f:
    json.dump(report, f, indent=2)
EOF

# benchmark FAMILY LIMIT_S [--variant KEY VALUE ...]
benchmark() {
  local family=$1 limit=$2
  shift 2
  # "$@" (--variant KEY VALUE ...) before the next flag: its values end there, and MODEL_OPTS go to every model
  step "benchmark_$family" "$limit" "$PY" tools/benchmark.py --config-file "configs/ks_${family}_r50.yaml" "$@" \
    --device "$DEVICE" --size "$SIZE" --batch "$BATCH" --iters "$ITERS" --warmup "$WARMUP" \
    --output "$OUT/benchmark_$family.json" "${MODEL_OPTS[@]}"
}
EARLY=(--variant MODEL.KS.EARLY_TEACHER_BACKWARD True)  # KS memory with the teachers' backward in the forward
benchmark dn_deformable_detr 120 "${EARLY[@]}"
step side_by_side 150 "$PY" tools/side_by_side.py --against transformers --device "$DEVICE" --size "$SIZE" \
  --batch "$BATCH" --rounds "$ROUNDS" --families "$SIDE_FAMILIES" --output "$OUT/side_by_side.json"
benchmark conditional_detr 120 "${EARLY[@]}"
benchmark dab_detr 90
benchmark deformable_detr 90  # last: side_by_side times Deformable DETR too

echo "== done in $((SECONDS - START))s; results in $OUT"
cat "$OUT/summary.tsv"
exit $FAILED

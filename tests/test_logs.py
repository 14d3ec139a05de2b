"""What a train_net.py run prints: progress lines with the loss sums (every term in metrics.json), the
environment/config/model dump in OUTPUT_DIR/log.txt only, detectron2's _C / fast-eval notes explained
there, user-error tracebacks in the log only."""
import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.usefixtures("trees_dataset")

# the KS quickstart model, tiny: one training step on trees_train, then COCO evaluation on trees_val at 128 px
TINY_KS = ["--config-file", "configs/quickstart/ks_trees.yaml", "MODEL.MOBILENET_V2.PRETRAINED", "False",
           "MODEL.DETR.HIDDEN_DIM", "32", "MODEL.DETR.NHEADS", "2", "MODEL.DETR.ENC_LAYERS", "1",
           "MODEL.DETR.DEC_LAYERS", "2", "MODEL.DETR.DIM_FEEDFORWARD", "64", "MODEL.DETR.NUM_QUERIES", "10",
           "MODEL.DETR.NUM_TOPK_TEST", "10", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "1",
           "SOLVER.STEPS", "()", "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
           "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128", "DATALOADER.NUM_WORKERS", "0"]


def test_ks_run_prints_loss_sums_and_keeps_dumps_in_the_log_file(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "train_net.py", *TINY_KS, "OUTPUT_DIR", str(out)], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    progress = [line for line in lines if " iter: 0 " in line]
    assert len(progress) == 1
    shown = [w.rstrip(":") for w in progress[0].split() if "loss" in w]
    assert shown == ["total_loss", "student_loss", "teacher_loss"], progress[0]
    row = json.loads((out / "metrics.json").read_text().splitlines()[0])
    terms = {k: v for k, v in row.items() if k.startswith("loss_")}
    teacher = {k: v for k, v in terms.items() if "_ks_" in k}
    assert len(terms) >= 20 and 0 < len(teacher) < len(terms)  # every term is still written
    assert row["student_loss"] + row["teacher_loss"] == pytest.approx(row["total_loss"], rel=1e-6)
    assert row["teacher_loss"] == pytest.approx(sum(teacher.values()), rel=1e-6)
    assert f"all {len(terms)} loss terms are in metrics.json and TensorBoard" in r.stdout
    # before the first iteration: a screenful, not ~840 lines; the dumps are in the log file
    before = lines[:next(i for i, line in enumerate(lines) if "Starting training" in line)]
    assert len(before) < 30, "\n".join(before)
    assert f"environment, command line, config and model: {out}/log.txt" in r.stdout
    log = (out / "log.txt").read_text()
    for dump in ("Environment info:", "Running with full config:", "Model:", "Fast COCO eval is not built"):
        assert dump not in r.stdout and dump in log, dump
    try:
        import detectron2._C  # noqa: F401
    except ImportError:
        assert "detectron2._C is not built here, and ks-detr needs none of it" in log
    assert "torch.jit.script` is deprecated" not in r.stderr and "No CUDA runtime" not in r.stderr


def test_user_error_traceback_only_in_the_log(tmp_path):
    """A user error (SOLVER.MAX_ITER 1 with an unreadable MODEL.WEIGHTS): stdout/stderr hold no traceback,
    log.txt does; --debug prints it."""
    weights = tmp_path / "notes.pth"
    weights.write_text("not a checkpoint")
    out = tmp_path / "out"
    cmd = [sys.executable, "train_net.py", *TINY_KS, "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {weights}: not a checkpoint (a text file")
    assert "Traceback" not in r.stdout + r.stderr
    assert "Traceback" in (out / "log.txt").read_text()
    r = subprocess.run(cmd[:2] + ["--debug"] + cmd[2:], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" in r.stderr

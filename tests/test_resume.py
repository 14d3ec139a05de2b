"""Exact resume: a run killed (SIGKILL, at any point, also during a checkpoint write) and resumed
with ``--resume`` ends with the same weights, bit for bit, as the run that was never interrupted;
SIGTERM saves a checkpoint and exits; the data stream and augmentation depend only on (seed,
iteration)."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO
from ks_detr.checkpoint import AtomicCheckpointer, checkpoint_problem
from ks_detr.data.sampler import ResumableBatchSampler

# The quickstart model (DN-Deformable, two-stage, KS, MobileNet) at 256 px: dropout, denoising noise,
# multi-scale resize, flip and crop all draw random numbers in every step.
RUN = [
    "--config-file", "configs/quickstart/ks_trees.yaml", "MODEL.MOBILENET_V2.PRETRAINED", "False",
    "MODEL.DETR.NUM_QUERIES", "30", "MODEL.DETR.NUM_TOPK_TEST", "30", "MODEL.DETR.DIM_FEEDFORWARD", "128",
    "MODEL.DETR.HIDDEN_DIM", "64", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "1",
    "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "(4,)", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()",
    "INPUT.MIN_SIZE_TRAIN", "(192, 224, 256)", "INPUT.MAX_SIZE_TRAIN", "256", "INPUT.CROP.ENABLED", "True",
    "INPUT.CROP.TYPE", "relative_range", "INPUT.CROP.SIZE", "[0.6, 0.6]", "INPUT.CROP.PRE_RESIZE_SIZES", "[200, 240]", "DATALOADER.NUM_WORKERS", "1",
    "SEED", "7",
]


def command(out, max_iter, *flags):
    return [sys.executable, os.path.join(REPO, "train_net.py"), *flags, *RUN, "SOLVER.MAX_ITER", str(max_iter),
            "OUTPUT_DIR", str(out)]


def train(out, max_iter, *flags):
    r = subprocess.run(command(out, max_iter, *flags), cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_identical(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


def kill_after(out, max_iter, checkpoint, delay):
    """Start the run, SIGKILL it ``delay`` seconds after ``model_<checkpoint>.pth`` appears."""
    proc = subprocess.Popen(command(out, max_iter), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = os.path.join(out, f"model_{checkpoint:07d}.pth")
    while not os.path.exists(target):
        assert proc.poll() is None, "the run ended before it was killed"
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """The 6-iteration run's final weights and the seconds from its model_0000001.pth to its model_final.pth."""
    out = tmp_path_factory.mktemp("uninterrupted")
    train(out, 6)
    span = os.path.getmtime(out / "model_final.pth") - os.path.getmtime(out / "model_0000001.pth")
    yield weights(out / "model_final.pth"), span
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return uninterrupted_run[0]


def test_kill_and_resume_gives_identical_weights(tmp_path, uninterrupted_run):
    """SIGKILL at a random moment after the second checkpoint (a later step, a checkpoint write, or between
    the last step's checkpoint and model_final.pth), then --resume: the same final weights as the
    uninterrupted run, bit for bit."""
    final, span = uninterrupted_run
    delay = random.Random(os.getpid()).uniform(0.0, 0.9 * span)  # within what the rest of the run takes
    for attempt in range(4):
        out = tmp_path / f"killed_{attempt}"
        kill_after(out, 6, 1, delay)
        if not os.path.exists(out / "model_final.pth"):
            break
        delay /= 3  # this run outpaced the uninterrupted one and ended before the kill: kill the next earlier
    else:
        pytest.fail(f"4 runs ended before their SIGKILL (the last {delay:.3f} s after model_0000001.pth)")
    log = train(out, 6, "--resume")
    if "--resume: all 6 iterations are trained, but the end of the run is missing" not in log:
        start = int(log.split("Starting training from iteration ")[1].split()[0])
        assert 2 <= start <= 5
    assert_identical(weights(out / "model_final.pth"), final)


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint,delay", [(0, 0.0), (2, 0.3), (3, 0.8), (4, 0.05)])
def test_kill_at_several_points(tmp_path, uninterrupted, checkpoint, delay):
    out = tmp_path / "killed"
    kill_after(out, 6, checkpoint, delay)
    train(out, 6, "--resume")
    assert_identical(weights(out / "model_final.pth"), uninterrupted)


def test_sigterm_saves_and_resume_is_exact(tmp_path, uninterrupted):
    """SIGTERM (Slurm's preemption notice): the step finishes, a checkpoint is saved, exit 143;
    --resume then ends exactly where the uninterrupted run does."""
    out = tmp_path / "preempted"
    out.mkdir()
    with open(out / "stdout.txt", "w") as stdout:  # a file, not a pipe: a full pipe would block the run
        proc = subprocess.Popen(command(out, 6), cwd=REPO, stdout=stdout, stderr=subprocess.STDOUT)
        while not os.path.exists(out / "model_0000001.pth"):
            assert proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        proc.wait()
    log = (out / "stdout.txt").read_text()
    assert proc.returncode == 143, log[-3000:]
    assert "Preempted at iteration" in log
    saved = int(log.split("Preempted at iteration ")[1].split(":")[0])
    with open(out / "last_checkpoint") as f:
        assert f.read() == f"model_{saved:07d}.pth"
    log = train(out, 6, "--resume")
    assert f"Starting training from iteration {saved + 1}" in log
    assert_identical(weights(out / "model_final.pth"), uninterrupted)


KILL_IN_SAVE = """
import os, signal, sys, torch
from torch import nn
from ks_detr.checkpoint import AtomicCheckpointer
ckpt = AtomicCheckpointer(nn.Linear(1000, 1000), sys.argv[1])
ckpt.save("model_0000001")
def dying_write(obj, f):
    f.write(b"partial" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_write
ckpt.save("model_0000002")
"""


def test_kill_during_checkpoint_write_leaves_previous_checkpoint(tmp_path):
    """A process killed in the middle of writing model_0000002.pth leaves no file of that name, and
    last_checkpoint still names the intact model_0000001.pth."""
    r = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, str(tmp_path)], cwd=REPO)
    assert r.returncode == -signal.SIGKILL
    assert not os.path.exists(tmp_path / "model_0000002.pth")
    with open(tmp_path / "last_checkpoint") as f:
        assert f.read() == "model_0000001.pth"
    ckpt = AtomicCheckpointer(torch.nn.Linear(1000, 1000), str(tmp_path))
    assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000001.pth")
    assert weights(tmp_path / "model_0000001.pth")["weight"].shape == (1000, 1000)


def test_batch_stream_skips_consumed_batches():
    """Batch i of the stream is the same whether the stream starts at 0 or at i (no data is read to
    skip), per rank; two ranks split every epoch's permutation without overlap; aspect groups are
    never mixed in a batch; another seed gives another order."""
    groups = np.array([i % 3 == 0 for i in range(50)], dtype=np.uint8)

    def batches(start, rank=0, world=1, seed=5, n=40):
        s = ResumableBatchSampler(50, 3, groups, None, rank=rank, world_size=world)
        s.set_start(seed, start)
        it = iter(s)
        return [next(it) for _ in range(n)]

    full = batches(0)
    assert batches(17, n=23) == full[17:]
    for b in full:
        assert len({int(groups[i]) for i, _ in b}) == 1
    assert len({seed for b in full for _, seed in b}) == 3 * 40  # one augmentation seed per sample
    assert [i for i, _ in batches(0, seed=6)[0]] != [i for i, _ in full[0]]
    # two ranks: each epoch's 50 positions split by parity; no grouping, so batches are in order
    per_rank = []
    for rank in (0, 1):
        s = ResumableBatchSampler(50, 5, None, None, rank=rank, world_size=2)
        s.set_start(5, 0)
        it = iter(s)
        per_rank.append([i for _ in range(5) for i, _ in next(it)])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(50))


def test_repeat_factors_repeat_rare_records():
    """RepeatFactorTrainingSampler semantics: a record with factor 3 appears 3x per epoch, factor
    1.5 on average 1.5x."""
    factors = [1.0] * 8 + [3.0, 1.5]
    s = ResumableBatchSampler(10, 1, None, factors, rank=0, world_size=1)
    s.set_start(0, 0)
    counts = np.zeros(10)
    for epoch in range(200):
        counts += np.bincount(s._epoch(epoch), minlength=10)
    assert (counts[:8] == 200).all() and counts[8] == 600
    assert 270 < counts[9] < 330


def test_resume_skips_an_unreadable_newest_checkpoint(tmp_path, caplog):
    """A truncated newest checkpoint (e.g. copied or written by other tools) is skipped with a warning
    naming it; --resume continues from the newest intact one."""
    model = torch.nn.Linear(10, 10)
    ckpt = AtomicCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000001")
    time.sleep(0.05)
    ckpt.save("model_0000002")
    with open(tmp_path / "model_0000002.pth", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "model_0000002.pth") // 2)
    with caplog.at_level("WARNING"):
        assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000001.pth")
    assert "skipping " + str(tmp_path / "model_0000002.pth") in caplog.text
    with open(tmp_path / "model_0000001.pth", "r+b") as f:
        f.truncate(100)
    with pytest.raises(FileNotFoundError, match="no readable checkpoint"):
        ckpt.get_checkpoint_file()


# --resume keeps the run's history: a tiny baseline (random MobileNet, width 32) trained 3 iterations on
# trees_train with a checkpoint after every iteration and the final COCO evaluation on trees_val at 128 px
HISTORY_RUN = [
    "--config-file", "configs/quickstart/trees.yaml", "MODEL.MOBILENET_V2.PRETRAINED", "False",
    "MODEL.DETR.HIDDEN_DIM", "32", "MODEL.DETR.NHEADS", "2", "MODEL.DETR.ENC_LAYERS", "1", "MODEL.DETR.DEC_LAYERS",
    "1", "MODEL.DETR.DIM_FEEDFORWARD", "64", "MODEL.DETR.NUM_QUERIES", "10", "MODEL.DETR.NUM_TOPK_TEST", "10",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "1",
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "128", "TEST.EVAL_PERIOD", "0", "DATALOADER.NUM_WORKERS", "0", "SEED", "3",
]


def run_history(out, max_iter, *flags):
    r = subprocess.run([sys.executable, os.path.join(REPO, "train_net.py"), *flags, *HISTORY_RUN, "SOLVER.MAX_ITER",
                        str(max_iter), "OUTPUT_DIR", str(out)], cwd=REPO, capture_output=True, text=True)
    return r.returncode, (r.stderr + r.stdout)  # stdout's last line last


def metrics_rows(out):
    return [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, trees_dataset):
    """A finished 3-iteration run (copied by each test)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    rc, log = run_history(out, 3)
    assert rc == 0, log[-3000:]
    yield out
    shutil.rmtree(out.parent, ignore_errors=True)


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_resume_continues_the_wall_clock_and_drops_rows_after_the_checkpoint(tmp_path, finished_run):
    """Resuming the 3-iteration run with MAX_ITER 5: wall_minutes goes on from the checkpoint's (it was
    restarting at 0), the old final row (iteration 3, after the checkpoint of iteration 2) is replaced,
    iterations strictly increase and wall_minutes never decreases; TensorBoard shows the old final
    evaluation no more."""
    out = copy_run(finished_run, tmp_path / "run")
    saved = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["trainer"]["wall_minutes"]
    rc, log = run_history(out, 5, "--resume")
    assert rc == 0, log[-3000:]
    assert "Starting training from iteration 3" in log
    assert "metrics.json: dropped 1 rows of iterations >= 3" in log
    rows = [r for r in metrics_rows(out) if "wall_minutes" in r]
    iterations, minutes = [r["iteration"] for r in rows], [r["wall_minutes"] for r in rows]
    assert iterations == [2, 4, 5], iterations
    assert minutes == sorted(minutes) and minutes[1] > saved > 0, minutes
    events = EventAccumulator(str(out))  # TensorBoard's own reader of the run folder (both events files)
    events.Reload()
    assert len(list(out.glob("events.out.tfevents.*"))) == 2
    assert [e.step for e in events.Scalars("bbox/AP")] == [5]  # the first run's final evaluation (step 3) is hidden
    assert [e.step for e in events.Scalars("total_loss")] == [2, 4]


def test_resume_of_a_finished_run_changes_nothing(tmp_path, finished_run):
    out = copy_run(finished_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "log.txt"}
    rc, log = run_history(out, 3, "--resume")
    assert rc == 0, log[-3000:]
    assert log.strip().splitlines()[-1].endswith(
        f"--resume: the run in {out} is finished (all SOLVER.MAX_ITER=3 iterations, model_final.pth and the final "
        "evaluation are there); nothing to do. Raise SOLVER.MAX_ITER to train on, or use --eval-only to evaluate again")
    assert "copypaste" not in log
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "log.txt"}
    assert after.keys() - {"config.yaml"} == before.keys() - {"config.yaml"}
    assert all(after[k] == before[k] for k in before if k != "config.yaml")
    assert [r["iteration"] for r in metrics_rows(out) if "bbox/AP" in r] == [3]


def test_fallback_resume_repairs_last_checkpoint_and_stops_at_max_iter(tmp_path, finished_run):
    """model_final.pth truncated: --resume falls back to model_0000002.pth (iteration 2 of 3), points
    last_checkpoint at it, then writes only the end of the run: an intact model_final.pth (named by
    last_checkpoint), one final evaluation row at iteration 3 and nothing beyond."""
    out = copy_run(finished_run, tmp_path / "run")
    final = out / "model_final.pth"
    with open(final, "r+b") as f:
        f.truncate(os.path.getsize(final) // 2)
    rc, log = run_history(out, 3, "--resume")
    assert rc == 0, log[-3000:]
    assert f"--resume: skipping {final} (truncated or corrupt zip archive" in log
    assert "last_checkpoint now names model_0000002.pth" in log
    assert log.count("copypaste: AP,AP50") == 1
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert checkpoint_problem(str(final)) is None
    assert_identical(weights(final), weights(out / "model_0000002.pth"))
    rows = metrics_rows(out)
    assert max(r["iteration"] for r in rows) == 3
    assert [r["iteration"] for r in rows if "bbox/AP" in r] == [3]
    assert sorted(p.name for p in out.glob("model_*.pth")) == [
        "model_0000000.pth", "model_0000001.pth", "model_0000002.pth", "model_final.pth"]

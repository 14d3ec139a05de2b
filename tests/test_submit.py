"""tools/submit.py: the command line -> submitit parameters and sbatch script (a stand-in sbatch records
it), and real two-process training through submitit's LocalExecutor on CPU, also preempted by USR2
(checkpoint, requeue with --resume, same final weights as without the preemption)."""
import importlib.util
import json
import os
import shutil
import signal
import stat
import sys
import time

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.usefixtures("trees_dataset")  # real images (prepared if missing)

spec = importlib.util.spec_from_file_location("ks_detr_submit", os.path.join(REPO, "tools", "submit.py"))
submit = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = submit  # cloudpickle ships registered modules by value
spec.loader.exec_module(submit)

CONFIG = "configs/ks_conditional_detr_r50.yaml"
# tests/test_train_net.py's SMALL_RUN, without evaluation, with a fixed seed (so that runs compare bit for bit)
SMALL_RUN = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.DETR.NUM_CLASSES", "1", "MODEL.DETR.NUM_QUERIES", "100",
    "DATASETS.TRAIN", '("trees_train",)', "DATASETS.TEST", "()",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "100", "TEST.EVAL_PERIOD", "0",
    "INPUT.MIN_SIZE_TRAIN", "(224,)", "INPUT.MAX_SIZE_TRAIN", "224", "INPUT.CROP.ENABLED", "False",
    "INPUT.MIN_SIZE_TEST", "224", "INPUT.MAX_SIZE_TEST", "224", "DATALOADER.NUM_WORKERS", "0", "SEED", "3",
    "SOLVER.MAX_ITER", "3",
]
SLURM = ["--nodes", "2", "--gpus-per-node", "8", "--partition", "P", "--timeout-min", "4320"]


# ---- command line -> executor parameters, without submitting ------------------------------------

def test_slurm_parameters_from_the_command_line(tmp_path):
    opts, args = submit.parse([*SLURM, "--account", "A", "--mem-gb", "480", "--cpus-per-task", "10",
                               "--job-dir", str(tmp_path), "--", "--config-file", CONFIG, "SOLVER.MAX_ITER", "9"])
    assert submit.executor_parameters(opts) == {
        "job_name": "ks_detr", "nodes": 2, "ntasks_per_node": 8, "gpus_per_node": 8, "partition": "P",
        "time": 4320, "signal_delay_s": 120, "account": "A", "mem": "480G", "cpus_per_task": 10,
        "additional_parameters": {"requeue": True},
    }
    # train_net's own parser; OUTPUT_DIR defaults to the job dir; one process per GPU of a node
    assert args.config_file == os.path.join(REPO, CONFIG)
    assert args.opts == ["SOLVER.MAX_ITER", "9", "OUTPUT_DIR", str(tmp_path)]
    assert (args.num_gpus, args.num_machines, args.resume) == (8, 2, False)
    opts, args = submit.parse([*SLURM, "--no-requeue", "--signal-delay-s", "300", "--job-dir", str(tmp_path), "--",
                               "--resume", "--config-file", CONFIG, "OUTPUT_DIR", "elsewhere"])
    params = submit.executor_parameters(opts)
    assert params["additional_parameters"] == {"no-requeue": True} and params["signal_delay_s"] == 300
    assert args.opts == ["OUTPUT_DIR", "elsewhere"] and args.resume


def fake_slurm(folder, monkeypatch):
    """Stand-in ``srun`` / ``sbatch`` on PATH (they fail if run)."""
    folder.mkdir()
    for tool in ("srun", "sbatch"):
        (folder / tool).write_text("#!/bin/sh\nexit 1\n")
        (folder / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def test_local_parameters_and_command_line_errors(tmp_path, monkeypatch):
    opts, _ = submit.parse(["--local", "--gpus-per-node", "2", "--timeout-min", "30", "--job-dir", str(tmp_path),
                            "--", "--config-file", CONFIG, "MODEL.DEVICE", "cpu"])
    assert submit.executor_parameters(opts) == {"tasks_per_node": 2, "gpus_per_node": min(2, torch.cuda.device_count()),
                                                "timeout_min": 30, "signal_delay_s": 120}
    job_dir = ["--job-dir", str(tmp_path)]
    for argv, message in [
        ([*job_dir, "--config-file", CONFIG], "after `--`"),
        ([*job_dir, "--", "--num-gpus", "8", "--config-file", CONFIG], "--num-gpus after `--` is set by the launcher"),
        (["--local", "--nodes", "2", *job_dir, "--", "--config-file", CONFIG], "one node"),
        ([*job_dir, "--", "SOLVER.MAX_ITER", "3"], "needs --config-file"),
    ]:
        with pytest.raises(submit.LauncherError, match=message):
            submit.parse(argv)
    fake_slurm(tmp_path / "bin", monkeypatch)
    with pytest.raises(submit.LauncherError, match="IMS_PER_BATCH 4 cannot be split over 16 tasks"):
        submit.submit([*SLURM, *job_dir, "--", "--config-file", CONFIG, "SOLVER.IMS_PER_BATCH", "4"])
    if not torch.cuda.is_available():  # a GPU config run locally on a machine without GPUs: told what to add
        with pytest.raises(submit.LauncherError, match="add MODEL.DEVICE cpu"):
            submit.submit(["--local", "--gpus-per-node", "2", *job_dir, "--", "--config-file", CONFIG])


def test_slurm_submission_without_slurm_is_a_named_error(tmp_path):
    """No sbatch/srun on PATH (a laptop, a container): exit 2, one line naming both and offering --local."""
    import subprocess

    env = dict(os.environ, PATH=os.path.dirname(sys.executable))  # python, no Slurm
    r = subprocess.run([sys.executable, "tools/submit.py", *SLURM, "--job-dir", str(tmp_path / "job"), "--",
                        "--config-file", CONFIG], cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "error: tools/submit.py: sbatch and srun not found on PATH, so this is not a Slurm submission host; run it "
        "where Slurm's commands are (a cluster's login node), or run here with --local")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "job" / "submitit").exists()


def test_resume_and_threads_follow_the_environment():
    args = submit.parse(["--job-dir", "d", "--", "--config-file", CONFIG])[1]
    assert not submit.should_resume(args, {})
    assert submit.should_resume(args, {"SLURM_RESTART_COUNT": "2"})  # requeued by Slurm itself
    assert not submit.should_resume(args, {"SLURM_RESTART_COUNT": "0"})
    assert submit.cpu_threads(2, {"OMP_NUM_THREADS": "3"}) is None
    assert submit.cpu_threads(8, {"SLURM_CPUS_PER_TASK": "10"}) == 10
    assert submit.cpu_threads(2, {}) == max(1, len(os.sched_getaffinity(0)) // 2)


def test_sbatch_script_and_pickled_job(tmp_path, monkeypatch, capsys):
    """The whole submission path with stand-in `srun` / `sbatch` (the latter records its script and answers
    like Slurm): the batch script asks for 2 nodes x 8 tasks x 8 GPUs, USR2 120 s before 4320 minutes and
    requeue; the pickled job runs train_net with OUTPUT_DIR = the job dir, and its continuation resumes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/recorded.sh\necho "Submitted batch job 4242"\n')
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    job_dir = tmp_path / "job"
    job = submit.main([*SLURM, "--qos", "high", "--constraint", "h100", "--job-dir", str(job_dir), "--",
                       "--config-file", CONFIG, "SOLVER.MAX_ITER", "9"])
    out = capsys.readouterr().out
    assert job.job_id == "4242" and "Slurm job 4242: 2 node(s) x 8 task(s)" in out
    assert f"{job_dir}/submitit/4242_0_log.out" in out and f"log.txt: {job_dir}" in out
    script = (tmp_path / "recorded.sh").read_text()
    for line in ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=P", "--time=4320",
                 "--signal=USR2@120", "--requeue", "--qos=high", "--constraint=h100", "--job-name=ks_detr"]:
        assert f"#SBATCH {line}\n" in script, line
    assert "srun --unbuffered" in script and "submitit.core._submit" in script

    import submitit

    delayed = submitit.helpers.DelayedSubmission.load(job_dir / "submitit" / "4242_submitted.pkl")
    train = delayed.function
    assert train.args.opts == ["SOLVER.MAX_ITER", "9", "OUTPUT_DIR", str(job_dir)] and not train.args.resume
    assert train.device == "cuda" and train.requeue
    follow_up = train.checkpoint()
    assert follow_up.function.args.resume and follow_up.function.args.opts == train.args.opts
    assert submit.TrainJob(train.args, "cuda", requeue=False).checkpoint() is None


# ---- real runs: 2 processes on CPU (gloo) through submitit's LocalExecutor -----------------------

def launch(job_dir):
    job, _, _ = submit.submit(["--local", "--gpus-per-node", "2", "--timeout-min", "10", "--job-dir", str(job_dir),
                               "--", "--config-file", CONFIG, *SMALL_RUN])
    return job


def wait(job):
    try:
        return job.results()
    finally:
        if job.state == "RUNNING":
            job.cancel()


def read(path):
    with open(path) as f:
        return f.read()


def iterations(out):
    return [json.loads(line)["iteration"] for line in read(out / "metrics.json").splitlines() if "total_loss" in line]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    start = time.time()
    results = wait(launch(out))
    print(f"2-process local run: {time.time() - start:.1f} s")
    yield out, results
    shutil.rmtree(out, ignore_errors=True)


def test_two_processes_through_local_executor(local_run):
    """2 submitit tasks on CPU form one gloo process group (world size 2, one image per process) and
    train 3 iterations; each task returns its result; the model ends in model_final.pth."""
    out, results = local_run
    assert [(r["rank"], r["world_size"], r["resume"]) for r in results] == [(0, 2, False), (1, 2, False)]
    assert "Rank of current process: 0. World size: 2" in read(out / "log.txt")
    assert "Rank of current process: 1. World size: 2" in read(out / "log.txt.rank1")
    assert iterations(out)[-1] == 2
    assert os.path.exists(out / "model_final.pth")
    logs = sorted((out / "submitit").glob("*_log.out"))  # one per task
    assert len(logs) == 2 and len(list((out / "submitit").glob("*_result.pkl"))) == 2
    for rank, task_log in enumerate(logs):
        assert f"[tools/submit.py] task {rank} of 2" in read(task_log)


def task_pids(job):
    """The task processes of a local job: the children of submitit's controller."""
    controller = str(job._process.pid)
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[1]
        except OSError:
            continue
        if ppid == controller:
            pids.append(int(pid))
    return pids


@pytest.mark.slow
def test_usr2_saves_requeues_and_resumes_exactly(tmp_path, local_run):
    """USR2 to every task in the middle of training (what Slurm sends --signal-delay-s before the time
    limit, and what the local controller sends then too): the trainer saves model_<iter>.pth after the
    step, task 0 hands submitit the job's continuation (--resume) and exits for requeue, the controller
    restarts both tasks, they resume from that checkpoint and end with the same weights as the run
    that was never interrupted."""
    job = launch(tmp_path)
    try:
        log = tmp_path / "log.txt"
        deadline = time.time() + 120
        while not (log.exists() and "Starting training from iteration 0" in read(log)):
            assert job.state == "RUNNING" and time.time() < deadline
            time.sleep(0.1)
        time.sleep(0.5)  # inside iteration 0 (several seconds at 224 px on 2 cores)
        pids = task_pids(job)
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, signal.SIGUSR2)
    except BaseException:
        job.cancel()
        raise
    results = wait(job)
    assert [(r["rank"], r["world_size"], r["resume"]) for r in results] == [(0, 2, True), (1, 2, True)]
    text = read(log)
    saved = int(text.split("Preempted at iteration ")[1].split(":")[0])
    assert saved < 2 and os.path.exists(tmp_path / f"model_{saved:07d}.pth")
    assert f"Starting training from iteration {saved + 1}" in text
    task0 = read(next((tmp_path / "submitit").glob("*_0_log.out")))
    assert "Calling checkpoint method" in task0 and "Requeued job" in task0
    assert task0.count("[tools/submit.py] task 0 of 2") == 2 and "resume=True" in task0
    assert iterations(tmp_path)[-1] == 2
    final = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    reference = torch.load(local_run[0] / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert final.keys() == reference.keys()
    assert [k for k in final if not torch.equal(final[k], reference[k])] == []

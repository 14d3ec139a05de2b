#!/usr/bin/env python
"""Run train_net.py as a Slurm job (one task per GPU, any number of nodes) through submitit, or as a
local job of N processes on this machine (``--local``).

    python tools/submit.py --nodes 2 --gpus-per-node 8 --partition P --timeout-min 4320 --job-dir DIR \\
        -- --config-file configs/ks_conditional_detr_r50.yaml
    python tools/submit.py --local --gpus-per-node 2 --job-dir DIR \\
        -- --config-file configs/quickstart/ks_trees.yaml MODEL.DEVICE cpu

Everything after ``--`` is train_net.py's command line (``--config-file``, ``--resume``, ``--eval-only``,
``--register-coco``, ``KEY VALUE`` overrides). ``OUTPUT_DIR`` is the job dir unless given there.

Every task sets up torch.distributed from submitit's environment (NCCL on GPUs, gloo on CPU) and runs
``train_net.main``. Slurm sends USR2 ``--signal-delay-s`` seconds before the time limit; the trainer's
preemption hook then saves ``model_<iter>.pth`` after the current step on every task and hands the
signal to submitit, whose task 0 asks this job for its continuation (the same command with
``--resume``) and requeues it. A job that Slurm itself requeues (preemption with requeue, node
failure) resumes as well.
"""
import argparse
import copy
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ks_detr.errors import UserError, report_user_errors  # noqa: E402

LAUNCHER_OWNED = ("--num-gpus", "--num-machines", "--machine-rank", "--dist-url")
SLURM_ONLY = ("partition", "account", "qos", "constraint", "comment", "mem_gb", "cpus_per_task")


class LauncherError(UserError, ValueError):
    """A launcher option or environment that cannot work (exit status 2, one line)."""


def get_parser():
    parser = argparse.ArgumentParser(
        prog="tools/submit.py",
        usage="%(prog)s [launcher options] -- [train_net.py arguments]",
        description="Submit train_net.py to Slurm with submitit (one task per GPU), or run it locally with "
                    "--local. Arguments after `--` go to train_net.py unchanged.")
    parser.add_argument("--job-dir", required=True,
                        help="folder for submitit's files and logs (DIR/submitit) and, unless OUTPUT_DIR is given "
                             "after --, for checkpoints and metrics; on Slurm it must be on a shared file system")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes (default: 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="GPUs per node = tasks (processes) per node (default: 8); with --local the number of "
                             "processes, on CPU too")
    parser.add_argument("--timeout-min", type=int, default=4320,
                        help="time limit of one run of the job in minutes (default: 4320 = 3 days)")
    parser.add_argument("--signal-delay-s", type=int, default=120,
                        help="USR2 is sent this many seconds before the time limit, enough for the current "
                             "step and a checkpoint (default: 120)")
    parser.add_argument("--max-timeouts", type=int, default=20,
                        help="how many times the job may reach its time limit and be requeued (default: 20; "
                             "preemptions do not count)")
    parser.add_argument("--no-requeue", action="store_true",
                        help="on USR2 / preemption save a checkpoint and stop, without requeueing "
                             "(continue later with --resume)")
    parser.add_argument("--job-name", default="ks_detr", help="Slurm job name (default: ks_detr)")
    slurm = parser.add_argument_group("Slurm only")
    slurm.add_argument("--partition", help="partition to submit to")
    slurm.add_argument("--account", help="account to charge")
    slurm.add_argument("--qos", help="quality of service")
    slurm.add_argument("--constraint", help="node features, e.g. volta32gb")
    slurm.add_argument("--comment", help="job comment")
    slurm.add_argument("--mem-gb", type=int, help="memory per node in GB (default: the partition's)")
    slurm.add_argument("--cpus-per-task", type=int,
                       help="CPU cores per task (default: the partition's); DATALOADER.NUM_WORKERS + 1 or more")
    parser.add_argument("--local", action="store_true",
                        help="run on this machine with submitit's LocalExecutor (one node; on a machine "
                             "without GPUs add MODEL.DEVICE cpu after --) and wait for the result")
    return parser


def parse(argv):
    """(launcher options, train_net args) from the command line; train_net's args are parsed by
    ``train_net.get_parser()``, paths made absolute and OUTPUT_DIR defaulted to the job dir."""
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = get_parser()
    opts, unknown = parser.parse_known_args(argv[:cut])  # --help and launcher errors first
    if unknown and cut < len(argv):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if cut == len(argv):
        raise LauncherError("tools/submit.py: give train_net.py's arguments after `--`, e.g. "
                         "`tools/submit.py --job-dir DIR -- --config-file configs/X.yaml`")
    train_argv = argv[cut + 1:]
    owned = [a for a in train_argv if a.split("=")[0] in LAUNCHER_OWNED]
    if owned:
        raise LauncherError(f"tools/submit.py: {', '.join(owned)} after `--` is set by the launcher "
                         "(--nodes, --gpus-per-node)")
    if opts.nodes < 1 or opts.gpus_per_node < 1:
        raise LauncherError("tools/submit.py: --nodes and --gpus-per-node must be >= 1")
    if opts.local and opts.nodes != 1:
        raise LauncherError("tools/submit.py: --local runs on one node (--nodes 1)")
    import train_net

    args = train_net.get_parser().parse_args(train_argv)
    if not args.config_file:
        raise LauncherError("tools/submit.py: train_net.py needs --config-file (after `--`)")
    opts.job_dir = os.path.abspath(opts.job_dir)
    args.config_file = os.path.abspath(args.config_file)
    if "OUTPUT_DIR" not in args.opts[0::2]:
        args.opts = list(args.opts) + ["OUTPUT_DIR", opts.job_dir]
    args.num_gpus, args.num_machines, args.machine_rank, args.dist_url = opts.gpus_per_node, opts.nodes, 0, "env://"
    return opts, args


def executor_parameters(opts):
    """The submitit executor parameters (Slurm's names; LocalExecutor's with --local) of the options."""
    if opts.local:
        import torch

        return {
            "tasks_per_node": opts.gpus_per_node,
            "gpus_per_node": min(opts.gpus_per_node, torch.cuda.device_count()),
            "timeout_min": opts.timeout_min,
            "signal_delay_s": opts.signal_delay_s,
        }
    params = {
        "job_name": opts.job_name,
        "nodes": opts.nodes,
        "ntasks_per_node": opts.gpus_per_node,
        "gpus_per_node": opts.gpus_per_node,
        "time": opts.timeout_min,
        "signal_delay_s": opts.signal_delay_s,
        "additional_parameters": {"no-requeue" if opts.no_requeue else "requeue": True},
    }
    for key in SLURM_ONLY:
        value = getattr(opts, key)
        if value is not None:
            params["mem" if key == "mem_gb" else key] = f"{value}G" if key == "mem_gb" else value
    return params


def should_resume(args, environ=os.environ):
    """--resume as given, or when Slurm restarted the job (SLURM_RESTART_COUNT > 0: requeued by
    Slurm after a preemption or a node failure), so a requeue never starts training from scratch."""
    return bool(args.resume) or int(environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def cpu_threads(local_world_size, environ=os.environ):
    """Intra-op threads for one task, or None to keep torch's choice: $OMP_NUM_THREADS wins, then
    Slurm's $SLURM_CPUS_PER_TASK; otherwise the tasks of a node share its cores (submitit's local
    executor), and N processes with all cores each would oversubscribe them many times over."""
    if environ.get("OMP_NUM_THREADS"):
        return None
    if environ.get("SLURM_CPUS_PER_TASK"):
        return int(environ["SLURM_CPUS_PER_TASK"])
    return max(1, len(os.sched_getaffinity(0)) // local_world_size)


class TrainJob:
    """The job: called once in every task. Picklable (holds only train_net's parsed args)."""

    def __init__(self, args, device, requeue=True):
        self.args = args
        self.device = device
        self.requeue = requeue

    def __call__(self):
        import signal

        import submitit
        import torch
        import torch.distributed as dist

        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        import train_net
        from detectron2.utils import comm

        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        args = copy.deepcopy(self.args)
        args.num_gpus = env.local_world_size
        args.num_machines = env.world_size // env.local_world_size
        args.machine_rank = env.rank // env.local_world_size
        args.resume = should_resume(args)
        threads = cpu_threads(env.local_world_size)
        if threads:
            torch.set_num_threads(threads)
        cuda = self.device.startswith("cuda")
        if cuda:
            if not torch.cuda.is_available():
                raise RuntimeError(f"MODEL.DEVICE is {self.device} but this node has no GPU; "
                                   "ask for GPUs or add MODEL.DEVICE cpu")
            torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        if not self.requeue:  # USR2: the trainer saves and stops; nothing is requeued
            signal.signal(submitit.JobEnvironment._usr_sig(), signal.SIG_IGN)
        print(f"[tools/submit.py] task {env.rank} of {env.world_size} (node {args.machine_rank}, local rank "
              f"{env.local_rank}), master {env.master_addr}:{env.master_port}, {torch.get_num_threads()} threads, "
              f"resume={args.resume}", flush=True)
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://",
                                world_size=env.world_size, rank=env.rank)
        comm.create_local_process_group(env.local_world_size)
        comm.synchronize()
        result = train_net.main(args)  # leaves the process group
        return {"rank": env.rank, "world_size": env.world_size, "resume": args.resume, "result": result}

    def checkpoint(self):
        """Called by submitit in task 0 on USR2 (after the trainer saved its checkpoint): the job to
        requeue is this one with --resume."""
        if not self.requeue:
            return None
        import submitit

        args = copy.deepcopy(self.args)
        args.resume = True
        return submitit.helpers.DelayedSubmission(type(self)(args, self.device, self.requeue))


def submit(argv):
    """Submit (or start locally) the job of a command line; returns (job, opts, args) without waiting."""
    opts, args = parse(argv)
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None and not opts.local]
    if missing:
        raise LauncherError(f"tools/submit.py: {' and '.join(missing)} not found on PATH, so this is not a Slurm "
                            "submission host; run it where Slurm's commands are (a cluster's login node), or "
                            "run here with --local")
    import submitit
    from ks_detr import load_config
    from ks_detr.engine import Trainer

    cfg = load_config(args.config_file, args.opts)  # a bad config or key fails here, not in the queue
    if opts.local and cfg.MODEL.DEVICE.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < opts.gpus_per_node:
            raise LauncherError(f"tools/submit.py: --local with {opts.gpus_per_node} processes on "
                             f"{cfg.MODEL.DEVICE} but {torch.cuda.device_count()} GPU(s) here; "
                             "add MODEL.DEVICE cpu after `--` to run on CPU")
    world = opts.nodes * opts.gpus_per_node
    if not args.eval_only:  # the batch is split over the tasks (after SOLVER.REFERENCE_WORLD_SIZE scaling)
        batch = Trainer.auto_scale_workers(cfg, world).SOLVER.IMS_PER_BATCH
        if batch % world:
            raise LauncherError(f"tools/submit.py: SOLVER.IMS_PER_BATCH {batch} cannot be split over {world} tasks "
                             f"({opts.nodes} node(s) x {opts.gpus_per_node})")
    if __name__ != "__main__":  # imported (tests): ship this module's code with the pickle
        import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    folder = os.path.join(opts.job_dir, "submitit")
    if opts.local:
        ignored = [f"--{k.replace('_', '-')}" for k in SLURM_ONLY if getattr(opts, k) is not None]
        if ignored:
            print(f"[tools/submit.py] --local ignores {', '.join(ignored)}")
        executor = submitit.LocalExecutor(folder, max_num_timeout=opts.max_timeouts)
    else:
        executor = submitit.SlurmExecutor(folder, max_num_timeout=opts.max_timeouts)
    executor.update_parameters(**executor_parameters(opts))
    job = executor.submit(TrainJob(args, cfg.MODEL.DEVICE, requeue=not opts.no_requeue))
    return job, opts, args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    with report_user_errors():
        job, opts, args = submit(argv)
    output_dir = args.opts[args.opts.index("OUTPUT_DIR") + 1]
    where = "local job (controller pid)" if opts.local else "Slurm job"
    print(f"Submitted {where} {job.job_id}: {opts.nodes} node(s) x {opts.gpus_per_node} task(s)")
    print(f"  checkpoints, metrics.json, log.txt: {output_dir}")
    print(f"  submitit logs: {job.paths.stdout} and .err (one pair per task: {job.job_id}_<task>_log.*)")
    if not opts.local:
        return job
    try:
        results = job.results()
    except KeyboardInterrupt:
        job.cancel()
        raise
    print(f"Done: {results[0]}")
    return job


if __name__ == "__main__":
    main()

"""Training engine: detectron2's ``DefaultTrainer`` with what large-scale DETR training needs.

- DDP on any device: ``--num-gpus N`` gives N processes on GPUs (NCCL) or on CPU (gloo). Every
  trainable parameter of every shipped config gets a gradient in every step (tested), so DDP runs
  without ``find_unused_parameters`` and its per-step graph walk.
- Mixed precision on any device (``SOLVER.AMP``): autocast to bfloat16 (CPU default) or float16
  (CUDA default, with a gradient scaler).
- Exact resume: the data stream and the augmentation of every sample follow from the run seed and
  the iteration (:mod:`ks_detr.data.sampler`); dropout / denoising noise are re-seeded from
  (seed, iteration, rank) before every step; the seed is stored in every checkpoint; checkpoints
  are written atomically.
- Preemption: SIGTERM / SIGUSR1 / SIGUSR2 save a checkpoint after the current step on every
  process, hand the signal to the handler installed before (submitit's requeue), and exit.
- History across ``--resume``: ``wall_minutes`` continues from the checkpoint's; the rows of
  ``metrics.json`` written after the checkpoint (trained again now) are dropped, and TensorBoard is told to
  hide those steps of the earlier event files (``purge_step``); a finished run is
  left as it is; a run whose last iteration is trained but whose end (``model_final.pth``, final
  evaluation) is missing gets only that end, never an iteration past ``SOLVER.MAX_ITER``.
- Progress lines: ``total_loss``, ``student_loss`` and (KS) ``teacher_loss`` (sums of the loss
  terms, ``_ks_`` terms being the teachers'); every term is in ``metrics.json`` and TensorBoard.
"""
import ctypes
import inspect
import json
import logging
import os
import signal
import threading
import time
import weakref
from functools import cached_property

import torch
from detectron2.data import build_detection_test_loader
from detectron2.engine import DefaultTrainer, HookBase, SimpleTrainer, TrainerBase
from detectron2.engine.hooks import PeriodicWriter
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, EventStorage, TensorboardXWriter, get_event_storage
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import AtomicCheckpointer, checkpoint_problem
from .config import amp_dtype_name
from .data import DetrDatasetMapper
from .data.sampler import build_resumable_train_loader, mix_seed
from .solver import build_optimizer

logger = logging.getLogger(__name__)
_DDP_ARGS = inspect.signature(DistributedDataParallel.__init__).parameters
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a process killed by SIGTERM reports
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def keep_freed_cpu_memory(cfg):
    """With ``cfg.CPU_KEEP_FREED_MEMORY`` and ``MODEL.DEVICE`` "cpu", make glibc's malloc serve every block
    below 2 GiB from its heap and never trim the heap (``mallopt`` M_MMAP_THRESHOLD, M_TRIM_THRESHOLD), for
    this process and the data workers it forks later. By default glibc maps large blocks (activations of
    more than 32 MiB always) freshly from the kernel and unmaps them on free, so every training step
    page-faults them in again. Returns True when set (not on other C libraries or devices)."""
    if not cfg.CPU_KEEP_FREED_MEMORY or cfg.MODEL.DEVICE != "cpu":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    limit = 2**31 - 1  # mallopt takes an int
    return bool(mallopt(_M_MMAP_THRESHOLD, limit) and mallopt(_M_TRIM_THRESHOLD, limit))


def amp_dtype(cfg):
    """The autocast dtype of ``SOLVER.AMP.DTYPE`` ("" = bfloat16 on CPU, float16 on CUDA)."""
    return getattr(torch, amp_dtype_name(cfg))


def create_ddp_model(model):
    """``model`` wrapped for data parallelism when there are several processes: on its GPU, or on
    CPU (gloo) without device ids. Buffers are not synchronised in every forward (FrozenBN
    statistics and pixel mean/std are constant)."""
    if comm.get_world_size() == 1:
        return model
    device = next(model.parameters()).device
    ids = [device.index if device.index is not None else comm.get_local_rank()] if device.type == "cuda" else None
    # torch >= 2.14 renamed the switch (and deprecates the old name)
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in _DDP_ARGS else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=ids, **{no_sync: False})


def end_process_group():
    """Destroy this worker's process groups (a no-op without them). A gloo worker that exits with its
    groups alive can abort while the interpreter shuts down ("terminate called without an active
    exception"), and the launcher then stops the other workers."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class MixedPrecisionTrainer(SimpleTrainer):
    """``SimpleTrainer`` with the forward and losses under ``torch.autocast(device_type, dtype)``;
    float16 scales the loss (``torch.amp.GradScaler``), bfloat16 needs no scaling. The model keeps
    its own float32 islands (matcher, losses, box arithmetic)."""

    def __init__(self, model, data_loader, optimizer, device_type, dtype):
        super().__init__(model, data_loader, optimizer)
        self.device_type, self.dtype = device_type, dtype
        self.grad_scaler = torch.amp.GradScaler(device_type) if dtype == torch.float16 else None

    def run_step(self):
        assert self.model.training, "[MixedPrecisionTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast(self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        if self.grad_scaler is None:
            losses.backward()
        else:
            self.grad_scaler.scale(losses).backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


class WallClock(HookBase):
    """Records ``wall_minutes`` (training time of the run, evaluations included; after ``--resume``
    counted on from the checkpoint's ``offset``) at every iteration and after the final evaluation,
    so each row of ``metrics.json`` says when it was reached (``tools/plot_metrics.py --x minutes``).
    It runs after the evaluation hook and before the writer."""

    def __init__(self):
        self.offset = 0.0
        self._start = None

    def minutes(self):
        """Minutes of the run so far."""
        return self.offset + (0.0 if self._start is None else (time.perf_counter() - self._start) / 60)

    def before_train(self):
        self._start = time.perf_counter()

    def after_step(self):
        self.trainer.storage.put_scalar("wall_minutes", self.minutes(), smoothing_hint=False)

    def after_train(self):
        self.after_step()  # the final evaluation's row


def is_teacher_loss(name):
    """Whether a loss term belongs to a KS teacher (``loss_*_ks_a``, ``loss_*_ks_v_2``, ...)."""
    return "_ks_" in name


class LossSums(HookBase):
    """Puts ``student_loss`` and, with KS, ``teacher_loss`` (sums of this step's loss terms) into the
    event storage, for the progress line; runs before the writer."""

    def after_step(self):
        storage = self.trainer.storage
        terms = {k: v for k, (v, it) in storage.latest().items() if it == storage.iter and k.startswith("loss_")}
        if not terms:
            return
        teacher = [v for k, v in terms.items() if is_teacher_loss(k)]
        storage.put_scalar("student_loss", sum(v for k, v in terms.items() if not is_teacher_loss(k)))
        if teacher:
            storage.put_scalar("teacher_loss", sum(teacher))
        if not getattr(self, "_told", False):
            self._told = True
            shown = "total_loss, student_loss and teacher_loss" if teacher else "total_loss and the last layer's terms"
            logger.info(f"progress lines show {shown}; all {len(terms)} loss terms are in metrics.json and TensorBoard")


class LossSumPrinter(CommonMetricPrinter):
    """detectron2's progress line with the loss sums (``total_loss``, ``student_loss``,
    ``teacher_loss``) in place of every loss term; a model without teachers also shows its final
    ``loss_class``/``loss_bbox``/``loss_giou``."""

    SHOWN = ("total_loss", "student_loss", "teacher_loss")
    BASELINE_SHOWN = ("total_loss", "loss_class", "loss_bbox", "loss_giou")

    def write(self):
        storage = get_event_storage()
        histories = storage.histories()
        shown = self.SHOWN if "teacher_loss" in histories else self.BASELINE_SHOWN
        kept = {k: v for k, v in histories.items() if "loss" not in k or k in shown}
        storage.histories = lambda: kept  # the instance attribute hides the method while the line is built
        try:
            super().write()
        finally:
            del storage.histories


class ResumingTensorboardWriter(TensorboardXWriter):
    """detectron2's TensorBoard writer; in a resumed run its events file starts with a purge at the
    first iteration trained again, so TensorBoard hides what the earlier files hold from that step on."""

    def __init__(self, log_dir, trainer):
        super().__init__(log_dir)
        self._run = weakref.proxy(trainer)

    @cached_property
    def _writer(self):  # made at the first write, after resume_or_load has set start_iter
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(**self._writer_args, purge_step=self._run.start_iter or None)


class StepSeed(HookBase):
    """Seeds torch (CPU and CUDA) from (run seed, iteration, rank) before every step, so dropout and
    denoising noise of a step do not depend on what ran before it (evaluation, an earlier process)."""

    def before_step(self):
        torch.manual_seed(mix_seed(self.trainer.seed, 2, self.trainer.iter, comm.get_rank()))


class Preemption(HookBase):
    """On SIGTERM / SIGUSR1 / SIGUSR2 (Slurm's preemption and time-limit signals): finish the step,
    save ``model_<iter>.pth`` (all processes agree on the step), call the handlers that were installed
    before ours for the signals received (e.g. submitit's checkpoint-and-requeue), then exit with
    status 143."""

    def before_train(self):
        self.received = []
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for name in PREEMPTION_SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._note)

    def _note(self, signum, frame):
        if signum not in self.received:
            self.received.append(signum)
            logger.warning(f"Received {signal.Signals(signum).name}: saving a checkpoint after this step")

    def after_step(self):
        # one scalar all_reduce per step (multi-process only), so every rank stops at the same step
        flag = torch.tensor([len(self.received)], device=_comm_device())
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if not flag.item():
            return
        name = f"model_{self.trainer.iter:07d}"
        self.trainer.checkpointer.save(name)
        comm.synchronize()
        logger.warning(f"Preempted at iteration {self.trainer.iter}: saved {name}.pth in "
                       f"{self.trainer.cfg.OUTPUT_DIR}; continue with --resume")
        previous = [(sig, self._previous.get(sig)) for sig in self.received]
        self.after_train()
        for sig, handler in previous:  # e.g. submitit: SIGTERM is logged, SIGUSR2 requeues and exits
            if callable(handler):
                handler(sig, None)
        raise SystemExit(PREEMPTED_EXIT_CODE)

    def after_train(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}


def _metrics_rows(path):
    """The rows of a ``metrics.json`` (one json object per line; unreadable lines skipped)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _drop_rows_from(path, iteration):
    """Remove the rows of iteration >= ``iteration`` from ``metrics.json``, in place (detectron2's
    writer already holds the file open for appending)."""
    if not os.path.isfile(path):
        return
    with open(path, "r+") as f:
        lines = f.read().splitlines()
        kept = [line for line in lines if _row_iteration(line) < iteration]
        if len(kept) == len(lines):
            return
        f.seek(0)
        f.write("".join(line + "\n" for line in kept))
        f.truncate()
    logger.info(f"{path}: dropped {len(lines) - len(kept)} rows of iterations >= {iteration}, written after the "
                "checkpoint (those iterations are trained again)")


def _row_iteration(line):
    try:
        return int(json.loads(line).get("iteration", -1))
    except (ValueError, AttributeError, TypeError):
        return -1


def _comm_device():
    """Device of tensors for collectives: the local GPU under NCCL, else CPU."""
    if comm.get_world_size() > 1 and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Trainer(DefaultTrainer):
    """DefaultTrainer with the DETR mapper and resumable loader, AdamW + backbone multiplier, COCO
    evaluation, DDP on any device, mixed precision, per-step seeds, atomic checkpoints, a wall
    clock and preemption checkpoints."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__ hard-wires create_ddp_model (GPU ids only), AMPTrainer (CUDA only) and a
        # non-atomic checkpointer; this is its sequence with ours in their place.
        TrainerBase.__init__(self)
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model)
        if cfg.SOLVER.AMP.ENABLED:
            device_type = torch.device(cfg.MODEL.DEVICE).type
            self._trainer = MixedPrecisionTrainer(model, data_loader, optimizer, device_type, amp_dtype(cfg))
        else:
            self._trainer = SimpleTrainer(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, allow_partial=cfg.MODEL.WEIGHTS_ALLOW_PARTIAL,
                                               trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        self._wall_clock = WallClock()
        self._finished = False
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume=True):
        """As detectron2 (the run seed and the wall clock come from the checkpoint when resuming);
        then ``metrics.json`` loses the rows after the checkpoint (they are trained again) unless the
        run is finished, and the data stream is positioned at ``start_iter``."""
        self._wall_clock.offset = None
        super().resume_or_load(resume=resume)
        metrics = os.path.join(self.cfg.OUTPUT_DIR, "metrics.json")
        resumed = resume and self.start_iter > 0
        if self._wall_clock.offset is None:  # a new run, or a checkpoint written before wall_minutes was saved
            earlier = [r["wall_minutes"] for r in _metrics_rows(metrics) if "wall_minutes" in r
                       and r.get("iteration", self.start_iter) < self.start_iter] if resumed else []
            self._wall_clock.offset = earlier[-1] if earlier else 0.0
        self._finished = resumed and self.start_iter >= self.max_iter and self._end_recorded(metrics)
        if resumed and not self._finished and comm.is_main_process():
            _drop_rows_from(metrics, self.start_iter)
        logger.info(f"Run seed {self.seed}, first iteration {self.start_iter}")
        self._trainer.data_loader.batch_sampler.set_start(self.seed, self.start_iter)

    def _end_recorded(self, metrics):
        """Whether the end of the run is on disk: an intact model_final.pth and the final row of metrics.json."""
        final = os.path.join(self.cfg.OUTPUT_DIR, "model_final.pth")
        return checkpoint_problem(final) is None and any(r.get("iteration") == self.max_iter
                                                         for r in _metrics_rows(metrics))

    def train(self):
        """detectron2's training from ``start_iter``; a resumed run with every iteration trained is
        not trained or evaluated again: finished -> a message; else only its end (:meth:`_finish`)."""
        if self.start_iter < self.max_iter:
            return super().train()
        if self._finished:
            logger.info(f"--resume: the run in {self.cfg.OUTPUT_DIR} is finished (all SOLVER.MAX_ITER={self.max_iter} "
                        "iterations, model_final.pth and the final evaluation are there); nothing to do. Raise "
                        "SOLVER.MAX_ITER to train on, or use --eval-only to evaluate again")
            return None
        return self._finish()

    def _finish(self):
        """The end of a run whose iterations are all trained: model_final.pth (when missing or broken),
        the final evaluation and the final row of metrics.json (iteration MAX_ITER)."""
        logger.info(f"--resume: all {self.max_iter} iterations are trained, but the end of the run is missing; "
                    "writing model_final.pth if needed and running the final evaluation")
        if checkpoint_problem(os.path.join(self.cfg.OUTPUT_DIR, "model_final.pth")) is not None:
            self.checkpointer.save("model_final", iteration=self.iter)
        self.iter = self.max_iter
        with EventStorage(self.max_iter) as self.storage:
            self.before_train()
            self.after_train()
        return getattr(self, "_last_eval_results", None)

    def state_dict(self):
        return dict(super().state_dict(), seed=self.seed, wall_minutes=self._wall_clock.minutes())

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "seed" in state_dict:
            self.seed = state_dict["seed"]
        if "wall_minutes" in state_dict:
            self._wall_clock.offset = state_dict["wall_minutes"]

    def build_hooks(self):
        hooks = super().build_hooks()
        writer = next((i for i, h in enumerate(hooks) if isinstance(h, PeriodicWriter)), len(hooks))
        return ([StepSeed()] + hooks[:writer] + [self._wall_clock, LossSums()] + hooks[writer:] + [Preemption()])

    def build_writers(self):
        swap = {CommonMetricPrinter: lambda w: LossSumPrinter(self.max_iter),
                TensorboardXWriter: lambda w: ResumingTensorboardWriter(self.cfg.OUTPUT_DIR, self)}
        return [swap.get(type(w), lambda w: w)(w) for w in super().build_writers()]

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, tasks=("bbox",), output_dir=output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_resumable_train_loader(cfg, DetrDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=DetrDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

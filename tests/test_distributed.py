"""Multi-process training: every trainable parameter gets a gradient (DDP without
``find_unused_parameters``), 2 processes x batch B == 1 process x batch 2B, and train_net.py with
``--num-gpus 2`` on CPU (gloo) trains and evaluates like one process."""
import json
import os
import socket
import time

import pytest
import torch
from detectron2.engine import launch
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

from conftest import coco_ap, make_cfg, tame_random_backbone, toy_inputs, train_net
from ks_detr import build_optimizer
from ks_detr.engine import create_ddp_model, end_process_group

pytestmark = pytest.mark.usefixtures("trees_dataset")  # real images (prepared if missing)

TINY = ["MODEL.DETR.NUM_QUERIES", "20", "MODEL.DETR.ENC_LAYERS", "2", "MODEL.DETR.DEC_LAYERS", "2",
        "MODEL.DETR.HIDDEN_DIM", "64", "MODEL.DETR.DIM_FEEDFORWARD", "128", "MODEL.RESNETS.DEPTH", "18",
        "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
FAMILIES = ["conditional_detr", "dab_detr", "dn_detr", "deformable_detr", "dn_deformable_detr"]
CASES = [(f"configs/{ks}{f}_r50.yaml", mode, two) for f in FAMILIES for ks in ("", "ks_")
         for mode in (["triple", "share_v", "share_a"] if ks else [None])
         for two in ([False, True] if f == "dn_deformable_detr" else [False])] + [
    ("configs/dino_r50_4scale_12ep.yaml", None, False), ("configs/ks_dino_r50_4scale_12ep.yaml", "triple", False)]


def case_opts(mode, two_stage):
    return TINY + (["MODEL.KS.MODE", mode] if mode else []) + (["MODEL.DETR.TWO_STAGE", "True"] if two_stage else [])


# The default run: KS (triple) of every family, the deformable ablation modes (which build one teacher
# projection each) and two-stage selection; `pytest -m slow` runs the whole matrix.
DEFAULT = {c for c in CASES if (c[1] == "triple" and not c[2]) or (c[0].startswith("configs/ks_deformable") and c[1])
           or c == ("configs/ks_dn_deformable_detr_r50.yaml", "triple", True)}


@pytest.mark.parametrize("config,mode,two_stage",
                         [c if c in DEFAULT else pytest.param(*c, marks=pytest.mark.slow) for c in CASES])
def test_every_trainable_parameter_gets_a_gradient(config, mode, two_stage):
    """What DDP checks in every step: no trainable parameter is left out of the loss, also for a
    batch whose images have no box at all (no denoising queries)."""
    torch.manual_seed(0)
    model = build_model(make_cfg(config, *case_opts(mode, two_stage)))
    model.train()
    for inputs in (toy_inputs(), toy_inputs(sizes=((160, 200),), with_empty=True)):
        model.zero_grad(set_to_none=True)
        with EventStorage():
            sum(model(inputs).values()).backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, unused


def test_quickstart_parameters_all_get_a_gradient():
    torch.manual_seed(0)
    model = build_model(make_cfg("configs/quickstart/ks_trees.yaml", "MODEL.MOBILENET_V2.PRETRAINED", "False"))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("backbone.") for n in frozen)  # FREEZE_AT 2: stem and first stages
    inputs = toy_inputs()
    for x in inputs:
        x["instances"].gt_classes.zero_()
    with EventStorage():
        sum(model(inputs).values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---- 2 processes x B images == 1 process x 2B images ----------------------------------------------
# Dropout and denoising noise off (their random numbers differ between the runs); all images of one
# size (padding is per process); each process's batch has one image with 3 boxes and one without,
# so the denoising group size (the most boxes of an image in the batch) is 3 in both runs.
EARLY = ("MODEL.KS.EARLY_TEACHER_BACKWARD", "True")  # the teachers' gradients taken in the forward
EQUAL_CASES = [("configs/conditional_detr_r50.yaml", False, ()), ("configs/ks_conditional_detr_r50.yaml", False, ()),
               ("configs/dn_deformable_detr_r50.yaml", True, ()), ("configs/ks_dn_deformable_detr_r50.yaml", True, ()),
               ("configs/ks_conditional_detr_r50.yaml", False, EARLY),
               ("configs/ks_dn_deformable_detr_r50.yaml", True, EARLY)]


def no_noise(config):
    """Dropout off, and the denoising noise where the family has denoising queries (elsewhere DN.* is refused)."""
    dn = os.path.basename(config).removeprefix("ks_").startswith(("dn_", "dino"))
    return ["MODEL.DETR.DROPOUT", "0.0"] + (["MODEL.DETR.DN.LABEL_NOISE", "0.0", "MODEL.DETR.DN.BOX_NOISE", "0.0"]
                                            if dn else [])


def batch():
    inputs = toy_inputs(sizes=((160, 192),) * 2, seed=1) + toy_inputs(sizes=((160, 192),) * 2, seed=2)
    inputs[2]["instances"].gt_boxes.tensor[:, :2] += 7.0  # other boxes in the second process
    return inputs


def step(config, two_stage, opts, inputs):
    """Gradients and weights after one AdamW step of a fixed-seed model on ``inputs`` (this process's
    share under DDP)."""
    cfg = make_cfg(config, *case_opts(None, two_stage), *no_noise(config), "SOLVER.BASE_LR", "1e-3", *opts)
    torch.manual_seed(0)
    model = tame_random_backbone(build_model(cfg))
    model.train()
    optimizer = build_optimizer(cfg, model)
    ddp = create_ddp_model(model)
    with EventStorage():
        losses = ddp(inputs)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def _worker(out_dir):
    rank = comm.get_rank()
    inputs = batch()[2 * rank: 2 * rank + 2]
    results = {(c, *opts): step(c, two, opts, inputs) for c, two, opts in EQUAL_CASES}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "ddp.pth"))
    comm.synchronize()
    end_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def test_two_processes_equal_one_process_with_double_batch(tmp_path):
    """The loss is normalised by the boxes of all processes (all_reduce) and DDP averages the
    gradients: gradients and AdamW-updated weights agree with one process on the whole batch to
    <= 1e-5 relative, per parameter tensor (KS and baseline; Conditional and DN-Deformable with
    two-stage selection and denoising; images without boxes; KS also with the teachers' gradients taken in the
    forward).

    Tensors whose gradient is zero in exact arithmetic (e.g. the key biases of attention: softmax
    ignores a constant shift of the logits) carry only round-off; tensors under 1e-6 of the total
    gradient norm are checked to be that small in both runs, not compared (AdamW turns round-off
    into full steps).
    Exactly-zero gradients (the box MLP before its zero-initialised last layer, the first decoder
    layer's self-attention content projections of all-zero content queries) are zero in both."""
    launch(_worker, 2, dist_url=f"tcp://127.0.0.1:{free_port()}", args=(str(tmp_path),))
    ddp = torch.load(tmp_path / "ddp.pth", weights_only=True)
    for config, two, opts in EQUAL_CASES:
        grads, weights = step(config, two, opts, batch())
        ddp_grads, ddp_weights = ddp[(config, *opts)]
        assert grads.keys() == ddp_grads.keys()
        total = torch.cat([g.flatten() for g in grads.values()]).norm()
        zero = {n for n, g in grads.items() if g.norm() == 0}
        assert all(ddp_grads[n].norm() == 0 for n in zero)
        roundoff = {n for n, g in grads.items() if 0 < g.norm() < 1e-6 * total}
        assert len(zero | roundoff) < len(grads) / 5  # the comparison is not between zeros
        assert all(ddp_grads[n].norm() < 1e-6 * total for n in roundoff)
        worst = max((relative_error(ddp_grads[n], g), n) for n, g in grads.items() if n not in roundoff | zero)
        assert worst[0] <= 1e-5, (config, worst)
        # AdamW's first step moves every element by lr * sign(grad): compare where the sign is not round-off
        meaningful = {n: grads[n].abs() > 1e-7 * total for n in grads}
        worst = max((relative_error(ddp_weights[n][m], weights[n][m]), n) for n, m in meaningful.items() if m.any())
        assert worst[0] <= 1e-5, (config, worst)
        assert sum(m.sum() for m in meaningful.values()) > 0.5 * sum(m.numel() for m in meaningful.values())


# ---- accepted settings that leave a parameter out of a plain forward ---------------------------------
# DDP without find_unused_parameters fails at the step after one where a trainable parameter got no gradient
# ("Expected to have finished reduction in the prior iteration"): every such setting runs 2 steps on 2 processes.
# (test_every_parameter_trains.py checks every family config, baseline and KS, for the gradients themselves)
ODD_CASES = [(f"configs/{family}_r50.yaml", opts) for family, opts in [
    ("dn_detr", ("MODEL.DETR.DN.GROUPS", "0")), ("dn_deformable_detr", ("MODEL.DETR.DN.GROUPS", "0")),
    ("ks_dn_deformable_detr", ("MODEL.DETR.DN.GROUPS", "0")),
    ("conditional_detr", ("MODEL.DETR.DEC_LAYERS", "1")), ("dab_detr", ("MODEL.DETR.DEC_LAYERS", "1")),
    ("dn_detr", ("MODEL.DETR.DEC_LAYERS", "1")), ("dn_deformable_detr", ("MODEL.DETR.DEC_LAYERS", "1")),
    ("ks_conditional_detr", ("MODEL.DETR.DEC_LAYERS", "1"))]]
ODD_TINY = ["MODEL.DETR.NUM_QUERIES", "8", "MODEL.DETR.ENC_LAYERS", "1", "MODEL.DETR.DEC_LAYERS", "2",
            "MODEL.DETR.HIDDEN_DIM", "32", "MODEL.DETR.NHEADS", "4", "MODEL.DETR.DIM_FEEDFORWARD", "32",
            "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.KS.ENCODER_LAYERS", "[0]"]


def _odd_worker(cases):
    rank = comm.get_rank()
    torch.set_num_threads(1)
    for config, opts in cases:
        ks = os.path.basename(config).startswith("ks_")
        cfg = make_cfg(config, *ODD_TINY[: None if ks else -2], *opts)
        torch.manual_seed(0)
        model = build_model(cfg)
        model.train()
        optimizer = build_optimizer(cfg, model)
        ddp = create_ddp_model(model)
        for it in range(2):  # DDP finds a parameter without gradient at the next step's forward
            inputs = toy_inputs(sizes=((96, 128), (80, 112)), seed=10 * it + rank)  # the second image has no box
            with EventStorage():
                losses = ddp(inputs)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    end_process_group()


def test_settings_without_some_parameters_train_under_ddp():
    """DN.GROUPS 0 (no denoising queries: the label embedding takes part through a zero) and DEC_LAYERS 1
    (``query_scale`` scales layers 1.. only: kept in the graph by a zero), baseline and KS: 2 DDP steps."""
    launch(_odd_worker, 2, dist_url=f"tcp://127.0.0.1:{free_port()}", args=(ODD_CASES,))


def _gather_and_leave():
    """Rank 1 exits while rank 0 still works, as after an evaluation (only the main process runs COCOeval)."""
    objs = [None, None] if comm.is_main_process() else None
    torch.distributed.gather_object(comm.get_rank(), objs, dst=0)
    if comm.is_main_process():
        time.sleep(0.3)
    end_process_group()


def test_workers_that_end_apart_leave_without_aborting():
    """A gloo worker that exits with its process group alive aborts ~1 time in 5 while the interpreter shuts
    down ("terminate called without an active exception"; then ``launch`` raises). Ending the group first
    (what train_net.py's workers do) lets 8 launches in a row exit cleanly."""
    for _ in range(8):
        launch(_gather_and_leave, 2, dist_url=f"tcp://127.0.0.1:{free_port()}")


# ---- train_net.py --num-gpus 2 on CPU --------------------------------------------------------------
SMALL_RUN = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.DETR.NUM_CLASSES", "1",
    "DATASETS.TRAIN", '("trees_train",)', "DATASETS.TEST", '("trees_val",)', "SOLVER.IMS_PER_BATCH", "4",
    "SOLVER.CHECKPOINT_PERIOD", "100", "TEST.EVAL_PERIOD", "0", "INPUT.MIN_SIZE_TRAIN", "(224,)",
    "INPUT.MAX_SIZE_TRAIN", "224", "INPUT.CROP.ENABLED", "False", "INPUT.MIN_SIZE_TEST", "224",
    "INPUT.MAX_SIZE_TEST", "224", "DATALOADER.NUM_WORKERS", "0", "SEED", "3",
] + TINY


def test_quickstart_trains_on_two_cpu_processes_and_evaluates_like_one(tmp_path):
    """train_net.py --num-gpus 2 on CPU: 2 gloo processes train the quickstart KS config (each
    process gets half of the batch); evaluation of the result with 2 processes gives the same COCO
    AP and the same predictions as with 1."""
    quick = ["--config-file", "configs/quickstart/ks_trees.yaml", "MODEL.MOBILENET_V2.PRETRAINED", "False"]
    log = train_net("--num-gpus", "2", *quick, *SMALL_RUN, "SOLVER.MAX_ITER", "3", "SOLVER.STEPS", "(2,)",
                    "SOLVER.WARMUP_ITERS", "1", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "train"))
    with open(tmp_path / "train" / "log.txt") as f:  # detectron2's setup lines go to the log file
        assert "World size: 2" in f.read()
    weights = str(tmp_path / "train" / "model_final.pth")
    results = {}
    for n in (1, 2):
        out = tmp_path / f"eval{n}"
        log = train_net("--num-gpus", str(n), "--eval-only", *quick, *SMALL_RUN, "MODEL.WEIGHTS", weights,
                        "OUTPUT_DIR", str(out))
        with open(out / "inference" / "coco_instances_results.json") as f:
            preds = sorted(json.load(f), key=lambda p: (p["image_id"], -p["score"], p["bbox"]))
        results[n] = coco_ap(log), preds
    assert results[1][0] == results[2][0]
    assert len(results[1][1]) == len(results[2][1]) > 0
    for a, b in zip(results[1][1], results[2][1]):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("config,mode,two_stage",
                         [(c, m, t) for c, m, t in CASES] + [("configs/quickstart/trees.yaml", None, True)])
def test_every_config_trains_under_two_process_ddp(tmp_path, config, mode, two_stage):
    """`pytest -m slow`: each family, KS on/off, every KS mode, two-stage: 3 iterations with
    2 gloo processes through train_net.py (a batch of 4 real images: 2 per process)."""
    extra = (["MODEL.KS.MODE", mode] if mode else []) + (["MODEL.DETR.TWO_STAGE", "True"] if two_stage else [])
    if "quickstart" in config:
        extra += ["MODEL.MOBILENET_V2.PRETRAINED", "False"]
    train_net("--num-gpus", "2", "--config-file", config, *SMALL_RUN, *extra, "SOLVER.MAX_ITER", "3",
              "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path))
    assert os.path.exists(tmp_path / "model_final.pth")

"""detectron2's own RetinaNet and Faster R-CNN on the quickstart (configs/quickstart/{retinanet,faster_rcnn}_trees.yaml):
the FPN MobileNet-V2 backbones, and train_net.py training and evaluating them without detectron2's _C."""
import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model

from conftest import REPO, coco_ap, make_cfg

D2_QUICKSTART = ["configs/quickstart/retinanet_trees.yaml", "configs/quickstart/faster_rcnn_trees.yaml"]


@pytest.mark.parametrize("config, levels", [(D2_QUICKSTART[0], {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}),
                                            (D2_QUICKSTART[1], {"p3": 8, "p4": 16, "p5": 32, "p6": 64})])
def test_mobilenet_fpn_levels(config, levels):
    model = build_model(make_cfg(config)).eval()
    shapes = model.backbone.output_shape()
    assert {k: s.stride for k, s in shapes.items()} == levels
    assert {s.channels for s in shapes.values()} == {128}
    out = model.backbone(torch.rand(1, 3, 256, 320))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {k: (-(-256 // s), -(-320 // s)) for k, s in levels.items()}
    # the bottom-up is the same ImageNet MobileNet-V2 as the DETR quickstart, stem + res2 frozen
    detr = build_model(make_cfg("configs/quickstart/trees.yaml"))
    ours = model.backbone.bottom_up.state_dict()
    for k, v in detr.backbone.state_dict().items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=0)
    frozen = {n for n, p in model.backbone.bottom_up.named_parameters() if not p.requires_grad}
    assert frozen and all(int(n.split(".")[1]) <= 3 for n in frozen)


# detectron2's _C made unimportable: the detectors' ROIAlign and NMS must be torchvision's
NO_C = ("import runpy, sys; sys.modules['detectron2._C'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path('train_net.py', run_name='__main__')")


@pytest.mark.parametrize("config", D2_QUICKSTART)
def test_d2_detector_trains_and_evaluates_without_C(config, tmp_path, trees_dataset):
    r = subprocess.run([sys.executable, "-c", NO_C, "train_net.py", "--config-file", config, "SOLVER.MAX_ITER", "3",
                        "SOLVER.STEPS", "(2,)", "SOLVER.WARMUP_ITERS", "1", "TEST.EVAL_PERIOD", "0",
                        "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(256,)", "INPUT.MIN_SIZE_TEST", "256",
                        "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert len(coco_ap(log)) == 6 and "eta:" in log
    with open(tmp_path / "metrics.json") as f:
        rows = [json.loads(line) for line in f]
    assert [row["iteration"] for row in rows if "total_loss" in row][-1] == 2
    assert any("wall_minutes" in row for row in rows)
    assert os.path.exists(tmp_path / "model_final.pth")


def test_d2_detector_class_count_checked(tmp_path, trees_dataset):
    r = subprocess.run([sys.executable, "train_net.py", "--config-file", D2_QUICKSTART[0], "MODEL.RETINANET.NUM_CLASSES",
                        "3", "OUTPUT_DIR", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0
    assert "Invalid config MODEL.RETINANET.NUM_CLASSES=3: dataset trees_train has 1 categories" in r.stderr


def test_backbone_multiplier_is_for_the_pretrained_trunk_not_the_fpn():
    from ks_detr import build_optimizer

    model = build_model(make_cfg(D2_QUICKSTART[0], "SOLVER.BACKBONE_MULTIPLIER", 0.1, "SOLVER.BASE_LR", 0.001))
    lr = {id(p): g["lr"] for g in build_optimizer(make_cfg(D2_QUICKSTART[0], "SOLVER.BACKBONE_MULTIPLIER", 0.1,
                                                           "SOLVER.BASE_LR", 0.001), model).param_groups
          for p in g["params"]}
    by_name = {n: lr[id(p)] for n, p in model.named_parameters() if p.requires_grad}
    trunk = {v for n, v in by_name.items() if n.startswith("backbone.bottom_up.")}
    fpn = {v for n, v in by_name.items() if n.startswith("backbone.") and not n.startswith("backbone.bottom_up.")}
    head = {v for n, v in by_name.items() if n.startswith("head.")}
    assert len(trunk) == 1 and trunk.pop() == pytest.approx(1e-4) and fpn == {0.001} and head == {0.001}

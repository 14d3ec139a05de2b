#!/usr/bin/env python
"""Convert torchvision's ImageNet ResNet into the detectron2 pickle that ``MODEL.WEIGHTS`` loads.

    python tools/convert_torchvision_resnet.py                    # ResNet-101 -> weights/R-101.pkl
    python tools/convert_torchvision_resnet.py --arch resnet50    # ResNet-50  -> weights/R-50.pkl
    python tools/convert_torchvision_resnet.py --input resnet101-63fe2227.pth --output weights/R-101.pkl

Without ``--input`` torchvision downloads its ``IMAGENET1K_V1`` weights (into the torch hub cache); where there
is no internet, fetch that file elsewhere (the URL is in the error) and pass it with ``--input``. Run it from the
repository root: the R101 configs read ``weights/R-101.pkl`` relative to where ``train_net.py`` runs.

The pickle is what detectron2's ``tools/convert-torchvision-to-d2.py`` writes: ``{"model": {name: array},
"__author__": "torchvision", "matching_heuristics": True}`` with conv1 -> stem.conv1, bn1 -> stem.conv1.norm,
layerN -> res{N+1}, bnK -> convK.norm, downsample.0 / downsample.1 -> shortcut / shortcut.norm; the classifier
(fc) and the BatchNorm counters (num_batches_tracked) are left out. The model loading it must be built like
torchvision's ResNet, as configs/Base-*.yaml do: ``MODEL.RESNETS.STRIDE_IN_1X1 False`` (stride in the 3x3 conv)
and RGB input normalised with torchvision's ImageNet mean/std.
"""
import argparse
import os
import pickle
import re
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ks_detr.errors import CheckpointError, report_user_errors  # noqa: E402

DEPTHS = {"resnet50": 50, "resnet101": 101}


def detectron2_name(name):
    """torchvision ResNet state-dict key -> detectron2 ResNet backbone key."""
    name = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", name)
    if not name.startswith("res"):
        name = "stem." + name
    name = re.sub(r"\bbn(\d)\b", r"conv\1.norm", name)
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def imagenet_state_dict(arch):
    """torchvision's ImageNet (IMAGENET1K_V1) weights of ``arch``, downloaded or from the torch hub cache."""
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True)
    except OSError as e:
        raise CheckpointError(f"cannot download {weights.url} ({e}): download it where there is internet and "
                              f"pass it with --input FILE") from e


def load_state_dict(path, arch):
    """A torchvision ``arch`` state dict from ``path``; a :class:`CheckpointError` if it is not one."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, not a torch file: all are the user's file
        first_sentence = (str(e).strip().splitlines() or [""])[0].split(". ")[0]  # torch's are paragraphs
        raise CheckpointError(f"cannot read --input {path} as a torch.save() file of tensors "
                              f"({type(e).__name__}: {first_sentence})") from e
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"--input {path} holds no state dict (a dict of tensors, as torch.save("
                              f"model.state_dict()) writes)")
    with torch.device("meta"):  # shapes only, no memory, no init cost
        expected = {k: v.shape for k, v in torchvision.models.get_model(arch).state_dict().items()}
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state_dict.keys() if state_dict[k].shape != expected[k])
    if missing or unexpected or wrong:
        raise CheckpointError(f"--input {path} is not a torchvision {arch} state dict: {len(missing)} missing keys "
                              f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} with "
                              f"another shape {wrong[:3]}; pass the --arch it was saved from")
    return state_dict


def convert(state_dict):
    """torchvision ResNet state dict -> detectron2 pickle content (see the module docstring)."""
    model = {detectron2_name(k): v.detach().cpu().numpy() for k, v in state_dict.items()
             if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    return {"model": model, "__author__": "torchvision", "matching_heuristics": True}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(DEPTHS), default="resnet101")
    parser.add_argument("--input", help="torchvision ResNet state dict (.pth); default: torchvision's download")
    parser.add_argument("--output", help="pickle to write (folder created); default: weights/R-<depth>.pkl")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an input error")
    args = parser.parse_args(argv)
    output = args.output or os.path.join("weights", f"R-{DEPTHS[args.arch]}.pkl")
    with report_user_errors(args.debug):
        state_dict = load_state_dict(args.input, args.arch) if args.input else imagenet_state_dict(args.arch)
        result = convert(state_dict)
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output, "wb") as f:
        pickle.dump(result, f)
    print(f"wrote {len(result['model'])} tensors of torchvision's {args.arch} to {output} "
          f"(MODEL.WEIGHTS {output}, MODEL.RESNETS.DEPTH {DEPTHS[args.arch]}, STRIDE_IN_1X1 False)")


if __name__ == "__main__":
    main()

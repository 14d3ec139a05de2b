"""tools/visualize_ks.py: the PNGs it writes, the recorded mask and attention against references
computed here, and recording leaves the model's outputs unchanged."""
import importlib.util
import json
import math
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from ks_detr import load_config
from ks_detr.data.custom import register_checked_coco

_spec = importlib.util.spec_from_file_location("visualize_ks", os.path.join(REPO, "tools", "visualize_ks.py"))
vis = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vis)

KS_CONDITIONAL = os.path.join(REPO, "configs", "ks_conditional_detr_r50.yaml")
KS_DEFORMABLE = os.path.join(REPO, "configs", "ks_deformable_detr_r50.yaml")
# Tiny random model: MobileNet-V2 (stride 32 -> a 4 x 4 token grid on the 128 x 128 image), width 32,
# 4 heads, 2 encoder layers (KS layer 1); dropout stays on in the config to show it is switched off.
TINY = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.DETR.NUM_CLASSES", "1",
        "MODEL.BACKBONE.NAME", "build_mobilenet_v2_backbone", "MODEL.MOBILENET_V2.PRETRAINED", "False",
        "MODEL.MOBILENET_V2.OUT_FEATURES", '["res3", "res4", "res5"]',
        "MODEL.DETR.HIDDEN_DIM", "32", "MODEL.DETR.NHEADS", "4", "MODEL.DETR.ENC_LAYERS", "2",
        "MODEL.DETR.DEC_LAYERS", "2", "MODEL.DETR.DIM_FEEDFORWARD", "64", "MODEL.DETR.NUM_QUERIES", "10",
        "MODEL.DETR.DROPOUT", "0.1", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128"]
# Hand-drawn boxes (x, y, w, h): a 50 x 50 box in the middle and a 28 x 30 one in the top-right corner.
BOXES = [[40, 40, 50, 50], [100, 0, 28, 30]]
# Bilinear, align_corners=True: token (i, j) samples canvas pixel (42.33 i, 42.33 j); box 1 covers
# pixels 40..89 (tokens 1, 2 in both axes), box 2 covers x 100..127, y 0..29 (token (0, 3)).
EXPECTED_MASK = [[0, 0, 0, 1], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]


def write_toy_dataset(folder):
    """A 128 x 128 random image with BOXES, as a COCO json; returns (json path, image dir)."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(folder / "toy.png")
    coco = {"images": [{"id": 1, "file_name": "toy.png", "width": 128, "height": 128}],
            "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": b[2] * b[3],
                             "iscrowd": 0} for i, b in enumerate(BOXES)],
            "categories": [{"id": 1, "name": "box"}]}
    (folder / "toy.json").write_text(json.dumps(coco))
    return str(folder / "toy.json"), str(folder)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Name of a registered one-image dataset with BOXES."""
    folder = tmp_path_factory.mktemp("toy")
    register_checked_coco("toy_vis_ks", *write_toy_dataset(folder))
    return "toy_vis_ks"


def png_size(path):
    with Image.open(path) as im:
        return im.size


def test_main_writes_the_promised_pngs(tmp_path):
    json_file, image_dir = write_toy_dataset(tmp_path)
    out = tmp_path / "out"
    paths = vis.main(["--config-file", KS_CONDITIONAL, "--register-coco", "toy_vis_ks_main", json_file, image_dir,
                      "--dataset", "toy_vis_ks_main", "--output", str(out), "--per-head", *TINY,
                      "MODEL.MOBILENET_V2.OUT_FEATURES", '["res5"]'])
    names = ["toy_fgmask.png", "toy_layer1_token0.png", "toy_layer1_token0_heads.png",
             "toy_layer1_token1.png", "toy_layer1_token1_heads.png"]
    assert [os.path.basename(p) for p in paths] == names
    assert sorted(os.listdir(out)) == sorted(names)
    row = vis.HEADER + vis.PANEL + vis.TITLE  # square image: panels are PANEL x PANEL
    assert png_size(out / "toy_fgmask.png") == (vis.PANEL, row)  # one feature level
    assert png_size(out / "toy_layer1_token0.png") == (3 * vis.PANEL, row)  # student + 2 teachers
    assert png_size(out / "toy_layer1_token1_heads.png") == (4 * vis.PANEL, vis.HEADER + 3 * (vis.PANEL + vis.TITLE))


def test_recorded_mask_and_attention_match_references(toy):
    cfg = load_config(KS_CONDITIONAL, [*TINY, "MODEL.MOBILENET_V2.OUT_FEATURES", '["res5"]'])
    torch.manual_seed(0)
    model = vis.build_ks_model(cfg, KS_CONDITIONAL)
    inputs, rgb, boxes = vis.load_example(cfg, vis.pick_record(toy, 0))
    flags = [m.training for m in model.modules()]

    seen = {}
    first = model.encoder.layers[0]  # its output is the KS layer's input x
    hooks = [first.register_forward_pre_hook(lambda m, args: seen.update(pos=args[1], pad=args[2])),
             first.register_forward_hook(lambda m, args, out: seen.update(x=out))]
    plain = vis.ks_forward(model, [inputs])
    with vis.record_ks(model, 1) as rec:
        recorded = vis.ks_forward(model, [inputs])
    for h in hooks:
        h.remove()

    # recording (and dropout, which must be off) leaves every output unchanged, flags restored
    assert set(plain) == set(recorded) and "loss_class_ks_a" in plain
    assert all(torch.equal(plain[k], recorded[k]) for k in plain)
    assert [m.training for m in model.modules()] == flags
    assert model.encoder.layers[1].self_attn.observer is None and model.ks._record is None  # hook removed

    assert rec["padded_size"] == (128, 128) and rec["token_shapes"] == [(4, 4)]
    assert rec["fg"].tolist() == [sum(EXPECTED_MASK, [])]
    assert not rec["key_padding_mask"].any()

    # dense weights: per head softmax(q k^T / sqrt(d)), here with explicit exp / sum
    attn = model.encoder.layers[1].self_attn
    x, pos, fg = seen["x"][0], seen["pos"][0], rec["fg"][0]
    lin = model.ks_smlp.linear
    x_tilde = x + fg[:, None] * (torch.relu(x @ lin.weight.T + lin.bias) - x)
    C, H = x.shape[-1], attn.num_heads
    d = C // H
    for kind, tokens, W, b in (("s", x, attn.in_proj_weight, attn.in_proj_bias),
                               ("a", x_tilde, attn.teacher_in_proj_weight, attn.teacher_in_proj_bias)):
        q = (tokens + pos) @ W[:C].T + b[:C]
        k = (tokens + pos) @ W[C:2 * C].T + b[C:2 * C]
        got = rec["attn"][kind]
        assert got.shape == (1, H, 16, 16)
        torch.testing.assert_close(got.sum(-1), torch.ones(1, H, 16))
        for h in range(H):
            e = torch.exp(q[:, h * d:(h + 1) * d] @ k[:, h * d:(h + 1) * d].T / math.sqrt(d))
            torch.testing.assert_close(got[0, h], e / e.sum(1, keepdim=True), rtol=1e-5, atol=1e-6)
    assert torch.equal(rec["attn"]["v"], rec["attn"]["s"])  # #3 uses the student's weights
    assert not torch.allclose(rec["attn"]["a"], rec["attn"]["s"])

    # default tokens: the big box's centre, and the background cell farthest from both boxes (0, 0)
    geo = vis.Geometry(rgb.shape[:2], inputs["image"].shape[-2:], rec["padded_size"], rec["token_shapes"])
    assert vis.default_tokens(geo, fg.numpy(), boxes, 0) == [(65.0, 65.0), (16.0, 16.0)]
    assert [geo.token(65, 65, 0), geo.token(16, 16, 0), geo.token(127.9, 0, 0)] == [10, 0, 3]


def test_deformable_sampling_points(toy, tmp_path):
    paths = vis.main(["--config-file", KS_DEFORMABLE, "--dataset", toy, "--output", str(tmp_path),
                      "--tokens", "65,65", "--query-level", "1", *TINY])
    row = vis.HEADER + vis.PANEL + vis.TITLE
    assert [png_size(p) for p in paths] == [(4 * vis.PANEL, row), (3 * vis.PANEL, row)]  # 4 levels; 3 streams

    cfg = load_config(KS_DEFORMABLE, TINY)
    model = vis.build_ks_model(cfg, KS_DEFORMABLE)
    inputs, _, _ = vis.load_example(cfg, vis.pick_record(toy, 0))
    with vis.record_ks(model, -1) as rec:
        vis.ks_forward(model, [inputs])
    assert rec["token_shapes"] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    N = 256 + 64 + 16 + 4
    assert rec["fg"].tolist()[0][256 + 64:256 + 64 + 16] == sum(EXPECTED_MASK, [])  # the stride-32 level
    w, loc = rec["weights"], rec["locations"]
    assert w["s"].shape == (1, N, 4, 4, 4) and loc["s"].shape == (1, N, 4, 4, 4, 2)
    torch.testing.assert_close(w["a"].sum((-1, -2)), torch.ones(1, N, 4))
    assert torch.equal(w["v"], w["s"]) and torch.equal(loc["a"], loc["s"])  # teachers reuse the locations


def test_errors_name_the_bad_value(toy, tmp_path, capsys):
    """Each mistake: exit status 2 and one last line naming the value (baseline configs: the KS sibling)."""
    run = ["--dataset", toy, "--output", str(tmp_path)]
    tiny = [*TINY, "MODEL.MOBILENET_V2.OUT_FEATURES", '["res5"]']  # only what the single-scale configs read

    def fails(argv, message):
        with pytest.raises(SystemExit) as e:
            vis.main(argv)
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and last.startswith("error: ") and re.search(message, last), last
        return last

    fails(["--config-file", KS_CONDITIONAL, "--tokens", "500,10", *run, *tiny],
          r"token \(500, 10\) is outside the image \(width 128, height 128\)")
    fails(["--config-file", KS_CONDITIONAL, *run, "--layer", "0", *tiny], "--layer 0 is not a KS encoder layer")
    baseline = os.path.join(REPO, "configs", "conditional_detr_r50.yaml")
    last = fails(["--config-file", baseline, *run, *tiny], "conditional_detr_r50.yaml is not a KS config")
    assert last.endswith(f"use its KS version {os.path.join(REPO, 'configs', 'ks_conditional_detr_r50.yaml')}")
    quickstart = os.path.join(REPO, "configs", "quickstart", "trees.yaml")
    two_levels = [*TINY, "MODEL.MOBILENET_V2.OUT_FEATURES", '["res4", "res5"]']
    last = fails(["--config-file", quickstart, *run, *two_levels], "trees.yaml is not a KS config")
    assert last.endswith(f"use its KS version {os.path.join(REPO, 'configs', 'quickstart', 'ks_trees.yaml')}")
    fails(["--config-file", KS_CONDITIONAL, *run, "--index", "7", *tiny], "--index 7 out of range")

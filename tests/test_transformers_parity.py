"""Hugging Face transformers' Conditional / DAB / Deformable DETR (single stage, with_box_refine, two_stage) against
ours (tools/convert_checkpoint.py --source transformers, tools/export_transformers.py).

transformers (pinned in requirements.txt) builds tiny random models from its own config classes (transformers'
ResNet backbone, nothing downloaded); ours loads the converted weights with the keys the converter derives:
raw logits and boxes agree to 1e-5 on a padded batch, post-processed detections are equal on a real photo
(datasets/trees), and losses and gradients agree where transformers computes our loss (no auxiliary loss:
transformers' Conditional DETR feeds normed states forward when its auxiliary loss is on). Our students go out as
transformers folders that ``AutoModelForObjectDetection.from_pretrained`` loads with the same detections, and come
back bit-identical. Refused forms are named. Measured (torch 2.14.1, CPU): logits <= 7.4e-6, boxes <= 1.7e-6
(Deformable with box refinement 6.8e-6 / 2.1e-7, two-stage 7.4e-6 / 2.1e-7).
transformers has no loss on two-stage proposals: there the decoder terms are compared (ours add ``*_enc`` terms).
"""
import glob
import logging
import math
import os
import shlex
import shutil
import sys

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

from conftest import REPO, make_cfg, tame_random_backbone, toy_inputs

transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(REPO, "tools"))
import convert_checkpoint  # noqa: E402
import export_transformers  # noqa: E402

from ks_detr import transformers_layout as hf  # noqa: E402
from ks_detr.checkpoint import student_state_dict  # noqa: E402

TOL = 1e-5
# form: (transformers prefix, our config, transformers config options)
FORMS = {"conditional": ("ConditionalDetr", "configs/conditional_detr_r50.yaml", {}),
         "dab": ("DabDetr", "configs/dab_detr_r50.yaml", {}),
         "deformable": ("DeformableDetr", "configs/deformable_detr_r50.yaml", {}),
         "deformable_refine": ("DeformableDetr", "configs/deformable_detr_refine_r50.yaml", dict(with_box_refine=True)),
         "deformable_two_stage": ("DeformableDetr", "configs/deformable_detr_two_stage_r50.yaml",
                                  dict(with_box_refine=True, two_stage=True, two_stage_num_proposals=12))}
REFINING = ("deformable_refine", "deformable_two_stage")
# a ResNet-50-shaped backbone with few channels (transformers' ResNet; ours: detectron2's with these keys)
TINY_OURS = ["MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
             "MODEL.RESNETS.WIDTH_PER_GROUP", "8", "MODEL.DETR.HIDDEN_DIM", "32", "MODEL.DETR.NHEADS", "4",
             "MODEL.DETR.ENC_LAYERS", "2", "MODEL.DETR.DEC_LAYERS", "2", "MODEL.DETR.DIM_FEEDFORWARD", "64",
             "MODEL.DETR.NUM_QUERIES", "12", "MODEL.DETR.NUM_CLASSES", "5", "MODEL.DETR.NUM_TOPK_TEST", "100"]


def hf_config(form, **extra):
    prefix, _, options = FORMS[form]
    out = ["stage2", "stage3", "stage4"] if prefix == "DeformableDetr" else ["stage4"]
    backbone = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[3, 4, 6, 3],
                                         layer_type="bottleneck", out_features=out)
    width = {"hidden_size": 32} if form == "dab" else {"d_model": 32}
    kw = dict(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False, encoder_layers=2,
              decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
              decoder_ffn_dim=64, num_queries=12, num_labels=5, **width, **options)
    kw.update(extra)
    return getattr(transformers, f"{prefix}Config")(**kw)


def random_hf_model(form, seed=0, **extra):
    """A transformers model with random weights, batch-norm statistics and heads spread out (distinct scores). Box
    heads that refine the next layer's references spread less (std 0.1): at 0.3 the boxes saturate at the sigmoid's
    ends, where inverse_sigmoid amplifies the float32 noise of the two backbones (already 7e-5 apart) to 1e-4."""
    torch.manual_seed(seed)
    model = getattr(transformers, f"{FORMS[form][0]}ForObjectDetection")(hf_config(form, **extra)).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "running_var") and hasattr(module, "running_mean"):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.0)
                module.bias.uniform_(-0.1, 0.1)
        for name, p in model.named_parameters():
            if any(s in name for s in ("bbox", "class", "reference", "refpoint")):
                p.normal_(0, 0.1 if form in REFINING and "bbox" in name else 0.3)
    return model


def convert(folder, config, caplog, *extra):
    """Run the converter CLI on a save_pretrained folder; returns (state dict, the keys it printed)."""
    out = os.path.join(folder, "ours.pth")
    with caplog.at_level(logging.INFO, logger="ks_detr.convert_checkpoint"):
        caplog.clear()
        convert_checkpoint.main(["--config-file", os.path.join(REPO, config), folder, out, *extra])
    lines = [r.getMessage() for r in caplog.records if "this conversion used" in r.getMessage()]
    keys = shlex.split(lines[0].split("too): ", 1)[1]) if lines else []
    return torch.load(out, weights_only=True)["model"], keys


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{form: (transformers model, our model, keys the converter set)}."""
    torch.set_num_threads(1)
    caplog = _ModuleCaplog()
    out = {}
    for form, (_, config, _) in FORMS.items():
        model = random_hf_model(form)
        folder = tmp_path_factory.mktemp(form)
        model.save_pretrained(folder)
        sd, keys = convert(str(folder), config, caplog)
        shutil.rmtree(folder)
        ours = build_model(make_cfg(config, *keys)).eval()
        ours.load_state_dict(sd, strict=True)
        out[form] = (model, ours, keys)
    return out


class _ModuleCaplog:
    """caplog for a module-scoped fixture: collects ks_detr.convert_checkpoint records."""

    def __init__(self):
        self.records = []

    def clear(self):
        self.records = []

    def at_level(self, level, logger):
        import contextlib

        parent = self

        class Collect(logging.Handler):
            def emit(self, record):
                parent.records.append(record)

        @contextlib.contextmanager
        def ctx():
            log = logging.getLogger(logger)
            handler, old = Collect(level), log.level
            log.addHandler(handler)
            log.setLevel(level)
            try:
                yield
            finally:
                log.removeHandler(handler)
                log.setLevel(old)
        return ctx()


def padded_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 160, 224, generator=g)
    valid = torch.ones(2, 160, 224, dtype=torch.long)
    valid[1, 130:] = 0
    valid[1, :, 190:] = 0
    return x, valid


@pytest.mark.parametrize("form", list(FORMS))
def test_logits_and_boxes_match(converted, form):
    model, ours, _ = converted[form]
    x, valid = padded_batch()
    with torch.no_grad():
        theirs = model(pixel_values=x, pixel_mask=valid)
        logits, boxes = ours.predict(x, valid == 0)
    assert torch.isfinite(theirs.logits).all()  # (two-stage: transformers selected no proposal off the image)
    dl, db = (theirs.logits - logits).abs().max().item(), (theirs.pred_boxes - boxes).abs().max().item()
    print(f"{form}: max |logit diff| {dl:.2e}, max |box diff| {db:.2e}")
    assert dl <= TOL and db <= TOL


def test_converter_keys(converted):
    """The keys printed are the sizes of the tiny models (those differing from the R-50 configs) and
    transformers' top 100; DAB's temperature 20, Deformable's -0.5 offset and the refine / two-stage switches are
    already in our configs."""
    for form, (_, _, keys) in converted.items():
        d = dict(zip(keys[::2], keys[1::2]))
        assert d["MODEL.DETR.HIDDEN_DIM"] == "32" and d["MODEL.DETR.NHEADS"] == "4", (form, d)
        assert d["MODEL.DETR.NUM_QUERIES"] == "12" and d["MODEL.DETR.NUM_TOPK_TEST"] == "100", (form, d)
        assert d["MODEL.RESNETS.WIDTH_PER_GROUP"] == "8", (form, d)
        assert "MODEL.DETR.BOX_REFINE" not in d and "MODEL.DETR.TWO_STAGE" not in d, (form, d)


@pytest.mark.parametrize("form", REFINING)
def test_deformable_forms_detected(converted, form, tmp_path):
    """From config.json, and from the keys alone (a bare model.safetensors): the converter sets BOX_REFINE and
    TWO_STAGE on the single-stage config; two-stage queries are config.json's two_stage_num_proposals (transformers'
    default 300 without it). transformers stores the tied per-layer class heads of a one-stage with_box_refine once
    (class_embed.0); ours gets a copy per layer."""
    model = converted[form][0]
    model.save_pretrained(str(tmp_path))
    sd, config, _ = hf.read_transformers(str(tmp_path))
    class_heads = [k for k in sd if "class_embed." in k and k.endswith("weight")]  # as transformers writes them
    assert len(class_heads) == (3 if form == "deformable_two_stage" else 1), class_heads
    plain = os.path.join(REPO, FORMS["deformable"][1])
    for hf_cfg, queries in ((config, 12), (None, 300)):
        d = dict(zip(*[iter(convert_checkpoint.transformers_keys(sd, plain, [], hf_cfg))] * 2))
        assert d["MODEL.DETR.BOX_REFINE"] is True, d
        assert d.get("MODEL.DETR.NUM_QUERIES", 300) == (12 if form == "deformable_refine" else queries), d
        assert d.get("MODEL.DETR.TWO_STAGE", False) is (form == "deformable_two_stage"), d
    _, names = hf.transformers_names(sd, config)
    assert torch.equal(names["class_embed.1.weight"][0], model.class_embed[1].weight)
    assert torch.equal(names["bbox_embed.1.layers.2.bias"][0], model.model.decoder.bbox_embed[1].layers[2].bias)
    if form == "deformable_two_stage":
        assert torch.equal(names["query_selection.enc_class_embed.weight"][0], model.class_embed[2].weight)
        assert torch.equal(names["pos_trans.weight"][0], model.model.pos_trans.weight)
        return
    # the original code's (and the hub's) layout: every layer's class head stored, distinct; transformers then
    # leaves them untied, and so do we
    from safetensors.torch import save_file
    full = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    full["class_embed.1.weight"] = torch.randn_like(full["class_embed.1.weight"])
    save_file(full, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = transformers.DeformableDetrForObjectDetection.from_pretrained(str(tmp_path))
    _, names = hf.transformers_names(*hf.read_transformers(str(tmp_path))[:2])
    for i in range(2):
        assert torch.equal(names[f"class_embed.{i}.weight"][0], loaded.class_embed[i].weight)
    assert not torch.equal(loaded.class_embed[0].weight, loaded.class_embed[1].weight)


def photo():
    root = os.environ.get("KS_DETR_DATASETS", os.path.join(REPO, "datasets"))
    return np.asarray(Image.open(sorted(glob.glob(os.path.join(root, "trees", "images", "*.jpg")))[0]).convert("RGB"))


def detections_ours(ours, image):
    h, w = image.shape[:2]
    with torch.no_grad():
        inst = ours([{"image": torch.from_numpy(image.copy()).permute(2, 0, 1).float(), "height": h,
                      "width": w}])[0]["instances"]
    return inst.scores, inst.pred_classes, inst.pred_boxes.tensor


def detections_hf(model, processor, image):
    h, w = image.shape[:2]
    inputs = processor(images=image, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    r = processor.post_process_object_detection(out, threshold=0.0, target_sizes=[(h, w)], top_k=100)[0]
    boxes = r["boxes"].clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)  # detectron2's detector_postprocess clips boxes to the image
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return r["scores"], r["labels"], boxes


def assert_same_detections(a, b):
    """The same (score, class, box) detections, best first; detections whose scores tie within 1e-5 may come in
    either order (they are matched one to one)."""
    (s1, l1, b1), (s2, l2, b2) = a, b
    assert len(s1) == len(s2) == 60  # top 100 of 12 queries x 5 classes
    assert (s1 - s2).abs().max() <= TOL
    free = list(range(len(s2)))
    for i in range(len(s1)):
        j = next((j for j in free if l2[j] == l1[i] and abs(s2[j] - s1[i]) <= TOL
                  and (b2[j] - b1[i]).abs().max() <= TOL * 400), None)  # pixels of the 400 x 400 photo
        assert j is not None, f"detection {i} ({s1[i]:.6f}, class {l1[i]}, {b1[i].tolist()}) has no counterpart"
        free.remove(j)


@pytest.mark.parametrize("form", list(FORMS))
def test_detections_on_a_photo(converted, form, trees_dataset):
    model, ours, _ = converted[form]
    image = photo()
    processor = getattr(transformers, "DeformableDetrImageProcessor" if form.startswith("deformable") else
                        "ConditionalDetrImageProcessor")(do_resize=False, do_pad=False)
    assert_same_detections(detections_hf(model, processor, image), detections_ours(ours, image))


@pytest.mark.parametrize("form", list(FORMS))
def test_loss_and_gradients_match(form, tmp_path, caplog):
    """Without auxiliary loss and dropout: transformers' focal/L1/GIoU loss (its class loss weighs 1) equals ours
    with the converter's loss keys; so do the gradients of every tensor (q/k/v parts of our packed ones; a tensor
    transformers ties across layers, the sum of ours). Two-stage: transformers has no loss on the proposals, so
    ours without the ``*_enc`` terms is compared (and the proposal heads get no gradient on either side)."""
    torch.set_num_threads(1)
    model = random_hf_model(form, seed=2, dropout=0.0, class_cost=2)
    model.save_pretrained(str(tmp_path))
    sd, keys = convert(str(tmp_path), FORMS[form][1], caplog)
    ours = build_model(make_cfg(FORMS[form][1], *keys, "MODEL.DETR.AUX_LOSS", "False", "MODEL.DETR.CLASS_WEIGHT", "1.0",
                                "MODEL.DETR.COST_CLASS", "2.0", "MODEL.DETR.DROPOUT", "0.0"))
    ours.load_state_dict(sd, strict=True)
    model.train()
    ours.train()
    x, valid = padded_batch(seed=3)
    x = x * valid[:, None]  # zero padding, as detectron2's ImageList pads our images
    boxes = torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.4]])  # cxcywh, normalised by the image size
    sizes = [(160, 224), (130, 190)]
    labels = [{"class_labels": torch.tensor([1, 3]), "boxes": boxes}, {"class_labels": torch.tensor([2]), "boxes": boxes[:1]}]
    out = model(pixel_values=x, pixel_mask=valid, labels=labels)
    out.loss.backward()

    from detectron2.structures import Boxes, Instances
    mean, std = ours.pixel_mean, ours.pixel_std
    inputs = []
    for i, (h, w) in enumerate(sizes):
        inst = Instances((h, w))
        cxcywh = labels[i]["boxes"] * torch.tensor([w, h, w, h])
        inst.gt_boxes = Boxes(torch.cat([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1))
        inst.gt_classes = labels[i]["class_labels"]
        inputs.append({"image": x[i, :, :h, :w] * std + mean, "instances": inst})
    losses = ours(inputs)
    enc = sorted(k for k in losses if k.endswith("_enc"))
    assert enc == (["loss_bbox_enc", "loss_class_enc", "loss_giou_enc"] if form == "deformable_two_stage" else [])
    total = sum(v for k, v in losses.items() if k not in enc)
    total.backward()
    print(f"{form}: loss transformers {out.loss.item():.6f} ours {total.item():.6f}")
    assert abs(out.loss.item() - total.item()) <= 1e-5 * max(1.0, abs(total.item()))
    worst, compared = 0.0, 0
    grads = {n: q.grad for n, q in ours.named_parameters() if q.grad is not None}
    family = hf.transformers_family(model.state_dict())
    heads = hf.head_layers(model.state_dict(), family, model.config.to_dict())
    tied = {}  # transformers tensor -> our names of all its (tied) keys
    for key, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(p, (key, set()))[1].add(hf.our_name(key, family, heads))
    for p, (key, names) in tied.items():
        mine = [hf._our_tensor(n, grads) for n in sorted(names) if n.split("#")[0] in grads]
        if p.grad is None or not mine:  # frozen backbone parts (which differ); two-stage: the proposal heads
            assert key.startswith("model.backbone.") or (p.grad is None and not mine), key
            continue
        compared += 1
        mine = sum(mine)
        scale = max(1.0, p.grad.abs().max().item())
        worst = max(worst, (p.grad - mine).abs().max().item() / scale)
    print(f"{form}: max relative gradient difference {worst:.2e} over {compared} tensors")
    assert worst <= 1e-4


@pytest.mark.parametrize("form", list(FORMS))
def test_export_loads_in_transformers_and_round_trips(form, tmp_path, caplog, trees_dataset):
    config = FORMS[form][1]
    torch.set_num_threads(1)
    torch.manual_seed(4)
    ours = tame_random_backbone(build_model(make_cfg(config, *TINY_OURS))).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if any(s in name for s in ("bbox_embed", "class_embed", "reference_points", "refpoint")):
                p.normal_(0, 0.1 if form in REFINING and "bbox" in name else 0.3)
    weights = str(tmp_path / "model_final.pth")
    torch.save({"model": ours.state_dict()}, weights)
    folder = str(tmp_path / "hf")
    export_transformers.main(["--config-file", os.path.join(REPO, config), weights, folder, *TINY_OURS])
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(os.listdir(folder))
    model = transformers.AutoModelForObjectDetection.from_pretrained(folder).eval()
    if form in REFINING:  # config.json carries the form; every layer keeps its own heads
        assert model.config.with_box_refine and model.config.two_stage == (form == "deformable_two_stage")
        assert model.class_embed[0].weight is not model.class_embed[1].weight
    # transformers trains with our dropout: one rate for attention weights, FFN activations and residual branches
    c = model.config
    assert c.dropout == c.attention_dropout == c.activation_dropout == make_cfg(config, *TINY_OURS).MODEL.DETR.DROPOUT
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    assert processor.size == {"shortest_edge": 800, "longest_edge": 1333}  # our INPUT.MIN/MAX_SIZE_TEST
    processor.do_resize = False  # (the resize itself: detectron2's and transformers' interpolations differ)
    image = photo()
    assert_same_detections(detections_hf(model, processor, image), detections_ours(ours, image))

    back, _ = convert(folder, config, caplog, *TINY_OURS)
    assert "dropout" not in caplog.text  # the rates agree: no note
    original = ours.state_dict()
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_dropout_rates_that_one_rate_cannot_hold_are_noted():
    """transformers' defaults (dropout 0.1, attention and activation dropout 0) have no ks-detr equivalent: the
    converter says what a fine-tune will do instead."""
    notes = hf.check_transformers_config({"dropout": 0.1, "attention_dropout": 0.0, "activation_dropout": 0.0})
    assert len(notes) == 1 and "dropout=0.1, attention_dropout=0.0, activation_dropout=0.0" in notes[0]
    assert "MODEL.DETR.DROPOUT (set to 0.1)" in notes[0]
    assert not hf.check_transformers_config({"dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1})


def test_refused_forms(converted, tmp_path, caplog):
    """A config.json claiming two_stage without with_box_refine (transformers refuses to build it); DAB patterns."""
    model = converted["deformable_two_stage"][0]
    model.save_pretrained(str(tmp_path))
    config = hf.read_side_files(str(tmp_path))[0]
    config["with_box_refine"] = False
    with pytest.raises(hf.TransformersLayoutError, match="two_stage without with_box_refine"):
        hf.transformers_names({k: v for k, v in model.state_dict().items() if "decoder.bbox_embed" not in k}, config)
    model = transformers.DabDetrForObjectDetection(hf_config("dab", num_patterns=3))
    with pytest.raises(hf.TransformersLayoutError, match="num_patterns"):
        hf.transformers_names(model.state_dict(), model.config.to_dict())


@pytest.mark.parametrize("form", REFINING)
def test_ks_forms_train_and_evaluate_as_the_student(form):
    """KS (triple attention in the last encoder layer) on the box-refine and two-stage forms: one train step gives
    every parameter a gradient (two-stage: the teachers select their own proposals, each stream's get a loss), and
    in eval the KS model detects exactly what the baseline with its student weights detects."""
    torch.set_num_threads(1)
    torch.manual_seed(5)
    config = FORMS[form][1]
    opts = (*TINY_OURS, "MODEL.DETR.NUM_CLASSES", "6")  # toy_inputs' classes 1 and 5
    ks_model = build_model(make_cfg(config.replace("configs/", "configs/ks_"), *opts)).train()
    # the original initialisation: the -2 box-size bias on the first layer's head only, none with two-stage
    sizes = [head.layers[-1].bias[2:].tolist() for head in ks_model.bbox_embed]
    assert sizes == ([[0.0, 0.0]] * 2 if form == "deformable_two_stage" else [[-2.0, -2.0], [0.0, 0.0]])
    prior = -math.log(0.99 / 0.01)  # focal prior of every class head
    heads = [*ks_model.class_embed] + ([ks_model.query_selection.enc_class_embed] if form != REFINING[0] else [])
    assert all(torch.allclose(h.bias, torch.full_like(h.bias, prior)) for h in heads)
    from detectron2.utils.events import EventStorage
    with EventStorage():
        losses = ks_model(toy_inputs(((160, 200), (128, 176))))
    assert ("loss_class_enc_ks_a" in losses) == (form == "deformable_two_stage")
    sum(losses.values()).backward()
    assert not [n for n, p in ks_model.named_parameters() if p.requires_grad and p.grad is None]
    with torch.no_grad():
        for p in ks_model.parameters():
            if p.grad is not None:
                p -= 1e-3 * p.grad.sign()  # off the initialisation
    base = build_model(make_cfg(config, *opts)).eval()
    base.load_state_dict(student_state_dict(ks_model.state_dict()), strict=True)
    ks_model.eval()
    images = [{"image": x["image"]} for x in toy_inputs(((176, 160), (144, 208)))]
    with torch.no_grad():
        for a, b in zip(ks_model(images), base(images)):
            a, b = a["instances"], b["instances"]
            assert len(a) == 72 and torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)
            assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)


@pytest.mark.parametrize("key, ours", [
    ("model.backbone.conv_encoder.model.conv1.weight", "backbone.stem.conv1.weight"),  # timm, as the hub files
    ("model.backbone.model.layer4.2.bn3.running_var", "backbone.res5.2.conv3.norm.running_var"),  # in memory
    ("model.backbone.conv_encoder.model._backbone.layer1.0.conv1.weight", "backbone.res2.0.conv1.weight"),  # DAB
    ("model.backbone.conv_encoder.model._backbone.layer2.0.downsample.1.weight", "backbone.res3.0.shortcut.norm.weight"),
])
def test_timm_backbone_names(key, ours):
    """timm's ResNet (the hub checkpoints' backbone; transformers 5 writes DAB-DETR's inside ``_backbone``) gets
    detectron2's names. The numbers were compared once with timm installed (timm 1.0.31, random ResNet-50, tiny
    transformer): logits within 1.3e-6 / 1.0e-6 / 3.1e-6 / 7.4e-6 of transformers' for Conditional / DAB /
    Deformable / two-stage Deformable."""
    for family in ("ConditionalDETR", "DABDETR", "DeformableDETR"):
        assert hf.our_name(key, family) == ours

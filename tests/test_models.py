"""Model-level behaviour: train steps, KS eval == baseline student, FLOPs, overfitting a real image."""
import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from fvcore.nn import FlopCountAnalysis

from conftest import REPO, family_config, make_cfg, tame_random_backbone, toy_inputs

pytestmark = pytest.mark.usefixtures("trees_dataset")  # real images (prepared if missing)

SMALL = ("MODEL.DETR.NUM_QUERIES", 50)  # keeps matching cheap; the architecture is unchanged
FAMILIES = ["conditional_detr", "dab_detr", "dn_detr", "deformable_detr", "dn_deformable_detr"]
CONFIGS = sorted(f"configs/{c}" for c in os.listdir(os.path.join(REPO, "configs"))
                 if c.endswith(".yaml") and not c.startswith("Base-"))


def schedule_variants(configs):
    """Configs whose MODEL equals an earlier config's up to the sine-position constants (a schedule variant, e.g.
    ``*_12ep`` of a 50-epoch config, DINO's ``*_24ep`` of its 12-epoch one): they build the same modules."""
    seen, variants = set(), set()
    for config in sorted(configs, key=lambda c: ("_12ep" in c or "_24ep" in c, "_24ep" in c, c)):
        model = make_cfg(config).MODEL
        model.DETR.POS_TEMPERATURE = model.DETR.POS_OFFSET = 0
        model = model.dump()
        if model in seen:
            variants.add(config)
        seen.add(model)
    return variants


VARIANTS = schedule_variants(CONFIGS)
# Deformable DETR's box-refine / two-stage forms: their tiny models train in test_every_parameter_trains.py and
# test_transformers_parity.py; the full-size step with -m slow
SLOW_FORMS = {c for c in CONFIGS if "_refine_" in c or "_two_stage_" in c}


@pytest.mark.parametrize("config", [pytest.param(c, marks=pytest.mark.slow) if c in VARIANTS | SLOW_FORMS else c
                                    for c in CONFIGS])
def test_one_train_step(config):
    """Every config (schedule variants, whose model another config builds, and Deformable DETR's box-refine /
    two-stage forms with ``-m slow``)."""
    torch.manual_seed(0)
    model = tame_random_backbone(build_model(make_cfg(config, *SMALL)))
    model.train()
    with EventStorage():
        losses = model(toy_inputs())
    name = os.path.basename(config)
    ks, dn = name.startswith("ks_"), name.replace("ks_", "", 1).startswith(("dn_", "dino_"))
    n_out = 6 + (2 if ks else 0)  # 6 student layers (+ last layer of 2 teachers)
    n_enc = (3 if ks else 1) if "dino_" in name or "two_stage" in name else 0  # proposals of every stream
    assert len(losses) == 3 * n_out * (2 if dn else 1) + 3 * n_enc  # (+ denoising losses on every output)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    if ks:
        assert {"loss_class_ks_a", "loss_bbox_ks_v"} <= set(losses)
        teacher = [n for n in grads if "teacher" in n or n.startswith("ks_smlp.")]
        assert len(teacher) >= 4 and all(n.startswith(("encoder.layers.5.", "ks_smlp.")) for n in teacher)
        for name in teacher:
            assert grads[name].abs().sum() > 0, name
    else:
        assert not any("teacher" in n or "ks_" in n for n in grads)
    if dn:
        assert {"loss_bbox_dn", "loss_giou_dn_0"} <= set(losses)
        assert ks == ({"loss_class_dn_ks_a", "loss_bbox_dn_ks_v"} <= set(losses))


@pytest.mark.parametrize("family", FAMILIES)
def test_ks_modes_and_teacher_layers(family):
    """The dual-attention ablations (share_v: teacher weights only, share_a: teacher values only)
    on every family, keeping the last two decoder layers of the teacher."""
    torch.manual_seed(0)
    for mode, kind in (("share_v", "a"), ("share_a", "v")):
        model = build_model(make_cfg(f"configs/ks_{family}_r50.yaml", *SMALL, "MODEL.KS.MODE", mode,
                                     "MODEL.KS.TEACHER_DECODER_LAYERS", 2))
        with EventStorage():
            losses = model(toy_inputs())
        teacher_keys = sorted(k for k in losses if "_ks_" in k)
        dn = ("", "_dn") if family.startswith("dn_") else ("",)
        assert teacher_keys == sorted(f"loss_{n}{d}_ks_{kind}{s}" for n in ("class", "bbox", "giou") for d in dn
                                      for s in ("", "_4"))
        assert all(torch.isfinite(v) for v in losses.values())


def eval_outputs(model, inputs):
    model.eval()
    with torch.no_grad():
        return [r["instances"] for r in model([{"image": x["image"]} for x in inputs])]


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f == "dn_deformable_detr" else f
                                    for f in FAMILIES + ["dn_deformable_detr two-stage", "dino"]])
def test_ks_eval_equals_baseline_with_converted_weights(tmp_path, family):
    """(DN-Deformable without two-stage with ``-m slow``: its two-stage form and DINO cover its decoder.)"""
    torch.manual_seed(0)
    family, _, variant = family.partition(" ")
    opts = SMALL + (("MODEL.DETR.TWO_STAGE", True) if variant == "two-stage" else ())
    ks_model = build_model(make_cfg(family_config(family, ks=True), *opts))
    with EventStorage():  # one update so that student and teacher weights are not at init
        sum(ks_model(toy_inputs()).values()).backward()
    with torch.no_grad():
        for p in ks_model.parameters():
            if p.grad is not None:
                p -= 1e-3 * p.grad.sign()
    ks_path, student_path = tmp_path / "ks.pth", tmp_path / "student.pth"
    torch.save({"model": ks_model.state_dict(), "iteration": 1}, ks_path)
    subprocess.run([sys.executable, os.path.join(REPO, "tools/ks_to_student.py"), str(ks_path), str(student_path)],
                   check=True)
    base = build_model(make_cfg(family_config(family), *opts))
    base.load_state_dict(torch.load(student_path, weights_only=True)["model"], strict=True)

    inputs = toy_inputs(sizes=((224, 200), (160, 240)))
    for a, b in zip(eval_outputs(ks_model, inputs), eval_outputs(base, inputs)):
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)
        assert len(a) == 300 and a.image_size == b.image_size  # NUM_TOPK_TEST

    class Wrap(torch.nn.Module):  # fvcore traces tensors in, tensors out
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, image):
            return self.m([{"image": image}])[0]["instances"].pred_boxes.tensor

    image = inputs[0]["image"]
    flops = []
    for m in (ks_model, base):
        fca = FlopCountAnalysis(Wrap(m).eval(), (image,))
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        flops.append(fca.total())
    assert flops[0] == flops[1] > 1e9


def test_converter_rejects_a_baseline_checkpoint(tmp_path):
    base = build_model(make_cfg("configs/conditional_detr_r50.yaml", *SMALL))
    torch.save({"model": base.state_dict()}, tmp_path / "base.pth")
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools/ks_to_student.py"), str(tmp_path / "base.pth"),
                        str(tmp_path / "out.pth")], capture_output=True, text=True)
    assert r.returncode != 0 and "no teacher parameters" in r.stderr
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.slow  # learning on real images is also checked by test_quickstart_model_learns_two_real_images
def test_overfit_one_real_image_lowers_the_loss():
    """30 AdamW steps on one trees tile (256 px): the total loss falls clearly."""
    from detectron2.data import DatasetCatalog

    from ks_detr import DetrDatasetMapper, build_optimizer

    torch.manual_seed(0)
    cfg = make_cfg("configs/ks_conditional_detr_r50.yaml", "MODEL.DETR.NUM_CLASSES", 1, *SMALL,
                   "INPUT.MIN_SIZE_TRAIN", (256,), "INPUT.MAX_SIZE_TRAIN", 256, "INPUT.CROP.ENABLED", False,
                   "INPUT.RANDOM_FLIP", "none", "MODEL.DETR.DROPOUT", 0.0)
    record = next(d for d in DatasetCatalog.get("trees_train") if len(d["annotations"]) >= 10)
    batch = [DetrDatasetMapper(cfg, is_train=True)(record)]
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    history = []
    with EventStorage():
        for _ in range(30):
            loss = sum(model(batch).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(loss.item())
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last < 0.7 * first, json.dumps(history)


def test_anchor_initialisation_per_family():
    """KS-DAB's official config draws anchor centres uniformly; DN-DETR keeps N(0, 1) logits;
    DN-Deformable draws uniform boxes with logits clamped to [-3, 3] (detrex)."""
    torch.manual_seed(0)
    cfg = ("MODEL.DETR.NUM_QUERIES", 300)
    dab = build_model(make_cfg("configs/dab_detr_r50.yaml", *cfg)).refpoint_embed.weight.detach()
    xy = dab[:, :2].sigmoid()
    assert xy.min() < 0.02 and xy.max() > 0.98 and abs(xy.mean().item() - 0.5) < 0.05
    assert dab[:, 2:].std().item() > 0.8  # w, h logits keep the default N(0, 1)
    dn = build_model(make_cfg("configs/dn_detr_r50.yaml", *cfg)).refpoint_embed.weight.detach()
    assert dn[:, :2].sigmoid().min() > 0.005 and 0.8 < dn.std().item() < 1.2
    dnd = build_model(make_cfg("configs/dn_deformable_detr_r50.yaml", *cfg)).refpoint_embed.weight.detach()
    assert dnd.abs().max().item() <= 3.0 and dnd.sigmoid().min() > 0.04


TWO_STAGE = ("MODEL.DETR.TWO_STAGE", True, "MODEL.DETR.HIDDEN_DIM", 64, "MODEL.DETR.DIM_FEEDFORWARD", 128,
             "MODEL.DETR.ENC_LAYERS", 2, "MODEL.DETR.DEC_LAYERS", 2, "MODEL.DETR.NUM_QUERIES", 30)


def test_two_stage_selects_top_proposals_like_a_loop():
    """Query selection against a per-token loop: proposal = cell centre of the valid region and
    size 0.05 * 2^level; tokens in padding or near the border are never selected."""
    torch.manual_seed(0)
    model = build_model(make_cfg("configs/dn_deformable_detr_r50.yaml", *TWO_STAGE)).eval()
    inputs = toy_inputs(sizes=((224, 200), (160, 240)))
    captured = {}
    selection = model.query_selection
    select = selection.forward

    def spy(memory, memory_mask, ctx):
        captured.update(memory=memory, mask=memory_mask, ctx=ctx)
        captured["out"] = select(memory, memory_mask, ctx)
        return captured["out"]

    selection.forward = spy
    with torch.no_grad():
        model([{"image": x["image"]} for x in inputs])
        memory, mask, ctx = captured["memory"], captured["mask"], captured["ctx"]
        anchors, enc = captured["out"]
        feats = selection.enc_output(memory)
        for b in range(memory.shape[0]):
            rows, start = [], 0
            for lvl, (h, w) in enumerate(ctx.shapes):
                pad = mask[b, start:start + h * w].view(h, w)
                vh, vw = int((~pad[:, 0]).sum()), int((~pad[0]).sum())
                for i in range(h):
                    for j in range(w):
                        prop = torch.tensor([(j + 0.5) / vw, (i + 0.5) / vh, 0.05 * 2 ** lvl, 0.05 * 2 ** lvl])
                        if pad[i, j] or not ((prop > 0.01) & (prop < 0.99)).all():
                            continue
                        f = feats[b, start + i * w + j]
                        logit = selection.enc_class_embed(f)
                        box = (selection.enc_bbox_embed(f) + torch.logit(prop, eps=1e-5)).sigmoid()
                        rows.append((float(logit.max()), logit, box))
                start += h * w
            rows.sort(key=lambda r: -r[0])
            top = rows[:30]
            assert torch.allclose(enc["pred_logits"][b], torch.stack([r[1] for r in top]), atol=1e-5)
            assert torch.allclose(enc["pred_boxes"][b], torch.stack([r[2] for r in top]), atol=1e-5)
    assert not anchors.requires_grad and anchors.shape == (2, 30, 4)


def test_two_stage_training_losses_every_stream():
    torch.manual_seed(0)
    model = build_model(make_cfg("configs/ks_dn_deformable_detr_r50.yaml", *TWO_STAGE))
    assert not hasattr(model, "refpoint_embed")
    with EventStorage():
        losses = model(toy_inputs())
    enc = sorted(k for k in losses if "_enc" in k)
    assert enc == sorted(f"loss_{n}_enc{s}" for n in ("class", "bbox", "giou") for s in ("", "_ks_a", "_ks_v"))
    sum(losses.values()).backward()
    for name, p in model.named_parameters():  # (the box MLP's last layer starts at zero: only it has grads)
        if name.startswith(tuple("query_selection." + n for n in ("enc_output", "enc_class_embed",
                                                                   "enc_bbox_embed.layers.2"))):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_teachers_decode_the_students_proposals_when_asked():
    """MODEL.KS.TEACHER_PROPOSALS: "own" lets every stream select from its own memory (the teachers'
    anchors differ); "student" gives every teacher pass the student's anchors (the same as the student's
    in "own": its memory does not depend on the switch) and keeps only the student's ``_enc`` loss."""
    seen, losses = {}, {}
    for choice in ("own", "student"):
        torch.manual_seed(0)
        model = build_model(make_cfg("configs/ks_dn_deformable_detr_r50.yaml", *TWO_STAGE,
                                     "MODEL.KS.TEACHER_PROPOSALS", choice))
        prepend = model.dn.prepend

        def spy(tgt, anchors, targets, streams, prepend=prepend, choice=choice):
            seen[choice] = anchors.detach().clone()
            return prepend(tgt, anchors, targets, streams)

        model.dn.prepend = spy
        torch.manual_seed(1)
        with EventStorage():
            losses[choice] = model(toy_inputs(with_empty=False))
    own, student = seen["own"].view(3, 2, 30, 4), seen["student"].view(3, 2, 30, 4)
    assert torch.equal(student[0], own[0])
    assert torch.equal(student[1], student[0]) and torch.equal(student[2], student[0])
    assert not torch.equal(own[1], own[0]) and not torch.equal(own[2], own[0])
    assert sorted(k for k in losses["student"] if "_enc" in k) == [f"loss_{n}_enc" for n in ("bbox", "class", "giou")]
    for k in ("loss_class_enc", "loss_bbox", "loss_giou_ks_a"):  # the student's own outputs are unchanged
        if k == "loss_giou_ks_a":
            assert losses["student"][k] != losses["own"][k]  # the teachers decode other anchors
        else:
            assert torch.equal(losses["student"][k], losses["own"][k]), k


NOT_IMPLEMENTED = "MODEL.DETR.TWO_STAGE=True: query selection is not implemented"
NEEDS_REFINE = "MODEL.DETR.TWO_STAGE=True with MODEL.DETR.BOX_REFINE=False: Deformable DETR's two-stage form needs box"


@pytest.mark.parametrize("config,refusal", [("conditional_detr_r50", NOT_IMPLEMENTED),
                                            ("dab_detr_r50", NOT_IMPLEMENTED),
                                            ("dn_detr_r50", NOT_IMPLEMENTED), ("deformable_detr_r50", NEEDS_REFINE),
                                            ("deformable_detr_refine_r50", None), ("dn_deformable_detr_r50", None),
                                            ("ks_dn_deformable_detr_r50", None)])
def test_two_stage_only_where_implemented(config, refusal):
    """The family's capability flag decides (no list of class names): a clear error elsewhere (Deformable DETR:
    only with box refinement, as the original and transformers)."""
    cfg = make_cfg(f"configs/{config}.yaml", "MODEL.DETR.TWO_STAGE", True, *SMALL)
    if refusal is None:
        assert build_model(cfg).SUPPORTS_TWO_STAGE
    else:
        with pytest.raises(ValueError, match=refusal):
            build_model(cfg)

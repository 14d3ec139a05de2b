"""tools/convert_checkpoint.py: published checkpoints, written here from our own small models with the published
names and shapes (an inverse mapping built from the documented name patterns, independent of the converter),
convert, load with strict=True and predict exactly as the model they came from."""
import argparse
import importlib.util
import logging
import os
import re
from collections import Counter

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from conftest import REPO, family_config, make_cfg, tame_random_backbone

_spec = importlib.util.spec_from_file_location("convert_checkpoint",
                                               os.path.join(REPO, "tools", "convert_checkpoint.py"))
cc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cc)

TINY = ("MODEL.DETR.HIDDEN_DIM", 32, "MODEL.DETR.NHEADS", 2, "MODEL.DETR.DIM_FEEDFORWARD", 16,
        "MODEL.DETR.ENC_LAYERS", 2, "MODEL.DETR.DEC_LAYERS", 2, "MODEL.DETR.NUM_QUERIES", 7,
        "MODEL.DETR.NUM_TOPK_TEST", 20)
LAYERS = 2
FAMILIES = ["conditional_detr", "dab_detr", "dn_detr", "deformable_detr", "dn_deformable_detr", "dino"]
DEFORMABLE = ("deformable_detr", "dn_deformable_detr", "dino")
# detrex DINO: our name prefix -> its name prefix(es) (heads registered twice; index LAYERS = the proposal heads)
DETREX_DINO = {"decoder.norm": ["transformer.decoder.norm"], "tgt_embed": ["transformer.tgt_embed"],
               "dn.label_embed": ["label_enc"], "query_selection.enc_output.0": ["transformer.enc_output"],
               "query_selection.enc_output.1": ["transformer.enc_output_norm"],
               **{f"{h}.{i}": [f"{h}.{i}", f"transformer.decoder.{h}.{i}"] for h in ("class_embed", "bbox_embed")
                  for i in range(LAYERS)},
               **{f"query_selection.enc_{h}": [f"{h}.{LAYERS}", f"transformer.decoder.{h}.{LAYERS}"]
                  for h in ("class_embed", "bbox_embed")}}
# Rows of a 91-row COCO class head that are no category (0 and the 10 ids COCO skips); the rest, in order, are
# detectron2's 80 contiguous classes (1 person ... 13 stop sign ... 90 toothbrush).
UNUSED_COCO_ROWS = (0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
COCO_ROWS = [r for r in range(91) if r not in UNUSED_COCO_ROWS]

# Our name -> detrex name inside a decoder layer (Conditional / DAB / DN: detrex ConditionalSelf/CrossAttention).
DETREX_COND_DEC = {"sa_qcontent_proj": "attentions.0.query_content_proj", "sa_qpos_proj": "attentions.0.query_pos_proj",
                   "sa_kcontent_proj": "attentions.0.key_content_proj", "sa_kpos_proj": "attentions.0.key_pos_proj",
                   "sa_v_proj": "attentions.0.value_proj", "self_attn.out_proj": "attentions.0.out_proj",
                   "ca_qcontent_proj": "attentions.1.query_content_proj", "ca_qpos_proj": "attentions.1.query_pos_proj",
                   "ca_qpos_sine_proj": "attentions.1.query_pos_sine_proj",
                   "ca_kcontent_proj": "attentions.1.key_content_proj", "ca_kpos_proj": "attentions.1.key_pos_proj",
                   "ca_v_proj": "attentions.1.value_proj", "cross_attn.out_proj": "attentions.1.out_proj",
                   "norm1": "norms.0", "norm2": "norms.1", "norm3": "norms.2"}
# Deformable decoder layers: official Deformable-DETR names norm2 (after self-attn), norm1 (after cross-attn), norm3.
DETREX_DEF_DEC = {"self_attn": "attentions.0.attn", "cross_attn": "attentions.1",
                  "norm2": "norms.0", "norm1": "norms.1", "norm3": "norms.2"}
DETREX_FFN = {"linear1": "ffns.0.layers.0.0", "linear2": "ffns.0.layers.1"}


def build(config, seed):
    """A tiny random model whose every tensor differs from its init (norms are not all ones / zeros)."""
    torch.manual_seed(seed)
    model = tame_random_backbone(build_model(make_cfg(config, *TINY))).eval()
    with torch.no_grad():
        for v in model.state_dict().values():
            v.add_(torch.rand_like(v) * 0.01)  # non-negative: FrozenBN variances stay positive
    return model


def predict(model):
    image = torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        r = model([{"image": image}])[0]["instances"]
    return r.pred_boxes.tensor, r.scores, r.pred_classes


def sub(table, rest):
    """Rename the longest ``table`` key that prefixes ``rest`` (module path + ".")."""
    for ours in sorted(table, key=len, reverse=True):
        if rest.startswith(ours + "."):
            return table[ours] + rest[len(ours):]
    raise KeyError(rest)


def to_detrex(sd, family):
    """Our state dict -> detrex / KS-DETR names and shapes (shared heads stored per layer as in detrex)."""
    deformable = family in DEFORMABLE
    out = {}
    for k, v in sd.items():
        if family == "dino" and (prefix := next((p for p in DETREX_DINO if k.startswith(p + ".")), None)):
            for name in DETREX_DINO[prefix]:
                out[name + k[len(prefix):]] = v
        elif k.startswith("backbone."):
            out[k] = v
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", k):
            p, rest = f"transformer.encoder.layers.{m[1]}.", m[2]
            if rest.startswith("self_attn.teacher_in_proj_"):
                continue  # packed with the student rows below
            if rest.startswith("self_attn.in_proj_") and (t := k.replace(".in_proj_", ".teacher_in_proj_")) in sd:
                v = torch.cat([v, sd[t]])  # KS-DETR (6C, C) [W_q; W_k; W_v; W'_q; W'_k; W'_v]
            if rest == "activation.weight":  # PReLU: FFN keeps it as .activation and inside .layers
                out[p + "ffns.0.activation.weight"] = out[p + "ffns.0.layers.0.1.weight"] = v
                continue
            table = {"self_attn": "attentions.0" if deformable else "attentions.0.attn", "norm1": "norms.0",
                     "norm2": "norms.1", **DETREX_FFN}
            out[p + sub(table, rest)] = v
        elif m := re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", k):
            p, rest = f"transformer.decoder.layers.{m[1]}.", m[2]
            if rest == "activation.weight":
                out[p + "ffns.0.activation.weight"] = out[p + "ffns.0.layers.0.1.weight"] = v
                continue
            out[p + sub({**(DETREX_DEF_DEC if deformable else DETREX_COND_DEC), **DETREX_FFN}, rest)] = v
        elif k.startswith("decoder.norm."):
            out["transformer.decoder.post_norm_layer." + k[len("decoder.norm."):]] = v
        elif k.startswith(("decoder.", "encoder.")):
            out["transformer." + k] = v  # query_scale, ref_point_head, ref_anchor_head
        elif m := re.fullmatch(r"input_proj\.(\d)\.([01])\.(.+)", k):
            i, part = int(m[1]), ("conv", "norm")[int(m[2])]
            out[f"neck.convs.{i}.{part}.{m[3]}" if i < 3 else f"neck.extra_convs.{i - 3}.{part}.{m[3]}"] = v
        elif k == "level_embed":
            out["transformer.level_embeds"] = v
        elif k.startswith("reference_points."):
            out["transformer." + k] = v
        elif k == "query_embed.weight":
            out["query_embedding.weight" if deformable else k] = v
        elif k == "refpoint_embed.weight":
            out[k if deformable else "anchor_box_embed.weight"] = v
        elif k == "dn.label_embed.weight":
            out["denoising_generator.label_encoder.weight"] = v
        elif k.startswith("ks_smlp.linear."):
            out["ksgt.smlp_module.token_split_conv.linear.0." + k[len("ks_smlp.linear."):]] = v
        elif family == "deformable_detr" and k.startswith(("class_embed.", "bbox_embed.")):
            head, rest = k.split(".", 1)
            for i in range(LAYERS):  # one module, registered once per layer
                out[f"{head}.{i}.{rest}"] = v
        elif k.startswith("bbox_embed.") and family != "conditional_detr":
            out[k] = out["transformer.decoder." + k] = v  # the decoder holds the same box head(s)
        elif k.startswith(("input_proj.", "class_embed.", "bbox_embed.", "query_embed.", "tgt_embed.")):
            out[k] = v
        else:
            raise KeyError(k)
    return out


def to_torchvision(name):
    """detectron2 ResNet name -> torchvision's (``stem.conv1.norm.bias`` -> ``bn1.bias``, ``res2.0.shortcut`` ->
    ``layer1.0.downsample.0``, ...)."""
    if name.startswith("stem."):
        return "bn1." + name[len("stem.conv1.norm."):] if ".norm." in name else "conv1.weight"
    stage, block, rest = re.fullmatch(r"res(\d)\.(\d+)\.(.+)", name).groups()
    rest = re.sub(r"^shortcut\.norm\.", "downsample.1.", rest)
    rest = re.sub(r"^shortcut\.", "downsample.0.", rest)
    rest = re.sub(r"^conv(\d)\.norm\.", r"bn\1.", rest)
    return f"layer{int(stage) - 1}.{block}.{rest}"


def to_official(sd, family):
    """Our state dict -> official Conditional-DETR / DAB-DETR names, with a 91-row COCO-id class head."""
    out = {}
    g = torch.Generator().manual_seed(1)
    for k, v in sd.items():
        if k.startswith("backbone."):
            out["backbone.0.body." + to_torchvision(k[len("backbone."):])] = v
        elif k.startswith(("encoder.", "decoder.")):
            out["transformer." + k] = v
        elif k.startswith("class_embed."):
            rows = torch.randn(91, *v.shape[1:], generator=g) * 100  # junk in the unused rows
            rows[COCO_ROWS] = v
            out[k] = rows
        elif k.startswith("bbox_embed.") and family == "dab_detr":
            out[k] = out["transformer.decoder." + k] = v
        else:
            out[k] = v
    return out


CASES = ([("ks-detr", family_config(f, ks=True), f) for f in FAMILIES]
         + [("detrex", family_config(f), f) for f in FAMILIES]
         + [("conditional-detr", "configs/conditional_detr_r50.yaml", "conditional_detr"),
            ("dab-detr", "configs/dab_detr_r50.yaml", "dab_detr")])


def published(source, model, family):
    sd = model.state_dict()
    return to_official(sd, family) if source in ("conditional-detr", "dab-detr") else to_detrex(sd, family)


def expected_of(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("source,config,family", CASES, ids=[f"{s}-{f}" for s, _, f in CASES])
def test_converted_checkpoint_loads_strictly_and_predicts_the_same(source, config, family, caplog):
    original = build(config, seed=0)
    sd = published(source, original, family)
    target = build(config, seed=1)
    assert not torch.equal(predict(target)[1], predict(original)[1])  # the test can fail
    cfg = make_cfg(config, *TINY)
    with caplog.at_level(logging.INFO, logger="ks_detr.convert_checkpoint"):
        converted = cc.convert(sd, cfg, expected_of(target), "auto")
    assert f"source: {source} (auto-detected)" in caplog.text
    assert cc.convert(sd, cfg, expected_of(target), source).keys() == converted.keys()
    target.load_state_dict(converted, strict=True)
    for name, value in original.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name
    for a, b in zip(predict(target), predict(original)):
        assert torch.equal(a, b)
    if source in ("conditional-detr", "dab-detr"):
        assert "class_embed.weight: 91 COCO-id rows -> 80 contiguous classes" in caplog.text
    hint = "add: MODEL.DETR.BOX_LOGIT_EPS 0.001 MODEL.DETR.GIOU_EPS 1e-06"
    hint += " MODEL.DETR.DECODER_PADDING_MASK False" * (family not in DEFORMABLE)
    hint += " MODEL.DETR.EVAL_PAD_LAST_PIXEL True" * (source == "ks-detr")
    assert (hint + "\n" in caplog.text + "\n") == (source in ("ks-detr", "detrex")), caplog.text


def test_ks_checkpoint_into_baseline_config_drops_teachers(caplog):
    ks = build("configs/ks_deformable_detr_r50.yaml", seed=0)
    baseline = build("configs/deformable_detr_r50.yaml", seed=1)
    with caplog.at_level(logging.INFO, logger="ks_detr.convert_checkpoint"):
        converted = cc.convert(to_detrex(ks.state_dict(), "deformable_detr"),
                               make_cfg("configs/deformable_detr_r50.yaml", *TINY), expected_of(baseline))
    # attention_weights_teacher and value_proj_teacher (weight, bias) + the sMLP (weight, bias)
    assert "teacher-only tensors dropped (no teacher there in this config): 6" in caplog.text
    baseline.load_state_dict(converted, strict=True)
    for a, b in zip(predict(baseline), predict(ks)):  # eval of a KS model = its student
        assert torch.equal(a, b)


def test_ks_packed_in_proj_splits_into_student_and_teacher_rows():
    C = 4
    packed = torch.arange(6 * C * 2, dtype=torch.float32).view(6 * C, 2)
    name = "encoder.layers.1.self_attn.in_proj_weight"
    expected = {name: (3 * C, 2), name.replace("in_proj", "teacher_in_proj"): (3 * C, 2)}
    (_, student), (_, teacher) = cc.split_packed_in_proj(name, packed, C, expected, "triple", Counter())
    assert torch.equal(student, packed[: 3 * C]) and torch.equal(teacher, packed[3 * C :])
    # dual "share A" ablation: (4C, C) = [q, k, v, v']; the teacher q', k' rows are never read and stay zero
    (_, teacher), = cc.split_packed_in_proj(name, packed[: 4 * C], C, expected, "share_a", Counter())[1:]
    assert teacher[: 2 * C].eq(0).all() and torch.equal(teacher[2 * C :], packed[3 * C : 4 * C])
    # dual "share V": (5C, C) = [q, k, v, q', k']; a triple-attention config would read the missing v'
    (_, teacher), = cc.split_packed_in_proj(name, packed[: 5 * C], C, expected, "share_v", Counter())[1:]
    assert torch.equal(teacher[: 2 * C], packed[3 * C : 5 * C]) and teacher[2 * C :].eq(0).all()
    with pytest.raises(cc.ConversionError, match="no teacher v', which MODEL.KS.MODE=triple needs"):
        cc.split_packed_in_proj(name, packed[: 5 * C], C, expected, "triple", Counter())


def test_class_rows_91_to_80_follow_coco_ids():
    head = torch.arange(91, dtype=torch.float32)[:, None].repeat(1, 3)  # row r holds r
    out = cc.remap_rows("class_embed.weight", head, "ConditionalDETR", 80)
    assert out[:, 0].tolist() == COCO_ROWS
    assert (out[0, 0], out[11, 0], out[79, 0]) == (1, 13, 90)  # person, stop sign, toothbrush
    bias = cc.remap_rows("class_embed.3.bias", torch.arange(91.0), "DNDeformableDETR", 80)
    assert bias.tolist() == COCO_ROWS
    assert cc.remap_rows("class_embed.weight", head, "ConditionalDETR", 91) is head  # a 91-class model keeps all


@pytest.mark.parametrize("source", ["dab-detr", "detrex"])
def test_dab_shared_box_head_is_deduplicated_and_checked(source):
    model = build("configs/dab_detr_r50.yaml", seed=0)
    sd = published(source, model, "dab_detr")
    assert torch.equal(sd["transformer.decoder.bbox_embed.layers.0.weight"], sd["bbox_embed.layers.0.weight"])
    cfg = make_cfg("configs/dab_detr_r50.yaml", *TINY)
    converted = cc.convert(sd, cfg, expected_of(model), source)
    assert not any(k.startswith("transformer.") for k in converted)
    sd["transformer.decoder.bbox_embed.layers.0.weight"] = sd["bbox_embed.layers.0.weight"] + 1
    with pytest.raises(cc.ConversionError, match=r"transformer\.decoder\.bbox_embed\.layers\.0\.weight.*differ"):
        cc.convert(sd, cfg, expected_of(model), source)


def test_dn_deformable_k_row_label_embedding_is_padded(caplog):
    config = "configs/dn_deformable_detr_r50.yaml"
    model = build(config, seed=0)
    sd = to_detrex(model.state_dict(), "dn_deformable_detr")
    key = "denoising_generator.label_encoder.weight"
    sd[key] = sd[key][:80]  # a K-row label encoder
    with caplog.at_level(logging.INFO, logger="ks_detr.convert_checkpoint"):
        converted = cc.convert(sd, make_cfg(config, *TINY), expected_of(model), "detrex")
    assert "dn.label_embed.weight: 80 rows -> 81 (one zero row appended" in caplog.text
    assert torch.equal(converted["dn.label_embed.weight"][:80], model.dn.label_embed.weight[:80])
    assert converted["dn.label_embed.weight"][80].eq(0).all()
    # DN-DETR's matching queries read the "unknown" row: K rows cannot be padded there
    dn = build("configs/dn_detr_r50.yaml", seed=0)
    sd = to_detrex(dn.state_dict(), "dn_detr")
    sd[key] = sd[key][:80]
    with pytest.raises(cc.ConversionError, match=r"dn\.label_embed\.weight: checkpoint \(80, 31\) vs model \(81, 31\)"):
        cc.convert(sd, make_cfg("configs/dn_detr_r50.yaml", *TINY), expected_of(dn), "detrex")


def test_errors_name_the_offending_keys():
    config = "configs/conditional_detr_r50.yaml"
    model = build(config, seed=0)
    cfg, expected = make_cfg(config, *TINY), expected_of(model)
    good = published("conditional-detr", model, "conditional_detr")

    def error(sd, source="auto", c=cfg, e=expected):
        with pytest.raises(cc.ConversionError) as info:
            cc.convert(sd, c, e, source)
        return str(info.value)

    assert "transformer.decoder.foo.weight" in error({**good, "transformer.decoder.foo.weight": torch.zeros(1)})
    assert "backbone.0.body.fc.weight" in error({**good, "backbone.0.body.fc.weight": torch.zeros(1)})
    bad = {**good, "input_proj.bias": torch.zeros(5)}
    assert "input_proj.bias: checkpoint (5,) vs model (32,)" in error(bad)
    missing = {k: v for k, v in good.items() if k != "transformer.decoder.norm.weight"}
    assert "missing" in error(missing) and "decoder.norm.weight" in error(missing)
    assert "--source dab-detr, but the checkpoint has the conditional-detr layout" in error(good, "dab-detr")
    dab = build("configs/dab_detr_r50.yaml", seed=0)
    assert "is a DABDETR model, but the config builds ConditionalDETR" in error(published("dab-detr", dab, "dab_detr"))
    dn_def = build("configs/dn_deformable_detr_r50.yaml", seed=0)
    text = error(to_detrex(dn_def.state_dict(), "dn_deformable_detr"))
    assert text.startswith("the checkpoint is a DNDeformableDETR model, but the config builds ConditionalDETR")
    ks = build("configs/ks_conditional_detr_r50.yaml", seed=0)
    ks_sd = to_detrex(ks.state_dict(), "conditional_detr")
    assert "use --source ks-detr" in error(ks_sd, "detrex")
    baseline_sd = to_detrex(model.state_dict(), "conditional_detr")  # no teachers for a KS config
    text = error(baseline_sd, "detrex", make_cfg("configs/ks_conditional_detr_r50.yaml", *TINY), expected_of(ks))
    assert "missing" in text and "encoder.layers.1.self_attn.teacher_in_proj_weight" in text and "ks_smlp" in text
    assert "unrecognised checkpoint layout" in error({"model.weight": torch.zeros(1)})


def test_cli_reads_wrapped_official_checkpoint_and_detectron2_loads_the_output(tmp_path, capsys):
    config = "configs/dab_detr_r50.yaml"
    model = build(config, seed=0)
    sd = {**published("dab-detr", model, "dab_detr"), "backbone.0.body.bn1.num_batches_tracked": torch.tensor(0)}
    src, dst = tmp_path / "dab.pth", tmp_path / "ours.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-4), "epoch": 49}, src)  # as the official repos save
    opts = [str(x) for x in TINY]
    cc.main(["--config-file", os.path.join(REPO, config), str(src), str(dst), *opts])
    target = build(config, seed=1)
    DetectionCheckpointer(target).load(str(dst))
    for a, b in zip(predict(target), predict(model)):
        assert torch.equal(a, b)
    saved = torch.load(dst, weights_only=True)
    assert list(saved) == ["model"] and saved["model"].keys() == model.state_dict().keys()

    torch.save({"model": {**sd, "transformer.patterns.weight": torch.zeros(3, 32)}}, src)
    with pytest.raises(SystemExit) as exit_info:
        cc.main(["--config-file", os.path.join(REPO, config), "--source", "dab-detr", str(src), str(dst), *opts])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and last.startswith(f"error: {src}: ") and "transformer.patterns.weight" in last

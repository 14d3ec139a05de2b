#!/usr/bin/env python
"""Convert published DETR-family checkpoints into ks-detr's parameter names.

    python tools/convert_checkpoint.py --config-file configs/dab_detr_r50.yaml IN.pth OUT.pth [KEY VALUE ...]
    python train_net.py --config-file configs/dab_detr_r50.yaml --eval-only MODEL.WEIGHTS OUT.pth

Sources (``--source``, auto-detected when left out; the config gives the family):
  ks-detr           official KS-DETR (edocanonymous/KS-DETR): detrex names, plus the teachers of the last encoder
                    layer (packed (6C, C) ``in_proj`` = [W_q; W_k; W_v; W'_q; W'_k; W'_v], or the deformable
                    ``attention_weights_teacher`` / ``value_proj_teacher``) and the sMLP ``ksgt.smlp_module.*``
  detrex            detrex baselines (IDEA-Research/detrex): Conditional, DAB, DN, Deformable, DN-Deformable DETR, DINO
  conditional-detr  Atten4Vis/ConditionalDETR (torchvision ResNet ``backbone.0.body.*``, 91-row class head)
  dab-detr          IDEA-Research/DAB-DETR (as Conditional DETR, plus a duplicated ``transformer.decoder.bbox_embed``)
  transformers      Hugging Face transformers' ConditionalDetrForObjectDetection, DabDetrForObjectDetection and
                    DeformableDetrForObjectDetection (single stage, with_box_refine, two_stage: detected from
                    config.json or the keys): a ``save_pretrained`` folder (config.json +
                    model.safetensors or pytorch_model.bin), a .safetensors file or a state dict; timm's or
                    transformers' ResNet backbone. The model keys that make ours compute what transformers computes
                    (sizes, position-embedding temperature/offset, backbone shape, pixel statistics, top 100,
                    MODEL.DETR.BOX_REFINE / TWO_STAGE) are
                    derived from the checkpoint and its config.json, applied, and printed (docs/transformers.md).

Quirks handled (each logged): 91-row class heads (COCO category ids, row = id) -> the 80 contiguous classes of
detectron2's COCO metadata; heads stored once per decoder layer but shared (detrex Deformable ``class_embed.{0..5}``,
DAB ``transformer.decoder.bbox_embed``, PReLU ``ffns.0.activation`` = ``ffns.0.layers.0.1``) -> one tensor, after
checking the copies are equal; detrex DINO's heads are registered twice (``class_embed.i`` and
``transformer.decoder.class_embed.i``) and index DEC_LAYERS of them (with ``transformer.enc_output(_norm)``) is our
``query_selection``; a K-row DN-Deformable label embedding -> K+1 rows (the extra "unknown" row only
feeds padding slots, which are zeroed, so it is padded with zeros); KS teacher tensors -> our teacher names, or
dropped (counted) when the config has no teacher there. Dropped without error, counted: ``num_batches_tracked``
and ``criterion.*`` buffers (no weights). Anything else that does not map, or maps to a wrong shape, is an error
naming the key. The output ``{"model": state_dict}`` loads with ``strict=True`` into the config's model.
"""
import argparse
import logging
import os
import pickle
import re
import shlex
import sys
from collections import Counter, defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ks_detr import load_config  # noqa: E402
from ks_detr.config import official_numerics  # noqa: E402
from ks_detr.checkpoint import is_teacher_only, torchvision_resnet_name  # noqa: E402
from ks_detr.errors import CheckpointError, report_user_errors  # noqa: E402
from ks_detr import transformers_layout as hf  # noqa: E402

log = logging.getLogger("ks_detr.convert_checkpoint")

SOURCES = ("ks-detr", "detrex", "conditional-detr", "dab-detr", "transformers")
DEFORMABLE = ("DeformableDETR", "DNDeformableDETR", "DINO")
# Marker keys (our names; all present) -> family, checked in this order (later families' markers are shared by
# earlier ones).
FAMILY_MARKERS = ((("tgt_embed.weight", "decoder.norm.weight"), "DINO"), (("tgt_embed.weight",), "DNDeformableDETR"),
                  (("reference_points.weight",), "DeformableDETR"), (("pos_trans.weight",), "DeformableDETR"),
                  (("dn.label_embed.weight",), "DNDETR"),
                  (("refpoint_embed.weight",), "DABDETR"), (("query_embed.weight",), "ConditionalDETR"))
# Conditional / DAB decoder attention projections: detrex (attentions.{0,1}.*) -> official/ours.
SELF_ATTN = {"query_content_proj": "sa_qcontent_proj", "query_pos_proj": "sa_qpos_proj",
             "key_content_proj": "sa_kcontent_proj", "key_pos_proj": "sa_kpos_proj", "value_proj": "sa_v_proj",
             "out_proj": "self_attn.out_proj"}
CROSS_ATTN = {"query_content_proj": "ca_qcontent_proj", "query_pos_proj": "ca_qpos_proj",
              "query_pos_sine_proj": "ca_qpos_sine_proj", "key_content_proj": "ca_kcontent_proj",
              "key_pos_proj": "ca_kpos_proj", "value_proj": "ca_v_proj", "out_proj": "cross_attn.out_proj"}
# Teacher rows after the student's 3C rows of a packed KS in_proj, by row count: which of (q', k', v') they hold.
TEACHER_ROWS = {6: (0, 1, 2), 5: (0, 1), 4: (2,)}  # triple | share_v (dual "share V") | share_a (dual "share A")
MODE_PARTS = {"triple": (0, 1, 2), "share_v": (0, 1), "share_a": (2,)}  # teacher parts each MODEL.KS.MODE reads


class ConversionError(CheckpointError):
    """A checkpoint that cannot be converted for the given config."""


def coco_category_ids():
    """The 80 COCO category ids in detectron2's contiguous class order (class i -> id)."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    ids = [c["id"] for c in COCO_CATEGORIES if c["isthing"]]
    assert len(ids) == 80
    return ids


def read_checkpoint(path, trust_pickle=False):
    """State dict of a checkpoint file: ``{"model": sd, ...}`` or a bare ``sd``.

    Read with ``weights_only=True`` (``argparse.Namespace`` allowed: the official repos store their ``args``);
    ``trust_pickle`` reads any pickle (only for files you trust).
    """
    try:
        if trust_pickle:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(f"{path}: torch.load(weights_only=True) refused it ({str(e).splitlines()[0]}); "
                              "if you trust the file, rerun with --trust-pickle") from None
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConversionError(f"{path}: expected a state dict of tensors, or a dict with one under 'model'")
    return sd


def expected_state(cfg):
    """{name: shape} of the model ``cfg`` builds (on CPU, random init)."""
    from detectron2.modeling import build_model

    return {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}


def detect_layout(sd):
    """"detrex" (detrex and KS-DETR), "conditional-detr", "dab-detr" or "transformers": the naming scheme of ``sd``."""
    if hf.looks_like_transformers(sd):
        return "transformers"
    if any(k.startswith("transformer.") and ".attentions." in k for k in sd):
        return "detrex"
    if any(re.match(r"transformer\.decoder\.layers\.\d+\.sa_qcontent_proj\.", k) for k in sd):
        return "dab-detr" if "refpoint_embed.weight" in sd else "conditional-detr"
    raise ConversionError("unrecognised checkpoint layout (neither detrex/KS-DETR `transformer.*.attentions.*` "
                          f"nor official Conditional/DAB-DETR `transformer.decoder.layers.N.sa_*`); first keys: "
                          f"{list(sd)[:5]}")


def encoder_layer_name(rest):
    """detrex encoder-layer suffix -> ours (``attentions.0[.attn].X`` -> ``self_attn.X``, FFN, norms)."""
    if m := re.fullmatch(r"attentions\.0\.(?:attn\.)?(.+)", rest):
        return f"self_attn.{m[1]}"
    if m := re.fullmatch(r"norms\.([01])\.(.+)", rest):
        return f"norm{int(m[1]) + 1}.{m[2]}"
    return ffn_name(rest)


def ffn_name(rest):
    """detrex FFN suffix -> ours; the PReLU is stored twice (``activation`` and ``layers.0.1``)."""
    for pattern, ours in ((r"ffns\.0\.layers\.0\.0\.(.+)", "linear1"), (r"ffns\.0\.layers\.1\.(.+)", "linear2"),
                          (r"ffns\.0\.(?:activation|layers\.0\.1)\.(.+)", "activation")):
        if m := re.fullmatch(pattern, rest):
            return f"{ours}.{m[1]}"
    return None


def decoder_layer_name(rest, deformable):
    """detrex decoder-layer suffix -> ours. Deformable: self-attention, deformable cross-attention and the
    official norm order (norm2 after self-attention, norm1 after cross-attention); else conditional attention."""
    if deformable:
        if m := re.fullmatch(r"attentions\.0\.attn\.(.+)", rest):
            return f"self_attn.{m[1]}"
        if m := re.fullmatch(r"attentions\.1\.(.+)", rest):
            return f"cross_attn.{m[1]}"
        if m := re.fullmatch(r"norms\.([012])\.(.+)", rest):
            return f"{('norm2', 'norm1', 'norm3')[int(m[1])]}.{m[2]}"
    else:
        if (m := re.fullmatch(r"attentions\.([01])\.(\w+)\.(.+)", rest)) and m[2] in (SELF_ATTN, CROSS_ATTN)[int(m[1])]:
            return f"{(SELF_ATTN, CROSS_ATTN)[int(m[1])][m[2]]}.{m[3]}"
        if m := re.fullmatch(r"norms\.([012])\.(.+)", rest):
            return f"norm{int(m[1]) + 1}.{m[2]}"
    return ffn_name(rest)


def detrex_name(key, family, num_in_features):
    """detrex / KS-DETR key -> our key (heads keep their per-layer index here), or None."""
    deformable = family in DEFORMABLE
    if key.startswith("backbone.") and not key.startswith("backbone.0."):
        return key  # detectron2 ResNet names
    if m := re.fullmatch(r"transformer\.encoder\.layers\.(\d+)\.(.+)", key):
        sub = encoder_layer_name(m[2])
        return sub and f"encoder.layers.{m[1]}.{sub}"
    if m := re.fullmatch(r"transformer\.decoder\.layers\.(\d+)\.(.+)", key):
        sub = decoder_layer_name(m[2], deformable)
        return sub and f"decoder.layers.{m[1]}.{sub}"
    if m := re.fullmatch(r"neck\.(convs|extra_convs)\.(\d+)\.(conv|norm)\.(.+)", key):
        level = int(m[2]) + (num_in_features if m[1] == "extra_convs" else 0)
        return f"input_proj.{level}.{0 if m[3] == 'conv' else 1}.{m[4]}"
    rules = ((r"transformer\.decoder\.(?:post_norm_layer|norm)\.(.+)", "decoder.norm.{}"),
             (r"transformer\.(encoder|decoder)\.(query_scale|ref_point_head|ref_anchor_head)\.(.+)", "{}.{}.{}"),
             (r"transformer\.decoder\.(bbox_embed|class_embed)\.(.+)", "{}.{}"),  # alias of the model's heads
             (r"transformer\.tgt_embed\.weight", "tgt_embed.weight"),
             (r"transformer\.enc_output\.(.+)", "query_selection.enc_output.0.{}"),
             (r"transformer\.enc_output_norm\.(.+)", "query_selection.enc_output.1.{}"),
             (r"label_enc\.weight", "dn.label_embed.weight"),
             (r"transformer\.level_embeds", "level_embed"),
             (r"transformer\.reference_points\.(.+)", "reference_points.{}"),
             (r"query_embedding\.weight", "query_embed.weight"),
             (r"anchor_box_embed\.weight", "refpoint_embed.weight"),
             (r"(?:denoising_generator\.)?label_encoder\.weight", "dn.label_embed.weight"),
             (r"ksgt\.smlp_module\.token_split_conv\.linear\.0\.(.+)", "ks_smlp.linear.{}"),
             (r"((?:input_proj|query_embed|tgt_embed|refpoint_embed|class_embed|bbox_embed)\..+)", "{}"))
    for pattern, template in rules:
        if m := re.fullmatch(pattern, key):
            return template.format(*m.groups())
    return None


def official_name(key):
    """Official Conditional-DETR / DAB-DETR key -> our key, or None."""
    if m := re.fullmatch(r"backbone\.0\.body\.(.+)", key):
        sub = torchvision_resnet_name(m[1])
        return sub and f"backbone.{sub}"
    if m := re.fullmatch(r"transformer\.decoder\.bbox_embed\.(.+)", key):
        return f"bbox_embed.{m[1]}"  # the same module as the model's box head (iterative anchor update)
    if m := re.fullmatch(r"transformer\.((?:encoder|decoder)\..+)", key):
        return m[1]
    if re.fullmatch(r"(input_proj|query_embed|refpoint_embed|class_embed|bbox_embed)\..+", key):
        return key
    return None


def split_packed_in_proj(name, value, C, expected, mode, counts):
    """KS packed encoder in_proj ((3+t)C rows) -> student ``in_proj_*`` (3C) and ``teacher_in_proj_*`` (3C rows
    [q'; k'; v']). Parts the source lacks are left zero when ``mode`` (MODEL.KS.MODE) never reads them."""
    n = value.shape[0] // C
    if value.shape[0] % C or n not in (3, *TEACHER_ROWS):
        return [(name, value)]  # not a packed tensor we know: left for the shape check
    out = [(name, value[: 3 * C])]
    if n == 3:
        return out
    teacher_name = name.replace("self_attn.in_proj_", "self_attn.teacher_in_proj_")
    if teacher_name in expected:
        if lacking := sorted(set(MODE_PARTS[mode]) - set(TEACHER_ROWS[n])):
            raise ConversionError(f"{name}: the checkpoint's {n}C-row packed projection has no teacher "
                                  f"{'/'.join(('q', 'k', 'v')[i] + chr(39) for i in lacking)}, which "
                                  f"MODEL.KS.MODE={mode} needs")
        counts["zero-filled teacher parts (unused by this MODEL.KS.MODE)"] += 3 - len(TEACHER_ROWS[n])
    teacher = value.new_zeros((3 * C, *value.shape[1:]))
    for j, part in enumerate(TEACHER_ROWS[n]):
        teacher[part * C : (part + 1) * C] = value[(3 + j) * C : (4 + j) * C]
    return out + [(teacher_name, teacher)]


def head_name(name, per_layer, num_layers):
    """``class_embed.i.X`` / ``bbox_embed.i.X`` -> ``…X`` when our heads are shared by all layers; the heads
    after the last decoder layer's (detrex DINO: index DEC_LAYERS) score the encoder proposals
    (``query_selection.enc_{class,bbox}_embed.X``)."""
    if not (m := re.fullmatch(r"(class_embed|bbox_embed)\.(\d+)\.(.+)", name)):
        return name
    if int(m[2]) == num_layers:
        return f"query_selection.enc_{m[1]}.{m[3]}"
    return name if per_layer else f"{m[1]}.{m[3]}"


def remap_rows(name, value, family, K):
    """Row quirks: 91-row COCO-id class heads -> 80 classes (Deformable DETR's class-agnostic two-stage proposal
    head keeps its first rows); K-row DN-Deformable label embedding -> K+1."""
    if re.fullmatch(r"class_embed(\.\d+)?\.(weight|bias)", name) and value.shape[0] == 91 and K == 80:
        log.info("%s: 91 COCO-id rows -> 80 contiguous classes (detectron2 COCO metadata; 11 unused rows dropped)",
                 name)
        return value[coco_category_ids()]
    if name.startswith("query_selection.enc_class_embed.") and value.shape[0] == 91 and K == 80 \
            and family == "DeformableDETR":
        log.info("%s: 91 rows -> the first 80 (row 0 is the two-stage objectness the proposals are ranked by; "
                 "the others are trained as negatives only)", name)
        return value[:80]
    if name == "dn.label_embed.weight" and value.shape[0] == K and family == "DNDeformableDETR":
        log.info("dn.label_embed.weight: %d rows -> %d (one zero row appended for the 'unknown' label, which only "
                 "feeds padding slots that are zeroed: outputs unchanged)", K, K + 1)
        return torch.cat([value, value.new_zeros(1, value.shape[1])])
    return value


def convert(sd, cfg, expected, source="auto", hf_config=None):
    """Published state dict -> ours.

    Args:
        sd: the checkpoint's state dict; cfg: our config (family, C, K, KS layers); expected: {name: shape}
        of the model ``cfg`` builds; source: one of ``SOURCES`` or "auto"; hf_config: a transformers
        checkpoint's config.json (dict), if any.
    Returns:
        our state dict: exactly the keys of ``expected``, with their shapes. Raises ``ConversionError``.
    """
    layout = detect_layout(sd)
    if source != "auto" and layout != {"ks-detr": "detrex"}.get(source, source):
        raise ConversionError(f"--source {source}, but the checkpoint has the {layout} layout")
    family = cfg.MODEL.META_ARCHITECTURE.removeprefix("KS")
    C, K = cfg.MODEL.DETR.HIDDEN_DIM, cfg.MODEL.DETR.NUM_CLASSES
    per_layer = "class_embed.0.weight" in expected
    counts, unmapped, groups = Counter(), [], defaultdict(list)

    if layout == "transformers":
        for name, (value, key) in hf.transformers_names(sd, hf_config)[1].items():
            groups[name].append((key, value))
        sd = {}
    for key, value in sd.items():
        if key.endswith("num_batches_tracked") or key.startswith("criterion."):
            counts["num_batches_tracked / criterion buffers"] += 1
            continue
        if layout == "detrex":
            name = detrex_name(key, family, len(cfg.MODEL.DETR.IN_FEATURES))
        else:
            name = official_name(key)
        if name is None:
            unmapped.append(key)
            continue
        if re.fullmatch(r"encoder\.layers\.\d+\.self_attn\.in_proj_(weight|bias)", name):
            pairs = split_packed_in_proj(name, value, C, expected, cfg.MODEL.KS.MODE, counts)
        else:
            pairs = [(head_name(name, per_layer, cfg.MODEL.DETR.DEC_LAYERS), value)]
        for ours, v in pairs:
            groups[ours].append((key, v))

    found = next((fam for markers, fam in FAMILY_MARKERS if all(m in groups for m in markers)), None)
    if found != family:
        raise ConversionError(f"the checkpoint is a {found} model, but the config builds "
                              f"{cfg.MODEL.META_ARCHITECTURE}: pick a {found} config" if found else
                              f"the checkpoint has none of the query embeddings of a known family "
                              f"({', '.join(' + '.join(m) for m, _ in FAMILY_MARKERS)} in our names)")
    if unmapped:
        raise ConversionError(f"{len(unmapped)} key(s) of the {layout}-layout checkpoint have no counterpart in "
                              "ks-detr: " + ", ".join(unmapped[:20]) + (" ..." if len(unmapped) > 20 else ""))
    has_teacher = any(is_teacher_only(n) for n in groups)
    if source == "detrex" and has_teacher:
        raise ConversionError("the checkpoint has KS-DETR teacher parameters (ksgt.*, *_teacher, packed "
                              "in_proj): use --source ks-detr")
    if source == "auto":
        source = "ks-detr" if has_teacher else layout
        log.info("source: %s (auto-detected)", source)
    if source == "ks-detr" and not has_teacher:
        log.info("no teacher parameters in this KS-DETR checkpoint (a baseline run)")

    out, origin, errors = {}, {}, []
    for name, entries in groups.items():
        first_key, value = entries[0]
        for key, other in entries[1:]:
            if other.shape != value.shape or not torch.equal(other, value):
                errors.append(f"{first_key} and {key} both map to {name} but differ")
        counts["duplicate copies merged (shared heads, PReLU aliases)"] += len(entries) - 1
        if name not in expected and is_teacher_only(name):
            counts["teacher-only tensors dropped (no teacher there in this config)"] += 1
            continue
        out[name], origin[name] = remap_rows(name, value, family, K), first_key

    unexpected = [f"{origin[n]} -> {n}" for n in sorted(set(out) - set(expected))]
    missing = sorted(set(expected) - set(out))
    shapes = [f"{origin[n]} -> {n}: checkpoint {tuple(out[n].shape)} vs model {expected[n]}"
              for n in out if n in expected and tuple(out[n].shape) != expected[n]]
    for what, names in (("map to names the model does not have", unexpected),
                        ("missing for the model (e.g. a KS config for a checkpoint without teachers)", missing),
                        ("have the wrong shape", shapes)):
        if names:
            more = " ..." if len(names) > 20 else ""
            errors.append(f"{len(names)} tensor(s) {what}: " + "; ".join(names[:20]) + more)
    if errors:
        raise ConversionError(" | ".join(errors))
    for what, n in sorted(counts.items()):
        log.info("%s: %d", what, n)
    if source in ("ks-detr", "detrex"):
        log.info("to compute exactly what the %s code computes (docs/fidelity.md), add: %s", source,
                 " ".join(map(str, official_numerics(family, source))))
    return {n: out[n] for n in expected}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="our config the output is for (gives the family)")
    parser.add_argument("--source", choices=("auto",) + SOURCES, default="auto")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="read the input with torch.load(weights_only=False): only for files you trust")
    parser.add_argument("input", help="published checkpoint (.pth)")
    parser.add_argument("output", help="where to write the converted checkpoint")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with report_user_errors(args.debug):
        run(parser, args)


def transformers_keys(sd, config_file, opts, hf_config=None, preprocessor=None):
    """The ``[KEY, VALUE, ...]`` that make the config compute what transformers computes with ``sd`` (those that
    differ from ``config_file`` + ``opts``), logged as a command-line tail."""
    family, names = hf.transformers_names(sd, hf_config)
    rows = hf.class_head(names).shape[0]
    derived = hf.transformers_opts(family, names, hf_config, preprocessor, num_classes=80 if rows == 91 else rows)
    derived = derived[2:]  # MODEL.META_ARCHITECTURE: the config file's (KS or not), checked by convert()
    for note in hf.check_transformers_config(hf_config):
        log.warning("%s", note)
    base = load_config(config_file, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])
    changed = []
    for key, value in zip(derived[::2], derived[1::2]):
        node = base
        for part in key.split(".")[:-1]:
            node = node[part]
        current = node[key.split(".")[-1]]
        if isinstance(current, tuple):
            current = list(current)
        if current != value and not (isinstance(value, float) and isinstance(current, (int, float))
                                     and float(current) == value):
            changed += [key, value]
    user = set(opts[::2])
    changed = [x for k, v in zip(changed[::2], changed[1::2]) if k not in user for x in (k, v)]
    if changed:
        tail = " ".join(f"{k} {shlex.quote(str(v)) if isinstance(v, list) else v}"
                        for k, v in zip(changed[::2], changed[1::2]))
        log.info("to compute what transformers computes with these weights, this conversion used (add them to "
                 "train_net.py / demo.py too): %s", tail)
    else:
        log.info("the config already computes what transformers computes with these weights")
    c = hf_config or {}
    loss = ["MODEL.DETR.CLASS_WEIGHT", 1.0, "MODEL.DETR.AUX_LOSS", bool(c.get("auxiliary_loss", False))]
    for ours, theirs in (("COST_CLASS", "class_cost"), ("COST_BBOX", "bbox_cost"), ("COST_GIOU", "giou_cost"),
                         ("BBOX_WEIGHT", "bbox_loss_coefficient"), ("GIOU_WEIGHT", "giou_loss_coefficient"),
                         ("FOCAL_ALPHA", "focal_alpha")):
        if theirs in c:
            loss += [f"MODEL.DETR.{ours}", float(c[theirs])]
    log.info("not applied (training recipe): to train with the loss transformers computes (its focal class loss "
             "weighs 1), add: %s", " ".join(map(str, loss)))
    return changed


def run(parser, args):
    if not os.path.isfile(args.input) and not hf.is_transformers_folder(args.input):
        parser.error(f"input {args.input!r} is not a file (nor a transformers save_pretrained folder)")
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        parser.error(f"output {args.output!r} would overwrite the input")
    hf_config = None
    if os.path.isdir(args.input) or args.input.endswith(".safetensors") or args.source == "transformers":
        sd, hf_config, preprocessor = hf.read_transformers(args.input)
    else:
        sd, preprocessor = read_checkpoint(args.input, args.trust_pickle), None
    opts = list(args.opts)
    try:
        if detect_layout(sd) == "transformers":
            if hf_config is None:
                hf_config, preprocessor = hf.read_side_files(args.input)
            opts = transformers_keys(sd, args.config_file, opts, hf_config, preprocessor) + opts
        cfg = load_config(args.config_file, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])
        sd = convert(sd, cfg, expected_state(cfg), args.source, hf_config)
    except ConversionError as e:
        raise ConversionError(f"{args.input}: {e}") from e
    torch.save({"model": sd}, args.output)
    log.info("wrote %s: %d tensors for %s", args.output, len(sd), args.config_file)


if __name__ == "__main__":
    main()

"""Hugging Face transformers' DETR layouts <-> ours (``tools/convert_checkpoint.py --source transformers``,
``tools/export_transformers.py``).

Forms: ``ConditionalDetrForObjectDetection``, ``DabDetrForObjectDetection`` and ``DeformableDetrForObjectDetection``
(single stage, ``with_box_refine`` and ``two_stage``: per-layer heads ``class_embed.i`` / ``bbox_embed.i``, also held
as ``model.decoder.{class,bbox}_embed.i``, index ``decoder_layers`` scoring the encoder proposals), with transformers'
ResNet backbone (``backbone[.conv_encoder].model.embedder.*`` / ``encoder.stages.*``) or timm's
(``backbone.conv_encoder.model[._backbone].conv1`` / ``layerN.*``, torchvision names). Both the names transformers 5 holds in
memory (``self_attn.o_proj``, ``mlp.fc1``, ``encoder_attn.q_content_proj``) and the ones it writes (``out_proj``,
``fc1``, ``ca_qcontent_proj``, ``backbone.conv_encoder``) are read. Files are read with safetensors or
``torch.load(weights_only=True)``, ``config.json`` / ``preprocessor_config.json`` with ``json``.
"""
import json
import os
import re

import torch

from .checkpoint import torchvision_resnet_name
from .errors import CheckpointError

FAMILIES = {"ConditionalDETR": "ConditionalDetrForObjectDetection", "DABDETR": "DabDetrForObjectDetection",
            "DeformableDETR": "DeformableDetrForObjectDetection"}
MODEL_TYPES = {"ConditionalDETR": "conditional_detr", "DABDETR": "dab-detr", "DeformableDETR": "deformable_detr"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Conditional decoder projections: transformers 5 (in memory) -> ours (= the official names, which transformers writes)
COND_SELF = {"q_content_proj": "sa_qcontent_proj", "q_pos_proj": "sa_qpos_proj", "k_content_proj": "sa_kcontent_proj",
             "k_pos_proj": "sa_kpos_proj", "v_proj": "sa_v_proj"}
COND_CROSS = {"q_content_proj": "ca_qcontent_proj", "q_pos_proj": "ca_qpos_proj", "k_content_proj": "ca_kcontent_proj",
              "k_pos_proj": "ca_kpos_proj", "v_proj": "ca_v_proj", "q_pos_sine_proj": "ca_qpos_sine_proj"}
DAB_PROJ = {"query_content": "qcontent", "query_pos": "qpos", "query_pos_sine": "qpos_sine", "key_content": "kcontent",
            "key_pos": "kpos", "value": "v"}
RESNET_DEPTHS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}


class TransformersLayoutError(CheckpointError):
    """A transformers checkpoint we cannot map (names the unsupported form)."""


# ---- reading --------------------------------------------------------------------------------------
def is_transformers_folder(path):
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in
                                       (*WEIGHT_FILES, "model.safetensors.index.json"))


def read_transformers(path):
    """``(state_dict, config dict or None, preprocessor dict or None)`` of a ``save_pretrained`` folder, a
    ``.safetensors`` file or a ``.bin`` state dict (``config.json`` beside a file is read too)."""
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            files = sorted(set(_json(index)["weight_map"].values()))
            sd = {}
            for f in files:
                sd.update(_load_safetensors(os.path.join(path, f)))
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            sd = _load_safetensors(os.path.join(path, "model.safetensors"))
        elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
            sd = _load_bin(os.path.join(path, "pytorch_model.bin"))
        else:
            raise TransformersLayoutError(f"{path}: no model.safetensors or pytorch_model.bin in this folder")
    elif path.endswith(".safetensors"):
        sd = _load_safetensors(path)
    else:
        sd = _load_bin(path)
    return (sd, *read_side_files(path))


def read_side_files(path):
    """``(config.json, preprocessor_config.json)`` of a ``save_pretrained`` folder or beside a weights file
    (None where absent)."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return _json(os.path.join(folder, "config.json")), _json(os.path.join(folder, "preprocessor_config.json"))


def _json(path):
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _load_safetensors(path):
    from safetensors.torch import load_file

    return load_file(path, device="cpu")


def _load_bin(path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (any refusal of the safe unpickler)
        raise TransformersLayoutError(f"{path}: torch.load(weights_only=True) refused it ({str(e).splitlines()[0]})")
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise TransformersLayoutError(f"{path}: expected a state dict of tensors")
    return sd


def looks_like_transformers(sd):
    """transformers' *ForObjectDetection state dicts: the detector under ``model.``."""
    return any(re.match(r"model\.(encoder|decoder)\.layers\.\d+\.", k) for k in sd) and \
        any(k.startswith("model.backbone.") for k in sd)


# ---- transformers -> ours ---------------------------------------------------------------------------
def _resnet_name(rest):
    """transformers' ResNet (``embedder.*``, ``encoder.stages.*``) or timm's/torchvision's name -> detectron2's."""
    if m := re.fullmatch(r"embedder\.embedder\.convolution\.weight", rest):
        return "stem.conv1.weight"
    if m := re.fullmatch(r"embedder\.embedder\.normalization\.(\w+)", rest):
        return f"stem.conv1.norm.{m[1]}"
    if m := re.fullmatch(r"encoder\.stages\.(\d)\.layers\.(\d+)\.(shortcut|layer\.(\d))\.(convolution|normalization)"
                         r"\.(\w+)", rest):
        block = f"res{int(m[1]) + 2}.{m[2]}"
        conv = "shortcut" if m[3] == "shortcut" else f"conv{int(m[4]) + 1}"
        return f"{block}.{conv}.weight" if m[5] == "convolution" else f"{block}.{conv}.norm.{m[6]}"
    return torchvision_resnet_name(rest)


def _ffn(rest):
    for pattern, ours in ((r"(?:mlp\.)?fc1\.(\w+)", "linear1.{}"), (r"(?:mlp\.)?fc2\.(\w+)", "linear2.{}"),
                          (r"(?:mlp\.)?activation_fn\.weight", "activation.weight")):
        if m := re.fullmatch(pattern, rest):
            return ours.format(*m.groups())
    return None


def _encoder_layer(rest, deformable):
    if m := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
        return f"self_attn.in_proj_{m[2]}#{m[1]}"  # packed below
    if m := re.fullmatch(r"self_attn\.(?:o_proj|out_proj)\.(\w+)", rest):
        return f"self_attn.out_proj.{m[1]}"
    if deformable and (m := re.fullmatch(r"self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)"
                                         r"\.(\w+)", rest)):
        return f"self_attn.{m[1]}.{m[2]}"
    if m := re.fullmatch(r"(self_attn_layer_norm|final_layer_norm)\.(\w+)", rest):
        return f"{'norm1' if m[1] == 'self_attn_layer_norm' else 'norm2'}.{m[2]}"
    return _ffn(rest)


def _decoder_layer(rest, family):
    if family == "DABDETR":
        if m := re.fullmatch(r"(self|cross)_attn\.\1_attn_(\w+?)_proj\.(\w+)", rest):
            if m[2] in DAB_PROJ:
                return f"{'sa' if m[1] == 'self' else 'ca'}_{DAB_PROJ[m[2]]}_proj.{m[3]}"
        if m := re.fullmatch(r"(self|cross)_attn\.\1_attn\.output_proj\.(\w+)", rest):
            return f"{m[1]}_attn.out_proj.{m[2]}"
        if m := re.fullmatch(r"(self|cross)_attn\.\1_attn_layer_norm\.(\w+)", rest):
            return f"{'norm1' if m[1] == 'self' else 'norm2'}.{m[2]}"
        if m := re.fullmatch(r"mlp\.final_layer_norm\.(\w+)", rest):
            return f"norm3.{m[1]}"
        return _ffn(rest)
    if family == "DeformableDETR":
        if m := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
            return f"self_attn.in_proj_{m[2]}#{m[1]}"
        if m := re.fullmatch(r"self_attn\.(?:o_proj|out_proj)\.(\w+)", rest):
            return f"self_attn.out_proj.{m[1]}"
        if m := re.fullmatch(r"encoder_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(\w+)", rest):
            return f"cross_attn.{m[1]}.{m[2]}"
        norms = {"self_attn_layer_norm": "norm2", "encoder_attn_layer_norm": "norm1", "final_layer_norm": "norm3"}
    else:
        if re.fullmatch(r"(sa|ca)_\w+_proj\.(weight|bias)", rest):
            return rest  # the official names, as transformers writes them
        if (m := re.fullmatch(r"(self_attn|encoder_attn)\.(\w+_proj)\.(\w+)", rest)) and \
                m[2] in (COND_SELF if m[1] == "self_attn" else COND_CROSS):
            return f"{(COND_SELF if m[1] == 'self_attn' else COND_CROSS)[m[2]]}.{m[3]}"
        if m := re.fullmatch(r"(self_attn|encoder_attn)\.(?:o_proj|out_proj)\.(\w+)", rest):
            return f"{'self_attn' if m[1] == 'self_attn' else 'cross_attn'}.out_proj.{m[2]}"
        norms = {"self_attn_layer_norm": "norm1", "encoder_attn_layer_norm": "norm2", "final_layer_norm": "norm3"}
    if (m := re.fullmatch(r"(\w+_layer_norm)\.(\w+)", rest)) and m[1] in norms:
        return f"{norms[m[1]]}.{m[2]}"
    return _ffn(rest)


def transformers_family(sd, config=None):
    """Our family of a transformers state dict; refuses the forms we do not implement, naming them."""
    arch = (config or {}).get("architectures") or []
    keys = list(sd)
    if any(k.startswith("model.query_refpoint_embeddings.") for k in keys):
        family = "DABDETR"
    elif "model.level_embed" in sd:
        family = "DeformableDETR"
    elif any(k.startswith("class_labels_classifier.") for k in keys):
        family = "ConditionalDETR"
    else:
        raise TransformersLayoutError(
            "a transformers checkpoint of none of ConditionalDetrForObjectDetection, DabDetrForObjectDetection, "
            f"DeformableDetrForObjectDetection (architectures: {arch or 'unknown'}; first keys {keys[:4]}); "
            "DETR, RT-DETR, DINO/Grounding-DINO, segmentation heads and bare *Model checkpoints are not supported")
    if arch and arch[0] != FAMILIES[family]:
        raise TransformersLayoutError(f"config.json architectures {arch} is not supported (only {FAMILIES[family]} "
                                      "of this layout)")
    refused = []
    c = config or {}
    if family == "DeformableDETR":
        refine, two_stage = deformable_form(sd, config)
        if two_stage and not refine:
            refused.append("Deformable DETR two_stage without with_box_refine (transformers refuses it too)")
    if family == "DABDETR":
        if c.get("num_patterns") or "model.patterns.weight" in sd:
            refused.append(f"DAB-DETR num_patterns={c.get('num_patterns')}")
        if c.get("keep_query_pos"):
            refused.append("DAB-DETR keep_query_pos=True")
        if c.get("query_dim", 4) != 4:
            refused.append(f"DAB-DETR query_dim={c['query_dim']}")
        if c.get("bbox_embed_diff_each_layer"):
            refused.append("DAB-DETR bbox_embed_diff_each_layer=True")
        if c.get("normalize_before") or any(k.startswith("model.encoder.norm.") for k in keys):
            refused.append("DAB-DETR normalize_before=True")
        if c.get("temperature_height", 20) != c.get("temperature_width", 20):
            refused.append("DAB-DETR temperature_height != temperature_width")
        if c.get("sine_position_embedding_scale") not in (None, 2 * 3.141592653589793):
            refused.append(f"DAB-DETR sine_position_embedding_scale={c['sine_position_embedding_scale']}")
    if c.get("position_embedding_type", "sine") != "sine":
        refused.append(f"position_embedding_type={c['position_embedding_type']!r}")
    if c.get("encoder_attention_heads", 0) != c.get("decoder_attention_heads", 0):
        refused.append("encoder_attention_heads != decoder_attention_heads")
    if family != "DABDETR" and c.get("encoder_ffn_dim", 0) != c.get("decoder_ffn_dim", 0):
        refused.append("encoder_ffn_dim != decoder_ffn_dim")
    if family == "DeformableDETR" and c.get("encoder_n_points", 0) != c.get("decoder_n_points", 0):
        refused.append("encoder_n_points != decoder_n_points")
    if c.get("activation_function", "relu") not in ("relu", "gelu", "prelu"):
        refused.append(f"activation_function={c['activation_function']!r}")
    if refused:
        raise TransformersLayoutError(f"unsupported {FAMILIES[family]} form: " + "; ".join(refused))
    return family


def deformable_form(sd, config=None):
    """``(with_box_refine, two_stage)`` of a Deformable DETR checkpoint, from config.json or, without one, its keys
    (the decoder's own box heads; the proposal projections)."""
    c = config or {}
    refine = bool(c.get("with_box_refine")) or any(k.startswith("model.decoder.bbox_embed.") for k in sd)
    two_stage = bool(c.get("two_stage")) or any(k.startswith(("model.enc_output", "model.pos_trans")) for k in sd)
    return refine, two_stage


def decoder_layers(sd):
    """The number of decoder layers of a transformers state dict."""
    return len({m[1] for k in sd if (m := re.match(r"model\.decoder\.layers\.(\d+)\.", k))})


def our_name(key, family, heads=None):
    """Our name of one transformers key (``…in_proj_weight#q`` for a part of a packed projection), or None.

    ``heads``: the decoder layers of a Deformable DETR with per-layer heads (``with_box_refine``): ``class_embed.i``
    and ``bbox_embed.i`` (or their ``model.decoder.`` copies) are ours per layer, index ``heads`` (two-stage) the
    proposal heads of ``query_selection``; None: heads shared by all layers."""
    deformable = family == "DeformableDETR"
    name = None
    if heads is not None and (m := re.fullmatch(r"(?:model\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.+)", key)):
        if int(m[2]) < heads:
            return f"{m[1]}.{m[2]}.{m[3]}"
        return f"query_selection.enc_{m[1]}.{m[3]}" if int(m[2]) == heads else None
    if m := re.fullmatch(r"model\.backbone\.(?:conv_encoder\.)?(?:model\.)?(?:_backbone\.)?(.+)", key):
        sub = _resnet_name(m[1])
        name = sub and f"backbone.{sub}"
    elif m := re.fullmatch(r"model\.encoder\.layers\.(\d+)\.(.+)", key):
        sub = _encoder_layer(m[2], deformable)
        name = sub and f"encoder.layers.{m[1]}.{sub}"
    elif m := re.fullmatch(r"model\.decoder\.layers\.(\d+)\.(.+)", key):
        sub = _decoder_layer(m[2], family)
        name = sub and f"decoder.layers.{m[1]}.{sub}"
    else:
        rules = ((r"model\.decoder\.layernorm\.(\w+)", "decoder.norm.{}"),
                 (r"model\.(encoder|decoder)\.(query_scale|ref_point_head|ref_anchor_head)\.(.+)", "{}.{}.{}"),
                 (r"model\.decoder\.bbox_embed\.(layers\..+)", "bbox_embed.{}"),  # DAB: the tied box head
                 (r"model\.query_position_embeddings\.weight", "query_embed.weight"),
                 (r"model\.query_refpoint_embeddings\.weight", "refpoint_embed.weight"),
                 (r"model\.input_projection\.(\w+)", "input_proj.{}"),
                 (r"model\.(input_proj\.\d+\.[01]\.\w+)", "{}"),
                 (r"model\.level_embed", "level_embed"),
                 (r"model\.reference_points\.(\w+)", "reference_points.{}"),
                 (r"model\.enc_output\.(\w+)", "query_selection.enc_output.0.{}"),
                 (r"model\.enc_output_norm\.(\w+)", "query_selection.enc_output.1.{}"),
                 (r"model\.(pos_trans(?:_norm)?)\.(\w+)", "{}.{}"),
                 (r"(?:class_labels_classifier|class_embed(?:\.\d+)?)\.(\w+)", "class_embed.{}"),
                 (r"(?:bbox_predictor|bbox_embed(?:\.\d+)?)\.(layers\..+)", "bbox_embed.{}"))
        for pattern, template in rules:
            if m := re.fullmatch(pattern, key):
                name = template.format(*m.groups())
                break
    return name


def head_layers(sd, family, config=None):
    """The ``heads`` argument of :func:`our_name` for this checkpoint: the decoder layers with per-layer heads
    (Deformable DETR ``with_box_refine``), else None."""
    if family == "DeformableDETR" and deformable_form(sd, config)[0]:
        return decoder_layers(sd)
    return None


def transformers_names(sd, config=None):
    """``(family, {our name: (value, source key)})``: the transformers state dict in our names (heads shared
    by all decoder layers are merged after checking the copies are equal; q/k/v projections packed into
    ``in_proj_*``; per-layer class heads transformers stores once, tied to layer 0's, are copied to every layer).
    Raises naming any key without a counterpart."""
    family = transformers_family(sd, config)
    heads = head_layers(sd, family, config)
    out, unmapped, packs = {}, [], {}
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        name = our_name(key, family, heads)
        if name is None:
            unmapped.append(key)
        elif "#" in name:
            target, part = name.split("#")
            packs.setdefault(target, {})[part] = (value, key)
        elif name in out:
            if out[name][0].shape != value.shape or not torch.equal(out[name][0], value):
                raise TransformersLayoutError(f"{out[name][1]} and {key} both map to our shared {name} but differ "
                                              "(per-layer heads: a form we do not implement)")
        else:
            out[name] = (value, key)
    if unmapped:
        raise TransformersLayoutError(f"{len(unmapped)} key(s) of the {FAMILIES[family]} checkpoint have no "
                                      "counterpart in ks-detr: " + ", ".join(unmapped[:20]))
    for i in range(1, heads or 0):  # transformers ties class_embed.i to class_embed.0 (with_box_refine, one stage)
        for name in [n for n in out if n.startswith("class_embed.0.")]:
            out.setdefault(name.replace("class_embed.0.", f"class_embed.{i}.", 1), out[name])
    for target, parts in packs.items():
        if set(parts) != {"q", "k", "v"}:
            raise TransformersLayoutError(f"{target}: only {sorted(parts)} of the q/k/v projections are present")
        out[target] = (torch.cat([parts[p][0] for p in "qkv"]), parts["q"][1])
    return family, out


def _backbone_opts(names, config):
    """detectron2 ResNet keys of the mapped backbone tensors."""
    blocks = []
    for stage in range(2, 6):
        n = {int(m[1]) for k in names if (m := re.match(rf"backbone\.res{stage}\.(\d+)\.", k))}
        blocks.append(len(n))
    bottleneck = "backbone.res2.0.conv3.weight" in names
    depth = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 50 if bottleneck else 34}.get(tuple(blocks), RESNET_DEPTHS.get(tuple(blocks)))
    if depth is None or (depth not in (18, 34)) != bottleneck:
        raise TransformersLayoutError(f"ResNet with {blocks} blocks per stage ({'bottleneck' if bottleneck else 'basic'}"
                                      ") has no detectron2 MODEL.RESNETS.DEPTH")
    opts = ["MODEL.RESNETS.DEPTH", depth,
            "MODEL.RESNETS.STEM_OUT_CHANNELS", names["backbone.stem.conv1.weight"][0].shape[0]]
    last = "conv3" if bottleneck else "conv2"
    opts += ["MODEL.RESNETS.RES2_OUT_CHANNELS", names[f"backbone.res2.0.{last}.weight"][0].shape[0]]
    if bottleneck:
        w1 = names["backbone.res2.0.conv1.weight"][0]
        w2 = names["backbone.res2.0.conv2.weight"][0]
        groups = w1.shape[0] // w2.shape[1]
        opts += ["MODEL.RESNETS.NUM_GROUPS", groups, "MODEL.RESNETS.WIDTH_PER_GROUP", w1.shape[0] // groups]
    bb = (config or {}).get("backbone_config") or {}
    stride_in_1x1 = bool(bb.get("downsample_in_bottleneck", False)) if bb.get("model_type") == "resnet" else False
    opts += ["MODEL.RESNETS.STRIDE_IN_1X1", stride_in_1x1,
             "MODEL.RESNETS.RES5_DILATION", 2 if (config or {}).get("dilation") else 1]
    return opts


def transformers_opts(family, names, config=None, preprocessor=None, num_classes=None):
    """``[KEY, VALUE, ...]`` making our model of ``family`` compute what transformers computes with these weights
    (shapes from the tensors, the rest from ``config.json`` / ``preprocessor_config.json`` when given)."""
    c = config or {}
    C, rows = class_head(names).shape[1], class_head(names).shape[0]
    enc = {int(m[1]) for k in names if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    dec = {int(m[1]) for k in names if (m := re.match(r"decoder\.layers\.(\d+)\.", k))}
    heads = c.get("encoder_attention_heads") or c.get("num_attention_heads")
    opts = ["MODEL.META_ARCHITECTURE", family]
    opts += ["MODEL.DETR.NUM_CLASSES", num_classes or rows, "MODEL.DETR.HIDDEN_DIM", C,
             "MODEL.DETR.ENC_LAYERS", len(enc), "MODEL.DETR.DEC_LAYERS", len(dec),
             "MODEL.DETR.DIM_FEEDFORWARD", names["encoder.layers.0.linear1.weight"][0].shape[0]]
    if heads:
        opts += ["MODEL.DETR.NHEADS", heads]
    if "pos_trans.weight" in names:  # two-stage: the top-k proposals are the queries (transformers' default 300)
        opts += ["MODEL.DETR.NUM_QUERIES", int(c.get("two_stage_num_proposals", 300))]
    else:
        query = {"DABDETR": "refpoint_embed.weight"}.get(family, "query_embed.weight")
        opts += ["MODEL.DETR.NUM_QUERIES", names[query][0].shape[0]]
    act = "prelu" if "encoder.layers.0.activation.weight" in names else c.get("activation_function", "relu")
    opts += ["MODEL.DETR.ACTIVATION", act]
    if "dropout" in c:
        opts += ["MODEL.DETR.DROPOUT", float(c["dropout"])]
    opts += ["MODEL.DETR.POS_TEMPERATURE", int(c.get("temperature_height", 20)) if family == "DABDETR" else 10000,
             "MODEL.DETR.POS_OFFSET", -0.5 if family == "DeformableDETR" else 0.0]
    if family == "DeformableDETR":
        levels = names["level_embed"][0].shape[0]
        n_in = len({k.split(".")[1] for k in names if re.match(r"input_proj\.\d+\.0\.weight", k)
                    and names[k][0].shape[-1] == 1})
        feats = ["res2", "res3", "res4", "res5"][4 - n_in:]
        opts += ["MODEL.DETR.NUM_FEATURE_LEVELS", levels, "MODEL.DETR.IN_FEATURES", feats,
                 "MODEL.RESNETS.OUT_FEATURES", feats]
        points = c.get("encoder_n_points")
        if points is None and heads:
            points = names["encoder.layers.0.self_attn.attention_weights.weight"][0].shape[0] // (heads * levels)
        if points:
            opts += ["MODEL.DETR.DEFORMABLE_POINTS", points]
        opts += ["MODEL.DETR.BOX_REFINE", "class_embed.0.weight" in names,
                 "MODEL.DETR.TWO_STAGE", "pos_trans.weight" in names]
    # what transformers computes: ours by default, set in case the config file chose the official numerics
    opts += ["MODEL.DETR.DECODER_PADDING_MASK", True, "MODEL.DETR.EVAL_PAD_LAST_PIXEL", False,
             "MODEL.DETR.BOX_LOGIT_EPS", 1e-5, "MODEL.DETR.GIOU_EPS", 0.0,
             # post_process_object_detection keeps the top 100 (query, class) pairs
             "MODEL.DETR.NUM_TOPK_TEST", 100]
    opts += _backbone_opts(names, config)
    if preprocessor:
        mean, std = preprocessor.get("image_mean"), preprocessor.get("image_std")
        if mean and std:
            opts += ["MODEL.PIXEL_MEAN", [round(m * 255.0, 6) for m in mean],
                     "MODEL.PIXEL_STD", [round(s * 255.0, 6) for s in std], "INPUT.FORMAT", "RGB"]
    return opts


def class_head(names):
    """The (K, C) class-head weight of :func:`transformers_names`' output (shared, or layer 0's)."""
    return (names.get("class_embed.weight") or names["class_embed.0.weight"])[0]


def check_transformers_config(config):
    """Warnings (strings) about config.json settings where transformers' own forward is not the official one."""
    notes = []
    c = config or {}
    rates = {k: float(c.get(k, 0.0)) for k in ("dropout", "attention_dropout", "activation_dropout") if k in c}
    if len(set(rates.values())) > 1:
        notes.append("config.json has " + ", ".join(f"{k}={v}" for k, v in rates.items()) + ": ks-detr has one "
                     f"rate, MODEL.DETR.DROPOUT (set to {rates.get('dropout', 0.1)}), for the attention weights, the "
                     "FFN activations and the residual branches, as the official code; a fine-tune from these weights "
                     "drops out where transformers' training did not")
    if c.get("model_type") == "conditional_detr" and c.get("auxiliary_loss"):
        notes.append("config.json has auxiliary_loss=true: transformers' Conditional DETR then feeds each layer's "
                     "normed output to the next layer (the official code, and ours, the un-normed one); these "
                     "weights load, but transformers' outputs differ from ours")
    return notes


# ---- ours -> transformers ---------------------------------------------------------------------------
def _our_tensor(name, ours):
    if "#" not in name:
        return ours[name]
    target, part = name.split("#")
    full = ours[target]
    n = full.shape[0] // 3
    return full["qkv".index(part) * n : ("qkv".index(part) + 1) * n]


def transformers_config(cfg, class_names=None):
    """The transformers config object of our (student) ``cfg``; refuses what transformers cannot compute."""
    import transformers

    d, r = cfg.MODEL.DETR, cfg.MODEL.RESNETS
    family = cfg.MODEL.META_ARCHITECTURE
    problems = []
    if family not in FAMILIES:
        problems.append(f"MODEL.META_ARCHITECTURE={family} (transformers has {', '.join(FAMILIES)} here)")
    if cfg.MODEL.BACKBONE.NAME != "build_resnet_backbone":
        problems.append(f"MODEL.BACKBONE.NAME={cfg.MODEL.BACKBONE.NAME} (a ResNet is exported)")
    if r.NUM_GROUPS != 1 or r.RES5_DILATION != 1 or r.DEFORM_ON_PER_STAGE != [False] * 4:
        problems.append("grouped, dilated or deformable ResNet convolutions (MODEL.RESNETS.NUM_GROUPS / "
                        "RES5_DILATION / DEFORM_ON_PER_STAGE): transformers' ResNet has none")
    if r.DEPTH >= 50 and r.WIDTH_PER_GROUP * 4 != r.RES2_OUT_CHANNELS:
        problems.append("MODEL.RESNETS.WIDTH_PER_GROUP * 4 != RES2_OUT_CHANNELS (transformers' bottleneck reduction "
                        "is 4)")
    if r.NORM != "FrozenBN":
        problems.append(f"MODEL.RESNETS.NORM={r.NORM} (transformers freezes its batch norms)")
    temperature = 20 if family == "DABDETR" else 10000
    if family != "DABDETR" and d.POS_TEMPERATURE != temperature:
        problems.append(f"MODEL.DETR.POS_TEMPERATURE={d.POS_TEMPERATURE} (transformers: {temperature})")
    offset = -0.5 if family == "DeformableDETR" else 0.0
    if d.POS_OFFSET != offset:
        problems.append(f"MODEL.DETR.POS_OFFSET={d.POS_OFFSET} (transformers: {offset})")
    if cfg.INPUT.FORMAT != "RGB":
        problems.append(f"INPUT.FORMAT={cfg.INPUT.FORMAT} (transformers' image processors give RGB)")
    if family == "DeformableDETR":
        stages = {"res2": "stage1", "res3": "stage2", "res4": "stage3", "res5": "stage4"}
        if list(d.IN_FEATURES) != ["res2", "res3", "res4", "res5"][4 - len(d.IN_FEATURES):]:
            problems.append(f"MODEL.DETR.IN_FEATURES={list(d.IN_FEATURES)} (transformers: the last stages)")
        out_features = [stages[f] for f in d.IN_FEATURES if f in stages]
    else:
        out_features = ["stage4"]
    if problems:
        raise TransformersLayoutError("cannot export to transformers: " + "; ".join(problems))
    depths = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}[r.DEPTH]
    backbone = transformers.ResNetConfig(
        embedding_size=r.STEM_OUT_CHANNELS, hidden_sizes=[r.RES2_OUT_CHANNELS * 2**i for i in range(4)],
        depths=depths, layer_type="bottleneck" if r.DEPTH >= 50 else "basic",
        downsample_in_bottleneck=bool(r.STRIDE_IN_1X1), out_features=out_features)
    names = list(class_names or [f"LABEL_{i}" for i in range(d.NUM_CLASSES)])
    common = dict(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
                  num_queries=d.NUM_QUERIES, encoder_layers=d.ENC_LAYERS, decoder_layers=d.DEC_LAYERS,
                  encoder_ffn_dim=d.DIM_FEEDFORWARD, decoder_ffn_dim=d.DIM_FEEDFORWARD,
                  encoder_attention_heads=d.NHEADS, decoder_attention_heads=d.NHEADS,
                  activation_function=d.ACTIVATION, dropout=d.DROPOUT, attention_dropout=d.DROPOUT,
                  activation_dropout=d.DROPOUT, auxiliary_loss=False,
                  id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
                  focal_alpha=float(d.FOCAL_ALPHA))
    # loss weights and matcher costs (training with transformers; its config types them as integers)
    for ours, theirs in (("COST_CLASS", "class_cost"), ("COST_BBOX", "bbox_cost"), ("COST_GIOU", "giou_cost"),
                         ("CLASS_WEIGHT", "cls_loss_coefficient"), ("BBOX_WEIGHT", "bbox_loss_coefficient"),
                         ("GIOU_WEIGHT", "giou_loss_coefficient")):
        if float(d[ours]).is_integer():
            common[theirs] = int(d[ours])
    if family == "ConditionalDETR":
        return transformers.ConditionalDetrConfig(d_model=d.HIDDEN_DIM, **common)
    if family == "DABDETR":
        return transformers.DabDetrConfig(hidden_size=d.HIDDEN_DIM, temperature_height=d.POS_TEMPERATURE,
                                          temperature_width=d.POS_TEMPERATURE, **common)
    # per-layer heads: untied (transformers 5 would otherwise share the class heads of a one-stage with_box_refine)
    refine = dict(with_box_refine=True, two_stage=d.TWO_STAGE, two_stage_num_proposals=d.NUM_QUERIES,
                  tie_word_embeddings=False) if d.BOX_REFINE else {}
    return transformers.DeformableDetrConfig(d_model=d.HIDDEN_DIM, num_feature_levels=d.NUM_FEATURE_LEVELS,
                                             encoder_n_points=d.DEFORMABLE_POINTS,
                                             decoder_n_points=d.DEFORMABLE_POINTS, **refine, **common)


def transformers_model(cfg, ours, class_names=None):
    """A transformers ``*ForObjectDetection`` holding our student state dict ``ours`` (every tensor used,
    every transformers tensor filled: ``load_state_dict(strict=True)``)."""
    import transformers

    config = transformers_config(cfg, class_names)
    family = cfg.MODEL.META_ARCHITECTURE
    model = getattr(transformers, FAMILIES[family])(config).eval()
    heads = cfg.MODEL.DETR.DEC_LAYERS if family == "DeformableDETR" and cfg.MODEL.DETR.BOX_REFINE else None
    state, used, unmapped = {}, set(), []
    for key, value in model.state_dict().items():
        name = our_name(key, family, heads)
        if name is None or name.split("#")[0] not in ours:
            unmapped.append(key)
            continue
        tensor = _our_tensor(name, ours)
        if tensor.shape != value.shape:
            unmapped.append(f"{key} {tuple(value.shape)} vs ours {name} {tuple(tensor.shape)}")
            continue
        state[key] = tensor.clone()
        used.add(name.split("#")[0])
    left = sorted(set(ours) - used)
    if unmapped or left:
        raise TransformersLayoutError(f"cannot export: transformers tensors without ours: {unmapped[:10]}; "
                                      f"ours without a transformers tensor: {left[:10]}")
    model.load_state_dict(state, strict=True)
    return model


def image_processor_settings(cfg):
    """``preprocessor_config.json`` content: our test-time resize and pixel statistics."""
    family = cfg.MODEL.META_ARCHITECTURE
    processor = "DeformableDetrImageProcessor" if family == "DeformableDETR" else "ConditionalDetrImageProcessor"
    return {"image_processor_type": processor, "do_resize": True,
            "size": {"shortest_edge": int(cfg.INPUT.MIN_SIZE_TEST), "longest_edge": int(cfg.INPUT.MAX_SIZE_TEST)},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [m / 255.0 for m in cfg.MODEL.PIXEL_MEAN], "image_std": [s / 255.0 for s in cfg.MODEL.PIXEL_STD],
            "do_pad": True, "format": "coco_detection", "do_convert_annotations": True}

"""``DETRBase``: the meta-architecture shared by every DETR family, with the KS switch.

A family subclass builds its decoder and says how queries become boxes
(:meth:`DETRBase.decode`); everything else — backbone and padding masks, encoder, knowledge
sharing, targets, losses, top-k inference — lives here once.
"""
import math

import torch
import torch.nn.functional as F
from detectron2.modeling import build_backbone, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn
from torchvision.ops import box_convert

from ..errors import ConfigError
from .criterion import SetCriterion
from .ks import EarlyBackward, KnowledgeSharing, KSEncoderLayer, TripleAttention, repeat_streams
from .layers import (
    MLP,
    MultiheadAttention,
    TransformerEncoder,
    TransformerEncoderLayer,
    inverse_sigmoid,
    sine_position_embedding,
    upcast,
)
from .matcher import HungarianMatcher


class DETRBase(nn.Module):
    """Backbone -> input projection -> encoder -> (family decoder) -> class / box heads.

    With knowledge sharing (``MODEL.KS``, owned by ``self.ks``, a :class:`KnowledgeSharing`; None
    when off) and in training, the KS encoder layers run triple attention on the GT Fg-Bg mask, the
    decoder runs once on the stacked student and teacher memories, and every kept output gets the
    family's loss. In eval the model is the student only.
    """

    FORCES_KS = False  # the KS* names: knowledge sharing on unless MODEL.KS.ENABLED says False (an error)
    SUPPORTS_TWO_STAGE = False  # MODEL.DETR.TWO_STAGE (query selection) is implemented by the family

    def __init__(self, cfg):
        super().__init__()
        d, ks = cfg.MODEL.DETR, cfg.MODEL.KS
        arch = type(self).__name__
        if self.FORCES_KS and ks.ENABLED is False:
            raise ConfigError(f"Invalid config MODEL.KS.ENABLED=False: MODEL.META_ARCHITECTURE={arch} trains with "
                              f"knowledge sharing; use {type(self).__mro__[1].__name__} for the baseline or "
                              "leave MODEL.KS.ENABLED unset")
        if d.TWO_STAGE and not self.SUPPORTS_TWO_STAGE:
            raise ConfigError(f"Invalid config MODEL.DETR.TWO_STAGE=True: query selection is not implemented "
                              f"for MODEL.META_ARCHITECTURE={arch}")
        self.hidden_dim = C = d.HIDDEN_DIM
        self.num_classes = d.NUM_CLASSES
        self.two_stage = d.TWO_STAGE
        self.num_topk = d.NUM_TOPK_TEST
        self.aux_loss = d.AUX_LOSS
        self.pos_temperature = d.POS_TEMPERATURE
        self.pos_offset = d.POS_OFFSET
        self.decoder_padding_mask = d.DECODER_PADDING_MASK
        self.eval_pad_last_pixel = d.EVAL_PAD_LAST_PIXEL
        self.box_logit_eps = d.BOX_LOGIT_EPS

        self.backbone = build_backbone(cfg)
        self.channels_last = d.CHANNELS_LAST
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.in_features = list(d.IN_FEATURES)
        shapes = self.backbone.output_shape()
        missing = [f for f in self.in_features if f not in shapes]
        if missing:
            raise ConfigError(
                f"Invalid config MODEL.DETR.IN_FEATURES={self.in_features!r}: the backbone gives "
                f"{sorted(shapes)} (set MODEL.RESNETS.OUT_FEATURES)"
            )
        self.add_named(self.build_input_proj(cfg, [shapes[f] for f in self.in_features]))
        strides = [shapes[f].stride for f in self.in_features]  # input pixels per token, per level in token order
        self.token_strides = strides + [strides[-1] * 2 ** (i + 1) for i in range(d.NUM_FEATURE_LEVELS - len(strides))]

        self.ks = KnowledgeSharing(cfg) if ks.ENABLED or self.FORCES_KS else None
        ks_layers = self.ks.encoder_layers if self.ks else frozenset()
        layer_args = (C, d.NHEADS, d.DIM_FEEDFORWARD, d.DROPOUT, d.ACTIVATION)
        self.encoder = TransformerEncoder(
            [KSEncoderLayer(*layer_args, attention=self.build_encoder_attention(cfg, ks.MODE)) if i in ks_layers
             else TransformerEncoderLayer(*layer_args, attention=self.build_encoder_attention(cfg, None))
             for i in range(d.ENC_LAYERS)],
            pos_scale=self.build_encoder_pos_scale(cfg),
        )
        self.encoder.recompute = self.ks is not None and ks.RECOMPUTE_KS_LAYERS
        self.add_named(self.build_queries(cfg))
        self.decoder = self.build_decoder(cfg)
        self.decoder.recompute = self.ks is not None and ks.RECOMPUTE_DECODER
        self.class_embed, self.bbox_embed = self.build_heads(cfg)
        self.reset_parameters()

        self.add_named(self.ks.build_modules() if self.ks else {})  # after reset_parameters: default sMLP init

        matcher = HungarianMatcher(d.COST_CLASS, d.COST_BBOX, d.COST_GIOU, d.FOCAL_ALPHA, d.FOCAL_GAMMA, d.GIOU_EPS)
        self.criterion = SetCriterion(matcher, d.CLASS_WEIGHT, d.BBOX_WEIGHT,
                                      d.GIOU_WEIGHT, d.FOCAL_ALPHA, d.FOCAL_GAMMA, d.GIOU_EPS)
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)

    def add_named(self, named):
        """Register a builder's ``{name: module or parameter}`` on the model under those names."""
        for name, value in named.items():
            setattr(self, name, value)

    # ---- family hooks: builders return their modules, the model registers them -----------
    def build_input_proj(self, cfg, shapes):
        """``{"input_proj": ...}``: the backbone features to the transformer width (one 1x1 conv)."""
        if len(shapes) != 1:
            raise ConfigError(f"Invalid config MODEL.DETR.IN_FEATURES={self.in_features!r}: "
                             f"{type(self).__name__} uses one feature map")
        return {"input_proj": nn.Conv2d(shapes[0].channels, cfg.MODEL.DETR.HIDDEN_DIM, kernel_size=1)}

    def build_encoder_attention(self, cfg, ks_mode):
        """Encoder self-attention: the plain one, or the triple attention when ``ks_mode`` is set."""
        d = cfg.MODEL.DETR
        if ks_mode is None:
            return MultiheadAttention(d.HIDDEN_DIM, d.NHEADS, d.DROPOUT)
        return TripleAttention(d.HIDDEN_DIM, d.NHEADS, d.DROPOUT, ks_mode)

    def embed_features(self, features, pixel_mask):
        """Backbone features -> encoder tokens.

        Args:
            features: dict of (B, C_l, h_l, w_l) backbone maps; pixel_mask: (B, H, W) True = padding.
        Returns:
            src, pos (B, N, C); key_mask (B, N) True = padding; token grids [(h, w)] and their
            valid-token masks [(B, h, w)] (for the Fg-Bg mask); the multi-scale context or None.
        """
        feat = features[self.in_features[0]]
        mask = F.interpolate(pixel_mask[None].float(), size=feat.shape[-2:])[0].bool()
        pos = sine_position_embedding(mask, self.hidden_dim // 2, self.pos_temperature, self.pos_offset)
        src = self.input_proj(feat).flatten(2).transpose(1, 2)
        return src, pos.flatten(1, 2), mask.flatten(1), [tuple(feat.shape[-2:])], [~mask], None

    def build_heads(self, cfg):
        """Classification and box heads, shared by all decoder layers: Linear(C, K), MLP(C, C, 4)."""
        C = cfg.MODEL.DETR.HIDDEN_DIM
        return nn.Linear(C, self.num_classes), MLP(C, C, 4, 3)

    def predict_logits(self, hs):
        """(L, B', Q, C) decoder states -> (L, B', Q, K) class logits."""
        return self.class_embed(hs)

    def build_encoder_pos_scale(self, cfg):
        """Module mapping encoder tokens to a scale of their position embedding, or None."""
        return None

    def build_queries(self, cfg):
        """``{name: module}``: the family's queries (embeddings, denoising, query selection), built
        before the decoder and registered under these names (checkpoint keys)."""
        raise NotImplementedError

    def build_decoder(self, cfg):
        """The family's decoder module (:mod:`ks_detr.modeling.layers`)."""
        raise NotImplementedError

    def prepare_queries(self, memory, memory_mask, targets=None, ctx=None, streams=1):
        """The decoder's queries for (stacked) memories.

        Args:
            memory: (B', N, C), B' = streams * B; memory_mask: (B', N) True = padding, or None (padding not
                masked: ``MODEL.DETR.DECODER_PADDING_MASK`` False).
            targets: the B images' targets in training (denoising families noise them, the same noise for
                every stream), else None.
            ctx: the multi-scale context of the memory (B' rows), or None.
            streams: S, the number of stacked streams (KS training), 1 otherwise.
        Returns:
            rows: {name: (B', ...) tensor} the per-row query inputs of :meth:`run_decoder`; shared: {name:
            value} its inputs common to all rows (a self-attention mask); extras: "dn", the denoising
            metadata ``dict(groups, group_size)`` when there are P = groups * group_size leading denoising
            queries; "enc", the selected encoder proposals of two-stage models ``dict(pred_logits (S'B, Q, K),
            pred_boxes (S'B, Q, 4), streams=S')`` for the first S' streams (S' = S when every stream selects
            its own, else 1).
        """
        raise NotImplementedError

    def run_decoder(self, rows, shared, memory, memory_mask, pos, ctx=None, streams=1):
        """The decoder and the box head on the queries of :meth:`prepare_queries` (any subset of their rows
        with the matching memory rows).

        pos: (B, N, C), the same for every stream (a family whose decoder reads it repeats it per stream).
        Returns hs (L, B', P+Q, C) normalised decoder states and boxes (L, B', P+Q, 4) sigmoid cxcywh.
        """
        raise NotImplementedError

    def decode(self, memory, memory_mask, pos, targets=None, ctx=None, streams=1):
        """:meth:`prepare_queries` then :meth:`run_decoder` on all rows: hs, boxes and the extras."""
        rows, shared, extras = self.prepare_queries(memory, memory_mask, targets, ctx, streams)
        hs, boxes = self.run_decoder(rows, shared, memory, memory_mask, pos, ctx, streams)
        return hs, boxes, extras

    def boxes_around_points(self, hs, reference):
        """Boxes of decoder states whose queries have fixed 2-D reference points (Conditional, Deformable):
        the box head's centre delta is added to the reference in logit space (in float32).

        hs: (L, B', Q, C); reference: (B', Q, 2) in [0, 1] -> (L, B', Q, 4) sigmoid cxcywh."""
        delta = upcast(self.bbox_embed(hs))
        centre = delta[..., :2] + inverse_sigmoid(reference, self.box_logit_eps)
        return torch.cat([centre, delta[..., 2:]], -1).sigmoid()

    def reset_parameters(self):
        """Official DETR-family init: xavier on transformer matrices, focal prior on the class
        bias, zero last box layer."""
        for module in (self.encoder, self.decoder):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for layer in self.encoder.layers:
            if isinstance(layer, KSEncoderLayer):
                layer.self_attn.reset_teacher()
        for head in self.class_embed if isinstance(self.class_embed, nn.ModuleList) else [self.class_embed]:
            nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))
        for head in self.bbox_embed if isinstance(self.bbox_embed, nn.ModuleList) else [self.bbox_embed]:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)

    # ---- forward --------------------------------------------------------------------------
    @property
    def ks_enabled(self):
        """True if the model trains with knowledge sharing (``self.ks`` is its owner)."""
        return self.ks is not None

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs):
        """Normalise and pad the images; returns the ImageList and its (B, H, W) padding mask (True =
        padding; with ``MODEL.DETR.EVAL_PAD_LAST_PIXEL`` in eval also each image's last row and column,
        as the official Conditional/DAB/DN-DETR eval)."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        sizes = [tuple(x.shape[-2:]) for x in images]
        d = max(self.backbone.size_divisibility, 1)  # the padded size from Python ints: no host round trip
        H, W = (-(-max(s[k] for s in sizes) // d) * d for k in (0, 1))
        padded = images[0].new_zeros(len(images), images[0].shape[0], H, W)
        mask = torch.ones(len(images), H, W, dtype=torch.bool, device=self.device)
        last = 1 if self.eval_pad_last_pixel and not self.training else 0
        for i, (x, (h, w)) in enumerate(zip(images, sizes)):
            padded[i, :, :h, :w].copy_(x)
            mask[i, : h - last, : w - last] = False
        return ImageList(padded, sizes), mask

    def forward(self, batched_inputs):
        """detectron2 interface: list of dicts with "image" (3, H, W) (and "instances" in training).

        Returns a dict of losses in training, else ``[{"instances": Instances}]`` per image.
        """
        images, pixel_mask = self.preprocess_image(batched_inputs)
        if not self.training:
            logits, boxes = self.predict(images.tensor, pixel_mask)
            return self.inference(logits, boxes, images.image_sizes, batched_inputs)
        features = self.backbone_features(images.tensor)
        src, pos, key_mask, token_shapes, valid_masks, ctx = self.embed_features(features, pixel_mask)
        B = src.shape[0]

        ks = None
        if self.ks is not None:
            gt = [x["instances"].gt_boxes.tensor.to(self.device) for x in batched_inputs]
            ks = self.ks.batch(gt, images.image_sizes, images.tensor.shape[-2:], token_shapes, valid_masks,
                               self.token_strides)
        memory = self.encoder(src, pos, key_mask, ks, ctx)
        S = ks.num_streams if ks else 1
        targets = self.prepare_targets(batched_inputs)
        if S > 1 and self.ks.early_backward:
            return self.teachers_first_losses(memory, key_mask, pos, targets, ctx, B, S)
        ctx = None if ctx is None else ctx.repeat(S)
        memory_mask = repeat_streams(key_mask, S) if self.decoder_padding_mask else None
        hs, boxes, extras = self.decode(memory, memory_mask, pos, targets, ctx, S)
        logits = self.predict_logits(hs)
        return self.criterion(self.loss_outputs(logits, boxes, B, S, extras), targets)

    def teachers_first_losses(self, memory, key_mask, pos, targets, ctx, B, S):
        """KS training losses with ``MODEL.KS.EARLY_TEACHER_BACKWARD``: the queries of all S streams are
        prepared once (the same denoising noise and selected proposals as one stacked pass); then each teacher
        stream is decoded and scored in its own pass, whose gradients are taken at once (:class:`EarlyBackward`)
        so that its activations are gone before the next pass; the student last. memory: (S*B, N, C)."""
        dtype = torch.get_autocast_dtype(self.device.type)
        if torch.is_autocast_enabled(self.device.type) and dtype == torch.float16:
            raise ConfigError("Invalid config MODEL.KS.EARLY_TEACHER_BACKWARD=True under float16 autocast: the "
                              "teachers' gradients are taken in the forward, before a gradient scaler scales "
                              "them; use SOLVER.AMP.DTYPE bfloat16 or turn the key off")
        mask = key_mask if self.decoder_padding_mask else None
        rows, shared, extras = self.prepare_queries(memory, repeat_streams(mask, S) if mask is not None else None,
                                                    targets, None if ctx is None else ctx.repeat(S), S)
        if trained := [k for k, v in shared.items() if torch.is_tensor(v) and v.requires_grad]:
            raise TypeError(f"{type(self).__name__}.prepare_queries: shared inputs {trained} need a gradient; per-row "
                            "tensors belong in its rows (the teacher passes take their gradients there)")
        dn = extras.get("dn")
        early = EarlyBackward(self.parameters())
        for s in range(1, S):
            part = slice(s * B, (s + 1) * B)
            hs, boxes = self.run_decoder({k: early.leaf(v, part) for k, v in rows.items()}, shared,
                                         early.leaf(memory, part), mask, early.leaf(pos), ctx, 1)
            kept = [(i, 0, suffix, w) for i, stream, suffix, w in self.ks.teacher_outputs(hs.shape[0]) if stream == s]
            early.backward(self.criterion(self.stream_outputs(self.predict_logits(hs), boxes, B, kept, dn), targets))
        # a copy of the student's memory rows: a view would keep every stream's rows alive until the backward
        hs, boxes = self.run_decoder({k: v[:B] for k, v in rows.items()}, shared, memory[:B].clone(), mask, pos, ctx, 1)
        outputs = self.loss_outputs(self.predict_logits(hs), boxes, B, 1, extras)
        return {**self.criterion(outputs, targets), **early.losses()}

    def backbone_features(self, images):
        """(B, 3, H, W) normalised images -> the backbone's feature maps (channels-last with
        ``MODEL.DETR.CHANNELS_LAST``)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(images)

    def predict(self, images, pixel_mask):
        """The inference network (the student), tensors only (what ``tools/export_model.py`` traces).

        images: (B, 3, H, W) normalised and padded; pixel_mask: (B, H, W) True = padding.
        Returns the last decoder layer's logits (B, Q, K) and boxes (B, Q, 4) (normalised cxcywh).
        """
        features = self.backbone_features(images)
        src, pos, key_mask, _, _, ctx = self.embed_features(features, pixel_mask)
        memory = self.encoder(src, pos, key_mask, None, ctx)
        hs, boxes, _ = self.decode(memory, key_mask if self.decoder_padding_mask else None, pos, None, ctx, 1)
        return self.predict_logits(hs)[-1], boxes[-1]

    def loss_outputs(self, logits, boxes, batch, streams, extras):
        """Outputs that get a loss: the student's last layer (no suffix), its earlier layers
        (``_i``) and the last ``TEACHER_DECODER_LAYERS`` of every teacher (``_ks_{a|v}[_i]``); with
        two-stage query selection also the selected encoder proposals (``_enc``; ``_enc_ks_{a|v}`` of the
        teachers that select their own, ``MODEL.KS.TEACHER_PROPOSALS`` "own").

        logits: (L, S*B, P+Q, K), boxes: (L, S*B, P+Q, 4), S = ``streams``; the P leading denoising
        queries (``extras["dn"]``) become each output's "dn" entry. Which teacher outputs are kept is
        planned by :meth:`KnowledgeSharing.teacher_outputs`.
        """
        L = logits.shape[0]
        kept = [(L - 1, 0, "", 1.0)]
        if self.aux_loss:
            kept += [(i, 0, f"_{i}", 1.0) for i in range(L - 1)]
        if streams > 1:
            kept += self.ks.teacher_outputs(L)
        outputs = self.stream_outputs(logits, boxes, batch, kept, extras.get("dn"))
        enc = extras.get("enc")
        for s in range(enc["streams"] if enc else 0):
            rows = slice(s * batch, (s + 1) * batch)
            suffix, weight = ("_enc", 1.0) if s == 0 else ("_enc" + self.ks.suffix(s), self.ks.teacher_weight)
            outputs.append(dict(pred_logits=enc["pred_logits"][rows], pred_boxes=enc["pred_boxes"][rows],
                                suffix=suffix, weight=weight, class_agnostic=enc.get("class_agnostic", False)))
        return outputs

    @staticmethod
    def stream_outputs(logits, boxes, batch, kept, dn):
        """The criterion's outputs of ``kept`` = [(layer, stream, suffix, weight)] from logits (L, S*B, P+Q, K) and
        boxes (L, S*B, P+Q, 4); the P leading denoising queries (``dn``) become each output's "dn" entry."""
        P = dn["groups"] * dn["group_size"] if dn else 0
        outputs = []
        for i, s, suffix, weight in kept:
            lg, bx = logits[i, s * batch : (s + 1) * batch], boxes[i, s * batch : (s + 1) * batch]
            out = dict(pred_logits=lg[:, P:], pred_boxes=bx[:, P:], suffix=suffix, weight=weight)
            if dn:
                out["dn"] = dict(dn, pred_logits=lg[:, :P], pred_boxes=bx[:, :P])
            outputs.append(out)
        return outputs

    def prepare_targets(self, batched_inputs):
        """GT Instances -> list of {"labels" (M,), "boxes" (M, 4) cxcywh normalised by image size}."""
        targets = []
        for x in batched_inputs:
            inst = x["instances"].to(self.device)
            h, w = inst.image_size
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_convert(inst.gt_boxes.tensor / scale, "xyxy", "cxcywh")
            targets.append({"labels": inst.gt_classes, "boxes": boxes})
        return targets

    def top_k(self, logits, boxes):
        """The ``NUM_TOPK_TEST`` best (query, class) pairs per image.

        logits: (B, Q, K), boxes: (B, Q, 4); 16-bit ones (autocast) give float32.
        Returns scores (B, k), labels (B, k) and their boxes (B, k, 4), best first.
        """
        logits, boxes = upcast(logits), upcast(boxes)
        B, Q, K = logits.shape
        k = min(self.num_topk, Q * K)
        scores, idx = logits.sigmoid().flatten(1).topk(k, dim=1)
        boxes = torch.gather(boxes, 1, torch.div(idx, K, rounding_mode="floor")[..., None].expand(-1, -1, 4))
        return scores, idx % K, boxes

    def inference(self, logits, boxes, image_sizes, batched_inputs):
        """Top-k over queries x classes per image, boxes rescaled to the requested output size.

        logits: (B, Q, K), boxes: (B, Q, 4) normalised cxcywh; 16-bit ones (autocast) give float32
        scores and boxes.
        """
        scores, labels, boxes = self.top_k(logits, boxes)
        results = []
        for i, (h, w) in enumerate(image_sizes):
            r = Instances((h, w))
            xyxy = box_convert(boxes[i], "cxcywh", "xyxy") * torch.tensor([w, h, w, h], device=boxes.device)
            r.pred_boxes = Boxes(xyxy)
            r.scores = scores[i]
            r.pred_classes = labels[i]
            x = batched_inputs[i]
            results.append({"instances": detector_postprocess(r, x.get("height", h), x.get("width", w))})
        return results

"""The one owner of knowledge sharing in a DETR: :class:`KnowledgeSharing`, built from ``MODEL.KS``.

It decides which encoder layers run the triple attention, makes the GT Fg-Bg mask and the sMLP input of
a batch, knows the streams (their kinds, names and count), plans which decoder outputs of which stream
get a loss (suffix, weight), names the teacher-only parameters, and lets a caller record what a KS layer
attends to (:meth:`KnowledgeSharing.record`). The generic core calls it through :class:`KSBatch`
(the encoder) and :meth:`KnowledgeSharing.teacher_outputs` (the losses); with KS off there is no owner.

Streams are stacked along the batch axis, stream-major: ``(S*B, ...)``; stream 0 is the student.
"""
import contextlib
from dataclasses import dataclass

import torch

from .fg_mask import box_canvas, fg_token_mask
from .smlp import SMLP

# MODEL.KS.MODE -> the stream kinds it trains: "s" student (A V), "a" teacher attention weights with
# the student's values (A' V), "v" the student's weights with teacher values (A V'). The only list of modes.
STREAMS = {"triple": ("s", "a", "v"), "share_v": ("s", "a"), "share_a": ("s", "v")}


def repeat_streams(t, streams):
    """(B, ...) -> (streams*B, ...): the same rows for every stream, stream-major."""
    return t if streams == 1 else t.repeat(streams, *[1] * (t.dim() - 1))


@dataclass
class KSBatch:
    """What one training batch's encoder needs for knowledge sharing.

    Attributes:
        fg: (B, N) bool Fg-Bg token mask (True = token inside a GT box).
        smlp: the sMLP making the teachers' input.
        layers: indices of the encoder layers that run the triple attention.
        streams: the stream kinds, student first; ``num_streams`` = len(streams).
    """

    fg: torch.Tensor
    smlp: SMLP
    layers: frozenset
    streams: tuple

    @property
    def num_streams(self):
        return len(self.streams)


class KnowledgeSharing:
    """KS-DETR's training-time additions to a DETR, from ``cfg.MODEL.KS`` (see the module docstring).

    :meth:`build_modules` makes the modules the model registers under their names (``ks_smlp``: the
    sMLP, outside the transformer, default ``nn.Linear`` init).
    """

    def __init__(self, cfg):
        d, ks = cfg.MODEL.DETR, cfg.MODEL.KS
        self.mode = ks.MODE
        self.streams = STREAMS[ks.MODE]
        self.encoder_layers = frozenset(i % d.ENC_LAYERS for i in ks.ENCODER_LAYERS)
        self.teacher_layers = ks.TEACHER_DECODER_LAYERS
        self.teacher_weight = ks.TEACHER_LOSS_WEIGHT
        self.teacher_proposals = ks.TEACHER_PROPOSALS
        self.early_backward = ks.EARLY_TEACHER_BACKWARD
        self.pad_pixels = ks.MASK.PAD_PIXELS
        self.sampling = ks.MASK.SAMPLING
        self.hidden_dim = d.HIDDEN_DIM
        self.smlp = None
        self._record = None

    @property
    def num_streams(self):
        return len(self.streams)

    def build_modules(self):
        """Make the modules the model registers as attributes (their parameters are teacher-only)."""
        self.smlp = SMLP(self.hidden_dim)
        return {"ks_smlp": self.smlp}

    def batch(self, gt_boxes, image_sizes, padded_size, token_shapes, valid_masks, strides):
        """The :class:`KSBatch` of one training batch.

        Args:
            gt_boxes: B tensors (M_i, 4) absolute xyxy input pixels; image_sizes: B (h, w) unpadded;
            padded_size: (H_pad, W_pad); token_shapes: [(h_l, w_l)] per level in token order;
            valid_masks: [(B, h_l, w_l)] bool, True = real token; strides: [s_l] input pixels per token.
        """
        canvas = box_canvas(gt_boxes, image_sizes, padded_size, self.pad_pixels)
        fg = fg_token_mask(canvas, token_shapes, valid_masks, self.sampling, strides)
        if self._record is not None:
            self._record.update(padded_size=tuple(padded_size), token_shapes=[tuple(s) for s in token_shapes],
                                fg=fg)
        return KSBatch(fg, self.smlp, self.encoder_layers, self.streams)

    def suffix(self, stream):
        """Loss-name suffix of stream ``stream`` (> 0): ``_ks_a`` / ``_ks_v``."""
        return f"_ks_{self.streams[stream]}"

    def teacher_outputs(self, num_layers):
        """Which teacher decoder outputs get a loss: ``[(layer, stream, suffix, weight)]`` for the last
        ``TEACHER_DECODER_LAYERS`` layers of every teacher stream (``_ks_{a|v}[_i]``)."""
        return [(i, s, self.suffix(s) + ("" if i == num_layers - 1 else f"_{i}"), self.teacher_weight)
                for s in range(1, self.num_streams)
                for i in range(num_layers - self.teacher_layers, num_layers)]

    def teacher_parameter_names(self, model):
        """State-dict keys of ``model`` that only the teachers use: what every module (the sMLP, the
        triple attentions) declares in ``TEACHER_PARAMETERS`` (names of its own parameters or submodules)."""
        stems = [".".join(p for p in (prefix, name) if p) for prefix, module in model.named_modules()
                 for name in getattr(module, "TEACHER_PARAMETERS", ())]
        return {k for k in model.state_dict() for stem in stems if k == stem or k.startswith(stem + ".")}

    @contextlib.contextmanager
    def record(self, model, layer):
        """Record what encoder layer ``layer`` (a KS layer index in [0, n)) sees in the training-style
        forwards inside the block.

        Yields a dict filled by each forward: ``padded_size``, ``token_shapes``, ``fg`` (B, N) bool,
        ``key_padding_mask`` (B, N), ``streams`` and the layer's per-stream attention from
        :meth:`~ks_detr.modeling.ks.TripleAttention.stream_weights`: ``attn[kind]`` (B, heads, N, N)
        (dense) or ``weights[kind]`` (B, N, heads, L, P) and ``locations[kind]`` (B, N, heads, L, P, 2)
        (deformable). Recording recomputes the weights beside the unchanged forward.
        """
        if layer not in self.encoder_layers:
            raise ValueError(f"encoder layer {layer} is not a KS layer (KS layers: {sorted(self.encoder_layers)})")
        attn = model.encoder.layers[layer].self_attn
        rec = {"streams": self.streams}
        self._record = rec
        attn.observer = rec.update
        try:
            yield rec
        finally:
            self._record = None
            attn.observer = None

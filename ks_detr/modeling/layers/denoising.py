"""Denoising queries (DN-DETR, Li et al., CVPR 2022): noised GT boxes and labels as extra
decoder queries that must reconstruct their GT, in groups that cannot see each other; and DINO's
contrastive form (Zhang et al., ICLR 2023), whose groups add a far-noised negative copy of every GT
that must predict "no object"."""
import torch
from torch import nn
from torchvision.ops import box_convert

from .transformer import inverse_sigmoid


def dn_box_noise(boxes, copies, scale):
    """DN-DETR: (n, 4) cxcywh -> (copies * n, 4): centre moved by up to scale * (w/2, h/2), size
    changed by up to scale * (w, h), clamped to [0, 1]."""
    box = boxes.repeat(copies, 1)
    span = torch.cat([box[:, 2:] / 2, box[:, 2:]], 1)
    return (box + (torch.rand_like(box) * 2 - 1) * span * scale).clamp(0.0, 1.0)


def contrastive_box_noise(boxes, copies, scale):
    """DINO: (n, 4) cxcywh -> (copies * n, 4), copies alternating positive / negative: each corner
    moves by s * m * (w/2 or h/2) * scale with a random sign s and m ~ U[0, 1) for positives,
    U[1, 2) for negatives; corners clamped to [0, 1]."""
    n = boxes.shape[0]
    corners = box_convert(boxes, "cxcywh", "xyxy").repeat(copies, 1)
    half = boxes[:, 2:].repeat(copies, 2) / 2
    negative = (torch.arange(copies, device=boxes.device) % 2).repeat_interleave(n)[:, None]
    sign = torch.randint_like(corners, 0, 2) * 2 - 1
    magnitude = torch.rand_like(corners) + negative
    return box_convert((corners + sign * magnitude * half * scale).clamp(0.0, 1.0), "xyxy", "cxcywh")


def noised_queries(targets, groups, label_noise, box_noise, num_classes, contrastive=False):
    """Noise every GT ``groups`` times (``contrastive``: twice per group, a positive and a negative).

    Args:
        targets: list of B dicts with "labels" (M_i,) and "boxes" (M_i, 4) normalised cxcywh.
        label_noise: probability of replacing a label by a uniformly random class (every copy).
        box_noise: the scale of :func:`dn_box_noise` or :func:`contrastive_box_noise`.
    Returns:
        labels (B, P) int64 (``num_classes`` = padding slot), boxes (B, P, 4) in [0, 1] (padding
        0.5) and the group size s, with g = max M_i, s = g (2g contrastive) and P = groups * s;
        query c * g + j of image b is its copy c of GT j: group c // 2's positive for even c and
        negative for odd c if contrastive, else group c.
    """
    g = max(len(t["labels"]) for t in targets)
    copies = groups * (2 if contrastive else 1)
    B, P = len(targets), copies * g
    device = targets[0]["boxes"].device
    labels = torch.full((B, P), num_classes, dtype=torch.int64, device=device)
    boxes = torch.full((B, P, 4), 0.5, dtype=targets[0]["boxes"].dtype, device=device)
    box_noise_fn = contrastive_box_noise if contrastive else dn_box_noise
    for b, t in enumerate(targets):
        n = len(t["labels"])
        if n == 0:
            continue
        idx = (torch.arange(copies, device=device)[:, None] * g + torch.arange(n, device=device)).flatten()
        lab = t["labels"].repeat(copies)
        flip = torch.rand(lab.shape, device=device) < label_noise
        labels[b, idx] = torch.where(flip, torch.randint_like(lab, 0, num_classes), lab)
        boxes[b, idx] = box_noise_fn(t["boxes"], copies, box_noise)
    return labels, boxes, P // groups


def dn_attention_mask(groups, group_size, num_queries, device=None):
    """(P+Q, P+Q) bool self-attention mask, True = blocked: matching queries cannot see any
    denoising query; a denoising group sees only itself and the matching queries."""
    P = groups * group_size
    mask = torch.zeros(P + num_queries, P + num_queries, dtype=torch.bool, device=device)
    mask[P:, :P] = True
    group = torch.arange(P, device=device) // group_size
    mask[:P, :P] = group[:, None] != group[None, :]
    return mask



class DenoisingQueries(nn.Module):
    """Label embedding of the denoising queries and their assembly in front of the matching ones.

    DN-DETR: a content query is [label embedding (C - 1) ; indicator] with indicator 1 for
    denoising queries (the K+1-th row is DN-DETR's "unknown" label); with ``contrastive`` (DINO) it
    is the label embedding alone (K rows, C wide) and every group also holds negatives. Empty
    padding slots are all zeros (official code); anchor logits clamp at ``logit_eps``. ``MODEL.DETR.DN.NUM_QUERIES`` > 0 sets the number of
    groups per batch to NUM_QUERIES // (max GT per image), at least 1 (DINO's ``dn_number``);
    otherwise it is ``MODEL.DETR.DN.GROUPS``.
    """

    def __init__(self, cfg, contrastive=False, logit_eps=1e-5):
        super().__init__()
        d = cfg.MODEL.DETR
        self.groups, self.label_noise, self.box_noise = d.DN.GROUPS, d.DN.LABEL_NOISE, d.DN.BOX_NOISE
        self.num_dn_queries = d.DN.NUM_QUERIES
        self.num_classes = d.NUM_CLASSES
        self.contrastive = contrastive
        self.logit_eps = logit_eps
        if contrastive:
            self.label_embed = nn.Embedding(d.NUM_CLASSES, d.HIDDEN_DIM)
        else:
            self.label_embed = nn.Embedding(d.NUM_CLASSES + 1, d.HIDDEN_DIM - 1)  # + "unknown" (DN-DETR)

    def content(self, labels, indicator=1.0):
        """labels (...,) in [0, K] -> (..., C) content queries (DN-DETR: with the given indicator value)."""
        if self.contrastive:
            return self.label_embed(labels.clamp(max=self.num_classes - 1))
        e = self.label_embed(labels)
        return torch.cat([e, torch.full_like(e[..., :1], indicator)], -1)

    def num_groups(self, targets):
        """Denoising groups for this batch (0 = none)."""
        if not self.num_dn_queries:
            return self.groups
        return max(1, self.num_dn_queries // max(len(t["labels"]) for t in targets))

    def prepend(self, tgt, anchors, targets, streams=1):
        """Put this batch's denoising queries before the matching queries.

        Args:
            tgt, anchors: (S*B, Q, C) content queries and (S*B, Q, 4) unsigmoided anchors, where S
                streams share one batch of B images (KS: the same noised queries for every stream).
            targets: the B images' targets in training, else None; streams: S.
        Returns:
            tgt (S*B, P+Q, C), anchors (S*B, P+Q, 4), the (P+Q, P+Q) self-attention mask or None,
            and the dn metadata ``dict(groups, group_size)`` or None; the first half of a
            contrastive group are its positives.
        """
        if targets is None:
            return tgt, anchors, None, None
        if (self.groups == 0 and not self.num_dn_queries) or not any(len(t["labels"]) for t in targets):
            # Denoising off (GROUPS 0) or no box in this batch: no denoising queries, but the label
            # embedding still takes part (a zero added, so a zero gradient), as DDP needs every
            # trainable parameter in every step.
            return tgt + 0.0 * self.label_embed.weight.sum(), anchors, None, None
        groups = self.num_groups(targets)
        labels, boxes, size = noised_queries(targets, groups, self.label_noise, self.box_noise, self.num_classes,
                                             self.contrastive)
        dn_tgt = self.content(labels).masked_fill((labels == self.num_classes)[..., None], 0.0)
        tgt = torch.cat([dn_tgt.repeat(streams, 1, 1), tgt], 1)
        anchors = torch.cat([inverse_sigmoid(boxes, self.logit_eps).repeat(streams, 1, 1), anchors], 1)
        mask = dn_attention_mask(groups, size, anchors.shape[1] - groups * size, tgt.device)
        return tgt, anchors, mask, dict(groups=groups, group_size=size)

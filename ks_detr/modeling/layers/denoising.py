"""Denoising queries (DN-DETR, Li et al., CVPR 2022): noised GT boxes and labels as extra
decoder queries that must reconstruct their GT, in groups that cannot see each other; and DINO's
contrastive form (Zhang et al., ICLR 2023), whose groups add a far-noised negative copy of every GT
that must predict "no object"."""
import torch
from torch import nn
from torchvision.ops import box_convert

from .transformer import inverse_sigmoid


def noised_queries(targets, groups, label_noise, box_noise, num_classes):
    """Noise every GT ``groups`` times.

    Args:
        targets: list of B dicts with "labels" (M_i,) and "boxes" (M_i, 4) normalised cxcywh.
        label_noise: probability of replacing a label by a uniformly random class.
        box_noise: centre shifted by up to box_noise * (w/2, h/2), size by up to box_noise * (w, h).
    Returns:
        labels (B, P) int64 (``num_classes`` = padding slot), boxes (B, P, 4) in [0, 1] (padding
        0.5) and the group size g = max M_i, with P = groups * g; query k * g + j of image b is the
        k-th noised copy of GT j of image b.
    """
    g = max(len(t["labels"]) for t in targets)
    B, P = len(targets), groups * g
    device = targets[0]["boxes"].device
    labels = torch.full((B, P), num_classes, dtype=torch.int64, device=device)
    boxes = torch.full((B, P, 4), 0.5, dtype=targets[0]["boxes"].dtype, device=device)
    for b, t in enumerate(targets):
        n = len(t["labels"])
        if n == 0:
            continue
        idx = (torch.arange(groups, device=device)[:, None] * g + torch.arange(n, device=device)).flatten()
        lab = t["labels"].repeat(groups)
        flip = torch.rand(lab.shape, device=device) < label_noise
        labels[b, idx] = torch.where(flip, torch.randint_like(lab, 0, num_classes), lab)
        box = t["boxes"].repeat(groups, 1)
        span = torch.cat([box[:, 2:] / 2, box[:, 2:]], 1)
        boxes[b, idx] = (box + (torch.rand_like(box) * 2 - 1) * span * box_noise).clamp(0.0, 1.0)
    return labels, boxes, g


def contrastive_noised_queries(targets, groups, label_noise, box_noise, num_classes):
    """DINO's contrastive denoising: a positive and a negative noised copy of every GT per group.

    Each corner of a GT box moves by s * m * (w/2 or h/2) * box_noise with a random sign s, and
    m ~ U[0, 1) for positives, U[1, 2) for negatives; labels flip to a uniform random class with
    probability ``label_noise``, independently for every copy.

    Returns labels (B, P) (``num_classes`` = padding slot), boxes (B, P, 4) cxcywh in [0, 1]
    (padding 0.5) and the group size 2g, g = max M_i, P = groups * 2g: query k * 2g + j of image b
    is group k's positive of GT j, query k * 2g + g + j its negative.
    """
    g = max(len(t["labels"]) for t in targets)
    B, P = len(targets), groups * 2 * g
    device = targets[0]["boxes"].device
    labels = torch.full((B, P), num_classes, dtype=torch.int64, device=device)
    boxes = torch.full((B, P, 4), 0.5, dtype=targets[0]["boxes"].dtype, device=device)
    for b, t in enumerate(targets):
        n = len(t["labels"])
        if n == 0:
            continue
        j = torch.arange(n, device=device)
        start = torch.arange(2 * groups, device=device)[:, None] * g  # positives of group k: chunk 2k
        idx = (start + j).flatten()
        negative = (torch.arange(2 * groups, device=device) % 2).repeat_interleave(n).bool()
        lab = t["labels"].repeat(2 * groups)
        flip = torch.rand(lab.shape, device=device) < label_noise
        labels[b, idx] = torch.where(flip, torch.randint_like(lab, 0, num_classes), lab)
        corners = box_convert(t["boxes"], "cxcywh", "xyxy").repeat(2 * groups, 1)
        half = t["boxes"][:, 2:].repeat(2 * groups, 2) / 2
        sign = torch.randint_like(corners, 0, 2) * 2 - 1
        magnitude = torch.rand_like(corners) + negative[:, None]
        corners = (corners + sign * magnitude * half * box_noise).clamp(0.0, 1.0)
        boxes[b, idx] = box_convert(corners, "xyxy", "cxcywh")
    return labels, boxes, 2 * g


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
    padding slots are all zeros (official code); DINO's anchor logits clamp at 1e-3 (detrex), DN's at
    1e-5. ``MODEL.DETR.DN.NUM_QUERIES`` > 0 sets the number of
    groups per batch to NUM_QUERIES // (max GT per image), at least 1 (DINO's ``dn_number``);
    otherwise it is ``MODEL.DETR.DN.GROUPS``.
    """

    def __init__(self, cfg, contrastive=False):
        super().__init__()
        d = cfg.MODEL.DETR
        self.groups, self.label_noise, self.box_noise = d.DN.GROUPS, d.DN.LABEL_NOISE, d.DN.BOX_NOISE
        self.num_dn_queries = d.DN.NUM_QUERIES
        self.num_classes = d.NUM_CLASSES
        self.contrastive = contrastive
        self.logit_eps = 1e-3 if contrastive else 1e-5
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
        if targets is None or (self.groups == 0 and not self.num_dn_queries):
            return tgt, anchors, None, None
        if not any(len(t["labels"]) for t in targets):
            # No box in this batch: no denoising queries, but the label embedding still takes part
            # (with a zero gradient), as DDP needs every trainable parameter in every step.
            return tgt + 0.0 * self.label_embed.weight.sum(), anchors, None, None
        groups = self.num_groups(targets)
        noise = contrastive_noised_queries if self.contrastive else noised_queries
        labels, boxes, size = noise(targets, groups, self.label_noise, self.box_noise, self.num_classes)
        dn_tgt = self.content(labels).masked_fill((labels == self.num_classes)[..., None], 0.0)
        tgt = torch.cat([dn_tgt.repeat(streams, 1, 1), tgt], 1)
        anchors = torch.cat([inverse_sigmoid(boxes, self.logit_eps).repeat(streams, 1, 1), anchors], 1)
        mask = dn_attention_mask(groups, size, anchors.shape[1] - groups * size, tgt.device)
        return tgt, anchors, mask, dict(groups=groups, group_size=size)

"""Denoising queries (DN-DETR, Li et al., CVPR 2022): noised GT boxes and labels as extra
decoder queries that must reconstruct their GT, in groups that cannot see each other."""
import torch
from torch import nn

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
    boxes = torch.full((B, P, 4), 0.5, device=device)
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

    A content query is [label embedding (C - 1) ; indicator] with indicator 1 for denoising
    queries; empty padding slots are all zeros (official code).
    """

    def __init__(self, cfg):
        super().__init__()
        d = cfg.MODEL.DETR
        self.groups, self.label_noise, self.box_noise = d.DN.GROUPS, d.DN.LABEL_NOISE, d.DN.BOX_NOISE
        self.num_classes = d.NUM_CLASSES
        self.label_embed = nn.Embedding(d.NUM_CLASSES + 1, d.HIDDEN_DIM - 1)  # + "unknown" (DN-DETR)

    def content(self, labels, indicator):
        """labels (...,) in [0, K] -> (..., C) content queries with the given indicator value."""
        e = self.label_embed(labels)
        return torch.cat([e, torch.full_like(e[..., :1], indicator)], -1)

    def prepend(self, tgt, anchors, targets, streams=1):
        """Put this batch's denoising queries before the matching queries.

        Args:
            tgt, anchors: (S*B, Q, C) content queries and (S*B, Q, 4) unsigmoided anchors, where S
                streams share one batch of B images (KS: the same noised queries for every stream).
            targets: the B images' targets in training, else None; streams: S.
        Returns:
            tgt (S*B, P+Q, C), anchors (S*B, P+Q, 4), the (P+Q, P+Q) self-attention mask or None,
            and the dn metadata ``dict(groups, group_size)`` or None.
        """
        if targets is None or self.groups == 0:
            return tgt, anchors, None, None
        if not any(len(t["labels"]) for t in targets):
            # No box in this batch: no denoising queries, but the label embedding still takes part
            # (with a zero gradient), as DDP needs every trainable parameter in every step.
            return tgt + 0.0 * self.label_embed.weight.sum(), anchors, None, None
        labels, boxes, g = noised_queries(targets, self.groups, self.label_noise, self.box_noise, self.num_classes)
        dn_tgt = self.content(labels, 1.0).masked_fill((labels == self.num_classes)[..., None], 0.0)
        tgt = torch.cat([dn_tgt.repeat(streams, 1, 1), tgt], 1)
        anchors = torch.cat([inverse_sigmoid(boxes).repeat(streams, 1, 1), anchors], 1)
        mask = dn_attention_mask(self.groups, g, anchors.shape[1] - self.groups * g, tgt.device)
        return tgt, anchors, mask, dict(groups=self.groups, group_size=g)

"""Denoising queries (DN-DETR, Li et al., CVPR 2022): noised GT boxes and labels as extra
decoder queries that must reconstruct their GT, in groups that cannot see each other."""
import torch


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


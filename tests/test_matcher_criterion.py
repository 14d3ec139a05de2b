"""Hungarian matcher and set criterion on known cases, against brute force and hand formulas."""
import itertools
import math

import torch

from ks_detr.modeling.criterion import SetCriterion
from ks_detr.modeling.matcher import HungarianMatcher


def giou(a, b):
    """GIoU of two cxcywh boxes, written out."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (hull - union) / hull


def pair_cost(logit, box, label, tbox, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-logit[label]))
    pos = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
    neg = (1 - alpha) * p**gamma * -math.log(1 - p + 1e-8)
    l1 = sum(abs(x - y) for x, y in zip(box, tbox))
    return 2.0 * (pos - neg) + 5.0 * l1 - 2.0 * giou(box, tbox)


def random_boxes(n, g):
    c = 0.2 + 0.6 * torch.rand(n, 2, generator=g)
    return torch.cat([c, 0.05 + 0.3 * torch.rand(n, 2, generator=g)], 1)


def test_matcher_is_the_brute_force_optimum():
    g = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher()
    logits = torch.randn(2, 5, 3, generator=g)
    boxes = random_boxes(10, g).view(2, 5, 4)
    targets = [
        {"labels": torch.tensor([0, 2, 1]), "boxes": random_boxes(3, g)},
        {"labels": torch.tensor([1, 1]), "boxes": random_boxes(2, g)},
    ]
    for b, (rows, cols) in enumerate(matcher(logits, boxes, targets)):
        t = targets[b]
        M = len(t["labels"])
        cost = [[pair_cost(logits[b, q].tolist(), boxes[b, q].tolist(), int(t["labels"][m]), t["boxes"][m].tolist())
                 for m in range(M)] for q in range(5)]
        best = min(sum(cost[q][m] for m, q in enumerate(perm)) for perm in itertools.permutations(range(5), M))
        assert len(rows) == M and sorted(cols.tolist()) == list(range(M))
        assert math.isclose(sum(cost[q][m] for q, m in zip(rows.tolist(), cols.tolist())), best, rel_tol=1e-5)


def test_matcher_of_stacked_outputs_equals_one_call_per_output():
    """O outputs in one call (one cost computation) give each output's own optimum, as O calls do."""
    g = torch.Generator().manual_seed(1)
    matcher = HungarianMatcher()
    logits = torch.randn(4, 2, 7, 3, generator=g)
    boxes = random_boxes(56, g).view(4, 2, 7, 4)
    targets = [
        {"labels": torch.tensor([0, 2, 1]), "boxes": random_boxes(3, g)},
        {"labels": torch.tensor([1]), "boxes": random_boxes(1, g)},
    ]
    stacked = matcher(logits, boxes, targets)
    assert len(stacked) == 4
    for o in range(4):
        for (r, c), (r1, c1) in zip(stacked[o], matcher(logits[o], boxes[o], targets)):
            assert torch.equal(r, r1) and torch.equal(c, c1)
    # outputs of different shapes (e.g. a denoising-free decoder output beside proposals) in one criterion
    crit = SetCriterion(matcher)
    outputs = [dict(pred_logits=logits[0], pred_boxes=boxes[0], suffix="", weight=1.0),
               dict(pred_logits=logits[1, :, :5], pred_boxes=boxes[1, :, :5], suffix="_enc", weight=1.0),
               dict(pred_logits=logits[2], pred_boxes=boxes[2], suffix="_0", weight=1.0)]
    indices = crit.match(outputs, targets)
    for out, pairs in zip(outputs, indices):
        for (r, c), (r1, c1) in zip(pairs, matcher(out["pred_logits"], out["pred_boxes"], targets)):
            assert torch.equal(r, r1) and torch.equal(c, c1)


def test_matcher_with_images_without_boxes():
    matcher = HungarianMatcher()
    logits, boxes = torch.randn(2, 4, 3), torch.rand(2, 4, 4)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    out = matcher(logits, boxes, [empty, empty])
    assert all(len(r) == 0 and len(c) == 0 for r, c in out)
    out = matcher(logits, boxes, [empty, {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}])
    assert len(out[0][0]) == 0 and out[1][1].tolist() == [0] and len(out[1][0]) == 1


def test_criterion_perfect_boxes_and_focal_formula():
    crit = SetCriterion(HungarianMatcher(), class_weight=2.0, bbox_weight=5.0, giou_weight=2.0)
    tboxes = torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.7, 0.6, 0.1, 0.3]])
    targets = [{"labels": torch.tensor([0, 2]), "boxes": tboxes}]
    pred_boxes = torch.tensor([[[0.1, 0.1, 0.05, 0.05], [0.7, 0.6, 0.1, 0.3], [0.3, 0.4, 0.2, 0.2]]])
    logits = torch.tensor([[[-3.0, -2.0, -4.0], [-1.0, 0.5, 2.0], [3.0, -2.0, -1.0]]])
    out = {"pred_logits": logits, "pred_boxes": pred_boxes, "suffix": "", "weight": 1.0}
    losses = crit([out], targets)
    assert losses["loss_bbox"].item() == 0.0
    assert abs(losses["loss_giou"].item()) < 1e-6
    # query 2 -> label 0, query 1 -> label 2; every other (query, class) is a negative
    onehot = torch.zeros(1, 3, 3)
    onehot[0, 2, 0] = onehot[0, 1, 2] = 1
    total = 0.0
    for x, t in zip(logits.flatten().tolist(), onehot.flatten().tolist()):
        p = 1 / (1 + math.exp(-x))
        pt = p if t else 1 - p
        a = 0.25 if t else 0.75
        total += -a * (1 - pt) ** 2 * math.log(pt)
    assert math.isclose(losses["loss_class"].item(), 2.0 * total / 2, rel_tol=1e-5)


def test_criterion_no_boxes_and_suffix_weights():
    crit = SetCriterion(HungarianMatcher())
    logits, boxes = torch.zeros(1, 4, 2), torch.rand(1, 4, 4)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    outs = [{"pred_logits": logits, "pred_boxes": boxes, "suffix": "", "weight": 1.0},
            {"pred_logits": logits, "pred_boxes": boxes, "suffix": "_ks_a", "weight": 0.5}]
    losses = crit(outs, targets)
    assert set(losses) == {f"loss_{n}{s}" for n in ("class", "bbox", "giou") for s in ("", "_ks_a")}
    # all 8 logits are negatives at p = 0.5: 0.75 * 0.25 * log 2 each, normalised by max(0, 1) boxes
    expect = 2.0 * 8 * 0.75 * 0.25 * math.log(2)
    assert math.isclose(losses["loss_class"].item(), expect, rel_tol=1e-5)
    assert math.isclose(losses["loss_class_ks_a"].item(), 0.5 * expect, rel_tol=1e-5)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0

"""Hungarian matching between predicted and ground-truth boxes (focal classification cost)."""
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_area, box_convert, generalized_box_iou


def giou(boxes1, boxes2, eps=0.0):
    """Pairwise GIoU of xyxy boxes (N, 4) x (M, 4) -> (N, M). ``eps`` = 0 is torchvision's; otherwise ``eps``
    is added to the union and to the enclosing area (the official KS-DETR / detrex code: 1e-6)."""
    if eps == 0:
        return generalized_box_iou(boxes1, boxes2)
    lo, hi = torch.max(boxes1[:, None, :2], boxes2[:, :2]), torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    union = box_area(boxes1)[:, None] + box_area(boxes2) - inter
    lo, hi = torch.min(boxes1[:, None, :2], boxes2[:, :2]), torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
    enclosing = (hi - lo).clamp(min=0).prod(-1)
    return inter / (union + eps) - (enclosing - union) / (enclosing + eps)


def paired_giou(boxes1, boxes2, eps=0.0):
    """GIoU of paired xyxy boxes (N, 4) and (N, 4) -> (N,): the diagonal of :func:`giou`, computed in the same
    order (the same values), without the (N, N) matrix."""
    lo, hi = torch.max(boxes1[:, :2], boxes2[:, :2]), torch.min(boxes1[:, 2:], boxes2[:, 2:])
    wh = (hi - lo).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    lo, hi = torch.min(boxes1[:, :2], boxes2[:, :2]), torch.max(boxes1[:, 2:], boxes2[:, 2:])
    wh = (hi - lo).clamp(min=0)
    enclosing = wh[:, 0] * wh[:, 1]
    if eps == 0:
        return inter / union - (enclosing - union) / enclosing
    return inter / (union + eps) - (enclosing - union) / (enclosing + eps)


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising
    ``cost_class * focal_cost + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU)``."""

    def __init__(self, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2.0, giou_eps=0.0):
        super().__init__()
        self.giou_eps = giou_eps
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def forward(self, pred_logits, pred_boxes, targets):
        """
        Args:
            pred_logits: (B, Q, K) classification logits; pred_boxes: (B, Q, 4) normalised cxcywh;
                or (O, B, Q, K) and (O, B, Q, 4): O outputs matched in one call, each on its own.
            targets: list of B dicts with "labels" (M_i,) int64 and "boxes" (M_i, 4) cxcywh.
        Returns:
            list of B (query_idx, target_idx) int64 tensor pairs of equal length min(Q, M_i); with O
            outputs, O such lists.
        """
        if pred_logits.dim() == 3:
            return self(pred_logits[None], pred_boxes[None], targets)[0]
        return [[(torch.as_tensor(r, dtype=torch.int64), torch.as_tensor(c, dtype=torch.int64)) for r, c in pairs]
                for pairs in self.assign(pred_logits, pred_boxes, targets)]

    @torch.no_grad()
    def assign(self, pred_logits, pred_boxes, targets):
        """:meth:`forward` of O stacked outputs (O, B, Q, K) and (O, B, Q, 4), with NumPy int64 index arrays: the
        cost matrices of every output and image come to the host in one copy."""
        O, B, Q, _ = pred_logits.shape
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0:
            empty = np.empty(0, dtype=np.int64)
            return [[(empty, empty) for _ in targets] for _ in range(O)]
        cost = self.cost(pred_logits, pred_boxes, torch.cat([t["labels"] for t in targets]),
                         torch.cat([t["boxes"] for t in targets]))
        return self.solve(cost.cpu().numpy(), sizes)

    @torch.no_grad()
    def cost(self, pred_logits, pred_boxes, tgt_ids, tgt_boxes):
        """Matching costs, on the predictions' device, of O stacked outputs (O, B, Q, K), (O, B, Q, 4) against all
        M targets of the batch: ``tgt_ids`` (M,) int64, ``tgt_boxes`` (M, 4) cxcywh -> (O, B, Q, M)."""
        O, B, Q, _ = pred_logits.shape
        prob = pred_logits.flatten(0, 2).float().sigmoid()
        boxes = pred_boxes.flatten(0, 2).float()
        tgt_boxes = tgt_boxes.float()
        p = prob[:, tgt_ids]
        neg = (1 - self.alpha) * p**self.gamma * -(1 - p + 1e-8).log()
        pos = self.alpha * (1 - p) ** self.gamma * -(p + 1e-8).log()
        cost = (
            self.cost_class * (pos - neg)
            + self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
            - self.cost_giou
            * giou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"), self.giou_eps)
        )
        return cost.view(O, B, Q, -1)

    @staticmethod
    def solve(cost, sizes):
        """Optimal assignments from host costs (O, B, Q, M) (NumPy; image i's targets are the next ``sizes[i]``
        columns): per output, per image (query_idx, target_idx) NumPy int64 arrays (scipy's
        ``linear_sum_assignment``)."""
        ends = np.cumsum(sizes)
        return [[tuple(a.astype(np.int64) for a in linear_sum_assignment(per_output[i, :, end - n : end]))
                 for i, (n, end) in enumerate(zip(sizes, ends))] for per_output in cost]

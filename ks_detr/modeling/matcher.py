"""Hungarian matching between predicted and ground-truth boxes (focal classification cost)."""
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
        O, B, Q, _ = pred_logits.shape
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [[(empty, empty) for _ in targets] for _ in range(O)]
        prob = pred_logits.flatten(0, 2).float().sigmoid()
        boxes = pred_boxes.flatten(0, 2).float()
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()

        p = prob[:, tgt_ids]
        neg = (1 - self.alpha) * p**self.gamma * -(1 - p + 1e-8).log()
        pos = self.alpha * (1 - p) ** self.gamma * -(p + 1e-8).log()
        cost = (
            self.cost_class * (pos - neg)
            + self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
            - self.cost_giou
            * giou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"), self.giou_eps)
        )
        cost = cost.view(O, B, Q, -1).cpu()
        out = []
        for per_output in cost:
            pairs = []
            for i, c in enumerate(per_output.split(sizes, -1)):
                rows, cols = linear_sum_assignment(c[i].numpy())
                pairs.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
            out.append(pairs)
        return out

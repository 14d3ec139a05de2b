"""Set criterion of the DETR family: sigmoid focal classification + L1 + GIoU on matched boxes."""
import torch
from detectron2.utils import comm
from torch import nn
from torchvision.ops import box_convert, sigmoid_focal_loss

from .layers import upcast
from .matcher import giou


class SetCriterion(nn.Module):
    """Weighted DETR losses over a list of decoder outputs, each matched on its own.

    Every output is a dict ``{"pred_logits": (B, Q, K), "pred_boxes": (B, Q, 4) cxcywh,
    "suffix": str, "weight": float}`` and optionally ``"dn": {"pred_logits", "pred_boxes", "groups",
    "group_size"}`` (denoising queries, whose targets are known: no matching). The returned dict has
    ``loss_{class,bbox,giou}[_dn]{suffix}`` multiplied by the loss weight and the output's weight.
    """

    def __init__(self, matcher, class_weight=2.0, bbox_weight=5.0, giou_weight=2.0,
                 alpha=0.25, gamma=2.0, giou_eps=0.0):
        super().__init__()
        self.giou_eps = giou_eps
        self.matcher = matcher
        self.weights = {"loss_class": class_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight}
        self.alpha, self.gamma = alpha, gamma

    def num_boxes(self, targets, device):
        """Average number of GT boxes per worker (at least 1): the loss normaliser."""
        n = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(n)
        return (n / comm.get_world_size()).clamp(min=1).item()

    def losses(self, pred_logits, pred_boxes, targets, indices, num_boxes):
        """Unweighted loss_class / loss_bbox / loss_giou of one output for given (query, target)
        index pairs per image; every unassigned query is a negative for every class. 16-bit
        predictions (a mixed-precision forward) are scored in float32."""
        pred_logits, pred_boxes = upcast(pred_logits), upcast(pred_boxes)
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)])
        query_idx = torch.cat([q for q, _ in indices])
        onehot = torch.zeros_like(pred_logits)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        onehot[batch_idx, query_idx, labels] = 1.0
        loss_class = sigmoid_focal_loss(pred_logits, onehot, self.alpha, self.gamma, "sum")
        src = pred_boxes[batch_idx, query_idx]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
        loss_bbox = (src - tgt).abs().sum()
        pairwise = giou(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"), self.giou_eps)
        loss_giou = (1 - torch.diag(pairwise)).sum()
        return {
            "loss_class": loss_class / num_boxes,
            "loss_bbox": loss_bbox / num_boxes,
            "loss_giou": loss_giou / num_boxes,
        }

    @staticmethod
    def dn_indices(targets, groups, group_size, device):
        """Denoising query k * group_size + j reconstructs target j of its image (every group k)."""
        out = []
        for t in targets:
            j = torch.arange(len(t["labels"]), device=device)
            q = (torch.arange(groups, device=device)[:, None] * group_size + j).flatten()
            out.append((q, j.repeat(groups)))
        return out

    def match(self, outputs, targets):
        """Hungarian indices of every output; outputs of equal shape are matched in one matcher call."""
        groups = {}
        for i, out in enumerate(outputs):
            groups.setdefault(tuple(out["pred_logits"].shape), []).append(i)
        indices = [None] * len(outputs)
        for members in groups.values():
            found = self.matcher(torch.stack([outputs[i]["pred_logits"].detach() for i in members]),
                                 torch.stack([outputs[i]["pred_boxes"].detach() for i in members]), targets)
            for i, pairs in zip(members, found):
                indices[i] = pairs
        return indices

    def forward(self, outputs, targets):
        device = outputs[0]["pred_logits"].device
        num_boxes = self.num_boxes(targets, device)
        losses = {}
        for out, indices in zip(outputs, self.match(outputs, targets)):
            parts = {"": self.losses(out["pred_logits"], out["pred_boxes"], targets, indices, num_boxes)}
            dn = out.get("dn")
            if dn:
                idx = self.dn_indices(targets, dn["groups"], dn["group_size"], device)
                parts["_dn"] = self.losses(dn["pred_logits"], dn["pred_boxes"], targets, idx,
                                           num_boxes * dn["groups"])
            for tag, values in parts.items():
                for name, value in values.items():
                    losses[name + tag + out["suffix"]] = value * self.weights[name] * out["weight"]
        return losses

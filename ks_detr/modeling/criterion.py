"""Set criterion of the DETR family: sigmoid focal classification + L1 + GIoU on matched boxes."""
import numpy as np
import torch
from detectron2.utils import comm
from torch import nn
from torchvision.ops import box_convert, sigmoid_focal_loss

from .layers import upcast
from .matcher import paired_giou


class SetCriterion(nn.Module):
    """Weighted DETR losses over a list of decoder outputs, each matched on its own.

    Every output is a dict ``{"pred_logits": (B, Q, K), "pred_boxes": (B, Q, 4) cxcywh,
    "suffix": str, "weight": float}`` and optionally ``"dn": {"pred_logits", "pred_boxes", "groups",
    "group_size"}`` (denoising queries, whose targets are known: no matching) and ``"class_agnostic": True``
    (scored as if every GT box were class 0). The returned dict has
    ``loss_{class,bbox,giou}[_dn]{suffix}`` multiplied by the loss weight and the output's weight.

    Outputs of one shape are scored together: one matcher call (their cost matrices reach the host in one copy)
    and one loss computation on the stacked outputs; so are the denoising parts of one shape.
    """

    def __init__(self, matcher, class_weight=2.0, bbox_weight=5.0, giou_weight=2.0,
                 alpha=0.25, gamma=2.0, giou_eps=0.0):
        super().__init__()
        self.giou_eps = giou_eps
        self.matcher = matcher
        self.weights = {"loss_class": class_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight}
        self.alpha, self.gamma = alpha, gamma

    def num_boxes(self, targets, device):
        """Average number of GT boxes per worker (at least 1): the loss normaliser (a Python float; no
        device round trip on one worker)."""
        total = float(sum(len(t["labels"]) for t in targets))
        if comm.get_world_size() == 1:
            return max(total, 1.0)
        n = torch.tensor([total], device=device)
        torch.distributed.all_reduce(n)
        return (n / comm.get_world_size()).clamp(min=1).item()

    def losses(self, pred_logits, pred_boxes, labels, boxes, index, num_boxes):
        """Unweighted losses of O stacked outputs; every unassigned query is a negative for every class.
        16-bit predictions (a mixed-precision forward) are scored in float32.

        Args:
            pred_logits: (O, B, Q, K); pred_boxes: (O, B, Q, 4) cxcywh.
            labels: (M,), boxes: (M, 4): the targets of all images, concatenated.
            index: (4, O * n) int64 rows (output, image, query, target), the n assigned pairs of every output
                in turn.
        Returns:
            {"loss_class" | "loss_bbox" | "loss_giou": (O,)}, each divided by ``num_boxes``.
        """
        pred_logits, pred_boxes = upcast(pred_logits), upcast(pred_boxes)
        O, n = pred_logits.shape[0], index.shape[1] // pred_logits.shape[0]
        out, image, query, target = index
        onehot = torch.zeros_like(pred_logits)
        onehot[out, image, query, labels[target]] = 1.0
        loss_class = sigmoid_focal_loss(pred_logits, onehot, self.alpha, self.gamma).flatten(1).sum(1)
        src, tgt = pred_boxes[out, image, query], boxes[target]
        loss_bbox = (src - tgt).abs().view(O, n * 4).sum(1)
        pairs = paired_giou(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"), self.giou_eps)
        loss_giou = (1 - pairs).view(O, n).sum(1)
        return {"loss_class": loss_class / num_boxes, "loss_bbox": loss_bbox / num_boxes,
                "loss_giou": loss_giou / num_boxes}

    @staticmethod
    def dn_pairs(targets, groups, group_size):
        """Denoising query k * group_size + j reconstructs target j of its image (every group k): per image
        (query, target) NumPy index arrays."""
        out = []
        for t in targets:
            j = np.arange(len(t["labels"]), dtype=np.int64)
            out.append(((np.arange(groups, dtype=np.int64)[:, None] * group_size + j).ravel(), np.tile(j, groups)))
        return out

    @staticmethod
    def flat_index(found, starts, device):
        """(4, O * n) int64 on ``device`` from O outputs' per-image (query, target) arrays: rows (output, image,
        query, target row in the concatenated targets), sent to the device in one copy."""
        cols = [np.stack([np.full_like(q, o), np.full_like(q, i), q, t + starts[i]])
                for o, pairs in enumerate(found) for i, (q, t) in enumerate(pairs)]
        index = np.concatenate(cols, 1) if cols else np.empty((4, 0), dtype=np.int64)
        return torch.from_numpy(index).to(device)

    @staticmethod
    def scored_targets(out, targets):
        """The targets an output is matched and scored on: with ``"class_agnostic"`` (Deformable DETR's two-stage
        proposals) every GT box is class 0."""
        if not out.get("class_agnostic"):
            return targets
        return [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]

    @staticmethod
    def groups(outputs):
        """Lists of the indices of outputs matched together: equal shapes and class-agnostic flags."""
        groups = {}
        for i, out in enumerate(outputs):
            groups.setdefault((tuple(out["pred_logits"].shape), bool(out.get("class_agnostic"))), []).append(i)
        return list(groups.values())

    def match(self, outputs, targets):
        """Hungarian indices of every output (per image (query_idx, target_idx) tensors); outputs of equal
        shape are matched in one matcher call."""
        indices = [None] * len(outputs)
        for members in self.groups(outputs):
            found = self.matcher(torch.stack([outputs[i]["pred_logits"].detach() for i in members]),
                                 torch.stack([outputs[i]["pred_boxes"].detach() for i in members]),
                                 self.scored_targets(outputs[members[0]], targets))
            for i, pairs in zip(members, found):
                indices[i] = pairs
        return indices

    def assign(self, stacked, boxes, targets):
        """Hungarian assignments of every group of stacked outputs ``(members, labels, logits, boxes)``: the cost
        matrices of all groups, images and outputs reach the host in one copy. Returns per group, per output, per
        image (query, target) NumPy arrays."""
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0:
            empty = np.empty(0, dtype=np.int64)
            return [[[(empty, empty) for _ in targets] for _ in members] for members, *_ in stacked]
        costs = [self.matcher.cost(logits.detach(), pred_boxes.detach(), labels, boxes)
                 for _, labels, logits, pred_boxes in stacked]
        host = (costs[0].flatten() if len(costs) == 1 else torch.cat([c.flatten() for c in costs])).cpu().numpy()
        found, start = [], 0
        for cost in costs:
            found.append(self.matcher.solve(host[start : start + cost.numel()].reshape(cost.shape), sizes))
            start += cost.numel()
        return found

    def forward(self, outputs, targets):
        device = outputs[0]["pred_logits"].device
        num_boxes = self.num_boxes(targets, device)
        labels = torch.cat([t["labels"] for t in targets])
        boxes = torch.cat([t["boxes"] for t in targets])
        starts = np.cumsum([0] + [len(t["labels"]) for t in targets])[:-1]
        parts = {}  # (output, "" or "_dn") -> ({loss name: (O,) tensor of its group}, row)
        stacked = []
        for members in self.groups(outputs):
            scored = labels if not outputs[members[0]].get("class_agnostic") else torch.zeros_like(labels)
            stacked.append((members, scored, torch.stack([outputs[i]["pred_logits"] for i in members]),
                            torch.stack([outputs[i]["pred_boxes"] for i in members])))
        for (members, scored, logits, pred_boxes), found in zip(stacked, self.assign(stacked, boxes, targets)):
            values = self.losses(logits, pred_boxes, scored, boxes, self.flat_index(found, starts, device), num_boxes)
            parts.update({(i, ""): (values, row) for row, i in enumerate(members)})
        dn_groups = {}
        for i, out in enumerate(outputs):
            if out.get("dn"):
                dn = out["dn"]
                dn_groups.setdefault((tuple(dn["pred_logits"].shape), dn["groups"], dn["group_size"]), []).append(i)
        for (_, groups, group_size), members in dn_groups.items():
            pairs = self.dn_pairs(targets, groups, group_size)
            index = self.flat_index([pairs] * len(members), starts, device)
            values = self.losses(torch.stack([outputs[i]["dn"]["pred_logits"] for i in members]),
                                 torch.stack([outputs[i]["dn"]["pred_boxes"] for i in members]),
                                 labels, boxes, index, num_boxes * groups)
            parts.update({(i, "_dn"): (values, row) for row, i in enumerate(members)})
        weighted = {}  # (id of a group's values, loss name) -> (O,) weighted by the loss weight
        losses = {}
        for i, out in enumerate(outputs):
            for tag in ("", "_dn"):
                if (i, tag) not in parts:
                    continue
                values, row = parts[(i, tag)]
                for name in values:
                    key = (id(values), name)
                    if key not in weighted:
                        weighted[key] = values[name] * self.weights[name]
                    value = weighted[key][row]
                    losses[name + tag + out["suffix"]] = value * out["weight"] if out["weight"] != 1.0 else value
        return losses

"""Two-stage query selection (Deformable DETR's two-stage variant, DINO's mixed query selection):
every encoder token proposes a box and the top-Q proposals by class score become the decoder's anchors."""
import math

import torch
from torch import nn

from ...errors import ConfigError
from .transformer import MLP, inverse_sigmoid


def token_proposals(memory_mask, ctx):
    """One box per encoder token: its cell centre in the valid image region, size 0.05 * 2^level.

    Args:
        memory_mask: (B, N) True = padding, or None; ctx: the tokens' :class:`MultiScaleContext`.
    Returns:
        proposals (B, N, 4) cxcywh and valid (B, N): inside (0.01, 0.99) of the valid region (so
        never on padding) and not masked.
    """
    N = ctx.reference_points.shape[1]
    device = ctx.reference_points.device
    level = torch.cat([torch.full((h * w,), lvl, device=device) for lvl, (h, w) in enumerate(ctx.shapes)])
    centre = ctx.reference_points[:, torch.arange(N, device=device), level] / ctx.valid_ratios[:, level]
    size = (0.05 * 2.0 ** level)[None, :, None].expand_as(centre)
    proposals = torch.cat([centre, size], -1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1)
    return proposals, valid if memory_mask is None else valid & ~memory_mask


class QuerySelection(nn.Module):
    """Proposal heads on the encoder memory and the top-Q selection.

    ``enc_output`` (Linear + LayerNorm) transforms the valid tokens; ``enc_class_embed`` scores them and
    ``enc_bbox_embed`` refines each token's proposal (in logit space). The Q best proposals (max class
    logit) are the anchors (detached, as DINO's mixed query selection: content queries stay learned)
    and get the detection loss too.

    ``class_agnostic`` (Deformable DETR's two-stage form): the first class logit is an objectness score
    that ranks the proposals, and every token's proposal gets a class-agnostic loss (all GT boxes are class
    0; tokens off the valid region propose the box at infinity's sigmoid, 1, as the original).
    """

    def __init__(self, d_model, num_classes, num_queries, class_agnostic=False):
        super().__init__()
        self.num_queries = num_queries
        self.class_agnostic = class_agnostic
        self.enc_output = nn.Sequential(nn.Linear(d_model, d_model), nn.LayerNorm(d_model))
        self.enc_class_embed = nn.Linear(d_model, num_classes)
        self.enc_bbox_embed = MLP(d_model, d_model, 4, 3)

    def reset_parameters(self):
        """As the decoder heads: focal prior on the class bias, zero last box layer."""
        nn.init.constant_(self.enc_class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(self.enc_bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.enc_bbox_embed.layers[-1].bias)

    def topk(self, scores):
        """(B, N) proposal scores (-inf = invalid) -> (B, Q) indices of the selected proposals."""
        return scores.topk(self.num_queries, dim=1).indices

    def forward(self, memory, memory_mask, ctx):
        """memory (B, N, C), memory_mask (B, N) True = padding (or None) -> anchors (B, Q, 4) unsigmoided and
        detached, and the proposals that get a loss ``dict(pred_logits (B, Q, K), pred_boxes (B, Q, 4))``: the
        selected ones, or with ``class_agnostic`` every token's (B, N, K), (B, N, 4) and ``class_agnostic=True``."""
        N = memory.shape[1]
        if N < self.num_queries:
            raise ConfigError(f"MODEL.DETR.NUM_QUERIES={self.num_queries} exceeds the {N} encoder tokens "
                              "of this input: use fewer queries or larger images")
        proposals, valid = token_proposals(memory_mask, ctx)
        feats = self.enc_output(memory.masked_fill(~valid[..., None], 0.0))
        logits = self.enc_class_embed(feats)
        score = logits[..., 0] if self.class_agnostic else logits.max(-1).values
        idx = self.topk(score.masked_fill(~valid, float("-inf")))[..., None]

        def pick(t):  # (B, N, D) -> the selected (B, Q, D)
            return torch.gather(t, 1, idx.expand(-1, -1, t.shape[-1]))

        if self.class_agnostic:
            off = ~valid[..., None]
            coords = self.enc_bbox_embed(feats) + inverse_sigmoid(proposals).masked_fill(off, float("inf"))
            return pick(coords).detach(), dict(pred_logits=logits, pred_boxes=coords.sigmoid(), class_agnostic=True)
        # the box head runs on the selected tokens only (it is per token)
        coords = self.enc_bbox_embed(pick(feats)) + inverse_sigmoid(pick(proposals))
        return coords.detach(), dict(pred_logits=pick(logits), pred_boxes=coords.sigmoid())

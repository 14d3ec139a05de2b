"""DINO's own parts against hand-built references: contrastive denoising queries (layout, noise ranges,
groups from DN.NUM_QUERIES), their attention mask, their losses (positives reconstruct, negatives are "no
object"), look-forward-twice gradients, and the detrex recipe in the config."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torchvision.ops import box_convert, sigmoid_focal_loss

from conftest import make_cfg, toy_inputs
from ks_detr.modeling.layers import noised_queries
from test_denoising import targets
from test_matcher_criterion import giou

K = 10
TINY = ("MODEL.DETR.HIDDEN_DIM", 64, "MODEL.DETR.DIM_FEEDFORWARD", 64, "MODEL.DETR.ENC_LAYERS", 2,
        "MODEL.DETR.DEC_LAYERS", 3, "MODEL.DETR.NUM_QUERIES", 12, "MODEL.RESNETS.DEPTH", 18,
        "MODEL.RESNETS.RES2_OUT_CHANNELS", 64)


def test_contrastive_layout_without_noise():
    """Group k: positives of GT j at k*2g + j, negatives at k*2g + g + j; empty slots are padding."""
    labels, boxes, size = noised_queries(targets(), 2, 0.0, 0.0, K, contrastive=True)
    g = 3
    assert size == 2 * g and labels.shape == (3, 12) and boxes.shape == (3, 12, 4)
    for k in range(2):
        for half in (0, 1):  # positives, negatives
            start = k * 2 * g + half * g
            assert labels[0, start:start + g].tolist() == [3, 1, 4]
            torch.testing.assert_close(boxes[0, start:start + g], targets()[0]["boxes"])
            assert labels[1, start:start + g].tolist() == [2, K, K]
            assert (boxes[1, start + 1:start + g] == 0.5).all()
    assert (labels[2] == K).all() and (boxes[2] == 0.5).all()


def test_contrastive_noise_ranges():
    """Every corner of a positive moves by less than half the box side; of a negative by 1 to 2 halves
    (box_noise 1.0, a centred box so that nothing is clamped); labels flip with the given probability."""
    torch.manual_seed(0)
    n = 500
    box = torch.tensor([[0.5, 0.5, 0.2, 0.3]])
    t = [{"labels": torch.zeros(n, dtype=torch.int64), "boxes": box.repeat(n, 1)}]
    labels, boxes, size = noised_queries(t, 1, 0.25, 1.0, K, contrastive=True)
    half = torch.tensor([0.1, 0.15, 0.1, 0.15])
    gt = box_convert(box, "cxcywh", "xyxy")
    for part, lo, hi in ((slice(0, n), 0.0, 1.0), (slice(n, 2 * n), 1.0, 2.0)):
        moved = (box_convert(boxes[0, part], "cxcywh", "xyxy") - gt).abs() / half
        assert (moved >= lo - 1e-5).all() and (moved < hi + 1e-5).all()
        assert moved.min() < lo + 0.05 and moved.max() > hi - 0.05  # the whole range is used
        signed = box_convert(boxes[0, part], "cxcywh", "xyxy") - gt
        assert 0.4 < (signed > 0).float().mean() < 0.6  # both directions
    flipped = (labels[0] != 0).float().mean().item()  # a flip may draw class 0 again: 0.25 * 9/10
    assert abs(flipped - 0.225) < 0.04


def dino(*opts, config="configs/dino_r50_4scale_12ep.yaml"):
    torch.manual_seed(0)
    return build_model(make_cfg(config, *TINY, *opts))


def test_groups_follow_dn_num_queries_and_the_mask_is_detrex_layout():
    """DN.NUM_QUERIES 6 with at most 3 GT per image: 2 groups of 6 (3 positives, 3 negatives). The mask
    (True = blocked), built here cell by cell from DINO's rules: matching queries see no denoising query;
    a denoising query sees its own group (positives and negatives) and every matching query."""
    model = dino("MODEL.DETR.DN.NUM_QUERIES", 6)
    model.train()
    Q, C = 12, 64
    tgt, anchors, mask, dn = model.dn.prepend(torch.zeros(3, Q, C), torch.zeros(3, Q, 4), targets())
    assert dn == {"groups": 2, "group_size": 6}
    P = 12
    assert tgt.shape == (3, P + Q, C) and anchors.shape == (3, P + Q, 4)
    ref = torch.zeros(P + Q, P + Q, dtype=torch.bool)
    for i in range(P + Q):
        for j in range(P + Q):
            if i >= P:
                ref[i, j] = j < P
            elif j < P:
                ref[i, j] = i // 6 != j // 6
    assert torch.equal(mask, ref)
    # padding slots: zero content, anchor logit 0 (box 0.5); real slots: the label embedding, no indicator
    assert (tgt[1, [1, 2, 4, 5]] == 0).all() and (anchors[1, [1, 2, 4, 5]] == 0).all()
    assert model.dn.label_embed.weight.shape == (80, C)
    model.dn.label_noise = 0.0
    tgt, *_ = model.dn.prepend(torch.zeros(3, Q, C), torch.zeros(3, Q, 4), targets())
    torch.testing.assert_close(tgt[0, :3], model.dn.label_embed.weight[[3, 1, 4]])
    # many boxes in one image: at least one group
    many = [{"labels": torch.zeros(9, dtype=torch.int64), "boxes": torch.rand(9, 4) * 0.5 + 0.25}]
    assert model.dn.prepend(torch.zeros(1, Q, C), torch.zeros(1, Q, 4), many)[3]["groups"] == 1


def test_contrastive_losses_positives_reconstruct_negatives_are_no_object():
    """The criterion's dn part against a hand computation: focal loss with the GT class on the
    positives only (negatives and padding: all-zero targets), L1 and GIoU on the positives, all over
    num_boxes * groups."""
    model = dino()
    crit = model.criterion
    t = targets()[:2]
    labels, boxes, size = noised_queries(t, 2, 0.0, 0.5, 80, contrastive=True)
    torch.manual_seed(3)
    logits = torch.randn(2, boxes.shape[1], 80)
    pred = boxes.clamp(0.05, 0.95)
    out = dict(pred_logits=torch.randn(2, 12, 80), pred_boxes=torch.rand(2, 12, 4) * 0.5 + 0.25, suffix="",
               weight=1.0, dn=dict(groups=2, group_size=size, pred_logits=logits, pred_boxes=pred))
    losses = crit([out], t)
    onehot = torch.zeros_like(logits)
    pos_q, pos_t = [], []
    for b, tb in enumerate(t):
        for k in range(2):
            for j in range(len(tb["labels"])):
                onehot[b, k * size + j, tb["labels"][j]] = 1.0
                pos_q.append(pred[b, k * size + j])
                pos_t.append(tb["boxes"][j])
    norm = 4.0 * 2  # 4 GT boxes, 2 groups
    cls = sigmoid_focal_loss(logits, onehot, 0.25, 2.0, "sum") / norm
    src, tgt = torch.stack(pos_q), torch.stack(pos_t)
    l1 = (src - tgt).abs().sum() / norm
    giou_loss = sum(1 - giou(a.tolist(), b.tolist()) for a, b in zip(src, tgt)) / norm  # written-out GIoU
    w = crit.weights
    torch.testing.assert_close(losses["loss_class_dn"], cls * w["loss_class"])
    torch.testing.assert_close(losses["loss_bbox_dn"], l1 * w["loss_bbox"])
    torch.testing.assert_close(losses["loss_giou_dn"].item(), giou_loss * w["loss_giou"], rtol=1e-5, atol=1e-6)


def capture_outputs(model):
    """Run a training forward and return the criterion's inputs (outputs with their suffixes)."""
    seen = {}

    def spy(outputs, targets):
        seen.update({o["suffix"]: o for o in outputs})
        return {"loss": outputs[0]["pred_boxes"].sum()}

    model.criterion.forward = spy
    model.train()
    with EventStorage():
        model(toy_inputs(with_empty=False))
    return seen


@pytest.mark.parametrize("config,twice", [("configs/dino_r50_4scale_12ep.yaml", True),
                                          ("configs/dn_deformable_detr_r50.yaml", False)])
def test_look_forward_twice(config, twice):
    """DINO: layer i's box loss trains the box head of layer i - 1 (whose box it refines), not of
    layer i - 2. DN-Deformable (look forward once): not even layer i - 1's."""
    model = dino("MODEL.DETR.TWO_STAGE", True, config=config)
    for head in model.bbox_embed:  # zero-initialised last layers would hide every gradient
        torch.nn.init.normal_(head.layers[-1].weight, std=0.01)
    out = capture_outputs(model)
    heads = [list(h.parameters()) for h in model.bbox_embed]

    def grad_norm(suffix, layer):
        grads = torch.autograd.grad(out[suffix]["pred_boxes"].sum(), heads[layer], retain_graph=True,
                                    allow_unused=True)
        return sum(0.0 if g is None else g.abs().sum().item() for g in grads)

    assert grad_norm("_1", 1) > 0  # its own head
    assert (grad_norm("_1", 0) > 0) == twice
    assert grad_norm("", 0) == 0  # the last layer (2) does not reach layer 0
    assert (grad_norm("", 1) > 0) == twice


def test_decoder_norm_and_heads():
    """DINO's decoder: no query_scale, one final LayerNorm on every layer's output; per-layer heads plus
    the proposal heads: the parameter count of detrex's DINO-R50 (47,650,316 at 900 queries, 80 classes)."""
    model = dino(config="configs/dino_r50_4scale_12ep.yaml")
    assert model.decoder.query_scale is None and isinstance(model.decoder.norm, torch.nn.LayerNorm)
    full = build_model(make_cfg("configs/dino_r50_4scale_12ep.yaml"))
    assert sum(p.numel() for p in full.parameters()) == 47_650_316
    assert full.dn.label_embed.weight.shape == (80, 256) and full.tgt_embed.weight.shape == (900, 256)
    d = make_cfg("configs/dino_r50_4scale_12ep.yaml").MODEL.DETR
    assert (d.NUM_QUERIES, d.DN.NUM_QUERIES, d.DN.LABEL_NOISE, d.DN.BOX_NOISE, d.NUM_TOPK_TEST) == (900, 100, 0.25,
                                                                                                    1.0, 300)


def test_dino_needs_two_stage():
    with pytest.raises(ValueError, match="MODEL.DETR.TWO_STAGE=False: DINO's anchors are the top-k"):
        dino("MODEL.DETR.TWO_STAGE", False)

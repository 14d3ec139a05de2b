"""Denoising queries: construction, the group attention mask, and no leakage through the decoder."""
import torch
from detectron2.modeling import build_model

from conftest import make_cfg
from ks_detr.modeling.layers import dn_attention_mask, noised_queries


def targets():
    return [
        {"labels": torch.tensor([3, 1, 4]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.2, 0.3, 0.1, 0.1],
                                                                   [0.7, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.6, 0.2, 0.2]])},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]


def test_noised_queries_layout_without_noise():
    labels, boxes, g = noised_queries(targets(), groups=5, label_noise=0.0, box_noise=0.0, num_classes=10)
    assert g == 3 and labels.shape == (3, 15) and boxes.shape == (3, 15, 4)
    for k in range(5):  # group k holds GT j at k * g + j; unused slots are padding (label 10)
        assert labels[0, k * 3:(k + 1) * 3].tolist() == [3, 1, 4]
        assert labels[1, k * 3:(k + 1) * 3].tolist() == [2, 10, 10]
        torch.testing.assert_close(boxes[0, k * 3:(k + 1) * 3], targets()[0]["boxes"])
    assert (labels[2] == 10).all() and (boxes[2] == 0.5).all()


def test_noise_magnitudes():
    torch.manual_seed(0)
    t = [{"labels": torch.zeros(2000, dtype=torch.int64), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4]]).repeat(2000, 1)}]
    labels, boxes, _ = noised_queries(t, groups=1, label_noise=0.2, box_noise=0.4, num_classes=10)
    flipped = (labels[0] != 0).float().mean().item()  # a flip may draw class 0 again: 0.2 * 9/10
    assert abs(flipped - 0.18) < 0.03
    d = (boxes[0] - t[0]["boxes"]).abs()
    limit = torch.tensor([0.4 * 0.1, 0.4 * 0.2, 0.4 * 0.2, 0.4 * 0.4])
    assert (d <= limit + 1e-6).all() and (d.max(0).values > 0.9 * limit).all()


def test_attention_mask_blocks_groups_and_matching_part():
    G, g, Q = 3, 2, 4
    m = dn_attention_mask(G, g, Q)
    P = G * g
    assert m.shape == (P + Q, P + Q)
    assert m[P:, :P].all() and not m[P:, P:].any()  # matching queries see no denoising query
    assert not m[:P, P:].any()  # denoising queries see the matching queries
    for i in range(P):
        for j in range(P):
            assert m[i, j] == (i // g != j // g)  # each group sees only itself


def test_no_leak_through_the_decoder():
    """Changing one denoising group's queries changes neither other groups nor matching outputs."""
    torch.manual_seed(0)
    model = build_model(make_cfg("configs/dn_detr_r50.yaml", "MODEL.DETR.NUM_QUERIES", 20)).eval()
    torch.manual_seed(1)
    memory, pos = torch.randn(1, 30, 256), torch.randn(1, 30, 256)
    mask = torch.zeros(1, 30, dtype=torch.bool)
    model.train()
    tgt, anchors, attn_mask, dn = model.queries(targets()[:1], 1)
    model.eval()  # no dropout (the DN config has none anyway)
    g = dn["group_size"]
    hs, _ = model.decoder(tgt, memory, mask, pos, anchors, model.bbox_embed, attn_mask)
    tgt2, anchors2 = tgt.clone(), anchors.clone()
    tgt2[:, g:2 * g] += 1.0  # perturb group 1
    anchors2[:, g:2 * g] -= 0.5
    hs2, _ = model.decoder(tgt2, memory, mask, pos, anchors2, model.bbox_embed, attn_mask)
    P = dn["groups"] * g
    torch.testing.assert_close(hs2[:, :, :g], hs[:, :, :g])  # group 0
    torch.testing.assert_close(hs2[:, :, 2 * g:], hs[:, :, 2 * g:])  # groups 2.. and matching part
    assert not torch.allclose(hs2[:, :, g:2 * g], hs[:, :, g:2 * g])
    assert hs.shape[2] == P + 20

"""The official-numerics switches (``MODEL.DETR.DECODER_PADDING_MASK``, ``MODEL.DETR.EVAL_PAD_LAST_PIXEL``)
against references computed another way: dropping padded tokens instead of masking them, and hand-built masks."""
import pytest
import torch
from detectron2.modeling import build_model

from conftest import make_cfg, toy_inputs

TINY = ("MODEL.DETR.HIDDEN_DIM", 64, "MODEL.DETR.NHEADS", 4, "MODEL.DETR.DIM_FEEDFORWARD", 64,
        "MODEL.DETR.ENC_LAYERS", 2, "MODEL.DETR.DEC_LAYERS", 2, "MODEL.DETR.NUM_QUERIES", 12,
        "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64)
SIZES = ((224, 256), (160, 192))  # the first image fills the padded batch, the second is padded


def decoded(config, padding_mask):
    """Eval run of a seeded random model on SIZES: the model, what its decoder got and gave."""
    torch.manual_seed(0)
    model = build_model(make_cfg(config, *TINY, "MODEL.DETR.DECODER_PADDING_MASK", padding_mask)).eval()
    seen, decode = {}, model.decode

    def spy(memory, memory_mask, pos, *rest):
        seen.update(memory=memory, memory_mask=memory_mask, pos=pos, out=decode(memory, memory_mask, pos, *rest))
        return seen["out"]

    model.decode = spy
    embed = model.embed_features
    model.embed_features = lambda *a: seen.setdefault("embedded", embed(*a))
    with torch.no_grad():
        model([{"image": x["image"]} for x in toy_inputs(SIZES, with_empty=False)])
        seen["decode"] = decode
    return seen


@pytest.mark.parametrize("family", ["conditional_detr", "dab_detr", "dn_detr"])
def test_decoder_padding_mask_on_equals_dropping_padded_tokens_off_attends_to_them(family):
    """On (ours): the padded image decodes as if its padded tokens did not exist. Off (the official
    Conditional/DAB/DN code): its queries also attend to the memory at the padded tokens, exactly as an
    unmasked decoder over the whole padded row. The unpadded image is the same either way."""
    on, off = (decoded(f"configs/{family}_r50.yaml", flag) for flag in (True, False))
    key_mask = on["embedded"][2]
    assert off["memory_mask"] is None and torch.equal(on["memory_mask"], key_mask)
    assert not key_mask[0].any() and key_mask[1].any()  # one padded image
    assert torch.equal(on["memory"], off["memory"])  # the encoder masks padding in both
    hs_on, hs_off = on["out"][0], off["out"][0]
    valid = ~key_mask[1]
    with torch.no_grad():
        dropped = on["decode"](on["memory"][1:, valid], None, on["pos"][1:, valid])[0]
        unmasked = on["decode"](on["memory"][1:], None, on["pos"][1:])[0]
    assert torch.allclose(hs_on[:, 1:], dropped, atol=1e-5)
    assert torch.allclose(hs_off[:, 1:], unmasked, atol=1e-5)
    assert (hs_on[:, 1] - hs_off[:, 1]).abs().max() > 1e-3
    assert torch.allclose(hs_on[:, 0], hs_off[:, 0], atol=1e-5)


def test_eval_pad_last_pixel_masks_each_images_last_row_and_column_in_eval_only():
    torch.manual_seed(0)
    model = build_model(make_cfg("configs/dab_detr_r50.yaml", *TINY, "MODEL.DETR.EVAL_PAD_LAST_PIXEL", True))
    inputs = toy_inputs(SIZES, with_empty=False)
    expected = {}
    for training, last in ((True, 0), (False, 1)):
        mask = torch.ones(2, 224, 256, dtype=torch.bool)  # hand-built: True = padding
        for i, (h, w) in enumerate(SIZES):
            mask[i, : h - last, : w - last] = False
        expected[training] = mask
    for training in (True, False):
        model.train(training)
        images, mask = model.preprocess_image(inputs)
        assert images.tensor.shape[-2:] == (224, 256) and torch.equal(mask, expected[training])
    model = build_model(make_cfg("configs/dab_detr_r50.yaml", *TINY)).eval()
    assert torch.equal(model.preprocess_image(inputs)[1], expected[True])  # default: no extra padding

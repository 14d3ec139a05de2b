"""The GT Fg-Bg mask against hand-drawn boxes and an explicit bilinear-sampling reference."""
import torch

from ks_detr.modeling.ks import box_canvas, fg_token_mask


def test_canvas_hand_drawn_boxes_and_padding():
    boxes = [torch.tensor([[1.0, 2.0, 4.0, 3.0], [3.7, 0.2, 5.9, 1.9]]), torch.tensor([[0.0, 0.0, 9.0, 9.0]])]
    # image 0 is 5 x 6 (h x w) in an 6 x 7 padded batch; image 1 is 4 x 3 (box clipped to it)
    canvas = box_canvas(boxes, [(5, 6), (4, 3)], (6, 7))
    expect0 = torch.zeros(6, 7)
    expect0[2:3, 1:4] = 1  # x 1..4, y 2..3 (truncated ints, exclusive end)
    expect0[0:1, 3:5] = 1  # 3.7->3, 0.2->0, 5.9->5, 1.9->1
    expect1 = torch.zeros(6, 7)
    expect1[:4, :3] = 1  # clipped to the unpadded image
    torch.testing.assert_close(canvas[0], expect0)
    torch.testing.assert_close(canvas[1], expect1)


def test_canvas_overlaps_and_pad_pixels():
    boxes = [torch.tensor([[2.0, 2.0, 4.0, 4.0], [3.0, 3.0, 5.0, 5.0]])]
    canvas = box_canvas(boxes, [(8, 8)], (8, 8), pad_pixels=1)
    expect = torch.zeros(8, 8)
    expect[1:5, 1:5] = 1
    expect[2:6, 2:6] = 1
    torch.testing.assert_close(canvas[0], expect)  # overlaps stay 1, boxes grown by 1 pixel


def test_empty_annotations_give_all_background():
    boxes = [torch.zeros(0, 4), torch.tensor([[3.0, 3.0, 6.0, 6.0]])]
    canvas = box_canvas(boxes, [(9, 9), (9, 9)], (9, 9))
    valid = torch.ones(2, 3, 3, dtype=torch.bool)
    fg = fg_token_mask(canvas, [(3, 3)], [valid])
    assert fg.shape == (2, 9)
    assert not fg[0].any()
    assert fg[1].tolist() == [False] * 4 + [True] + [False] * 4  # only the centre sample (4, 4)


def bilinear_reference(canvas, h, w):
    """Token (i, j) samples the canvas at align_corners coordinates; fg iff the sample > 0."""
    H, W = canvas.shape
    out = torch.zeros(h, w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            y = i * (H - 1) / (h - 1) if h > 1 else 0.0
            x = j * (W - 1) / (w - 1) if w > 1 else 0.0
            y0, x0 = int(y), int(x)
            y1, x1 = min(y0 + 1, H - 1), min(x0 + 1, W - 1)
            fy, fx = y - y0, x - x0
            value = (canvas[y0, x0] * (1 - fy) * (1 - fx) + canvas[y0, x1] * (1 - fy) * fx
                     + canvas[y1, x0] * fy * (1 - fx) + canvas[y1, x1] * fy * fx)
            out[i, j] = value > 0
    return out


def test_bilinear_tokens_odd_sizes_and_padding():
    g = torch.Generator().manual_seed(0)
    H, W, h, w = 37, 29, 5, 4  # odd sizes: 37x29 pixels onto a 5x4 token grid
    boxes = []
    for _ in range(2):
        xy = torch.rand(6, 2, generator=g) * torch.tensor([W - 8.0, H - 8.0])
        wh = 2 + torch.rand(6, 2, generator=g) * 6
        boxes.append(torch.cat([xy, xy + wh], 1))
    sizes = [(37, 29), (30, 21)]
    canvas = box_canvas(boxes, sizes, (H, W))
    valid = torch.ones(2, h, w, dtype=torch.bool)
    valid[1, 4:, :] = False  # image 1 is padded: its last token row / column are padding
    valid[1, :, 3:] = False
    fg = fg_token_mask(canvas, [(h, w)], [valid]).view(2, h, w)
    for b in range(2):
        assert torch.equal(fg[b], bilinear_reference(canvas[b], h, w) & valid[b])
    assert not fg[1][~valid[1]].any()


def test_multi_level_concatenation_and_area_sampling():
    canvas = box_canvas([torch.tensor([[5.0, 5.0, 7.0, 7.0]])], [(32, 32)], (32, 32))
    shapes = [(8, 8), (4, 4)]
    valid = [torch.ones(1, 8, 8, dtype=torch.bool), torch.ones(1, 4, 4, dtype=torch.bool)]
    fg = fg_token_mask(canvas, shapes, valid, sampling="area", strides=[4, 8])
    assert fg.shape == (1, 64 + 16)
    # pixels 5..6 fall in 4-pixel cell 1 (level 0) and 8-pixel cell 0 (level 1)
    lvl0, lvl1 = fg[0, :64].view(8, 8), fg[0, 64:].view(4, 4)
    assert lvl0.nonzero().tolist() == [[1, 1]]
    assert lvl1.nonzero().tolist() == [[0, 0]]
    # bilinear point sampling misses this small box on the coarse grid (documented behaviour)
    assert not fg_token_mask(canvas, [(4, 4)], [valid[1]], sampling="bilinear").any()


def area_reference(boxes, h, w, stride):
    """Token (i, j) is fg iff a box's pixel rows [y1, y2) and columns [x1, x2) (truncated) meet its stride
    cell [i * stride, (i + 1) * stride) x [j * stride, (j + 1) * stride): a loop over cells and boxes."""
    fg = torch.zeros(h, w, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes.to(torch.int64).tolist():
        for i in range(h):
            for j in range(w):
                rows = max(y1, i * stride) < min(y2, (i + 1) * stride)
                cols = max(x1, j * stride) < min(x2, (j + 1) * stride)
                fg[i, j] |= rows and cols
    return fg


def test_area_sampling_uses_the_stride_cells_when_the_size_is_not_a_multiple_of_the_stride():
    """100 x 100 input, stride 32: tokens are ceil(100 / 32) = 4 per axis; the box [76, 95] lies in stride cell
    2 (pixels 64..95), not in the last quarter of the padded batch (75..99) that a plain resize would use."""
    box = torch.tensor([[76.0, 76.0, 95.0, 95.0]])
    canvas = box_canvas([box], [(100, 100)], (100, 100))
    fg = fg_token_mask(canvas, [(4, 4)], [torch.ones(1, 4, 4, dtype=torch.bool)], "area", strides=[32])
    assert fg[0].view(4, 4).nonzero().tolist() == [[2, 2]]
    g = torch.Generator().manual_seed(3)
    for H, W, s in ((100, 100, 32), (75, 130, 16), (37, 61, 8)):
        h, w = -(-H // s), -(-W // s)
        xy = torch.rand(5, 2, generator=g) * torch.tensor([W - 4.0, H - 4.0])
        boxes = torch.cat([xy, xy + 1 + torch.rand(5, 2, generator=g) * 20], 1)
        canvas = box_canvas([boxes], [(H, W)], (H, W))
        fg = fg_token_mask(canvas, [(h, w)], [torch.ones(1, h, w, dtype=torch.bool)], "area", strides=[s])
        clipped = torch.minimum(boxes, torch.tensor([W, H, W, H], dtype=boxes.dtype))
        assert torch.equal(fg[0].view(h, w), area_reference(clipped, h, w, s)), (H, W, s)

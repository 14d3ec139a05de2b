"""Ground-truth foreground/background token mask (training only), KS-DETR's Fg-Bg mask."""
import torch
import torch.nn.functional as F


def box_canvas(boxes_per_image, image_sizes, padded_size, pad_pixels=0):
    """Paint GT boxes on a zeros canvas of the padded batch size.

    Args:
        boxes_per_image: list of B tensors (M_i, 4), absolute xyxy in input-image pixels.
        image_sizes: list of B (h, w) of the unpadded input images.
        padded_size: (H_pad, W_pad) of the batch tensor.
        pad_pixels: grow every box by this many pixels per side (clipped to the image).
    Returns:
        (B, H_pad, W_pad) float canvas, 1 inside any box, 0 elsewhere (padding is always 0).
    """
    H, W = padded_size
    B = len(boxes_per_image)
    device = boxes_per_image[0].device if B else torch.device("cpu")
    # 2-D difference array: +1/-1 at the four corners of every box, then a double cumsum.
    diff = torch.zeros(B, H + 1, W + 1, device=device)
    for b, (boxes, (h, w)) in enumerate(zip(boxes_per_image, image_sizes)):
        if boxes.numel() == 0:
            continue
        xyxy = boxes.detach().to(torch.int64)  # truncation, as the official code
        x1 = (xyxy[:, 0] - pad_pixels).clamp(0, w)
        y1 = (xyxy[:, 1] - pad_pixels).clamp(0, h)
        x2 = (xyxy[:, 2] + pad_pixels).clamp(0, w)
        y2 = (xyxy[:, 3] + pad_pixels).clamp(0, h)
        one = ((x2 > x1) & (y2 > y1)).to(diff.dtype)  # empty boxes add zeros (no boolean indexing: no host sync)
        for ys, xs, sign in ((y1, x1, 1), (y1, x2, -1), (y2, x1, -1), (y2, x2, 1)):
            diff[b].index_put_((ys, xs), sign * one, accumulate=True)
    return (diff.cumsum(1).cumsum(2)[:, :H, :W] > 0).to(torch.float32)


def fg_token_mask(canvas, token_shapes, valid_masks, sampling="bilinear", strides=None):
    """Resize the box canvas to every token grid and flag foreground tokens.

    Args:
        canvas: (B, H_pad, W_pad) from :func:`box_canvas`.
        token_shapes: list of (h, w) token grids (one per feature level, in token order).
        valid_masks: list of (B, h, w) bool, True = real (non-padding) token.
        sampling: "bilinear" (official: align_corners=True, fg iff the sample is > 0) or
            "area" (fg iff the token's stride cell, pixels [i*s, (i+1)*s) per axis, overlaps a box; never
            misses a small box).
        strides: the stride s of every token grid (needed by "area").
    Returns:
        (B, sum(h*w)) bool, True = foreground token.
    """
    out = []
    H, W = canvas.shape[-2:]
    for level, ((h, w), valid) in enumerate(zip(token_shapes, valid_masks)):
        if sampling == "bilinear":
            r = F.interpolate(canvas[:, None], size=(h, w), mode="bilinear", align_corners=True)
        else:
            s = strides[level]  # the padded batch covers h * s pixels or a little less (h = ceil(H / s))
            cells = F.pad(canvas, (0, max(w * s - W, 0), 0, max(h * s - H, 0)))[:, : h * s, : w * s]
            r = F.max_pool2d(cells[:, None], kernel_size=s, stride=s)
        out.append(((r[:, 0] > 0) & valid).flatten(1))
    return torch.cat(out, dim=1)

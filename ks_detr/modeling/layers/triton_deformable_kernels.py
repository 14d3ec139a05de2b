"""The Triton kernels of :mod:`ks_detr.modeling.layers.triton_deformable` (forward and backward of
multi-scale deformable attention sampling). This file holds only ``@triton.jit`` functions: it is
loaded once per Triton mode (compiled; interpreter), see ``triton_deformable._kernels``."""
import triton
import triton.language as tl


@triton.jit
def _bilinear_corner(x0, y0, dx: tl.constexpr, dy: tl.constexpr, fx, fy, w_l, h_l):
    """Corner (x0 + dx, y0 + dy): inside-the-map mask, flat index within the level, bilinear weight
    and its derivatives by fx and fy."""
    xi = x0 + dx
    yi = y0 + dy
    inside = (xi >= 0) & (xi < w_l) & (yi >= 0) & (yi < h_l)
    wx = dx * fx + (1 - dx) * (1.0 - fx)  # dx, dy: 0 or 1
    wy = dy * fy + (1 - dy) * (1.0 - fy)
    return inside, yi * w_l + xi, wx * wy, (2 * dx - 1) * wy, wx * (2 * dy - 1)


@triton.jit
def _pixel(loc_ptr, offs, mask, w_l, h_l):
    """Pixel coordinates of the locations at ``offs`` (x at offs, y at offs + 1), kept within
    [-2, size + 1] (further out all four corners are outside either way; no overflow in the int cast)."""
    x = tl.load(loc_ptr + offs, mask=mask, other=0.0) * w_l - 0.5
    y = tl.load(loc_ptr + offs + 1, mask=mask, other=0.0) * h_l - 0.5
    x = tl.minimum(tl.maximum(x, -2.0), w_l + 1.0)
    y = tl.minimum(tl.maximum(y, -2.0), h_l + 1.0)
    xf = tl.floor(x)
    yf = tl.floor(y)
    return xf.to(tl.int32), yf.to(tl.int32), x - xf, y - yf


@triton.jit
def _forward_kernel(value_ptr, loc_ptr, attn_ptr, out_ptr, shapes_ptr, starts_ptr,
                    B, N, Lq, H: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_w = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    q_ok = q < Lq
    d_ok = d < D
    tile_ok = q_ok[:, None] & d_ok[None, :]
    row = (b * Lq + q).to(tl.int64) * H + h  # (b, q, h) of locations and weights
    set_offset = pid_w.to(tl.int64) * B * Lq * H * L * P
    v_base = value_ptr + (b.to(tl.int64) * N * H + h) * D
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=out_ptr.dtype.element_ty)
    for lvl in tl.static_range(L):
        h_l = tl.load(shapes_ptr + 2 * lvl)
        w_l = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl)
        for pt in tl.static_range(P):
            lp = (row * L + lvl) * P + pt
            a = tl.load(attn_ptr + set_offset + lp, mask=q_ok, other=0.0)
            x0, y0, fx, fy = _pixel(loc_ptr, 2 * lp, q_ok, w_l, h_l)
            for c in tl.static_range(4):
                inside, idx, bw, _, _ = _bilinear_corner(x0, y0, c % 2, c // 2, fx, fy, w_l, h_l)
                ok = q_ok & inside
                v = tl.load(v_base + (start + idx).to(tl.int64)[:, None] * (H * D) + d[None, :],
                            mask=ok[:, None] & d_ok[None, :], other=0.0)
                acc += (a * bw)[:, None] * v
    out_offs = ((pid_w.to(tl.int64) * B + b) * Lq + q)[:, None] * (H * D) + h * D + d[None, :]
    tl.store(out_ptr + out_offs, acc, mask=tile_ok)


@triton.jit
def _backward_kernel(value_ptr, loc_ptr, attn_ptr, grad_out_ptr, grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
                     shapes_ptr, starts_ptr,
                     B, N, Lq, H: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                     BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_w = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    q_ok = q < Lq
    d_ok = d < D
    tile_ok = q_ok[:, None] & d_ok[None, :]
    row = (b * Lq + q).to(tl.int64) * H + h
    set_offset = pid_w.to(tl.int64) * B * Lq * H * L * P
    v_base = (b.to(tl.int64) * N * H + h) * D
    out_offs = ((pid_w.to(tl.int64) * B + b) * Lq + q)[:, None] * (H * D) + h * D + d[None, :]
    g = tl.load(grad_out_ptr + out_offs, mask=tile_ok, other=0.0)
    for lvl in tl.static_range(L):
        h_l = tl.load(shapes_ptr + 2 * lvl)
        w_l = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl)
        for pt in tl.static_range(P):
            lp = (row * L + lvl) * P + pt
            a = tl.load(attn_ptr + set_offset + lp, mask=q_ok, other=0.0)
            x0, y0, fx, fy = _pixel(loc_ptr, 2 * lp, q_ok, w_l, h_l)
            g_attn = tl.zeros((BLOCK_Q,), dtype=g.dtype)
            g_fx = tl.zeros((BLOCK_Q,), dtype=g.dtype)
            g_fy = tl.zeros((BLOCK_Q,), dtype=g.dtype)
            for c in tl.static_range(4):
                inside, idx, bw, dbw_dx, dbw_dy = _bilinear_corner(x0, y0, c % 2, c // 2, fx, fy, w_l, h_l)
                ok = q_ok & inside
                offs = v_base + (start + idx).to(tl.int64)[:, None] * (H * D) + d[None, :]
                mask = ok[:, None] & d_ok[None, :]
                v = tl.load(value_ptr + offs, mask=mask, other=0.0)
                gv = tl.sum(g * v, axis=1)  # d out / d (a * bw) for this corner
                g_attn += bw * gv
                g_fx += dbw_dx * gv
                g_fy += dbw_dy * gv
                tl.atomic_add(grad_value_ptr + offs, (a * bw)[:, None] * g, mask=mask)
            tl.store(grad_attn_ptr + set_offset + lp, g_attn, mask=q_ok)
            # x = loc_x * w_l - 0.5 (no gradient where the clamp acted: every corner is outside there)
            tl.store(grad_loc_ptr + 2 * set_offset + 2 * lp, a * g_fx * w_l, mask=q_ok)
            tl.store(grad_loc_ptr + 2 * set_offset + 2 * lp + 1, a * g_fy * h_l, mask=q_ok)

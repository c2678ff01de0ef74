"""Triton building blocks shared by every fattn kernel.

All helpers are `@triton.jit` functions, inlined into the calling kernel.

Known Triton pitfalls these helpers (and kernels using them) steer around:
- an int argument equal to 1 is passed as a Python constant: use `x * 1.0`, not `x.to(tl.float32)`;
- a loop variable is a Python int under the interpreter: use `tl.cast(i, tl.int64)`, not `i.to(...)`;
- triton 3.6 on sm_90 can crash in RemoveLayoutConversions ("arith.select ... same shape") when
  1-D per-row vectors from `bilinear_corner` are mixed with row sums of 2-D fp32 tiles; keeping the
  per-row values as [BLOCK, 1] columns avoids it.

Online softmax works in base 2: callers multiply scores by `scale * LOG2E` once, so the inner loop
uses `exp2` (one MUFU instruction) instead of `exp`. Log-sum-exps leave the kernels in natural log.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fattn.core.runtime import INTERPRET

__all__ = [
    "LN2",
    "LOG2E",
    "bilinear_cell",
    "bilinear_coords",
    "cell_corner",
    "bilinear_corner",
    "interp_upcast",
    "mask_2d",
    "offsets_2d",
    "online_softmax_finalize",
    "online_softmax_update",
    "probs_from_lse",
    "tile_range",
]

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# --------------------------------------------------------------------------------------------
# Online softmax
# --------------------------------------------------------------------------------------------
@triton.jit
def online_softmax_update(m_i, l_i, scores):
    """One tile of the streaming softmax.

    m_i, l_i: [BM] fp32 running max and running sum (start at -inf and 0).
    scores:   [BM, BN] fp32 in base-2 units (scale * log2(e) applied), -inf where masked.
    Returns (m_new, l_new, p, alpha): p = exp2(scores - m_new) [BM, BN] and alpha = exp2(m_i - m_new)
    [BM], the factor the caller multiplies its accumulator by before adding p @ v.
    """
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    # A row that has seen only masked keys keeps m_new = -inf; subtracting 0 instead of -inf keeps
    # p and alpha at 0 rather than NaN (-inf - -inf).
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_ref)
    p = tl.math.exp2(scores - m_ref[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return m_new, l_new, p, alpha


@triton.jit
def online_softmax_finalize(acc, m_i, l_i):
    """Normalize the accumulator. Returns (out [BM, BD], lse [BM]).

    lse is the natural-log log-sum-exp of the (scaled) scores. A row that saw no key gives out = 0
    and lse = -inf (log of an empty sum), never NaN.
    """
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    return out, lse


@triton.jit
def probs_from_lse(scores, lse):
    """Recompute softmax probabilities in a backward pass.

    scores: [BM, BN] base-2 scaled scores (-inf where masked); lse: [BM] natural-log lse as written by
    `online_softmax_finalize`. Rows with lse = -inf (no key seen) give p = 0, not NaN.
    """
    lse2 = lse * LOG2E
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    return tl.math.exp2(scores - lse2[:, None])


# --------------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------------
@triton.jit
def tile_range(tile_id, BLOCK: tl.constexpr, n):
    """Offsets of tile `tile_id` of size BLOCK and the mask of those below n (ragged last tile)."""
    offs = tile_id * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def offsets_2d(rows, cols, stride_row, stride_col):
    """[R, C] element offsets rows * stride_row + cols * stride_col, computed in int64.

    int64 because a row index times its stride passes 2^31 on large activations (e.g. B*N*H*D).
    """
    return rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col


@triton.jit
def mask_2d(rows, n_rows, cols, n_cols):
    """[R, C] mask of rows < n_rows and cols < n_cols."""
    return (rows < n_rows)[:, None] & (cols < n_cols)[None, :]


# --------------------------------------------------------------------------------------------
# Bilinear sampling, with grid_sample's conventions
# --------------------------------------------------------------------------------------------
@triton.jit
def bilinear_coords(x, y, width, height, ALIGN_CORNERS: tl.constexpr, BORDER: tl.constexpr):
    """Map normalized points to the pixel grid of a `height x width` map.

    x, y: fp32 tensors, 0 = left/top edge and 1 = right/bottom edge (grid_sample's grid is 2x - 1).
    ALIGN_CORNERS: 0 and 1 are the centres of the corner pixels (ix = x * (width - 1)); otherwise
    the outer edges of the corner pixels (ix = x * width - 0.5).
    BORDER: clamp to the map (padding_mode="border"); otherwise samples outside read zeros.

    Returns (x0, y0, fx, fy, dix_dx, diy_dy): the top-left corner (int32), the fractional offsets
    inside the cell, and d(pixel coordinate)/d(normalized coordinate), zero where BORDER clamped.
    """
    # `* 1.0`, not `.to(tl.float32)`: Triton passes an int argument equal to 1 as a Python constant.
    wf = width * 1.0
    hf = height * 1.0
    if ALIGN_CORNERS:
        ix = x * (wf - 1.0)
        iy = y * (hf - 1.0)
        dix_dx = wf - 1.0 + tl.zeros_like(x)
        diy_dy = hf - 1.0 + tl.zeros_like(y)
    else:
        ix = x * wf - 0.5
        iy = y * hf - 0.5
        dix_dx = wf + tl.zeros_like(x)
        diy_dy = hf + tl.zeros_like(y)
    if BORDER:
        # grid_sample's clip: the gradient passes strictly inside (0, size - 1), zero on and outside.
        dix_dx = tl.where((ix <= 0.0) | (ix >= wf - 1.0), 0.0, dix_dx)
        diy_dy = tl.where((iy <= 0.0) | (iy >= hf - 1.0), 0.0, diy_dy)
        ix = tl.minimum(tl.maximum(ix, 0.0), wf - 1.0)
        iy = tl.minimum(tl.maximum(iy, 0.0), hf - 1.0)
    else:
        # Points far outside touch no pixel; clamping keeps the int32 conversion in range.
        ix = tl.minimum(tl.maximum(ix, -2.0), wf + 1.0)
        iy = tl.minimum(tl.maximum(iy, -2.0), hf + 1.0)
    x0f = tl.floor(ix)
    y0f = tl.floor(iy)
    return x0f.to(tl.int32), y0f.to(tl.int32), ix - x0f, iy - y0f, dix_dx, diy_dy


@triton.jit
def bilinear_cell(x, y, width, height, ALIGN_CORNERS: tl.constexpr, BORDER: tl.constexpr):
    """The bilinear cell of each point, per axis: a corner's validity and weight are products of its x
    and y factors, so four corners cost two compares and two weights per axis, not per corner.

    Returns (pix, in_x0, in_x1, in_y0, in_y1, wx0, wx1, wy0, wy1, dix_dx, diy_dy): the top-left pixel
    index y0 * width + x0 (int32; the other corners are pix + 1, pix + width, pix + width + 1), whether
    each of the two columns and two rows lies inside the map, their weights (1 - f, f), and
    d(pixel coordinate)/d(normalized coordinate) as in `bilinear_coords`.
    """
    x0, y0, fx, fy, dix_dx, diy_dy = bilinear_coords(x, y, width, height, ALIGN_CORNERS, BORDER)
    in_x0 = (x0 >= 0) & (x0 < width)
    in_x1 = (x0 >= -1) & (x0 < width - 1)
    in_y0 = (y0 >= 0) & (y0 < height)
    in_y1 = (y0 >= -1) & (y0 < height - 1)
    return y0 * width + x0, in_x0, in_x1, in_y0, in_y1, 1.0 - fx, fx, 1.0 - fy, fy, dix_dx, diy_dy


@triton.jit
def cell_corner(in_x0, in_x1, in_y0, in_y1, wx0, wx1, wy0, wy1, width, DX: tl.constexpr, DY: tl.constexpr):
    """Corner (DX, DY in {0, 1}) of a `bilinear_cell`: (in_map, wx, wy, dwx, dwy, offset), whether it
    lies inside the map, its x and y weights (their product is its bilinear weight), their derivatives
    with respect to fx and fy (+-1), and its pixel's offset from the top-left one (DX + DY * width)."""
    if DX == 1:
        in_x, wx, dwx = in_x1, wx1, 1.0
    else:
        in_x, wx, dwx = in_x0, wx0, -1.0
    if DY == 1:
        in_y, wy, dwy = in_y1, wy1, 1.0
    else:
        in_y, wy, dwy = in_y0, wy0, -1.0
    return in_x & in_y, wx, wy, dwx, dwy, DX + DY * width


@triton.jit
def bilinear_corner(x0, y0, fx, fy, width, height, DX: tl.constexpr, DY: tl.constexpr):
    """One of the four corners (DX, DY in {0, 1}) around the sample point.

    Returns (pixel, valid, w, dw_dfx, dw_dfy): the row-major pixel index y * width + x (int32; only
    meaningful where valid), whether the corner lies inside the map, its bilinear weight, and the
    weight's derivatives with respect to fx and fy. Invalid corners get weight and derivatives 0;
    callers must still mask loads and scatters with `valid`.
    """
    xi = x0 + DX
    yi = y0 + DY
    valid = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    if DX == 1:
        wx = fx
        dwx = 1.0
    else:
        wx = 1.0 - fx
        dwx = -1.0
    if DY == 1:
        wy = fy
        dwy = 1.0
    else:
        wy = 1.0 - fy
        dwy = -1.0
    w = tl.where(valid, wx * wy, 0.0)
    dw_dfx = tl.where(valid, dwx * wy, 0.0)
    dw_dfy = tl.where(valid, wx * dwy, 0.0)
    pixel = tl.where(valid, yi * width + xi, 0)
    return pixel, valid, w, dw_dfx, dw_dfy


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------
@triton.jit
def interp_upcast(x):
    """bf16 -> fp32 under the CPU interpreter, which cannot do bf16 arithmetic; a no-op on a GPU.

    Use on operands right after loading (e.g. before `tl.dot`), so kernels keep native bf16
    tensor-core math on the GPU and still compute correct values in interpreter tests.
    """
    if INTERPRET:
        if x.dtype == tl.bfloat16:
            return x.to(tl.float32)
    return x

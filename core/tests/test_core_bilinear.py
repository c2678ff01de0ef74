"""Bilinear sampling helpers against torch.nn.functional.grid_sample, forward and both gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fattn.core import empty
from fattn.core.testing import assert_close, case_id, device, rand, randn
from fattn.core.triton_helpers import (
    bilinear_cell,
    bilinear_coords,
    bilinear_corner,
    cell_corner,
    mask_2d,
    offsets_2d,
    tile_range,
)


@triton.jit
def _points(xy_ptr, P, BP: tl.constexpr, BC: tl.constexpr):
    """This program's BP points (indices p), channel indices c, and their (x, y)."""
    p, pm = tile_range(tl.program_id(0), BP, P)
    x = tl.load(xy_ptr + p * 2, mask=pm, other=0.0)
    y = tl.load(xy_ptr + p * 2 + 1, mask=pm, other=0.0)
    return p, tl.arange(0, BC), x, y


@triton.jit
def _sample_kernel(map_ptr, xy_ptr, out_ptr, P, C, W, H,
                   ALIGN: tl.constexpr, BORDER: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
    p, c, x, y = _points(xy_ptr, P, BP, BC)
    x0, y0, fx, fy, _, _ = bilinear_coords(x, y, W, H, ALIGN, BORDER)
    acc = tl.zeros([BP, BC], tl.float32)
    for corner in tl.static_range(4):
        pix, valid, w, _, _ = bilinear_corner(x0, y0, fx, fy, W, H, corner % 2, corner // 2)
        m = mask_2d(p, P, c, C) & valid[:, None]
        v = tl.load(map_ptr + offsets_2d(pix, c, C, 1), mask=m, other=0.0)
        acc += w[:, None] * v
    tl.store(out_ptr + offsets_2d(p, c, C, 1), acc, mask=mask_2d(p, P, c, C))


@triton.jit
def _sample_cell_kernel(map_ptr, xy_ptr, out_ptr, P, C, W, H,
                        ALIGN: tl.constexpr, BORDER: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
    """The same sample through bilinear_cell: per-axis validity and weights, corner = pix + offset."""
    p, c, x, y = _points(xy_ptr, P, BP, BC)
    pix, in_x0, in_x1, in_y0, in_y1, wx0, wx1, wy0, wy1, _, _ = bilinear_cell(x, y, W, H, ALIGN, BORDER)
    acc = tl.zeros([BP, BC], tl.float32)
    for corner in tl.static_range(4):
        in_map, wx, wy, _, _, offset = cell_corner(in_x0, in_x1, in_y0, in_y1, wx0, wx1, wy0, wy1, W,
                                                   corner % 2, corner // 2)
        m = mask_2d(p, P, c, C) & in_map[:, None]
        v = tl.load(map_ptr + offsets_2d(pix + offset, c, C, 1), mask=m, other=0.0)
        acc += tl.where(in_map, wx * wy, 0.0)[:, None] * v
    tl.store(out_ptr + offsets_2d(p, c, C, 1), acc, mask=mask_2d(p, P, c, C))


@triton.jit
def _sample_backward_kernel(map_ptr, xy_ptr, gout_ptr, gmap_ptr, gxy_ptr, P, C, W, H,
                            ALIGN: tl.constexpr, BORDER: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
    p, pm = tile_range(tl.program_id(0), BP, P)
    c = tl.arange(0, BC)
    pc_mask = mask_2d(p, P, c, C)
    x = tl.load(xy_ptr + p * 2, mask=pm, other=0.0)
    y = tl.load(xy_ptr + p * 2 + 1, mask=pm, other=0.0)
    g = tl.load(gout_ptr + offsets_2d(p, c, C, 1), mask=pc_mask, other=0.0)
    x0, y0, fx, fy, dix_dx, diy_dy = bilinear_coords(x, y, W, H, ALIGN, BORDER)
    gfx = tl.zeros([BP], tl.float32)
    gfy = tl.zeros([BP], tl.float32)
    for corner in tl.static_range(4):
        pix, valid, w, dw_dfx, dw_dfy = bilinear_corner(x0, y0, fx, fy, W, H, corner % 2, corner // 2)
        m = pc_mask & valid[:, None]
        v = tl.load(map_ptr + offsets_2d(pix, c, C, 1), mask=m, other=0.0)
        gv = tl.sum(g * v, 1)
        gfx += dw_dfx * gv
        gfy += dw_dfy * gv
        tl.atomic_add(gmap_ptr + offsets_2d(pix, c, C, 1), w[:, None] * g, mask=m)
    tl.store(gxy_ptr + p * 2, gfx * dix_dx, mask=pm)
    tl.store(gxy_ptr + p * 2 + 1, gfy * diy_dy, mask=pm)


def _reference(fmap: torch.Tensor, xy: torch.Tensor, align: bool, padding: str) -> torch.Tensor:
    # fmap [H, W, C], xy [P, 2] in [0, 1] -> [P, C]
    grid = (2 * xy - 1).view(1, 1, -1, 2)
    out = F.grid_sample(fmap.permute(2, 0, 1)[None], grid, mode="bilinear", padding_mode=padding,
                        align_corners=align)
    return out[0, :, 0, :].t()


CASES = [
    dict(H=5, W=7, C=3, P=53, align=True, padding="zeros"),
    dict(H=5, W=7, C=3, P=53, align=False, padding="zeros"),
    dict(H=9, W=4, C=5, P=61, align=True, padding="border"),
    dict(H=9, W=4, C=5, P=61, align=False, padding="border"),
    dict(H=1, W=6, C=2, P=17, align=False, padding="zeros"),
]


@pytest.mark.parametrize("case", CASES, ids=[case_id(**c) for c in CASES])
def test_bilinear_forward_and_gradients_match_grid_sample(case: dict) -> None:
    H, W, C, P = case["H"], case["W"], case["C"], case["P"]
    align, padding = case["align"], case["padding"]
    BORDER = padding == "border"
    fmap = randn([H, W, C])
    # Points inside, on the borders, across them and far outside.
    xy = rand([P, 2], low=-0.4, high=1.4)
    xy[:4] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.5]], device=device())
    xy[4:8] = torch.tensor([[-3.0, 0.5], [0.5, 9.0], [1.02, -0.01], [0.5, 0.5]], device=device())
    # Keep points off exact pixel centres where the gradient of the weights is discontinuous.
    out = empty([P, C], dtype=torch.float32, device=device())
    BP, BC = 16, triton.next_power_of_2(C)
    _sample_kernel[(triton.cdiv(P, BP),)](fmap, xy, out, P, C, W, H, ALIGN=align, BORDER=BORDER, BP=BP, BC=BC)

    fmap64 = fmap.double().requires_grad_(True)
    xy64 = xy.double().requires_grad_(True)
    ref = _reference(fmap64, xy64, align, padding)
    assert_close("out", out, ref, floor=1e-5)
    out_cell = empty([P, C], dtype=torch.float32, device=device())
    _sample_cell_kernel[(triton.cdiv(P, BP),)](fmap, xy, out_cell, P, C, W, H, ALIGN=align, BORDER=BORDER,
                                               BP=BP, BC=BC)
    assert_close("out (bilinear_cell)", out_cell, ref, floor=1e-5)

    gout = randn([P, C])
    gmap = torch.zeros_like(fmap)
    gxy = empty([P, 2], dtype=torch.float32, device=device())
    _sample_backward_kernel[(triton.cdiv(P, BP),)](fmap, xy, gout, gmap, gxy, P, C, W, H,
                                                  ALIGN=align, BORDER=BORDER, BP=BP, BC=BC)
    ref_gmap, ref_gxy = torch.autograd.grad(ref, [fmap64, xy64], gout.double())
    assert_close("grad_map", gmap, ref_gmap, floor=1e-5)
    assert_close("grad_xy", gxy, ref_gxy, floor=1e-5)

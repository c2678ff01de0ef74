"""Online softmax and tiling helpers, each run inside a small kernel and checked against PyTorch."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from fattn.core import empty
from fattn.core.testing import assert_close, case_id, device, randn
from fattn.core.triton_helpers import (
    LOG2E,
    mask_2d,
    offsets_2d,
    online_softmax_finalize,
    online_softmax_update,
    probs_from_lse,
    tile_range,
)


@triton.jit
def _softmax_av_kernel(s_ptr, v_ptr, o_ptr, lse_ptr, p_ptr, M, N, D,
                       BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    # out = softmax(s) @ v streamed over key tiles; then p recomputed from lse.
    rows, row_mask = tile_range(tl.program_id(0), BM, M)
    cols_d = tl.arange(0, BD)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    for start in range(0, N, BN):
        cols, col_mask = tile_range(start // BN, BN, N)
        s = tl.load(s_ptr + offsets_2d(rows, cols, N, 1), mask=mask_2d(rows, M, cols, N), other=float("-inf"))
        s = s * LOG2E
        m_i, l_i, p, alpha = online_softmax_update(m_i, l_i, s)
        v = tl.load(v_ptr + offsets_2d(cols, cols_d, D, 1), mask=mask_2d(cols, N, cols_d, D), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    out, lse = online_softmax_finalize(acc, m_i, l_i)
    tl.store(o_ptr + offsets_2d(rows, cols_d, D, 1), out, mask=mask_2d(rows, M, cols_d, D))
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    for start in range(0, N, BN):
        cols, col_mask = tile_range(start // BN, BN, N)
        s = tl.load(s_ptr + offsets_2d(rows, cols, N, 1), mask=mask_2d(rows, M, cols, N), other=float("-inf"))
        p = probs_from_lse(s * LOG2E, lse)
        tl.store(p_ptr + offsets_2d(rows, cols, N, 1), p, mask=mask_2d(rows, M, cols, N))


@pytest.mark.parametrize("M,N,D", [(37, 51, 19), (16, 16, 16), (5, 130, 33)],
                         ids=lambda v: str(v))
def test_online_softmax_matches_torch(M: int, N: int, D: int) -> None:
    s = randn([M, N], scale=3.0)
    # Fully masked rows (no key at all) and partly masked rows.
    s[0, :] = float("-inf")
    s[M // 2, ::2] = float("-inf")
    v = randn([N, D])
    out, lse, p = empty([M, D], dtype=torch.float32, device=device()), \
        empty([M], dtype=torch.float32, device=device()), empty([M, N], dtype=torch.float32, device=device())
    _softmax_av_kernel[(triton.cdiv(M, 16),)](s, v, out, lse, p, M, N, D, BM=16, BN=16, BD=triton.next_power_of_2(D))

    s64 = s.double()
    ref_lse = torch.logsumexp(s64, dim=1)
    ref_p = torch.softmax(s64, dim=1).nan_to_num(0.0)  # an empty row gives zeros, not NaN
    ref_out = ref_p @ v.double()
    assert torch.isneginf(lse[0]) and torch.all(out[0] == 0) and torch.all(p[0] == 0)
    assert_close("out", out, ref_out, floor=1e-5 if device().type == "cpu" else 3e-3)
    assert_close("p", p, ref_p, floor=1e-5)
    finite = torch.isfinite(ref_lse)
    assert_close("lse", lse[finite], ref_lse[finite], floor=1e-5)


@triton.jit
def _offsets_kernel(rows_ptr, cols_ptr, out_ptr, R, C, stride_r, stride_c,
                    BR: tl.constexpr, BC: tl.constexpr):
    r, _ = tile_range(tl.program_id(0), BR, R)
    c, _ = tile_range(tl.program_id(1), BC, C)
    rows = tl.load(rows_ptr + r, mask=r < R, other=0)
    cols = tl.load(cols_ptr + c, mask=c < C, other=0)
    offs = offsets_2d(rows, cols, stride_r, stride_c)
    tl.store(out_ptr + offsets_2d(r, c, C, 1), offs, mask=mask_2d(r, R, c, C))


def test_offsets_are_int64_past_2_31() -> None:
    # Row indices times a large stride pass 2^31: int32 math would wrap to negative offsets.
    R, C = 7, 5
    rows = torch.tensor([0, 1, 3, 1000, 40000, 65535, 99999], dtype=torch.int32, device=device())
    cols = torch.arange(C, dtype=torch.int32, device=device()) * 3
    stride_r, stride_c = 1 << 20, 1
    out = empty([R, C], dtype=torch.int64, device=device())
    _offsets_kernel[(1, 1)](rows, cols, out, R, C, stride_r, stride_c, BR=8, BC=8)
    expected = rows.long()[:, None] * stride_r + cols.long()[None, :] * stride_c
    assert expected.max() > 2**31
    assert torch.equal(out, expected)


@triton.jit
def _ragged_copy_kernel(x_ptr, y_ptr, R, C, sxr, sxc, BR: tl.constexpr, BC: tl.constexpr):
    r, _ = tile_range(tl.program_id(0), BR, R)
    c, _ = tile_range(tl.program_id(1), BC, C)
    m = mask_2d(r, R, c, C)
    x = tl.load(x_ptr + offsets_2d(r, c, sxr, sxc), mask=m)
    tl.store(y_ptr + offsets_2d(r, c, C, 1), x, mask=m)


@pytest.mark.parametrize("R,C", [(1, 1), (17, 33), (64, 31)], ids=lambda v: str(v))
def test_ragged_tiles_cover_everything_once(R: int, C: int) -> None:
    x = randn([R, C], noncontiguous=True)
    y = empty([R, C], dtype=x.dtype, device=device())  # NaN-poisoned: unwritten elements fail
    _ragged_copy_kernel[(triton.cdiv(R, 16), triton.cdiv(C, 16))](x, y, R, C, x.stride(0), x.stride(1), BR=16, BC=16)
    assert torch.equal(y, x)


def test_case_ids_are_readable() -> None:
    assert case_id(B=2, N=197, H=6, D=64, dtype=torch.float16) == "B2-N197-H6-D64-fp16"

"""Triton kernels of multiscale deformable attention.

Layout (Deformable DETR's): value [N, S, M, D] with the L levels concatenated along S, each level
row-major (H_l x W_l); sampling locations [N, Lq, M, L, P, 2] as (x, y) in [0, 1]; attention weights
[N, Lq, M, L, P]; output [N, Lq, M * D].

One program handles BLOCK_Q queries of one (batch, head) and all D channels of that head: each
sample point costs 4 vectorized row gathers of D channels (one per bilinear corner) instead of the
CUDA op's one-thread-per-channel scheme, and the bilinear coordinates are computed once per point,
not once per channel. Accumulation is in fp32 (fp64 for fp64 inputs), storage in the value dtype.

Backward:
- gradients of the locations and attention weights are reductions over D, done inside the program
  (no atomics);
- the value gradient is a scatter. Fast mode: fp32 atomics into an fp32 buffer. Deterministic mode:
  the scatter is turned into a gather: `_msda_bwd_kernel` writes (destination row, source row,
  coefficient) triples, the host sorts them stably by destination, and `_msda_value_grad_kernel`
  sums each destination's contributions in that fixed order.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from fattn.core.runtime import interpreter_enabled
from fattn.core.triton_helpers import bilinear_coords, bilinear_corner, interp_upcast

__all__ = [
    "fwd_configs",
    "msda_fwd_kernel",
    "msda_bwd_kernel",
    "msda_value_grad_kernel",
]


def _configs(block_qs: list[int], warps: list[int], stages: list[int]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_Q": bq}, num_warps=w, num_stages=s)
        for bq in block_qs for w in warps for s in stages
    ]


def _small_search() -> bool:
    """FATTN_MSDA_AUTOTUNE=0 (set by this package's tests) trims the search to a few tilings, so a GPU
    test run does not spend minutes compiling configs for every new shape."""
    return os.environ.get("FATTN_MSDA_AUTOTUNE", "1") == "0"


def fwd_configs() -> list[triton.Config]:
    """The forward's autotuning space: one small config under the interpreter (fast CPU tests)."""
    if interpreter_enabled():
        return [triton.Config({"BLOCK_Q": 32}, num_warps=4, num_stages=1)]
    if _small_search():
        return [triton.Config({"BLOCK_Q": 16}, num_warps=4, num_stages=1),
                triton.Config({"BLOCK_Q": 64}, num_warps=8, num_stages=3),
                triton.Config({"BLOCK_Q": 8}, num_warps=8, num_stages=1)]  # large head dims
    return _configs([16, 32, 64], [4, 8], [1, 3]) + _configs([8], [4, 8], [1])


def bwd_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_Q": 32}, num_warps=4, num_stages=1)]
    if _small_search():
        return [triton.Config({"BLOCK_Q": 16}, num_warps=4, num_stages=1),
                triton.Config({"BLOCK_Q": 64}, num_warps=8, num_stages=1),
                triton.Config({"BLOCK_Q": 8}, num_warps=8, num_stages=1)]
    return _configs([16, 32, 64], [4, 8], [1]) + _configs([8], [4, 8], [1])


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles that would exhaust registers (more than 8 fp32 accumulator elements per thread:
    the gathers need many warps in flight, so occupancy matters more than tile size; sm_90 compiles
    of BLOCK_Q 128 x D 32 on 8 warps take 166 registers) or leave most of the GPU idle on small
    problems (few queries: a small BLOCK_Q gives more programs)."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 32))
    lq = named_args.get("Lq", 1 << 20)
    value = named_args.get("value_ptr")
    per_thread = 4 if getattr(value, "dtype", None) == torch.float64 else 8  # fp64 takes 2 registers

    def elements(c: triton.Config) -> float:
        return c.kwargs["BLOCK_Q"] * block_d / (32 * c.num_warps)

    kept = [c for c in configs if elements(c) <= per_thread and c.kwargs["BLOCK_Q"] <= max(16, 2 * lq)]
    return kept or [min(configs, key=elements)]


# Autotuning is keyed on a power-of-two bucket of the query count, not on the count itself, so a
# detector fed images of changing sizes does not re-tune for every new token count.
_KEY = ["LQ_BUCKET", "M", "BLOCK_D", "L", "P", "ALIGN_CORNERS", "BORDER"]


@triton.jit
def _sample_location(loc_ptr, loc_base, q, q_mask, stride_lq, stride_lc, ACC: tl.constexpr):
    """(x, y) of one point for BLOCK_Q queries. (Two loads: a paired load + tl.split trips a layout
    bug of Triton 3.6's RemoveLayoutConversions pass in the backward kernel.)"""
    x = tl.load(loc_ptr + loc_base + q * stride_lq, mask=q_mask, other=0.0)
    y = tl.load(loc_ptr + loc_base + q * stride_lq + stride_lc, mask=q_mask, other=0.0)
    return interp_upcast(x).to(ACC), interp_upcast(y).to(ACC)


@triton.autotune(configs=fwd_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def msda_fwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
    Lq, M, D, L, LQ_BUCKET,
    stride_vn, stride_vs, stride_vm, stride_vd,
    stride_ln, stride_lq, stride_lm, stride_ll, stride_lp, stride_lc,
    stride_an, stride_aq, stride_am, stride_al, stride_ap,
    P: tl.constexpr, ALIGN_CORNERS: tl.constexpr, BORDER: tl.constexpr, ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_q = tl.program_id(0)
    m = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)  # batch offsets pass 2^31 on large inputs

    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < Lq
    q64 = q.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    qd_mask = q_mask[:, None] & d_mask[None, :]

    value_head = value_ptr + n * stride_vn + m * stride_vm
    d_offs = d[None, :].to(tl.int64) * stride_vd
    loc_head = n * stride_ln + m * stride_lm
    attn_head = n * stride_an + m * stride_am

    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=ACC)
    for lvl in range(L):
        height = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
        start = tl.load(starts_ptr + lvl)
        value_lvl = value_head + start * stride_vs
        for pt in tl.static_range(P):  # unrolled: all points' gathers in flight together
            x, y = _sample_location(loc_ptr, loc_head + lvl * stride_ll + pt * stride_lp, q64, q_mask,
                                    stride_lq, stride_lc, ACC)
            a = tl.load(attn_ptr + attn_head + lvl * stride_al + pt * stride_ap + q64 * stride_aq,
                        mask=q_mask, other=0.0)
            a = interp_upcast(a).to(ACC)
            x0, y0, fx, fy, _, _ = bilinear_coords(x, y, width, height, ALIGN_CORNERS, BORDER)
            for corner in tl.static_range(4):
                pix, valid, w, _, _ = bilinear_corner(x0, y0, fx, fy, width, height, corner % 2, corner // 2)
                rows = value_lvl + pix.to(tl.int64)[:, None] * stride_vs + d_offs
                v = tl.load(rows, mask=qd_mask & valid[:, None], other=0.0)
                acc += (a * w)[:, None] * interp_upcast(v).to(ACC)

    # out is [N, Lq, M * D], contiguous.
    out_offs = (n * Lq + q64)[:, None] * (M * D) + m * D + d[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=qd_mask)


@triton.autotune(configs=bwd_configs(), key=_KEY + ["DETERMINISTIC"],
                 prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["grad_value_ptr"])
@triton.jit
def msda_bwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr, dest_ptr, coef_ptr,
    Lq, M, D, L, S, LQ_BUCKET,
    stride_vn, stride_vs, stride_vm, stride_vd,
    stride_ln, stride_lq, stride_lm, stride_ll, stride_lp, stride_lc,
    stride_an, stride_aq, stride_am, stride_al, stride_ap,
    stride_gn, stride_gq, stride_gc,
    P: tl.constexpr, ALIGN_CORNERS: tl.constexpr, BORDER: tl.constexpr, ACC: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gradients of one (batch, head, query block).

    grad_value_ptr: [N, S, M, D] contiguous, zero-filled, written with atomics (unless DETERMINISTIC).
    grad_loc_ptr / grad_attn_ptr: contiguous [N, Lq, M, L, P, 2] / [N, Lq, M, L, P], fully written.
    dest_ptr / coef_ptr (DETERMINISTIC only): [N, Lq, M, L, P, 4] destination row ((n * M + m) * S + s,
    or N * M * S for a corner outside the map) and coefficient of each corner's contribution.
    """
    pid_q = tl.program_id(0)
    m = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    N = tl.num_programs(2)

    # Per-query values are [BLOCK_Q, 1] columns rather than 1-D vectors: one layout family for the
    # whole kernel (1-D vectors mixed with row reductions of fp32 tiles trip Triton 3.6's
    # RemoveLayoutConversions pass).
    q = (pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q))[:, None]
    q_mask = q < Lq
    q64 = q.to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    qd_mask = q_mask & (d < D)

    value_head = value_ptr + n * stride_vn + m * stride_vm
    d_offs = d.to(tl.int64) * stride_vd
    loc_head = n * stride_ln + m * stride_lm
    attn_head = n * stride_an + m * stride_am
    # The output gradient of these queries, kept in registers for every point.
    g_offs = n * stride_gn + q64 * stride_gq + (m * D + d).to(tl.int64) * stride_gc
    g = interp_upcast(tl.load(grad_out_ptr + g_offs, mask=qd_mask, other=0.0)).to(ACC)
    # Contiguous [N, Lq, M, L, P] index of point (lvl, pt) = base + lvl * P + pt.
    point_base = ((n * Lq + q64) * M + m) * (L * P)
    grad_value_head = grad_value_ptr + (n * S * M + m) * D + d

    for lvl in range(L):
        height = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
        start = tl.load(starts_ptr + lvl)
        value_lvl = value_head + start * stride_vs
        for pt in tl.static_range(P):
            x, y = _sample_location(loc_ptr, loc_head + lvl * stride_ll + pt * stride_lp, q64, q_mask,
                                    stride_lq, stride_lc, ACC)
            a = tl.load(attn_ptr + attn_head + lvl * stride_al + pt * stride_ap + q64 * stride_aq,
                        mask=q_mask, other=0.0)
            a = interp_upcast(a).to(ACC)
            x0, y0, fx, fy, dix_dx, diy_dy = bilinear_coords(x, y, width, height, ALIGN_CORNERS, BORDER)
            # The bilinear sample and its derivatives along fx and fy, all D channels; each gradient
            # below is then one reduction against g (3 per point, not 3 per corner).
            sample = tl.zeros([BLOCK_Q, BLOCK_D], dtype=ACC)
            sample_dfx = tl.zeros([BLOCK_Q, BLOCK_D], dtype=ACC)
            sample_dfy = tl.zeros([BLOCK_Q, BLOCK_D], dtype=ACC)
            point = point_base + lvl * P + pt
            for corner in tl.static_range(4):
                pix, valid, w, dw_dfx, dw_dfy = bilinear_corner(x0, y0, fx, fy, width, height,
                                                                corner % 2, corner // 2)
                pix64 = pix.to(tl.int64)
                corner_mask = qd_mask & valid
                v = tl.load(value_lvl + pix64 * stride_vs + d_offs, mask=corner_mask, other=0.0)
                v = interp_upcast(v).to(ACC)
                sample += w * v
                sample_dfx += dw_dfx * v
                sample_dfy += dw_dfy * v
                if DETERMINISTIC:
                    dest = tl.where(valid, (n * M + m) * S + start + pix64, N * M * S)
                    tl.store(dest_ptr + point * 4 + corner, dest.to(dest_ptr.dtype.element_ty), mask=q_mask)
                    tl.store(coef_ptr + point * 4 + corner, a * w, mask=q_mask)
                else:
                    contrib = (a * w) * g
                    tl.atomic_add(grad_value_head + (start + pix64) * (M * D),
                                  contrib.to(grad_value_ptr.dtype.element_ty), mask=corner_mask, sem="relaxed")
            grad_a = tl.sum(g * sample, 1, keep_dims=True)
            grad_fx = tl.sum(g * sample_dfx, 1, keep_dims=True)
            grad_fy = tl.sum(g * sample_dfy, 1, keep_dims=True)
            tl.store(grad_attn_ptr + point, grad_a.to(grad_attn_ptr.dtype.element_ty), mask=q_mask)
            tl.store(grad_loc_ptr + point * 2, (a * grad_fx * dix_dx).to(grad_loc_ptr.dtype.element_ty),
                     mask=q_mask)
            tl.store(grad_loc_ptr + point * 2 + 1, (a * grad_fy * diy_dy).to(grad_loc_ptr.dtype.element_ty),
                     mask=q_mask)


@triton.jit
def msda_value_grad_kernel(
    row_start_ptr, src_ptr, coef_ptr, grad_out_ptr, grad_value_ptr,
    n_rows, Lq, M, D, S,
    stride_gn, stride_gq, stride_gc,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Deterministic value gradient: a gather over contributions sorted by destination row.

    row_start_ptr: [n_rows + 1] offsets (CSR) into the sorted src/coef arrays, n_rows = N * M * S with
    row r = (n * M + m) * S + s. src: the contribution's (n, q, m) as (n * Lq + q) * M + m. Each row's
    contributions are summed in their sorted (stable) order, so the result has the same bits on
    every run.
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < n_rows
    r64 = r.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    rd_mask = r_mask[:, None] & d_mask[None, :]
    lo = tl.load(row_start_ptr + r64, mask=r_mask, other=0)
    hi = tl.load(row_start_ptr + r64 + 1, mask=r_mask, other=0)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for i in range(0, tl.max(hi - lo, 0)):
        k = lo + i
        k_mask = r_mask & (k < hi)
        src = tl.load(src_ptr + k, mask=k_mask, other=0).to(tl.int64)
        coef = interp_upcast(tl.load(coef_ptr + k, mask=k_mask, other=0.0)).to(ACC)
        n_src = src // (Lq * M)
        q_src = (src // M) % Lq
        m_src = src % M
        g_offs = n_src[:, None] * stride_gn + q_src[:, None] * stride_gq \
            + (m_src[:, None] * D + d[None, :]).to(tl.int64) * stride_gc
        g = tl.load(grad_out_ptr + g_offs, mask=k_mask[:, None] & d_mask[None, :], other=0.0)
        acc += coef[:, None] * interp_upcast(g).to(ACC)
    # Row r = (n * M + m) * S + s of the [N, S, M, D] gradient.
    s = r64 % S
    nm = r64 // S
    out_offs = ((nm // M) * S + s)[:, None] * (M * D) + (nm % M)[:, None] * D + d[None, :]
    tl.store(grad_value_ptr + out_offs, acc.to(grad_value_ptr.dtype.element_ty), mask=rd_mask)

"""Triton kernels of multi-view deformable attention with bilinear sampling fused in.

Layout (strides are passed, so any view works):
    q      [B, S, H, Lq, D]      queries, S query groups of Lq queries
    k, v   [B, T, H, HW, D]      T source views, each a row-major height x width map per head
    coords [B, S, Lq, T, P, 2]   (x, y) in [0, 1] per query, view and point, shared by the heads
    vis    [B, S, Lq, T]         optional uint8: 0 removes view t from the query's softmax
    out    [B, S, H, Lq, D]      lse [B, S, H, Lq] (natural log, for the backward)

Every query has its own T*P keys (bilinear samples of its views), so there is no key tile shared by a
block of queries: the kernels gather the four corner rows of every sample straight from K and V and
never write a sampled tensor to memory. Keys are streamed in tiles of BLOCK_N samples (views in order,
so a program works on one view's map at a time and finds its rows in L1) with the online softmax of
flash attention.

Program grid: query tiles x B * H * S, flattened, query tiles fastest and then query groups: programs
that run together read the same (batch, head) maps. The backward recomputes samples and probabilities
from the saved log-sum-exp, owns its dq rows and stores the probabilities and score gradients; dK and dV
are then gathered per pixel (`_deform_bwd_dkdv_kernel`): no atomics, the same bits every run.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fattn.core.runtime import interpreter_enabled, next_power_of_2
from fattn.core.triton_helpers import (
    LOG2E,
    bilinear_cell,
    cell_corner,
    online_softmax_finalize,
    online_softmax_update,
    probs_from_lse,
)


@triton.jit
def _softmax_scales(qk_scale, qk_scale_lo, ACC_DTYPE: tl.constexpr):
    """(scale, scale * log2(e)) in the accumulation dtype. Triton passes a Python float as fp32, so an fp64
    scale arrives as two fp32 parts, qk_scale + qk_scale_lo (op.split_scale: ~48 bits); its product with
    the constexpr LOG2E is then taken in fp64 (an fp32 scale alone left fp64 outputs 5e-8 off)."""
    if ACC_DTYPE == tl.float64:
        scale = tl.cast(qk_scale, tl.float64) + tl.cast(qk_scale_lo, tl.float64)
    else:
        scale = qk_scale
    return scale, scale * LOG2E


# Elements of one gathered [BLOCK_M, BLOCK_N, BLOCK_D] tile per thread: 16 compiles to 80-150 registers
# and keeps every layout conversion out of the sample loop; at 32 Triton converts the corner offsets and
# weights through shared memory at every step (checked on sm_90 TTGIR / ptxas, tests/compile_check.py).
_MAX_TILE_ELEMS_PER_THREAD = 16
# Autotuning candidates per shape: few, so the first call (compiles included) stays short.
_MAX_FWD_CONFIGS = 3
_MAX_BWD_CONFIGS = 2


def _configs(table: list[tuple[int, ...]]) -> list[triton.Config]:
    """Table rows (BLOCK_M, BLOCK_N, num_warps) or (BLOCK_M, BLOCK_N, num_warps, maxnreg)."""
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 8, "BLOCK_N": 4}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": row[0], "BLOCK_N": row[1]}, num_warps=row[2], num_stages=1,
                          maxnreg=row[3] if len(row) > 3 else None) for row in table]


# (BLOCK_M, BLOCK_N, num_warps), preferred first. Triton lays the gathered tiles out with 16-byte vectors
# along the head dim, the rest of a warp's lanes along the queries and the warps along the queries too;
# each lane keeps all BLOCK_N samples of its query, so the online softmax and the sum over samples need no
# shuffles, as long as BLOCK_M fills the warps (`_prune`). Many queries per program: they share the view
# map being read (views are streamed in order), in L1.
# No software pipelining (num_stages=1): the loads are data-dependent gathers.
_FWD_TABLE = [(64, 2, 8), (64, 2, 8, 80), (32, 4, 8), (16, 4, 4), (128, 1, 8), (32, 2, 4), (32, 2, 4, 80), (8, 4, 4),
              (16, 2, 4), (4, 4, 4),
              (8, 2, 4), (4, 2, 4), (2, 4, 4), (2, 2, 4), (1, 4, 4), (1, 2, 4), (32, 1, 4), (8, 1, 4), (1, 1, 4)]
_BWD_TABLE = [(32, 2, 8), (32, 2, 8, 64), (32, 2, 4), (64, 2, 8), (16, 2, 4), (16, 4, 4), (8, 2, 4), (4, 2, 4),
              (2, 2, 4), (1, 2, 4), (32, 1, 4), (8, 1, 4), (1, 1, 4)]
# Register caps (the 4th entry): both main kernels are latency-bound (gathers) at two programs per SM.
# sm_90 compiles (tests/compile_check.py), D <= 32: the backward's (32, 2, 8) tile fits 64 registers with
# no spill in fp32 (105 -> 64: four programs per SM), while 16-bit dtypes spill at any cap under their
# 128; the forward's bf16 / fp16 tiles (64, 2, 8) and (32, 2, 4) fit 80 with no spill (108-110 -> 80:
# three programs per SM), fp32 ones spill at 72-80. So each capped row serves one element size.
# H100, session 13 (bench-tuning.txt, T8 P8 / T12 P12 / T8 P32): the capped fp32 backward 449 / 1353 /
# 2021 us against 471 / 1429 / 1901 uncapped: searched beside its twin. The capped bf16 forward
# (32, 2, 4) 141 / 432 / 658 us against 176 / 526 / 689, (64, 2, 8) 149 / 474 / 737 against
# 181 / 566 / 794: it replaces its twin (the first call compiles no more candidates).
# (tile + cap) -> (element size it serves, whether it replaces its uncapped twin), see `_prune`.
_CAPPED = {(32, 2, 8, 64): (4, False), (64, 2, 8, 80): (2, True), (32, 2, 4, 80): (2, True)}


def _fwd_configs() -> list[triton.Config]:
    return _configs(_FWD_TABLE)


def _bwd_configs() -> list[triton.Config]:
    return _configs(_BWD_TABLE)


def _prune_fwd(configs, named_args, **kwargs):  # type: ignore[no-untyped-def]
    return _prune(configs, named_args, _MAX_FWD_CONFIGS, **kwargs)


def _prune_bwd(configs, named_args, **kwargs):  # type: ignore[no-untyped-def]
    return _prune(configs, named_args, _MAX_BWD_CONFIGS, **kwargs)


def _prune(configs, named_args, max_configs, **kwargs):  # type: ignore[no-untyped-def]
    """Keep at most `max_configs` configs (first-call autotuning stays short) whose gathered tiles fit the
    registers without layout conversions in the loop, whose queries fill the warps' lanes, and that are no
    larger than the problem."""
    if len(configs) == 1:
        return configs
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    q = named_args.get("Q")
    elem_bytes = q.element_size() if hasattr(q, "element_size") else 4
    elems = _MAX_TILE_ELEMS_PER_THREAD // (4 if elem_bytes == 8 else 1)  # fp64 (gradcheck): registers
    d_lanes = min(32, max(1, block_d // (16 // elem_bytes)))  # lanes along the head dim (16-byte vectors)
    m_lanes = 32 // d_lanes
    n_points = named_args["P"]
    lq = named_args["Lq"]
    kept = []
    for c in configs:
        bm, bn, warps = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps
        if bm * bn * block_d > elems * 32 * warps or bm < m_lanes * warps:
            continue
        if c.maxnreg is not None and (block_d > 32 or elem_bytes != _CAPPED.get(
                (bm, bn, warps, c.maxnreg), (0,))[0]):  # see _CAPPED
            continue
        # Samples are tiled within a view (BLOCK_N of its P points at a time).
        if bn > max(1, next_power_of_2(n_points)) or bm > max(m_lanes * warps, next_power_of_2(lq)):
            continue
        kept.append(c)
    if not kept:  # very small or very large head dims: the largest tiles that fit, lanes idle or not
        kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * block_d <= elems * 32 * c.num_warps
                and c.kwargs["BLOCK_N"] <= max(1, next_power_of_2(n_points))
                and c.kwargs["BLOCK_M"] <= max(8, next_power_of_2(lq)) and c.maxnreg is None] or configs[-1:]
    # A register-capped twin does not take an uncapped tile's place in the limit; one that replaces its
    # twin takes exactly that place.
    uncapped = [c for c in kept if c.maxnreg is None][:max_configs]
    capped = [c for c in kept if c.maxnreg is not None and _twin(c, uncapped) is not None]
    replaced = [_twin(c, uncapped) for c in capped if _CAPPED[_row(c)][1]]
    return [c for c in kept if (c in uncapped and not any(c is r for r in replaced)) or c in capped]


def _row(c: triton.Config) -> tuple[int, ...]:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.maxnreg)


def _twin(capped: triton.Config, configs: list[triton.Config]) -> triton.Config | None:
    """The uncapped config of `configs` with the same tile as `capped`, if any."""
    return next((c for c in configs if c.kwargs == capped.kwargs and c.num_warps == capped.num_warps), None)


@triton.jit
def _program_tile(Lq, S, H, BLOCK_M: tl.constexpr):
    """(query tile, b, s, h as int64) of this program. A 1-D grid (dims 1-2 would cap B * S * H at
    65535), query tiles fastest, then query groups: programs running together read one (b, h)'s maps."""
    n_tiles = tl.cdiv(Lq, BLOCK_M)
    pid_m = tl.program_id(0) % n_tiles
    pid_bhs = tl.program_id(0) // n_tiles
    s = pid_bhs % S
    h = (pid_bhs // S) % H
    b = (pid_bhs // S) // H
    return pid_m, b.to(tl.int64), s.to(tl.int64), h.to(tl.int64)


@triton.jit
def _view_live(m_mask, w_t, HAS_VIS: tl.constexpr):
    """[BM] queries that see the current view (in range, and visible when a visibility mask is given)."""
    if HAS_VIS:
        return m_mask & (tl.load(w_t, mask=m_mask, other=0) != 0)
    return m_mask


@triton.jit
def _load_points(c_t, offs_p, live, stride_cp, stride_cc, ACC_DTYPE: tl.constexpr):
    """(x, y) [BM, BN] of points offs_p of the current view (0 where not live)."""
    c_ptrs = c_t[:, None] + offs_p[None, :] * stride_cp
    x = tl.load(c_ptrs, mask=live, other=0.0).to(ACC_DTYPE)
    y = tl.load(c_ptrs + stride_cc, mask=live, other=0.0).to(ACC_DTYPE)
    return x, y


@triton.jit
def _gather_corner(k_t, v_t, pix, hit, offs_d, d_mask, stride_kp, stride_kd, stride_vp, stride_vd,
                   EVEN_D: tl.constexpr, OFFSETS_64: tl.constexpr):
    """The K and V rows [BM, BN, BD] (storage dtype) of one bilinear corner at pixel `pix` of the
    current view. Misses (off the map, dead samples) read pixel 0 instead of a masked load (callers
    give them weight 0): no predicates or zero-fills on the gathers (the hot loop is instruction-bound)."""
    pix_c = tl.where(hit, pix, 0)
    return (_gather_rows(k_t, pix_c, offs_d, d_mask, stride_kp, stride_kd, EVEN_D, OFFSETS_64),
            _gather_rows(v_t, pix_c, offs_d, d_mask, stride_vp, stride_vd, EVEN_D, OFFSETS_64))


@triton.jit
def _query_rows(Lq, S, H, HEAD_DIM, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """This program's (b, s, h) (int64), its BLOCK_M query rows (int64) and the head-dim offsets, with
    their masks. EVEN_D: a mask constant along the head dim, so the gathers are 16-byte vector loads."""
    pid_m, b64, s64, h64 = _program_tile(Lq, S, H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < Lq
    d_mask = offs_d < (BLOCK_D if EVEN_D else HEAD_DIM)
    return b64, s64, h64, offs_m.to(tl.int64), offs_d, m_mask, d_mask


@triton.jit
def _load_q(Q, b64, s64, h64, offs_m64, offs_d, m_mask, d_mask, stride_qb, stride_qs, stride_qh, stride_qm,
            stride_qd):
    """The program's q rows [BM, BD] in their storage dtype (0 outside the masks)."""
    return tl.load(Q + b64 * stride_qb + s64 * stride_qs + h64 * stride_qh + offs_m64[:, None] * stride_qm
                   + offs_d[None, :] * stride_qd, mask=m_mask[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def _first_view(K, V, C, VIS, b64, s64, h64, offs_m64, stride_kb, stride_kh, stride_vb, stride_vh, stride_cb,
                stride_cs, stride_cm, stride_wb, stride_ws, stride_wm, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """View 0's K and V map bases (offsets inside one (batch, head) slice stay int32 unless OFFSETS_64),
    the queries' coordinate and visibility rows [BM], and the empty online-softmax state (m_i, l_i, acc)."""
    k_t = K + b64 * stride_kb + h64 * stride_kh
    v_t = V + b64 * stride_vb + h64 * stride_vh
    c_t = C + b64 * stride_cb + s64 * stride_cs + offs_m64 * stride_cm
    w_t = VIS + b64 * stride_wb + s64 * stride_ws + offs_m64 * stride_wm
    m_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    return k_t, v_t, c_t, w_t, m_i, l_i, acc


@triton.jit
def _point_cells(c_t, p0, live_m, P, stride_cp, stride_cc, width, height, ALIGN_CORNERS: tl.constexpr,
                 BORDER: tl.constexpr, BLOCK_N: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Points p0 .. p0 + BLOCK_N of the current view: which samples are live [BM, BN] and their
    bilinear cells (`bilinear_cell`'s outputs)."""
    offs_p = p0 + tl.arange(0, BLOCK_N)
    live = live_m[:, None] & (offs_p < P)[None, :]
    x, y = _load_points(c_t, offs_p, live, stride_cp, stride_cc, ACC_DTYPE)
    pix, in_x0, in_x1, in_y0, in_y1, wx0, wx1, wy0, wy1, dix_dx, diy_dy = bilinear_cell(
        x, y, width, height, ALIGN_CORNERS, BORDER)
    return live, pix, in_x0, in_x1, in_y0, in_y1, wx0, wx1, wy0, wy1, dix_dx, diy_dy


@triton.jit
def _softmax_step(m_i, l_i, acc, scores, v_s, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """One block of samples into the online softmax: scores [BM, BN] (base 2, -inf where dead), their
    values v_s [BM, BN, BD]. Returns the new (m_i, l_i, acc)."""
    m_i, l_i, prob, alpha = online_softmax_update(m_i, l_i, scores)
    # alpha moved into acc's layout through a size-1 reduction, not a layout conversion.
    alpha_d = tl.sum(tl.broadcast_to(alpha[:, None, None], (BLOCK_M, 1, BLOCK_D)), 1)
    return m_i, l_i, acc * alpha_d + tl.sum(prob[:, :, None] * v_s, 1)


@triton.jit
def _store_out_lse(O, LSE, acc, m_i, l_i, b64, s64, h64, S, H, Lq, HEAD_DIM, offs_m64, offs_d, m_mask, d_mask):
    """Normalize and store the output rows and their lse (both contiguous [B, S, H, Lq, (D)])."""
    out, lse = online_softmax_finalize(acc, m_i, l_i)
    row = ((b64 * S + s64) * H + h64) * Lq + offs_m64
    tl.store(O + row[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE + row, lse.to(LSE.dtype.element_ty), mask=m_mask)


@triton.jit
def _gather_rows(base, pix, offs_d, d_mask, stride_p, stride_d, EVEN_D: tl.constexpr, OFFSETS_64: tl.constexpr):
    """The map rows [BM, BN, BD] (storage dtype) at pixels `pix` [BM, BN] (in range: callers point misses
    at pixel 0 and weight them 0)."""
    if OFFSETS_64:
        ptrs = base + (pix.to(tl.int64) * stride_p)[:, :, None] + (offs_d * stride_d)[None, None, :]
    else:
        ptrs = base + (pix * stride_p)[:, :, None] + (offs_d * stride_d)[None, None, :]
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=d_mask[None, None, :], other=0.0)


@triton.autotune(configs=_fwd_configs(), key=["Lq", "T", "P", "BLOCK_D", "ALIGN_CORNERS", "BORDER", "HAS_VIS"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _deform_fwd_kernel(
    Q, K, V, C, VIS, O, LSE,
    stride_qb, stride_qs, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kp, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vp, stride_vd,
    stride_cb, stride_cs, stride_cm, stride_ct, stride_cp, stride_cc,
    stride_wb, stride_ws, stride_wm, stride_wt,
    S, H, Lq, T, P, HEAD_DIM, width, height, qk_scale, qk_scale_lo,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, ALIGN_CORNERS: tl.constexpr, BORDER: tl.constexpr,
    HAS_VIS: tl.constexpr, OFFSETS_64: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b64, s64, h64, offs_m64, offs_d, m_mask, d_mask = _query_rows(Lq, S, H, HEAD_DIM, BLOCK_M, BLOCK_D, EVEN_D)
    q = _load_q(Q, b64, s64, h64, offs_m64, offs_d, m_mask, d_mask, stride_qb, stride_qs, stride_qh, stride_qm,
                stride_qd).to(ACC_DTYPE)
    # Scores in base 2: one multiply here instead of one per score.
    q = q * _softmax_scales(qk_scale, qk_scale_lo, ACC_DTYPE)[1]

    # Views outer, points inner: the view's map base and visibility are per-loop scalars / [BM] vectors
    # (no integer division per sample), and a program reads one view's map at a time.
    k_t, v_t, c_t, w_t, m_i, l_i, acc = _first_view(
        K, V, C, VIS, b64, s64, h64, offs_m64, stride_kb, stride_kh, stride_vb, stride_vh, stride_cb, stride_cs,
        stride_cm, stride_wb, stride_ws, stride_wm, BLOCK_M, BLOCK_D, ACC_DTYPE)
    for t in range(0, T):
        live_m = _view_live(m_mask, w_t, HAS_VIS)
        for p0 in range(0, P, BLOCK_N):
            live, pix, in_x0, in_x1, in_y0, in_y1, wx0, wx1, wy0, wy1, _, _ = _point_cells(
                c_t, p0, live_m, P, stride_cp, stride_cc, width, height, ALIGN_CORNERS, BORDER, BLOCK_N, ACC_DTYPE)
            # Misses get weight 0 here and read pixel 0 in _gather_corner.
            k_s = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
            v_s = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
            for corner in tl.static_range(4):
                in_map, wx, wy, _, _, offset = cell_corner(in_x0, in_x1, in_y0, in_y1, wx0, wx1, wy0, wy1, width,
                                                           corner % 2, corner // 2)
                hit = live & in_map
                w = tl.where(hit, wx * wy, 0.0)[:, :, None]
                kc, vc = _gather_corner(k_t, v_t, pix + offset, hit, offs_d, d_mask, stride_kp, stride_kd,
                                        stride_vp, stride_vd, EVEN_D, OFFSETS_64)
                k_s += w * kc.to(ACC_DTYPE)
                v_s += w * vc.to(ACC_DTYPE)
            scores = tl.where(live, tl.sum(q[:, None, :] * k_s, 2), float("-inf"))
            m_i, l_i, acc = _softmax_step(m_i, l_i, acc, scores, v_s, BLOCK_M, BLOCK_D)
        k_t, v_t, c_t, w_t = k_t + stride_kt, v_t + stride_vt, c_t + stride_ct, w_t + stride_wt

    _store_out_lse(O, LSE, acc, m_i, l_i, b64, s64, h64, S, H, Lq, HEAD_DIM, offs_m64, offs_d, m_mask, d_mask)


@triton.autotune(configs=_bwd_configs(), key=["Lq", "T", "P", "BLOCK_D", "ALIGN_CORNERS", "BORDER", "HAS_VIS",
                                              "NEED_DCOORDS"],
                 prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit
def _deform_bwd_kernel(
    Q, K, V, C, VIS, O, DO, LSE, DQ, DC, DS, PR,
    stride_qb, stride_qs, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kp, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vp, stride_vd,
    stride_cb, stride_cs, stride_cm, stride_ct, stride_cp, stride_cc,
    stride_wb, stride_ws, stride_wm, stride_wt,
    stride_gb, stride_gs, stride_gh, stride_gm, stride_gd,
    stride_dch,
    S, H, Lq, T, P, HEAD_DIM, width, height, qk_scale, qk_scale_lo,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, ALIGN_CORNERS: tl.constexpr, BORDER: tl.constexpr,
    HAS_VIS: tl.constexpr, NEED_DCOORDS: tl.constexpr, OFFSETS_64: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq (owned rows), each head's dcoords (DC slice h, stride_dch apart; summed over heads afterwards),
    and the probabilities PR and score gradients DS ([B, H, S, Lq, T*P]) for `_deform_bwd_dkdv_kernel`.
    No atomics."""
    b64, s64, h64, offs_m64, offs_d, m_mask, d_mask = _query_rows(Lq, S, H, HEAD_DIM, BLOCK_M, BLOCK_D, EVEN_D)
    md_mask = m_mask[:, None] & d_mask[None, :]
    q = _load_q(Q, b64, s64, h64, offs_m64, offs_d, m_mask, d_mask, stride_qb, stride_qs, stride_qh, stride_qm,
                stride_qd).to(ACC_DTYPE)
    do = _load_q(DO, b64, s64, h64, offs_m64, offs_d, m_mask, d_mask, stride_gb, stride_gs, stride_gh, stride_gm,
                 stride_gd).to(ACC_DTYPE)
    row = ((b64 * S + s64) * H + h64) * Lq + offs_m64  # rows of the contiguous out / lse / dq
    o = tl.load(O + row[:, None] * HEAD_DIM + offs_d[None, :], mask=md_mask, other=0.0).to(ACC_DTYPE)
    lse = tl.load(LSE + row, mask=m_mask, other=float("-inf")).to(ACC_DTYPE)
    delta = tl.sum(o * do, 1)  # rowsum(dO * O): the softmax backward's correction term
    scale, scale_log2 = _softmax_scales(qk_scale, qk_scale_lo, ACC_DTYPE)
    n_keys = T * P
    # Per-query rows of the probabilities / score gradients and of this head's
    # dcoords slice (contiguous [H, B, S, Lq, T, P, 2]); advanced by one view per outer step.
    sp_t = (((b64 * H + h64) * S + s64) * Lq + offs_m64) * n_keys  # DS / PR are [B, H, S, Lq, T*P]
    dc_t = DC + h64 * stride_dch + ((b64 * S + s64) * Lq + offs_m64) * (n_keys * 2)
    k_t, v_t, c_t, w_t, _, _, dq = _first_view(
        K, V, C, VIS, b64, s64, h64, offs_m64, stride_kb, stride_kh, stride_vb, stride_vh, stride_cb, stride_cs,
        stride_cm, stride_wb, stride_ws, stride_wm, BLOCK_M, BLOCK_D, ACC_DTYPE)
    for t in range(0, T):
        live_m = _view_live(m_mask, w_t, HAS_VIS)
        for p0 in range(0, P, BLOCK_N):
            live, pix, in_x0, in_x1, in_y0, in_y1, wx0, wx1, wy0, wy1, dix_dx, diy_dy = _point_cells(
                c_t, p0, live_m, P, stride_cp, stride_cc, width, height, ALIGN_CORNERS, BORDER, BLOCK_N, ACC_DTYPE)
            offs_p = p0 + tl.arange(0, BLOCK_N)
            mn_mask = m_mask[:, None] & (offs_p < P)[None, :]
            # Per corner: q . K_c and dO . V_c give the scores, dO . v_sample and the dcoords terms; the
            # blended key is kept for dq. Off-map corners read pixel 0 with zero weights (as the forward).
            k_s = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
            dov = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
            qk_dx = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
            qk_dy = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
            dov_dx = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
            dov_dy = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
            for corner in tl.static_range(4):
                in_map, wx, wy, dwx, dwy, offset = cell_corner(in_x0, in_x1, in_y0, in_y1, wx0, wx1, wy0, wy1,
                                                               width, corner % 2, corner // 2)
                hit = live & in_map
                w = tl.where(hit, wx * wy, 0.0)
                kc, vc = _gather_corner(k_t, v_t, pix + offset, hit, offs_d, d_mask, stride_kp, stride_kd,
                                        stride_vp, stride_vd, EVEN_D, OFFSETS_64)
                kc = kc.to(ACC_DTYPE)
                vc = vc.to(ACC_DTYPE)
                k_s += w[:, :, None] * kc
                dov_c = tl.sum(do[:, None, :] * vc, 2)
                dov += w * dov_c
                if NEED_DCOORDS:
                    qk_c = tl.sum(q[:, None, :] * kc, 2)
                    dw_dfx = tl.where(hit, dwx * wy, 0.0)
                    dw_dfy = tl.where(hit, wx * dwy, 0.0)
                    qk_dx += dw_dfx * qk_c
                    qk_dy += dw_dfy * qk_c
                    dov_dx += dw_dfx * dov_c
                    dov_dy += dw_dfy * dov_c

            qk = tl.sum(q[:, None, :] * k_s, 2)
            scores = tl.where(live, qk * scale_log2, float("-inf"))
            prob = probs_from_lse(scores, lse)  # 0 where masked or the row saw nothing
            dz = prob * (dov - delta[:, None])  # dL/d(scaled score)
            dq += tl.sum(dz[:, :, None] * k_s, 1)
            if NEED_DCOORDS:
                dfx = dz * scale * qk_dx + prob * dov_dx
                dfy = dz * scale * qk_dy + prob * dov_dy
                dc_ptrs = dc_t[:, None] + offs_p[None, :] * 2
                tl.store(dc_ptrs, (dfx * dix_dx).to(DC.dtype.element_ty), mask=mn_mask)
                tl.store(dc_ptrs + 1, (dfy * diy_dy).to(DC.dtype.element_ty), mask=mn_mask)
            sp_ptrs = sp_t[:, None] + offs_p[None, :]
            tl.store(DS + sp_ptrs, dz.to(DS.dtype.element_ty), mask=mn_mask)
            tl.store(PR + sp_ptrs, prob.to(PR.dtype.element_ty), mask=mn_mask)
        k_t, v_t, c_t, w_t = k_t + stride_kt, v_t + stride_vt, c_t + stride_ct, w_t + stride_wt
        sp_t += P
        dc_t += 2 * P
    tl.store(DQ + row[:, None] * HEAD_DIM + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=md_mask)


@triton.jit
def _corner_keys_kernel(
    C, KEY, W, QOFF, GOFF,
    stride_qb, stride_qs, stride_qm, stride_gb, stride_gs, stride_gm,
    n_samples, per_batch, Lq, T, P, width, height, sentinel,
    ALIGN_CORNERS: tl.constexpr, BORDER: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    """For every (sample, corner) of contiguous coords [B, S, Lq, T, P, 2]: the pixel it touches as a sort
    key (b * T + t) * HW + pixel (`sentinel` when off the map) and its bilinear weight, both at
    4 * sample + corner; and per sample the offsets of its query's rows in q and dO (head 0), so the dK / dV
    gather needs no integer division. The same corner math as the attention kernels."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_samples
    offs64 = offs.to(tl.int64)
    x = tl.load(C + offs64 * 2, mask=mask, other=0.0).to(ACC_DTYPE)
    y = tl.load(C + offs64 * 2 + 1, mask=mask, other=0.0).to(ACC_DTYPE)
    b = offs // per_batch
    qrow = (offs - b * per_batch) // (T * P)  # s * Lq + m
    s_idx = qrow // Lq
    m_idx = qrow - s_idx * Lq
    b64, s64, m64 = b.to(tl.int64), s_idx.to(tl.int64), m_idx.to(tl.int64)
    tl.store(QOFF + offs64, b64 * stride_qb + s64 * stride_qs + m64 * stride_qm, mask=mask)
    tl.store(GOFF + offs64, b64 * stride_gb + s64 * stride_gs + m64 * stride_gm, mask=mask)
    t = (offs // P) % T
    pix, in_x0, in_x1, in_y0, in_y1, wx0, wx1, wy0, wy1, _, _ = bilinear_cell(
        x, y, width, height, ALIGN_CORNERS, BORDER)
    base = (b.to(tl.int64) * T + t) * (width * height) + pix
    for corner in tl.static_range(4):
        hit, wx, wy, _, _, offset = cell_corner(in_x0, in_x1, in_y0, in_y1, wx0, wx1, wy0, wy1, width,
                                                corner % 2, corner // 2)
        key = tl.where(hit, base + offset, sentinel)
        tl.store(KEY + offs64 * 4 + corner, key.to(KEY.dtype.element_ty), mask=mask)
        tl.store(W + offs64 * 4 + corner, tl.where(hit, wx * wy, 0.0).to(W.dtype.element_ty), mask=mask)


@triton.jit
def _deform_bwd_dkdv_kernel(
    Q, DO, DS, PR, ORDER, W, QOFF, GOFF, OFFSETS, DK, DV,
    stride_qh, stride_qd, stride_gh, stride_gd,
    S, H, Lq, T, HW, n_keys, HEAD_DIM, qk_scale, qk_scale_lo,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_E: tl.constexpr, ROW_ALIGN: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """Deterministic dK / dV: one program per (b, t, pixel) and head sums, in a fixed order, the
    (sample, corner) entries that touch the pixel: ORDER[OFFSETS[i]:OFFSETS[i+1]] (entry indices
    4 * sample + corner sorted by pixel, stable), weights W[entry], query rows QOFF / GOFF[sample] (from
    `_corner_keys_kernel`). DS / PR are [B, H, S, Lq, T*P]: a sample's probability and score gradient sit at
    (b * H + h) * (S * Lq * T*P) + its index inside batch b. ROW_ALIGN: a divisor of every query row offset
    and head stride of q and dO (in elements).

    Grid: (B * T * HW * H,), heads fastest. The H programs of one pixel read the same entries (ORDER, W,
    QOFF, GOFF: 24 bytes, four 32-byte sectors of random reads per entry); running them together lets
    the later ones find those in L2, where a pixel-fastest order streamed every pixel's entries (tens
    of MB, more than L2) once per head."""
    pid = tl.program_id(0) // H  # (b * T + t) * HW + pixel
    h = tl.program_id(0) % H
    b = pid // (T * HW)
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    start = tl.load(OFFSETS + pid)
    end = tl.load(OFFSETS + pid + 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < (BLOCK_D if EVEN_D else HEAD_DIM)
    per_batch = b64 * 0 + S * Lq * n_keys  # samples per batch, int64
    sp_shift = (b64 * (H - 1) + h64) * per_batch  # global sample index -> its DS / PR position for head h
    q_h = Q + h64 * stride_qh
    g_h = DO + h64 * stride_gh

    dk = tl.zeros([BLOCK_E, BLOCK_D], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_E, BLOCK_D], dtype=ACC_DTYPE)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_mask = offs_e < end
        entry = tl.load(ORDER + offs_e, mask=e_mask, other=0)
        sample = entry >> 2
        w = tl.load(W + entry, mask=e_mask, other=0.0).to(ACC_DTYPE)
        dz = tl.load(DS + (sp_shift + sample), mask=e_mask, other=0.0).to(ACC_DTYPE)
        prob = tl.load(PR + (sp_shift + sample), mask=e_mask, other=0.0).to(ACC_DTYPE)
        q_off = tl.load(QOFF + sample, mask=e_mask, other=0)
        g_off = tl.load(GOFF + sample, mask=e_mask, other=0)
        if ROW_ALIGN > 1:  # rows start at multiples of ROW_ALIGN elements: 16-byte vector loads
            q_off = tl.multiple_of(q_off, ROW_ALIGN)
            g_off = tl.multiple_of(g_off, ROW_ALIGN)
        mask2 = e_mask[:, None] & d_mask[None, :]
        q = tl.load(q_h + q_off[:, None] + offs_d[None, :] * stride_qd, mask=mask2, other=0.0).to(ACC_DTYPE)
        do = tl.load(g_h + g_off[:, None] + offs_d[None, :] * stride_gd, mask=mask2, other=0.0).to(ACC_DTYPE)
        dk += (w * dz)[:, None] * q
        dv += (w * prob)[:, None] * do

    # dK / dV are contiguous [B, T, H, HW, D]; pid = (b * T + t) * HW + pixel.
    bt = pid // HW
    pix = pid % HW
    out_row = (bt.to(tl.int64) * H + h64) * HW + pix
    ptrs = out_row * HEAD_DIM + offs_d
    scale = _softmax_scales(qk_scale, qk_scale_lo, ACC_DTYPE)[0]
    tl.store(DK + ptrs, (tl.sum(dk, 0) * scale).to(DK.dtype.element_ty), mask=d_mask)
    tl.store(DV + ptrs, tl.sum(dv, 0).to(DV.dtype.element_ty), mask=d_mask)

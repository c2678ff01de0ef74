"""Triton kernels of multi-view deformable attention with bilinear sampling fused in.

Layout (strides are passed, so any view works):
    q      [B, S, H, Lq, D]      queries, S query groups of Lq queries
    k, v   [B, T, H, HW, D]      T source views, each a row-major height x width map per head
    coords [B, S, Lq, T, P, 2]   (x, y) in [0, 1] per query, view and point, shared by the heads
    vis    [B, S, Lq, T]         optional uint8: 0 removes view t from the query's softmax
    out    [B, S, H, Lq, D]      lse [B, S, H, Lq] (natural log, for the backward)

Every query has its own T*P keys (bilinear samples of its views), so there is no key tile shared by a
block of queries: the kernels gather the four corner rows of every sample straight from K and V
(L2-resident for the feature-map sizes these models use) and never write a sampled tensor to memory.
Keys are streamed in tiles of BLOCK_N samples with the online softmax of flash attention.

Program grid: query tiles x B * S * H, flattened. The backward recomputes samples and probabilities from the
saved log-sum-exp; dK and dV are scattered with fp32 atomics (fast path) or, for bit-reproducible
results, gathered per pixel from the probabilities and score gradients (`_deform_bwd_dkdv_kernel`).
"""

from __future__ import annotations

import triton
import triton.language as tl
from fattn.core.runtime import interpreter_enabled
from fattn.core.triton_helpers import (
    LOG2E,
    bilinear_coords,
    bilinear_corner,
    online_softmax_finalize,
    online_softmax_update,
    probs_from_lse,
)

# Elements of one [BLOCK_M, BLOCK_N, BLOCK_D] fp32 tile per thread that keep the kernels out of
# register spills (the kernels keep one such tile, plus its pointers, live at a time).
_MAX_TILE_ELEMS_PER_THREAD = 16
# Autotuning candidates per shape: few, so the first call (compiles included) stays short.
_MAX_CONFIGS = 2


def _configs(table: list[tuple[int, int, int]]) -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 8, "BLOCK_N": 8}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=1) for bm, bn, w in table]


# (BLOCK_M, BLOCK_N, num_warps), largest first; `_prune` keeps the largest that fits the head dim for
# each warp count (a big 8-warp tile and a small 4-warp one with more programs per SM).
# No software pipelining (num_stages=1): the loads are data-dependent gathers.
_FWD_TABLE = [(16, 16, 8), (8, 16, 8), (4, 16, 8), (2, 16, 8), (2, 8, 8), (1, 8, 8),
              (8, 8, 4), (4, 8, 4), (2, 8, 4), (4, 4, 4), (2, 4, 4), (1, 4, 4)]
_BWD_TABLE = [(8, 8, 8), (4, 16, 8), (4, 8, 8), (2, 8, 8), (1, 8, 8),
              (4, 8, 4), (4, 4, 4), (2, 8, 4), (2, 4, 4), (1, 4, 4)]


def _fwd_configs() -> list[triton.Config]:
    return _configs(_FWD_TABLE)


def _bwd_configs() -> list[triton.Config]:
    return _configs(_BWD_TABLE)


def _prune_fwd(configs, named_args, **kwargs):  # type: ignore[no-untyped-def]
    return _prune(configs, named_args, _MAX_TILE_ELEMS_PER_THREAD, **kwargs)


def _prune_bwd(configs, named_args, **kwargs):  # type: ignore[no-untyped-def]
    # The backward keeps six [BLOCK_M, BLOCK_N] accumulators besides its gathers: half the tile.
    return _prune(configs, named_args, _MAX_TILE_ELEMS_PER_THREAD // 2, **kwargs)


def _prune(configs, named_args, elems_per_thread, **kwargs):  # type: ignore[no-untyped-def]
    """Keep the configs whose [BLOCK_M, BLOCK_N, BLOCK_D] tiles fit in registers and are no larger than
    the problem; at most _MAX_CONFIGS of them (first-call autotuning stays short)."""
    if len(configs) == 1:
        return configs
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    n_keys = named_args["T"] * named_args["P"]
    lq = named_args["Lq"]
    kept: dict[int, triton.Config] = {}
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if bm * bn * block_d > elems_per_thread * 32 * c.num_warps:
            continue
        if bn > max(8, triton.next_power_of_2(n_keys)) or bm > max(4, triton.next_power_of_2(lq)):
            continue
        kept.setdefault(c.num_warps, c)
    return list(kept.values())[:_MAX_CONFIGS] or configs[-1:]


@triton.jit
def _gather_rows(base, t_off, pix, stride_pix, offs_d, stride_d, mask):
    """[BM, BN, BD] rows `pix` of the map at `base + t_off` (t_off [BN] int64, pix [BM, BN])."""
    row = t_off[None, :] + pix.to(tl.int64) * stride_pix
    return tl.load(base + row[:, :, None] + (offs_d * stride_d)[None, None, :], mask=mask, other=0.0)


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
    S, H, Lq, T, P, HEAD_DIM, width, height, qk_scale,
    BLOCK_D: tl.constexpr, ALIGN_CORNERS: tl.constexpr, BORDER: tl.constexpr, HAS_VIS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # A 1-D grid (query tiles fastest, so neighbouring programs share K/V maps in L2): grid dims 1-2
    # would cap B * S * H at 65535.
    n_tiles = tl.cdiv(Lq, BLOCK_M)
    pid_m = tl.program_id(0) % n_tiles
    pid_bsh = tl.program_id(0) // n_tiles
    h = pid_bsh % H
    s = (pid_bsh // H) % S
    b = (pid_bsh // H) // S
    b64, s64, h64 = b.to(tl.int64), s.to(tl.int64), h.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < Lq
    d_mask = offs_d < HEAD_DIM

    q_ptrs = Q + b64 * stride_qb + s64 * stride_qs + h64 * stride_qh \
        + offs_m.to(tl.int64)[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0).to(ACC_DTYPE)
    # Scores in base 2: one multiply here instead of one per score.
    q = q * (qk_scale * LOG2E)

    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    c_row = C + b64 * stride_cb + s64 * stride_cs + offs_m.to(tl.int64) * stride_cm  # [BM]
    w_row = VIS + b64 * stride_wb + s64 * stride_ws + offs_m.to(tl.int64) * stride_wm

    m_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)

    n_keys = T * P
    for start_n in range(0, n_keys, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_keys
        t = offs_n // P
        p = offs_n % P
        mn_mask = m_mask[:, None] & n_mask[None, :]
        c_ptrs = c_row[:, None] + (t.to(tl.int64) * stride_ct + p.to(tl.int64) * stride_cp)[None, :]
        x = tl.load(c_ptrs, mask=mn_mask, other=0.0).to(ACC_DTYPE)
        y = tl.load(c_ptrs + stride_cc, mask=mn_mask, other=0.0).to(ACC_DTYPE)
        live = mn_mask
        if HAS_VIS:
            seen = tl.load(w_row[:, None] + t.to(tl.int64)[None, :] * stride_wt, mask=mn_mask, other=0)
            live = live & (seen != 0)

        x0, y0, fx, fy, _, _ = bilinear_coords(x, y, width, height, ALIGN_CORNERS, BORDER)
        kt_off = t.to(tl.int64) * stride_kt
        vt_off = t.to(tl.int64) * stride_vt
        # Blend the four corners, then reduce once: FMAs are cheap, cross-thread reductions are not.
        # K first, then V: one blended [BM, BN, BD] tile is live at a time.
        k_s = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
        for corner in tl.static_range(4):
            pix, valid, w, _, _ = bilinear_corner(x0, y0, fx, fy, width, height, corner % 2, corner // 2)
            mask3 = (live & valid)[:, :, None] & d_mask[None, None, :]
            kc = _gather_rows(k_base, kt_off, pix, stride_kp, offs_d, stride_kd, mask3).to(ACC_DTYPE)
            k_s += w.to(ACC_DTYPE)[:, :, None] * kc
        scores = tl.sum(q[:, None, :] * k_s, 2)

        scores = tl.where(live, scores, float("-inf"))
        m_i, l_i, prob, alpha = online_softmax_update(m_i, l_i, scores)
        v_s = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
        for corner in tl.static_range(4):
            pix, valid, w, _, _ = bilinear_corner(x0, y0, fx, fy, width, height, corner % 2, corner // 2)
            mask3 = (live & valid)[:, :, None] & d_mask[None, None, :]
            vc = _gather_rows(v_base, vt_off, pix, stride_vp, offs_d, stride_vd, mask3).to(ACC_DTYPE)
            v_s += (prob * w)[:, :, None] * vc
        acc = acc * alpha[:, None] + tl.sum(v_s, 1)

    out, lse = online_softmax_finalize(acc, m_i, l_i)
    # Output and lse are contiguous [B, S, H, Lq, (D)].
    row = ((b64 * S + s64) * H + h64) * Lq + offs_m.to(tl.int64)
    o_ptrs = O + row[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE + row, lse.to(LSE.dtype.element_ty), mask=m_mask)


@triton.autotune(configs=_bwd_configs(), key=["Lq", "T", "P", "BLOCK_D", "ALIGN_CORNERS", "BORDER", "HAS_VIS",
                                              "DETERMINISTIC", "NEED_DCOORDS"],
                 prune_configs_by={"early_config_prune": _prune_bwd}, reset_to_zero=["DK", "DV", "DC"])
@triton.jit
def _deform_bwd_kernel(
    Q, K, V, C, VIS, O, DO, LSE, DQ, DK, DV, DC, DS, PR,
    stride_qb, stride_qs, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kp, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vp, stride_vd,
    stride_cb, stride_cs, stride_cm, stride_ct, stride_cp, stride_cc,
    stride_wb, stride_ws, stride_wm, stride_wt,
    stride_gb, stride_gs, stride_gh, stride_gm, stride_gd,
    stride_dch,
    S, H, Lq, T, P, HEAD_DIM, width, height, qk_scale,
    BLOCK_D: tl.constexpr, ALIGN_CORNERS: tl.constexpr, BORDER: tl.constexpr, HAS_VIS: tl.constexpr,
    DETERMINISTIC: tl.constexpr, NEED_DCOORDS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq (owned rows), dcoords, and dK/dV.

    DETERMINISTIC=False: dK, dV (contiguous, fp32/fp64) and dcoords (contiguous [B,S,Lq,T,P,2]) get
    atomic adds. DETERMINISTIC=True: the probabilities PR and score gradients DS ([B,S,H,Lq,T*P]) are
    stored for `_deform_bwd_dkdv_kernel`, and each head's dcoords goes to its own slice of DC
    (stride_dch apart), summed over heads afterwards; no atomics.
    """
    # A 1-D grid (query tiles fastest, so neighbouring programs share K/V maps in L2): grid dims 1-2
    # would cap B * S * H at 65535.
    n_tiles = tl.cdiv(Lq, BLOCK_M)
    pid_m = tl.program_id(0) % n_tiles
    pid_bsh = tl.program_id(0) // n_tiles
    h = pid_bsh % H
    s = (pid_bsh // H) % S
    b = (pid_bsh // H) // S
    b64, s64, h64 = b.to(tl.int64), s.to(tl.int64), h.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < Lq
    d_mask = offs_d < HEAD_DIM
    md_mask = m_mask[:, None] & d_mask[None, :]
    offs_m64 = offs_m.to(tl.int64)

    q = tl.load(Q + b64 * stride_qb + s64 * stride_qs + h64 * stride_qh + offs_m64[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=md_mask, other=0.0).to(ACC_DTYPE)
    do = tl.load(DO + b64 * stride_gb + s64 * stride_gs + h64 * stride_gh + offs_m64[:, None] * stride_gm
                 + offs_d[None, :] * stride_gd, mask=md_mask, other=0.0).to(ACC_DTYPE)
    row = ((b64 * S + s64) * H + h64) * Lq + offs_m64  # rows of the contiguous out / lse / dq
    o = tl.load(O + row[:, None] * HEAD_DIM + offs_d[None, :], mask=md_mask, other=0.0).to(ACC_DTYPE)
    lse = tl.load(LSE + row, mask=m_mask, other=float("-inf")).to(ACC_DTYPE)
    delta = tl.sum(o * do, 1)  # rowsum(dO * O): the softmax backward's correction term

    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    # DK / DV are contiguous [B, T, H, HW, D] accumulators, whatever the strides of K and V.
    hw = width * height
    dk_base = DK + (b64 * T * H + h64) * hw * HEAD_DIM
    dv_base = DV + (b64 * T * H + h64) * hw * HEAD_DIM
    c_row = C + b64 * stride_cb + s64 * stride_cs + offs_m64 * stride_cm
    w_row = VIS + b64 * stride_wb + s64 * stride_ws + offs_m64 * stride_wm
    n_keys = T * P
    # dcoords is contiguous [(H,) B, S, Lq, T, P, 2]
    dc_row = DC + h64 * stride_dch + ((b64 * S + s64) * Lq + offs_m64) * (n_keys * 2)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    for start_n in range(0, n_keys, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_keys
        t = offs_n // P
        p = offs_n % P
        mn_mask = m_mask[:, None] & n_mask[None, :]
        c_ptrs = c_row[:, None] + (t.to(tl.int64) * stride_ct + p.to(tl.int64) * stride_cp)[None, :]
        x = tl.load(c_ptrs, mask=mn_mask, other=0.0).to(ACC_DTYPE)
        y = tl.load(c_ptrs + stride_cc, mask=mn_mask, other=0.0).to(ACC_DTYPE)
        live = mn_mask
        if HAS_VIS:
            seen = tl.load(w_row[:, None] + t.to(tl.int64)[None, :] * stride_wt, mask=mn_mask, other=0)
            live = live & (seen != 0)

        x0, y0, fx, fy, dix_dx, diy_dy = bilinear_coords(x, y, width, height, ALIGN_CORNERS, BORDER)
        kt_off = t.to(tl.int64) * stride_kt
        vt_off = t.to(tl.int64) * stride_vt
        # Pass 1: per corner, q . K_c and dO . V_c give the scores, dO . v_sample and the dcoords terms;
        # one [BM, BN, BD] tile is live at a time.
        qk = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
        dov = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
        qk_dx = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
        qk_dy = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
        dov_dx = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
        dov_dy = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
        for corner in tl.static_range(4):
            pix, valid, w, dw_dfx, dw_dfy = bilinear_corner(x0, y0, fx, fy, width, height, corner % 2, corner // 2)
            mask3 = (live & valid)[:, :, None] & d_mask[None, None, :]
            kc = _gather_rows(k_base, kt_off, pix, stride_kp, offs_d, stride_kd, mask3).to(ACC_DTYPE)
            qk_c = tl.sum(q[:, None, :] * kc, 2)
            qk += w * qk_c
            vc = _gather_rows(v_base, vt_off, pix, stride_vp, offs_d, stride_vd, mask3).to(ACC_DTYPE)
            dov_c = tl.sum(do[:, None, :] * vc, 2)
            dov += w * dov_c
            if NEED_DCOORDS:
                qk_dx += dw_dfx * qk_c
                qk_dy += dw_dfy * qk_c
                dov_dx += dw_dfx * dov_c
                dov_dy += dw_dfy * dov_c

        scores = tl.where(live, qk * (qk_scale * LOG2E), float("-inf"))
        prob = probs_from_lse(scores, lse)  # 0 where masked or the row saw nothing
        dz = prob * (dov - delta[:, None])  # dL/d(scaled score)
        # Pass 2: dq = sum_n dz_n k_n, reloading the corners (L1/L2 hits) rather than keeping k_n.
        k_s = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
        for corner in tl.static_range(4):
            pix, valid, w, _, _ = bilinear_corner(x0, y0, fx, fy, width, height, corner % 2, corner // 2)
            mask3 = (live & valid)[:, :, None] & d_mask[None, None, :]
            kc = _gather_rows(k_base, kt_off, pix, stride_kp, offs_d, stride_kd, mask3).to(ACC_DTYPE)
            k_s += (dz * w)[:, :, None] * kc
        dq += tl.sum(k_s, 1)

        if NEED_DCOORDS:
            dfx = dz * qk_scale * qk_dx + prob * dov_dx
            dfy = dz * qk_scale * qk_dy + prob * dov_dy
            dc_ptrs = dc_row[:, None] + offs_n[None, :] * 2
            if DETERMINISTIC:
                tl.store(dc_ptrs, (dfx * dix_dx).to(DC.dtype.element_ty), mask=mn_mask)
                tl.store(dc_ptrs + 1, (dfy * diy_dy).to(DC.dtype.element_ty), mask=mn_mask)
            else:
                tl.atomic_add(dc_ptrs, (dfx * dix_dx).to(DC.dtype.element_ty), mask=mn_mask)
                tl.atomic_add(dc_ptrs + 1, (dfy * diy_dy).to(DC.dtype.element_ty), mask=mn_mask)

        if DETERMINISTIC:
            sp_ptrs = row[:, None] * n_keys + offs_n[None, :]
            tl.store(DS + sp_ptrs, dz.to(DS.dtype.element_ty), mask=mn_mask)
            tl.store(PR + sp_ptrs, prob.to(PR.dtype.element_ty), mask=mn_mask)
        else:
            # Pass 3: scatter w * dK_sample and w * dV_sample to the four corners.
            for corner in tl.static_range(4):
                pix, valid, w, _, _ = bilinear_corner(x0, y0, fx, fy, width, height, corner % 2, corner // 2)
                hit = live & valid & (prob > 0)
                mask3 = hit[:, :, None] & d_mask[None, None, :]
                rows = t.to(tl.int64)[None, :] * H * hw + pix.to(tl.int64)
                ptrs = rows[:, :, None] * HEAD_DIM + offs_d[None, None, :]
                dk_c = (w * dz * qk_scale)[:, :, None] * q[:, None, :]
                tl.atomic_add(dk_base + ptrs, dk_c.to(DK.dtype.element_ty), mask=mask3)
                dv_c = (w * prob)[:, :, None] * do[:, None, :]
                tl.atomic_add(dv_base + ptrs, dv_c.to(DV.dtype.element_ty), mask=mask3)

    dq = dq * qk_scale
    tl.store(DQ + row[:, None] * HEAD_DIM + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=md_mask)


@triton.jit
def _deform_bwd_dkdv_kernel(
    Q, DO, DS, PR, ENTRY_QROW, ENTRY_N, ENTRY_W, OFFSETS, DK, DV,
    stride_qb, stride_qs, stride_qh, stride_qm, stride_qd,
    stride_gb, stride_gs, stride_gh, stride_gm, stride_gd,
    S, H, Lq, T, HW, n_keys, HEAD_DIM, qk_scale,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Deterministic dK / dV: one program per (b, t, pixel) and head sums, in a fixed order, the
    samples that touch the pixel (a CSR list sorted by pixel: entries OFFSETS[i]..OFFSETS[i+1])."""
    pid = tl.program_id(0)  # (b * T + t) * HW + pixel
    h = tl.program_id(1)
    b = pid // (T * HW)
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    start = tl.load(OFFSETS + pid)
    end = tl.load(OFFSETS + pid + 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    dk = tl.zeros([BLOCK_E, BLOCK_D], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_E, BLOCK_D], dtype=ACC_DTYPE)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_mask = offs_e < end
        qrow = tl.load(ENTRY_QROW + offs_e, mask=e_mask, other=0)  # s * Lq + query
        n = tl.load(ENTRY_N + offs_e, mask=e_mask, other=0).to(tl.int64)
        w = tl.load(ENTRY_W + offs_e, mask=e_mask, other=0.0).to(ACC_DTYPE)
        s64 = (qrow // Lq).to(tl.int64)
        m64 = (qrow % Lq).to(tl.int64)
        sp = (((b64 * S + s64) * H + h64) * Lq + m64) * n_keys + n
        dz = tl.load(DS + sp, mask=e_mask, other=0.0).to(ACC_DTYPE)
        prob = tl.load(PR + sp, mask=e_mask, other=0.0).to(ACC_DTYPE)
        mask2 = e_mask[:, None] & d_mask[None, :]
        q = tl.load(Q + (b64 * stride_qb + s64 * stride_qs + h64 * stride_qh + m64 * stride_qm)[:, None]
                    + offs_d[None, :] * stride_qd, mask=mask2, other=0.0).to(ACC_DTYPE)
        do = tl.load(DO + (b64 * stride_gb + s64 * stride_gs + h64 * stride_gh + m64 * stride_gm)[:, None]
                     + offs_d[None, :] * stride_gd, mask=mask2, other=0.0).to(ACC_DTYPE)
        dk += (w * dz)[:, None] * q
        dv += (w * prob)[:, None] * do

    # dK / dV are contiguous [B, T, H, HW, D]; pid = (b * T + t) * HW + pixel.
    bt = pid // HW
    pix = pid % HW
    out_row = (bt.to(tl.int64) * H + h64) * HW + pix
    ptrs = out_row * HEAD_DIM + offs_d
    tl.store(DK + ptrs, (tl.sum(dk, 0) * qk_scale).to(DK.dtype.element_ty), mask=d_mask)
    tl.store(DV + ptrs, tl.sum(dv, 0).to(DV.dtype.element_ty), mask=d_mask)

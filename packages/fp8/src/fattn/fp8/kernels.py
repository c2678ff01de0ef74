"""Triton kernels of fattn-fp8.

Forward (`_attn_fwd_kernel`): flash attention in the style of Triton's 06-fused-attention tutorial.
With FP8 inputs both products run on FP8 tensor cores: S = Q8 K8^T (fp32 accumulation) is scaled by
the per-head descales, the online softmax runs in fp32, and P is quantized to e4m3 (times 2^8, so
small probabilities stay normal numbers) for the FP8 product P8 V8. The same kernel, with FP8 off,
is the full-precision forward that the backward pass recomputes (it writes the log-sum-exp and
delta = rowsum(dO * O) instead of O). On Hopper, K and V tiles can come through TMA tensor
descriptors (config TMA=True, see op.py for when): besides saving the per-thread address registers
this lets one-warpgroup programs of 64 x 128 tiles fit three to an SM.

Full-precision Q is quantized inside the forward kernel, one scale per query row (no extra pass).
K and V (`_quant_stats_kernel`, `_quant_finalize_kernel`, `_quant_apply_kernel`): amax per
(batch, head), optionally after centring each channel on its mean over the tokens (used for K: it
shifts every logit of a query row by the same amount, so the softmax is unchanged, and it removes
the per-channel offsets that make outlier channels), in three deterministic launches that each
handle K and V together (grid axis 2 picks the tensor). Per block of tokens (granularity "block"), one
pass: `_quant_blocks_kernel` (K per QUANT_BLOCK = 64 tokens after `_quant_centre_kernel`'s centre, V per
V_QUANT_BLOCK = 128), `_quant_x_blocks_kernel` (`quantize(x, granularity="block")`, no centre). The forward
reads per-block descales with Q_BLOCK_SCALES / K_BLOCK_SCALES / V_BLOCK_SCALES.

Backward (`_attn_bwd_dkdv_kernel`, `_attn_bwd_dq_kernel`): the flash-attention backward of the
full-precision attention (straight-through over the quantization); one program per key block owns
dK and dV for its KV head (it loops over every query head of its GQA group), one program per query
block owns dQ: no atomics, deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fattn.core.runtime import INTERPRET, autotune_limit, interpreter_enabled
from fattn.core.triton_helpers import LOG2E, interp_upcast, online_softmax_finalize

FP8_MAX = tl.constexpr(448.0)  # largest finite float8_e4m3fn
# P in [0, 1] is stored in e4m3 times 2^8 (at most 256 < 448): exact (a power of two), and
# probabilities down to 2^-14 stay normal numbers instead of flushing into e4m3's subnormals.
P_SCALE_LOG2 = tl.constexpr(8.0)
# Tokens per quantization block of the per-block granularity (op.QUANT_BLOCK): descales [B, H, ceil(N / 64)].
# Every kernel tile is a power of two: a tile of <= 64 tokens lies inside one block, a 128 tile spans two.
QUANT_BLOCK = tl.constexpr(64)
# Tokens per V descale where the op quantizes V per block (granularity "block"): at least the largest key
# tile, so that every tile's V shares one descale (op.V_QUANT_BLOCK; descales [B, Hkv, ceil(N / 128)]).
V_QUANT_BLOCK = tl.constexpr(128)
# A V block whose descale is this far (log2) below its head's largest has its P scaled by 2^-100 instead:
# its values are below 2^-100 of the head's amax, and its share of the row sum stays a normal fp32 number.
V_SHIFT_FLOOR = tl.constexpr(-100.0)
# K's centre for the one-pass quantization: the channel medians of this many tokens spread evenly over the head.
CENTRE_SAMPLE = tl.constexpr(64)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _to_e4m3(x):
    """fp32 -> float8_e4m3fn, round to nearest. |x| must be <= 448.

    The Triton interpreter's fp32 -> fp8 cast loses the carry when rounding crosses a power of two
    (127.3 -> 64); there we round to the e4m3 grid in fp32 first, so its cast is exact.
    """
    if INTERPRET:
        ax = tl.abs(x)
        e = tl.floor(tl.log2(tl.maximum(ax, 1e-30)))
        e = tl.maximum(e, -6.0)  # subnormals share the exponent of the smallest normal
        ulp = tl.exp2(e - 3.0)
        x = tl.floor(x / ulp + 0.5) * ulp
    return x.to(tl.float8e4nv)


@triton.jit
def _quantize_rows(x):
    """fp32 tile [ROWS, D] -> (e4m3 tile, descale [ROWS]) with one scale per row: amax over the row / 448
    (1 for an all-zero row), how full-precision Q is quantized (in the forward kernel or `_quant_rows_kernel`)."""
    amax = tl.max(tl.abs(x), 1)
    descale = tl.where(amax > 0.0, amax / FP8_MAX, 1.0)
    inv = 1.0 / descale
    # clamp: the scaled amax can land a rounding step above 448, and the cast does not saturate
    return _to_e4m3(tl.minimum(tl.maximum(x * inv[:, None], -FP8_MAX), FP8_MAX)), descale


@triton.jit
def _load_tile(base, offs_n, n_limit, offs_d, stride_n, stride_d, MASK: tl.constexpr):
    """[BLOCK, D] tile of rows offs_n (int64 offsets; rows >= n_limit read as 0 when MASK)."""
    ptrs = base + offs_n.to(tl.int64)[:, None] * stride_n + offs_d[None, :] * stride_d
    if MASK:
        return tl.load(ptrs, mask=(offs_n < n_limit)[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _load_tile_t(base, offs_n, n_limit, offs_d, stride_n, stride_d, MASK: tl.constexpr):
    """[D, BLOCK] (transposed) tile of rows offs_n."""
    ptrs = base + offs_d[:, None] * stride_d + offs_n.to(tl.int64)[None, :] * stride_n
    if MASK:
        return tl.load(ptrs, mask=(offs_n < n_limit)[None, :], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _block_descale_max(scales, n):
    """The largest of the n descales at `scales` (at least 2^-100: an all-zero head's are all 0)."""
    offs = tl.arange(0, 128)
    best = tl.full([128], 2.0 ** -100, dtype=tl.float32)
    for i in range(0, n, 128):
        best = tl.maximum(best, tl.load(scales + i + offs, mask=i + offs < n, other=0.0))
    return tl.max(best, 0)


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
               K_desc, V_desc, k_row, v_row,
               offs_m, offs_d, lo, hi, N_K, diag, qk_scale, k_scales, v_scales, v_log2_max,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr,
               FP8: tl.constexpr, TMA: tl.constexpr, K_BLOCK_SCALES: tl.constexpr, V_BLOCK_SCALES: tl.constexpr):
    """Key tiles [lo, hi): MASK says whether they need the bounds / causal mask.

    m_i is the running max of the base-2 logits. With FP8, p and l_i carry a factor 2^8 (P_SCALE_LOG2)
    that the final acc / l_i cancels: it is folded into the exponent, so it costs nothing.
    TMA: K and V tiles come through tensor descriptors (K as [rows, D] rows k_row + n, V tokens-contiguous
    as [rows, N_K] rows v_row + d): no per-thread addresses, so fewer registers (one-warpgroup programs
    fit two or three to an SM, and run out of phase: one's softmax overlaps another's tensor-core
    work; the warpgroups of one program still meet at a barrier every tile).
    K_BLOCK_SCALES: k_scales points at this (batch, KV head)'s K descales, one per QUANT_BLOCK keys.
    A tile of <= QUANT_BLOCK keys lies inside one block: its descale joins the row scale. A tile of
    2 * QUANT_BLOCK keys spans two: each half of the tile has its own row scale, picked per register by
    a split known at compile time (no per-logit multiply, no column vector: a loaded per-column descale
    vector spills at 128 x 128 / 8 warps and takes 54 more registers at 64 x 128 / 4 warps, sm_90).
    V_BLOCK_SCALES: v_scales points at this (batch, KV head)'s V descales, powers of two, one per V_QUANT_BLOCK
    keys (so one per tile), v_log2_max = log2 of their largest. The tile's P is scaled by its descale over that
    largest (a power of two <= 1: P * 2^8 still fits e4m3 and rounds as before) through the exponent, and acc
    keeps the units of the largest descale: no per-logit work; the row sum l_i takes the unscaled sum (one
    multiply per row).
    """
    # Tiles are powers of two, so no tile straddles a block boundary except at its middle.
    tl.static_assert(not K_BLOCK_SCALES or BLOCK_N <= 2 * QUANT_BLOCK)
    tl.static_assert(not V_BLOCK_SCALES or BLOCK_N <= V_QUANT_BLOCK)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if TMA:
            # Rows past N_K belong to the next head (finite e4m3 values), or are zero past the tensor's
            # end: the MASK tile sets their logits to -inf.
            k_t = K_desc.load([k_row + start_n, 0]).T
        else:
            k_t = interp_upcast(_load_tile_t(k_base, offs_n, N_K, offs_d, stride_kn, stride_kd, MASK))
        s = tl.dot(q, k_t)  # raw logits, fp32; qk_scale [BLOCK_M] > 0 is applied inside the exp2 below
        tile_scale = qk_scale
        if K_BLOCK_SCALES:
            # start_n is a multiple of BLOCK_N: the tile's first key is in block start_n // QUANT_BLOCK
            tile_scale = qk_scale * tl.load(k_scales + start_n // QUANT_BLOCK)
            if BLOCK_N > QUANT_BLOCK:
                # its second half: the next block (descale > 0, so each half's row max commutes with it)
                if MASK:
                    k_d1 = tl.load(k_scales + start_n // QUANT_BLOCK + 1, mask=start_n + QUANT_BLOCK < N_K,
                                   other=1.0)
                else:
                    k_d1 = tl.load(k_scales + start_n // QUANT_BLOCK + 1)
                second_scale = qk_scale * k_d1
                first_half = (tl.arange(0, BLOCK_N) < QUANT_BLOCK)[None, :]
        if MASK:
            keep = (offs_n < N_K)[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
            s = tl.where(keep, s, float("-inf"))
        if K_BLOCK_SCALES and BLOCK_N > QUANT_BLOCK:
            # (the selects pick whole registers: each half reduces only its own)
            m_new = tl.maximum(m_i, tl.maximum(tl.max(tl.where(first_half, s, float("-inf")), 1) * tile_scale,
                                               tl.max(tl.where(first_half, float("-inf"), s), 1) * second_scale))
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * tile_scale)
        # rows that have seen only masked keys keep m_new = -inf: subtract 0 there (no -inf - -inf)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_ref)
        if FP8:
            m_ref = m_ref - P_SCALE_LOG2
        if V_BLOCK_SCALES:
            # log2(this tile's V descale / the head's largest): an integer <= 0 (powers of two; an all-zero
            # block's 0 gives the floor), folded exactly into the exponent of p
            v_shift = tl.maximum(_log2_pow2(tl.load(v_scales + start_n // V_QUANT_BLOCK)) - v_log2_max, V_SHIFT_FLOOR)
            m_ref = m_ref - v_shift
        if K_BLOCK_SCALES and BLOCK_N > QUANT_BLOCK:
            p = tl.math.exp2(s * tl.where(first_half, tile_scale[:, None], second_scale[:, None]) - m_ref[:, None])
        else:
            p = tl.math.exp2(s * tile_scale[:, None] - m_ref[:, None])  # one FMA and one exp2 per logit
        if V_BLOCK_SCALES:
            l_i = l_i * alpha + tl.sum(p, 1) * tl.math.exp2(-v_shift)
        else:
            l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        if TMA:
            v = V_desc.load([v_row, start_n]).T  # columns past N_K read as 0
        else:
            v = interp_upcast(_load_tile(v_base, offs_n, N_K, offs_d, stride_vn, stride_vd, MASK))
        if FP8:
            pv = tl.dot(_to_e4m3(p), v)
        elif v.dtype == tl.float32:
            pv = tl.dot(p, v)
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
    return acc, m_i, l_i


# What is left when every tuned config is pruned (fp32 at D = 256): unpipelined 32 x 32 tiles.
_SMALLEST = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)


def _set_tma_blocks(nargs: dict) -> None:  # type: ignore[type-arg]
    """Config pre-hook: the TMA descriptors' tile shapes follow the config's BLOCK_N."""
    if nargs.get("K_desc") is not None:
        bn, d = nargs["BLOCK_N"], nargs["HEAD_DIM"]
        nargs["K_desc"].block_shape = [bn, d]
        nargs["V_desc"].block_shape = [d, bn]


def _fwd_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=_set_tma_blocks)
        # 8 warps at BLOCK_M = 128: with 4, the 128-row fp32 accumulator and logits spill (ptxas, sm_90)
        for bm, bn, w, s in [
            (128, 128, 8, 3),
            (128, 64, 8, 3),
            (128, 64, 8, 4),
            # One warpgroup per program: 239 registers, so two programs share an SM and, unlike the two
            # warpgroups of one 8-warp program (which meet at a barrier every key tile), run out of
            # phase: one's softmax overlaps the other's tensor-core work.
            (64, 64, 4, 3),
            (64, 64, 8, 3),
            (64, 32, 8, 3),
        ]
    ]
    # FP8 on Hopper with TMA-able K/V (see op.py): K/V tiles through tensor descriptors. No per-thread
    # address registers: one warpgroup on 64 x 128 tiles takes 168 registers and 73 KB (2 stages), so
    # three programs fit an SM and overlap each other's softmax and tensor-core work (ptxas, sm_90).
    configs += [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "TMA": True}, num_warps=w, num_stages=s,
                      pre_hook=_set_tma_blocks)
        for bm, bn, w, s in [(64, 128, 4, 2), (64, 128, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 4),
                             (128, 64, 8, 4)]
    ]
    # D <= 64 only (_fwd_prune): 128 x 64 / 8 warps capped at 128 registers has no spill there (183 uncapped)
    # and fits two programs per SM instead of one; the same cap made fattn-rope2d's 128 x 64 forward 27%
    # faster on an H100. At D = 128 it spills 1.6 KB. Added in session 16 from sm_90 compiles, not yet timed.
    configs.append(triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "TMA": True}, num_warps=8, num_stages=3, maxnreg=128,
                                 pre_hook=_set_tma_blocks))
    # D <= 128: one warpgroup on 64 x 128 TMA tiles capped at 168 registers, three programs per SM. Uncapped,
    # a causal mask (220-222 registers) or Q quantized in the kernel (226-236) leaves room for two: the
    # bf16-Q pick ran 783 us against e4m3 Q's 661 at B4-H16-N4096-D128 (H100, session 18). sm_90, capped:
    # e4m3 Q 163-165 registers, no spill; bf16 Q causal no spill, non-causal 32 bytes. Not yet timed.
    configs += [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "TMA": True}, num_warps=4, num_stages=s, maxnreg=168,
                              pre_hook=_set_tma_blocks) for s in (2, 3)]
    return configs


# The largest head dim at which each register cap (triton.Config.maxnreg) compiles without spilling much.
_CAP_MAX_HEAD_DIM = {128: 64, 168: 128}


def _fwd_prune(configs, named_args, **kwargs):  # type: ignore[no-untyped-def]
    """Drop configs whose pipelined K/V tiles exceed Hopper's 227 KB of shared memory, BLOCK_N < 32
    for FP8 (the P @ V product needs a reduction of at least 32), tiles over 64 at D = 256 (they
    spill registers, ptxas sm_90), TMA configs when the launch has no descriptors, register-capped
    configs above their _CAP_MAX_HEAD_DIM or outside the FP8 forward (they spill there), and with
    per-block K descales the pointer-load 128-key tiles, and with per-block K or V descales and bf16 Q the
    capped ones from D = 128 (128 x 128 / 8 warps spills 64 bytes with e4m3 Q, sm_90, where per head it
    does not; capped 64 x 128 with bf16 Q 40-184 bytes, with e4m3 Q none)."""
    d = kwargs["HEAD_DIM"]
    fp8 = kwargs["FP8"]
    tma = bool(kwargs.get("KV_DESC", False))
    k_blocks = kwargs.get("K_BLOCK_SCALES", False)
    v_blocks = kwargs.get("V_BLOCK_SCALES", False)
    q_fp8 = named_args["Q"].element_size() == 1
    elem = 1 if fp8 else named_args["Q"].element_size()
    out = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if (c.kwargs.get("TMA", False) and not tma) or (c.maxnreg is not None and (d > _CAP_MAX_HEAD_DIM[c.maxnreg]
                                                                                   or not fp8)):
            continue
        if k_blocks and bn > QUANT_BLOCK and d >= 128 and not c.kwargs.get("TMA", False):
            continue
        if (k_blocks or v_blocks) and c.maxnreg is not None and d >= 128 and not q_fp8:
            continue  # capped at 168 with bf16 Q they spill 40-184 bytes (with e4m3 Q none, sm_90)
        smem = bm * d * elem + c.num_stages * 2 * bn * d * elem  # Q, then K and V per pipeline stage
        # one warpgroup (4 warps) holds a 64-row tile: only for FP8 at D <= 128 (it spills beyond)
        one_wg_ok = c.num_warps == 8 or (fp8 and d <= 128)
        if smem <= 220 * 1024 and (not fp8 or bn >= 32) and (d < 256 or (bm <= 64 and bn <= 64)) and one_wg_ok:
            out.append(c)
    limit = autotune_limit("fp8")  # FATTN_FP8_AUTOTUNE_LIMIT (older FATTN_FP8_TUNE_LIMIT); the tests set 1
    if limit and len(out) > limit:
        # tests: the first configs only (TMA ones first when there are descriptors)
        out = sorted(out, key=lambda c: not c.kwargs.get("TMA", False))[:limit]
    return out or [_SMALLEST]


# KV_DESC is in the key: whether TMA configs may run depends on the call's layout (op._tma_descriptors),
# and two calls of one length bucket can differ there (Nk 4096 and 4090): a pick cached for one must
# not be replayed on the other.
@triton.autotune(configs=_fwd_configs(), key=["Q_BUCKET", "K_BUCKET", "HEAD_DIM", "CAUSAL", "FP8", "BWD_PREP",
                                              "Q_BLOCK_SCALES", "K_BLOCK_SCALES", "KV_DESC", "Q_ROW_SCALES",
                                              "V_BLOCK_SCALES"],
                 prune_configs_by={"early_config_prune": _fwd_prune})
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Q_descale, K_descale, V_descale, Out, Lse, DO, Delta,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, GROUP, N_Q, N_K, sm_scale, Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, FP8: tl.constexpr, BWD_PREP: tl.constexpr,
    K_desc=None, V_desc=None, KV_DESC: tl.constexpr = False, TMA: tl.constexpr = False,
    Q_BLOCK_SCALES: tl.constexpr = False, K_BLOCK_SCALES: tl.constexpr = False, Q_ROW_SCALES: tl.constexpr = False,
    V_BLOCK_SCALES: tl.constexpr = False,
):
    """One program: BLOCK_M queries of one (batch, head).

    FP8: K/V are e4m3 with fp32 descales per (batch, head), Q too, or Q is full precision and
    quantized per row here; writes Out. Q_BLOCK_SCALES (e4m3 Q) / K_BLOCK_SCALES: Q_descale
    [B, H, ceil(N_Q / 64)] / K_descale [B, Hkv, ceil(N_K / 64)], one descale per QUANT_BLOCK tokens
    (contiguous), instead of [B, H] / [B, Hkv]. Q_ROW_SCALES (e4m3 Q): Q_descale [B, H, N_Q], one per query
    row (`_quant_rows_kernel`). V_BLOCK_SCALES: V_descale [B, Hkv, ceil(N_K / 128)], one per V_QUANT_BLOCK keys
    (`_quant_blocks_kernel`; an all-zero block's is 0).
    BWD_PREP (full precision): writes Lse [B*H, N_Q] (natural log) and Delta = rowsum(dO * O).
    """
    tl.static_assert(not TMA or KV_DESC, "a TMA config needs the K / V tensor descriptors")
    pid_m = tl.program_id(0)
    if CAUSAL:
        # the last query blocks see the most keys: start them first, so the short ones fill the tail
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    hkv_total = H // GROUP
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = interp_upcast(_load_tile(q_base, offs_m, N_Q, offs_d, stride_qn, stride_qd, True))
    # TMA: first row of this (batch, KV head) in the 2-D views [B*Hkv*N_K, D] of K and [B*Hkv*D, N_K] of V
    bhk = b * hkv_total + hk
    k_row = bhk * N_K
    v_row = bhk * HEAD_DIM

    # qk_scale: per query row, base 2; the logits are dot(q, k) * qk_scale
    qk_scale = tl.full([BLOCK_M], sm_scale * LOG2E, dtype=tl.float32)
    if FP8:
        if Q.dtype.element_ty == tl.float8e4nv:
            if Q_BLOCK_SCALES:
                # per query row, its block's descale (a BLOCK_M of 128 spans two blocks)
                q_d = tl.load(Q_descale + pid_bh.to(tl.int64) * tl.cdiv(N_Q, QUANT_BLOCK) + offs_m // QUANT_BLOCK,
                              mask=offs_m < N_Q, other=1.0)
            elif Q_ROW_SCALES:
                # one descale per query row (`_quant_rows_kernel`: full-precision Q quantized before the launch)
                q_d = tl.load(Q_descale + pid_bh.to(tl.int64) * N_Q + offs_m, mask=offs_m < N_Q, other=1.0)
            else:
                q_d = tl.load(Q_descale + pid_bh)
        else:
            # Full-precision Q is quantized here, one scale per query row (amax over D): no extra
            # pass over Q, and a finer scale than one per head.
            q, q_d = _quantize_rows(q.to(tl.float32))
        if K_BLOCK_SCALES:
            qk_scale = qk_scale * q_d  # K's descales are applied per key tile (_fwd_inner)
        else:
            qk_scale = qk_scale * q_d * tl.load(K_descale + b * hkv_total + hk)
    k_scales = K_descale
    if K_BLOCK_SCALES:
        k_scales = K_descale + bhk.to(tl.int64) * tl.cdiv(N_K, QUANT_BLOCK)
    v_scales = V_descale
    v_log2_max = 0.0
    if V_BLOCK_SCALES:
        v_scales = V_descale + bhk.to(tl.int64) * tl.cdiv(N_K, V_QUANT_BLOCK)
        v_max = _block_descale_max(v_scales, tl.cdiv(N_K, V_QUANT_BLOCK))
        v_log2_max = _log2_pow2(v_max)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Causal with N_Q != N_K aligns the diagonal bottom right: query m sees keys n <= m + diag.
    diag = N_K - N_Q
    if CAUSAL:
        hi = tl.minimum(N_K, pid_m * BLOCK_M + BLOCK_M + diag)
        full_hi = tl.minimum(N_K, pid_m * BLOCK_M + diag + 1)
    else:
        hi = N_K
        full_hi = N_K
    hi = tl.maximum(hi, 0)
    # Tiles below full_hi need no mask at all (inside the sequence and under the diagonal).
    full_hi = (tl.maximum(full_hi, 0) // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               K_desc, V_desc, k_row, v_row,
                               offs_m, offs_d, 0, full_hi, N_K, diag, qk_scale, k_scales, v_scales, v_log2_max,
                               HEAD_DIM, BLOCK_N, CAUSAL, False, FP8, TMA, K_BLOCK_SCALES, V_BLOCK_SCALES)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               K_desc, V_desc, k_row, v_row,
                               offs_m, offs_d, full_hi, hi, N_K, diag, qk_scale, k_scales, v_scales, v_log2_max,
                               HEAD_DIM, BLOCK_N, CAUSAL, True, FP8, TMA, K_BLOCK_SCALES, V_BLOCK_SCALES)
    out, lse = online_softmax_finalize(acc, m_i, l_i)
    row_ok = offs_m < N_Q
    if FP8:
        if V_BLOCK_SCALES:
            out = out * v_max  # acc is in units of the head's largest V descale (_fwd_inner)
        else:
            out = out * tl.load(V_descale + b * hkv_total + hk)
    if BWD_PREP:
        do = _load_tile(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh,
                        offs_m, N_Q, offs_d, stride_don, stride_dod, True).to(tl.float32)
        # delta from the fp32 O of the full-precision attention (the gradient being computed is its)
        delta = tl.sum(out * do, 1)
        row = pid_bh.to(tl.int64) * N_Q + offs_m
        tl.store(Lse + row, lse, mask=row_ok)
        tl.store(Delta + row, delta, mask=row_ok)
    else:
        o_ptrs = (Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                  + offs_m.to(tl.int64)[:, None] * stride_on + offs_d[None, :] * stride_od)
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------------
@triton.jit
def _pick(which, a, b):
    """a for tensor 0 (K), b for tensor 1 (V): one launch quantizes both."""
    if which == 0:
        r = a
    else:
        r = b
    return r


@triton.jit
def _quant_stats_kernel(X0, X1, ColSum, ColMax, ColMin, H, N, n_tiles,
                        stride_x0b, stride_x0h, stride_x0n, stride_x0d,
                        stride_x1b, stride_x1h, stride_x1n, stride_x1d,
                        D: tl.constexpr, BLOCK_N: tl.constexpr, CENTER0: tl.constexpr, TILES: tl.constexpr = 1,
                        UNROLL: tl.constexpr = 1):
    """Per (batch*head, part, tensor): per-channel max, min (and sum when CENTER0) of TILES consecutive
    BLOCK_N-token tiles -> [2, BH, n_tiles, D] (n_tiles: parts per head). TILES > 1 (the default, op's
    _STATS_TOKENS): fewer programs, each keeping elementwise running max / min / sum over its tiles and
    reducing them across rows once (twice the bandwidth of one-tile programs on an H100). TILES = 1: one tile
    per program (FATTN_FP8_STATS_TOKENS=0). UNROLL divides TILES."""
    pid_bh = tl.program_id(0)
    t = tl.program_id(1)
    which = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    base = _pick(which, X0 + b * stride_x0b + h * stride_x0h, X1 + b * stride_x1b + h * stride_x1h)
    stride_n = _pick(which, stride_x0n, stride_x1n)
    stride_d = _pick(which, stride_x0d, stride_x1d)
    offs_d = tl.arange(0, D)
    if TILES == 1:  # one tile, reduced at once
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        x = _load_tile(base, offs_n, N, offs_d, stride_n, stride_d, True).to(tl.float32)
        row_ok = (offs_n < N)[:, None]
        slot = which.to(tl.int64) * tl.num_programs(0) + pid_bh
        out = (slot * n_tiles + t) * D + offs_d
        tl.store(ColMax + out, tl.max(tl.where(row_ok, x, float("-inf")), 0))
        tl.store(ColMin + out, tl.min(tl.where(row_ok, x, float("inf")), 0))
        if CENTER0:
            tl.store(ColSum + out, tl.sum(x, 0))
    else:
        col_max = tl.full([BLOCK_N, D], float("-inf"), dtype=tl.float32)
        col_min = tl.full([BLOCK_N, D], float("inf"), dtype=tl.float32)
        col_sum = tl.zeros([BLOCK_N, D], dtype=tl.float32)
        # UNROLL chunks per loop step: their loads are issued together. A fully unrolled span compiled
        # spill-free with Triton 3.6 but spilled with 3.9 (all its loads hoisted: 160 bytes at bf16 D128).
        for g in range(TILES // UNROLL):
            for u in tl.static_range(UNROLL):
                offs_n = (t * TILES + g * UNROLL + u) * BLOCK_N + tl.arange(0, BLOCK_N)
                x = _load_tile(base, offs_n, N, offs_d, stride_n, stride_d, True).to(tl.float32)
                row_ok = (offs_n < N)[:, None]
                col_max = tl.maximum(col_max, tl.where(row_ok, x, float("-inf")))
                col_min = tl.minimum(col_min, tl.where(row_ok, x, float("inf")))
                if CENTER0:
                    col_sum += x
        slot = which.to(tl.int64) * tl.num_programs(0) + pid_bh
        out = (slot * n_tiles + t) * D + offs_d
        tl.store(ColMax + out, tl.max(col_max, 0))
        tl.store(ColMin + out, tl.min(col_min, 0))
        if CENTER0:
            tl.store(ColSum + out, tl.sum(col_sum, 0))


@triton.jit
def _quant_rows_kernel(X, Y, Descale, H, N, stride_xb, stride_xh, stride_xn, stride_xd,
                       stride_yb, stride_yh, stride_yn, stride_yd, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per (batch*head, token tile): Y = e4m3(X / descale) with one descale per token (`_quantize_rows`,
    as the forward quantizes full-precision Q itself) -> Descale [B*H, N]. One pass: a row's scale needs
    nothing but the row."""
    pid_bh = tl.program_id(0)
    t = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    x = _load_tile(X + b * stride_xb + h * stride_xh, offs_n, N, offs_d, stride_xn, stride_xd, True)
    y, descale = _quantize_rows(x.to(tl.float32))
    row_ok = offs_n < N
    y_ptrs = Y + b * stride_yb + h * stride_yh + offs_n.to(tl.int64)[:, None] * stride_yn + offs_d[None, :] * stride_yd
    tl.store(y_ptrs, y, mask=row_ok[:, None])
    tl.store(Descale + pid_bh.to(tl.int64) * N + offs_n, descale, mask=row_ok)


@triton.jit
def _quant_centre_kernel(K, Centre, H, N, stride_kb, stride_kh, stride_kn, stride_kd, D: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """Per (batch*head, BLOCK_D channels): K's centre for the one-pass quantization -> Centre [BH, D] fp32, each
    channel's lower median over CENTRE_SAMPLE tokens spread evenly over the head (token (i * N) // S for
    i < S = min(N, 64)). Any centre leaves the softmax unchanged; a sample's medians remove per-channel offsets
    as well as the full means, and a few outlier tokens in the sample (attention sinks, 30x keys) do not move
    them as they would move a mean. Small programs (a sort of BLOCK_D x 64 values each; a whole D 128 head's
    in one program spilled 1.9 KB with Triton 3.9), ahead of `_quant_blocks_kernel`."""
    tl.static_assert(D % BLOCK_D == 0, "the grid's BLOCK_D-channel programs must cover D exactly")
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_sample = tl.minimum(N, CENTRE_SAMPLE)
    offs_s = tl.arange(0, CENTRE_SAMPLE)
    sample = (offs_s.to(tl.int64) * N) // tl.maximum(n_sample, 1)
    head = K + b * stride_kb + h * stride_kh
    x = tl.load(head + sample[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=(offs_s < n_sample)[:, None],
                other=float("inf")).to(tl.float32)  # rows past the sample are +inf: they rank last
    median_rank = (n_sample - 1) // 2
    if INTERPRET:
        # The same element by counting ranks (ties broken by position): the interpreter's tl.sort takes
        # seconds per call, this milliseconds.
        rank = tl.zeros([CENTRE_SAMPLE, BLOCK_D], dtype=tl.int32)
        for j in range(CENTRE_SAMPLE):
            token = (N.to(tl.int64) * j) // tl.maximum(n_sample, 1)
            x_j = tl.load(head + token * stride_kn + offs_d * stride_kd, mask=(offs_d * 0 + j) < n_sample,
                          other=float("inf")).to(tl.float32)[None, :]
            rank += ((x_j < x) | ((x_j == x) & (j < offs_s[:, None]))).to(tl.int32)
        centre = tl.sum(tl.where(rank == median_rank, x, 0.0), 0)
    else:
        ranked = tl.sort(tl.trans(x), dim=1)  # [BLOCK_D, CENTRE_SAMPLE]
        centre = tl.sum(tl.where(offs_s[None, :] == median_rank, ranked, 0.0), 1)
    tl.store(Centre + pid_bh.to(tl.int64) * D + offs_d, centre)


@triton.jit
def _quant_blocks_kernel(K, V, Centre, K8, V8, KDescale, VDescale, H, N,
                         stride_kb, stride_kh, stride_kn, stride_kd,
                         stride_vb, stride_vh, stride_vn, stride_vd,
                         stride_k8b, stride_k8h, stride_k8n, stride_k8d,
                         stride_v8b, stride_v8h, stride_v8n, stride_v8d,
                         D: tl.constexpr):
    """One pass over K and V with per-block scales (granularity "block"), per (batch*head, 128-token tile,
    tensor):
    - K (tensor 0): centred per channel on Centre [BH, D] (`_quant_centre_kernel`), then one descale per
      64-token block (amax / 448, 1 for an all-zero block) -> KDescale [BH, ceil(N / 64)];
    - V (tensor 1): one descale per 128-token block, amax / 448 rounded up to a power of two (0 for an
      all-zero block) -> VDescale [BH, ceil(N / 128)], written through V8's strides (tokens-contiguous).
    Each program reads its tokens once: no statistics pass, no finalize."""
    pid_bh = tl.program_id(0)
    t = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    # Two code paths rather than picked strides (as in _quant_apply_kernel): each store keeps its unit stride.
    if tl.program_id(2) == 0:
        _quant_k_blocks(K + b * stride_kb + h * stride_kh, stride_kn, stride_kd,
                        K8 + b * stride_k8b + h * stride_k8h, stride_k8n, stride_k8d,
                        KDescale + pid_bh.to(tl.int64) * tl.cdiv(N, QUANT_BLOCK), Centre + pid_bh.to(tl.int64) * D,
                        t, N, D)
    else:
        _quant_v_block(V + b * stride_vb + h * stride_vh, stride_vn, stride_vd,
                       V8 + b * stride_v8b + h * stride_v8h, stride_v8n, stride_v8d,
                       VDescale + pid_bh.to(tl.int64) * tl.cdiv(N, V_QUANT_BLOCK) + t, t, N, D)


@triton.jit
def _quant_k_blocks(x_base, stride_xn, stride_xd, y_base, stride_yn, stride_yd, descales, centre_ptr, t, N,
                    D: tl.constexpr, CENTRE: tl.constexpr = True):
    """The two 64-token blocks of 128-token tile t, each with its own descale: K's part of
    `_quant_blocks_kernel` (centred on centre_ptr's vector), or `_quant_x_blocks_kernel`'s (CENTRE off)."""
    offs_d = tl.arange(0, D)
    centre = tl.zeros([D], dtype=tl.float32)
    if CENTRE:
        centre = tl.load(centre_ptr + offs_d)
    n_blocks = tl.cdiv(N, QUANT_BLOCK)
    for half in tl.static_range(V_QUANT_BLOCK // QUANT_BLOCK):
        blk = t * (V_QUANT_BLOCK // QUANT_BLOCK) + half
        offs_n = blk * QUANT_BLOCK + tl.arange(0, QUANT_BLOCK)
        row_ok = (offs_n < N)[:, None]
        x = _load_tile(x_base, offs_n, N, offs_d, stride_xn, stride_xd, True).to(tl.float32)
        x = tl.where(row_ok, x - centre[None, :], 0.0)
        amax = tl.max(tl.max(tl.abs(x), 1), 0)
        descale = tl.where(amax > 0.0, amax / FP8_MAX, 1.0)
        # clamp: x * (448 / amax) can land a rounding step above 448, and the cast does not saturate
        y = _to_e4m3(tl.minimum(tl.maximum(x * (1.0 / descale), -FP8_MAX), FP8_MAX))
        y_ptrs = y_base + offs_n.to(tl.int64)[:, None] * stride_yn + offs_d[None, :] * stride_yd
        tl.store(y_ptrs, y, mask=row_ok)
        tl.store(descales + blk, descale, mask=blk < n_blocks)


@triton.jit
def _quant_x_blocks_kernel(X, Y, Descale, H, N, stride_xb, stride_xh, stride_xn, stride_xd,
                           stride_yb, stride_yh, stride_yn, stride_yd, D: tl.constexpr):
    """`quantize(x, granularity="block")` in one pass, per (batch*head, 128-token tile): one descale per
    64-token block (amax / 448, 1 for an all-zero block) -> Descale [BH, ceil(N / 64)]."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    _quant_k_blocks(X + b * stride_xb + h * stride_xh, stride_xn, stride_xd, Y + b * stride_yb + h * stride_yh,
                    stride_yn, stride_yd, Descale + pid_bh.to(tl.int64) * tl.cdiv(N, QUANT_BLOCK), Descale,
                    tl.program_id(1), N, D, False)


@triton.jit
def _quant_v_block(x_base, stride_xn, stride_xd, y_base, stride_yn, stride_yd, descale_ptr, t, N, D: tl.constexpr):
    """V's part of `_quant_blocks_kernel`: 128-token block t."""
    offs_d = tl.arange(0, D)
    offs_n = t * V_QUANT_BLOCK + tl.arange(0, V_QUANT_BLOCK)
    x = _load_tile(x_base, offs_n, N, offs_d, stride_xn, stride_xd, True).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    # A power of two (amax / 448 rounded up, exactly): the attention scales this block's P by its descale over
    # the head's largest, and a power-of-two ratio leaves P's e4m3 rounding as it is (a dominant p of 1 stays
    # exactly 2^8 * ratio). 0 for an all-zero block (the attention floors its P scale).
    descale = _pow2_ceil(amax / FP8_MAX)
    inv = tl.where(amax > 0.0, 1.0 / tl.maximum(descale, 1e-37), 0.0)
    y = _to_e4m3(tl.minimum(tl.maximum(x * inv, -FP8_MAX), FP8_MAX))
    y_ptrs = y_base + offs_n.to(tl.int64)[:, None] * stride_yn + offs_d[None, :] * stride_yd
    tl.store(y_ptrs, y, mask=(offs_n < N)[:, None])
    tl.store(descale_ptr, descale)


@triton.jit
def _pow2_ceil(x):
    """The smallest power of two >= x, for x >= 0 a normal fp32 number or 0 (exact: on the bits)."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x007FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)


@triton.jit
def _log2_pow2(x):
    """log2 of a power of two x > 0, exactly (its exponent bits); 0 gives -127."""
    return ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF).to(tl.float32) - 127.0


@triton.jit
def _quant_finalize_kernel(ColSum, ColMax, ColMin, Mean, Descale, N, n_tiles,
                           D: tl.constexpr, BLOCK_T: tl.constexpr, CENTER0: tl.constexpr):
    """Per (batch*head, tensor): the channel means (tensor 0 when CENTER0; zeros for tensor 1) and
    descale = amax / 448 of the (centred) values -> Mean [2, BH, D], Descale [2, BH]."""
    pid_bh = tl.program_id(0)
    which = tl.program_id(1)
    slot = which.to(tl.int64) * tl.num_programs(0) + pid_bh
    offs_d = tl.arange(0, D)
    base = slot * n_tiles * D
    col_max = tl.full([D], float("-inf"), dtype=tl.float32)
    col_min = tl.full([D], float("inf"), dtype=tl.float32)
    col_sum = tl.zeros([D], dtype=tl.float32)
    for t0 in range(0, n_tiles, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        ptrs = base + offs_t.to(tl.int64)[:, None] * D + offs_d[None, :]
        ok = (offs_t < n_tiles)[:, None]
        col_max = tl.maximum(col_max, tl.max(tl.load(ColMax + ptrs, mask=ok, other=float("-inf")), 0))
        col_min = tl.minimum(col_min, tl.min(tl.load(ColMin + ptrs, mask=ok, other=float("inf")), 0))
        if CENTER0:
            col_sum += tl.sum(tl.load(ColSum + ptrs, mask=ok, other=0.0), 0)
    if CENTER0:
        mean = tl.where(which == 0, col_sum / N, 0.0)
        tl.store(Mean + slot * D + offs_d, mean)
        col_max = col_max - mean
        col_min = col_min - mean
    amax = tl.max(tl.maximum(tl.abs(col_max), tl.abs(col_min)), 0)
    # An all-zero head quantizes to zeros whatever the scale; 1 keeps the division finite.
    descale = tl.where(amax > 0.0, amax / FP8_MAX, 1.0)
    tl.store(Descale + slot, descale)


@triton.jit
def _quant_apply_tile(x_base, stride_xn, stride_xd, y_base, stride_yn, stride_yd, mean_ptr, descale_ptr,
                      offs_n, N, D: tl.constexpr, CENTER0: tl.constexpr):
    offs_d = tl.arange(0, D)
    x = _load_tile(x_base, offs_n, N, offs_d, stride_xn, stride_xd, True).to(tl.float32)
    if CENTER0:
        x = x - tl.load(mean_ptr + offs_d)[None, :]
    inv = 1.0 / tl.load(descale_ptr)
    # Clamp: x * (448 / amax) can land a rounding step above 448, and the cast does not saturate.
    y = tl.minimum(tl.maximum(x * inv, -FP8_MAX), FP8_MAX)
    y_ptrs = y_base + offs_n.to(tl.int64)[:, None] * stride_yn + offs_d[None, :] * stride_yd
    tl.store(y_ptrs, _to_e4m3(y), mask=(offs_n < N)[:, None])


@triton.jit
def _quant_apply_kernel(X0, X1, Mean, Descale, Y0, Y1, H, N,
                        stride_x0b, stride_x0h, stride_x0n, stride_x0d,
                        stride_x1b, stride_x1h, stride_x1n, stride_x1d,
                        stride_y0b, stride_y0h, stride_y0n, stride_y0d,
                        stride_y1b, stride_y1h, stride_y1n, stride_y1d,
                        D: tl.constexpr, BLOCK_N: tl.constexpr, CENTER0: tl.constexpr):
    """Y = e4m3((X - mean) / descale), written through Y's strides (e.g. tokens-contiguous for V)."""
    pid_bh = tl.program_id(0)
    t = tl.program_id(1)
    which = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    slot = which.to(tl.int64) * tl.num_programs(0) + pid_bh
    offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
    # Two code paths rather than picked strides, so that each store keeps its known unit stride
    # (coalesced, vectorized stores also for the tokens-contiguous V layout).
    if which == 0:
        _quant_apply_tile(X0 + b * stride_x0b + h * stride_x0h, stride_x0n, stride_x0d,
                          Y0 + b * stride_y0b + h * stride_y0h, stride_y0n, stride_y0d,
                          Mean + slot * D, Descale + slot, offs_n, N, D, CENTER0)
    else:
        _quant_apply_tile(X1 + b * stride_x1b + h * stride_x1h, stride_x1n, stride_x1d,
                          Y1 + b * stride_y1b + h * stride_y1h, stride_y1n, stride_y1d,
                          Mean + slot * D, Descale + slot, offs_n, N, D, CENTER0)


# --------------------------------------------------------------------------------------------
# backward (full precision, straight-through)
# --------------------------------------------------------------------------------------------
def _bwd_configs(block_inner: str) -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    outer = "BLOCK_N" if block_inner == "BLOCK_M" else "BLOCK_M"
    return [
        triton.Config({outer: o, block_inner: i}, num_warps=w, num_stages=s)
        # (outer, inner, warps, stages). dK/dV keep two fp32 accumulators: an inner block of 64 spills
        # at D >= 64 (ptxas, sm_90), so they stream 32 queries at a time.
        for o, i, w, s in ([(128, 32, 8, 3), (128, 32, 8, 2), (64, 32, 8, 3)] if block_inner == "BLOCK_M"
                           else [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 8, 3), (64, 32, 8, 3)])
    ]


def _bwd_prune(configs, named_args, **kwargs):  # type: ignore[no-untyped-def]
    d = kwargs["HEAD_DIM"]
    elem = named_args["Q"].element_size()
    out = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        # the resident tiles (two of the outer block) and the pipelined inner tiles (two per stage)
        smem = (2 * max(bm, bn) + c.num_stages * 2 * min(bm, bn)) * d * elem
        if smem <= 220 * 1024 and (d < 256 or max(bm, bn) <= 64):
            out.append(c)
    limit = autotune_limit("fp8")
    if limit:
        out = out[:limit]
    return out or [_SMALLEST]


@triton.autotune(configs=_bwd_configs("BLOCK_M"), key=["Q_BUCKET", "K_BUCKET", "HEAD_DIM", "CAUSAL"],
                 prune_configs_by={"early_config_prune": _bwd_prune})
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, GROUP, N_Q, N_K, sm_scale, Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
):
    """One program: dK, dV of BLOCK_N keys of one (batch, KV head), summed over its GROUP query heads."""
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    hkv_total = H // GROUP
    b = pid_bhk // hkv_total
    hk = pid_bhk % hkv_total
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = interp_upcast(_load_tile(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh,
                                 offs_n, N_K, offs_d, stride_kn, stride_kd, True))
    v = interp_upcast(_load_tile(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh,
                                 offs_n, N_K, offs_d, stride_vn, stride_vd, True))
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    diag = N_K - N_Q
    # Queries m see key n when n <= m + diag: the first query block that sees this key block.
    lo = 0
    if CAUSAL:
        lo = (tl.maximum(pid_n * BLOCK_N - diag, 0) // BLOCK_M) * BLOCK_M
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        for start_m in range(lo, N_Q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < N_Q
            q_t = interp_upcast(_load_tile_t(q_base, offs_m, N_Q, offs_d, stride_qn, stride_qd, True))
            do = interp_upcast(_load_tile(do_base, offs_m, N_Q, offs_d, stride_don, stride_dod, True))
            lse = tl.load(Lse + bh.to(tl.int64) * N_Q + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(Delta + bh.to(tl.int64) * N_Q + offs_m, mask=m_ok, other=0.0)
            # rows that saw no key (lse = -inf) get p = 0, not NaN
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
            s_t = tl.dot(k, q_t) * qk_scale  # [BLOCK_N, BLOCK_M]
            keep = m_ok[None, :] & (offs_n < N_K)[:, None]
            if CAUSAL:
                keep = keep & (offs_n[:, None] <= offs_m[None, :] + diag)
            p_t = tl.where(keep, tl.math.exp2(s_t - lse2[None, :]), 0.0)
            if do.dtype == tl.float32:
                dv += tl.dot(p_t, do)
            else:
                dv += tl.dot(p_t.to(do.dtype), do)
            dp_t = tl.dot(v, tl.trans(do))
            ds_t = p_t * (dp_t - delta[None, :])
            if q_t.dtype == tl.float32:
                dk += tl.dot(ds_t, tl.trans(q_t))
            else:
                dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t))
    n_ok = (offs_n < N_K)[:, None]
    dk_ptrs = (DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
               + offs_n.to(tl.int64)[:, None] * stride_dkn + offs_d[None, :] * stride_dkd)
    dv_ptrs = (DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
               + offs_n.to(tl.int64)[:, None] * stride_dvn + offs_d[None, :] * stride_dvd)
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=n_ok)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_ok)


@triton.autotune(configs=_bwd_configs("BLOCK_N"), key=["Q_BUCKET", "K_BUCKET", "HEAD_DIM", "CAUSAL"],
                 prune_configs_by={"early_config_prune": _bwd_prune})
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    H, GROUP, N_Q, N_K, sm_scale, Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
):
    """One program: dQ of BLOCK_M queries of one (batch, head)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < N_Q
    q = interp_upcast(_load_tile(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh,
                                 offs_m, N_Q, offs_d, stride_qn, stride_qd, True))
    do = interp_upcast(_load_tile(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh,
                                  offs_m, N_Q, offs_d, stride_don, stride_dod, True))
    lse = tl.load(Lse + pid_bh.to(tl.int64) * N_Q + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * N_Q + offs_m, mask=m_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    diag = N_K - N_Q
    hi = N_K
    if CAUSAL:
        hi = tl.maximum(tl.minimum(N_K, pid_m * BLOCK_M + BLOCK_M + diag), 0)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = interp_upcast(_load_tile_t(k_base, offs_n, N_K, offs_d, stride_kn, stride_kd, True))
        v_t = interp_upcast(_load_tile_t(v_base, offs_n, N_K, offs_d, stride_vn, stride_vd, True))
        s = tl.dot(q, k_t) * qk_scale
        keep = m_ok[:, None] & (offs_n < N_K)[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
        p = tl.where(keep, tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, v_t)
        ds = p * (dp - delta[:, None])
        if k_t.dtype == tl.float32:
            dq += tl.dot(ds, tl.trans(k_t))
        else:
            dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t))
    dq_ptrs = (DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
               + offs_m.to(tl.int64)[:, None] * stride_dqn + offs_d[None, :] * stride_dqd)
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None])

"""Triton kernels of multiscale deformable attention.

Layout (Deformable DETR's): value [N, S, M, D] with the L levels concatenated along S, each level
row-major (H_l x W_l); sampling locations [N, Lq, M, L, P, 2] as (x, y) in [0, 1]; attention weights
[N, Lq, M, L, P]; output [N, Lq, M * D].

A tile is BLOCK_Q queries of one (batch, head) with all D channels of that head: each
sample point costs 4 vectorized row gathers of D channels (one per bilinear corner) instead of the
CUDA op's one-thread-per-channel scheme, and the bilinear coordinates are computed once per point,
not once per channel. Accumulation is in fp32 (fp64 for fp64 inputs), storage in the value dtype.

Schedules (autotuned per shape, both kernels): one program per tile on a (query blocks, M, N) grid,
or PERSISTENT: SM count x PROGRAMS_PER_SLOT programs walking head-major tile ranges, one range per
SM, for L1 reuse of a head's value rows. UNROLL_LEVELS unrolls the level loop in either.

Backward:
- gradients of the locations and attention weights are reductions over D, done inside the program
  (no atomics);
- the value gradient is a scatter. Fast mode: fp32 atomics into an fp32 buffer (bf16: bf16 atomics
  straight into the gradient on the leading levels whose rows take few contributions, SPLIT; see
  op._direct_rows). Deterministic mode:
  the scatter is turned into a gather: `msda_bwd_kernel` writes (destination row, source row,
  coefficient) triples, the host sorts them stably by destination, and `msda_value_grad_kernel`
  sums each destination's contributions in that fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fattn.core.runtime import autotune_limit, interpreter_enabled
from fattn.core.triton_helpers import bilinear_cell, bilinear_coords, bilinear_corner, cell_corner, interp_upcast

__all__ = [
    "fwd_configs",
    "msda_fwd_kernel",
    "msda_bwd_kernel",
    "msda_value_grad_kernel",
]


def _configs(block_qs: list[int], warps: list[int], stages: list[int], unroll: bool = False,
             per_slot: int = 0, rotate: bool | None = None) -> list[triton.Config]:
    """per_slot > 0: the persistent schedule with that many programs per SM (see msda_fwd_kernel);
    rotate: the backward's ROTATE_LEVELS (None for the forward, which has no such parameter)."""
    extra = {"PERSISTENT": per_slot > 0, "PROGRAMS_PER_SLOT": max(per_slot, 1)}
    if rotate is not None:
        extra["ROTATE_LEVELS"] = rotate
    return [
        triton.Config({"BLOCK_Q": bq, "UNROLL_LEVELS": unroll, **extra}, num_warps=w, num_stages=s)
        for bq in block_qs for w in warps for s in stages
    ]


def _small_search() -> bool:
    """An autotune limit of 1 (FATTN_MSDA_AUTOTUNE_LIMIT=1, or the older FATTN_MSDA_AUTOTUNE=0; set by this
    package's tests) keeps ONE config per kernel and shape (see `_prune`), so a GPU test run compiles
    each new shape once instead of a dozen times."""
    return autotune_limit("msda") == 1


# The level loop unrolled: all L * P * 4 corner gathers of a query block in one straight-line block, so
# the location loads of every level issue up front instead of one level at a time (each level is
# otherwise two dependent L2 round trips: locations, then gathers). It compiles ~10x slower (seconds
# per config), so the search holds a few unrolled tiles beside round 1's looped ones; the autotuner
# picks per shape.
def fwd_configs() -> list[triton.Config]:
    """The forward's autotuning space: one small config under the interpreter (fast CPU tests)."""
    if interpreter_enabled():
        return _configs([32], [4], [1], unroll=True)
    if _small_search():
        return _SMALL
    # (num_stages 3 gave the same PTX as 1 for the looped tiles on sm_90: Triton 3.6 does not pipeline
    # this loop, so stages are not searched.)
    return (_configs([16, 32, 64], [4, 8], [1]) + _configs([8], [4, 8], [1])
            + _configs([16, 32], [4], [1], unroll=True) + _configs([64], [8], [1], unroll=True)
            # Persistent: few enough programs per SM that all stay resident (<= 80 registers a thread
            # at 4 warps, <= 80 at 8 warps x 3; the sm_90 compiles take 54-79 at 4 warps), else a
            # late program would run one SM's share alone at the end. (BLOCK_Q 16 persistent tiles were
            # 1.4-1.8x the best tile on an H100 in session 11: dropped.)
            + _configs([32], [4], [1], per_slot=6) + _configs([32], [8], [1], per_slot=3))


def bwd_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return _configs([32], [4], [1], unroll=True, rotate=True)
    if _small_search():
        return _SMALL_BWD
    off = False
    # (BLOCK_Q 64 and the 8-warp persistent tile, 1.2-1.6x the best on an H100 in session 11 and the
    # latter spilling in 16-bit dtypes, are not searched.)
    return (_configs([16, 32], [4, 8], [1], rotate=off) + _configs([8], [4, 8], [1], rotate=off)
            + _configs([16], [4], [1], unroll=True, rotate=off)
            # persistent (sm_90 compiles: 96-102 registers at BQ16 / 4 warps -> 4 resident per SM)
            + _configs([16], [4], [1], per_slot=4, rotate=off)
            # Rotated level order (see _bwd_tile) for the tiles that win on sm_90: B4 Q10000 with uniform
            # random points 957 -> 910 us (fp32, H200); an encoder's local points 1936 -> 1968 us: tuned.
            + _configs([16], [4], [1], unroll=True, rotate=True) + _configs([16, 32], [4], [1], rotate=True))


# Test mode (FATTN_MSDA_AUTOTUNE_LIMIT=1): the looped tile, its unrolled twin, and a tile for large
# head dims (see _prune for which one a shape gets).
_SMALL = (_configs([16], [4], [1]) + _configs([16], [4], [1], unroll=True) + _configs([8], [8], [1])
          + _configs([8], [8], [1], unroll=True))
# The same for the backward; the looped tiles rotate the level order, the unrolled ones do not (the GPU
# suite runs both).
_SMALL_BWD = (_configs([16], [4], [1], rotate=True) + _configs([16], [4], [1], unroll=True, rotate=False)
              + _configs([8], [8], [1], rotate=True) + _configs([8], [8], [1], unroll=True, rotate=False))


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
    # Nor tiles under half that (e.g. BLOCK_Q 8, or 16 on 8 warps, at D 32): their lanes spend the time
    # on per-point index math for few channels (1.4-2.6x the best tile on an H100, session 11).
    kept = [c for c in kept if elements(c) >= per_thread / 2] or kept
    if block_d > 32 or per_thread < 8:
        # The persistent tiles' programs-per-SM counts assume <= 80 registers a thread (sm_90 compiles
        # of D <= 32 in fp32/fp16/bf16); wider heads or fp64 would leave programs unresident.
        kept = [c for c in kept if not c.kwargs["PERSISTENT"]]
    if kwargs.get("DETERMINISTIC"):  # sort-bound: not worth the unrolled tiles' compile time
        kept = [c for c in kept if not c.kwargs["UNROLL_LEVELS"]]
    kept = kept or [min(configs, key=elements)]
    limit = autotune_limit("msda")
    if limit != 1:
        return kept[:limit] if limit else kept
    # Test mode: one config. The GPU suite's border + align_corners cases take the unrolled path, the
    # others the looped one (fast to compile), so both are exercised on the GPU.
    unroll = bool(named_args.get("BORDER", kwargs.get("BORDER"))) and bool(
        named_args.get("ALIGN_CORNERS", kwargs.get("ALIGN_CORNERS")))
    return ([c for c in kept if c.kwargs["UNROLL_LEVELS"] == unroll] or kept)[:1]


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


@triton.jit
def _load_pair(ptr, pair_offset, mask, ACC: tl.constexpr):
    """Two adjacent 4- or 2-byte floats for BLOCK_Q queries in ONE load: the pair read as a single
    2x-wide integer (`pair_offset` counts pairs) and split by bits. Per point the forward otherwise
    issues three scalar loads (x, y, weight) beside its four row gathers, each a separate L1 request
    per warp. Needs every pair aligned (decided on the host: op._paired_loads)."""
    elem: tl.constexpr = ptr.dtype.element_ty
    tl.static_assert(elem.primitive_bitwidth == 32 or elem.primitive_bitwidth == 16,
                     "paired loads take 2- or 4-byte floats (op._paired_loads never pairs fp64)")
    if elem.primitive_bitwidth == 32:
        bits = tl.load(ptr.to(tl.pointer_type(tl.int64)) + pair_offset, mask=mask, other=0)
        lo = bits.to(tl.int32).to(elem, bitcast=True)
        hi = (bits >> 32).to(tl.int32).to(elem, bitcast=True)
    else:
        bits = tl.load(ptr.to(tl.pointer_type(tl.int32)) + pair_offset, mask=mask, other=0)
        lo = bits.to(tl.int16).to(elem, bitcast=True)
        hi = (bits >> 16).to(tl.int16).to(elem, bitcast=True)
    return interp_upcast(lo).to(ACC), interp_upcast(hi).to(ACC)


@triton.jit
def _fwd_level(acc, lvl, value_head, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, loc_head, attn_head,
               loc_q, attn_q, q_mask, qd_mask, d_offs, stride_vs, stride_ll, stride_lp, stride_lc,
               stride_al, stride_ap,
               P: tl.constexpr, ALIGN_CORNERS: tl.constexpr, BORDER: tl.constexpr, ACC: tl.constexpr,
               OFFSETS_64: tl.constexpr, PAIRED_LOC: tl.constexpr, PAIRED_ATTN: tl.constexpr):
    """acc + the attention-weighted bilinear samples of level `lvl`'s P points (BLOCK_Q x BLOCK_D).
    loc_q / attn_q: the queries' row offsets in the locations / weights, counted in pairs with
    PAIRED_LOC / PAIRED_ATTN (int32 unless OFFSETS_64)."""
    height = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
    width = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
    start = tl.load(starts_ptr + lvl)
    value_lvl = value_head + start * stride_vs
    for pt in tl.static_range(P):  # unrolled: all points' gathers in flight together
        if PAIRED_LOC:  # (x, y) in one load
            x, y = _load_pair(loc_ptr, (loc_head + lvl * stride_ll + pt * stride_lp) // 2 + loc_q, q_mask, ACC)
        else:
            loc_pt = loc_ptr + (loc_head + lvl * stride_ll + pt * stride_lp) + loc_q
            x = interp_upcast(tl.load(loc_pt, mask=q_mask, other=0.0)).to(ACC)
            y = interp_upcast(tl.load(loc_pt + stride_lc, mask=q_mask, other=0.0)).to(ACC)
        if PAIRED_ATTN:  # the weights of points pt and pt + 1 in one load (P is even)
            if pt % 2 == 0:
                a, a_next = _load_pair(attn_ptr, (attn_head + lvl * stride_al + pt * stride_ap) // 2 + attn_q, q_mask,
                                       ACC)
            else:
                a = a_next
        else:
            a = tl.load(attn_ptr + (attn_head + lvl * stride_al + pt * stride_ap) + attn_q, mask=q_mask, other=0.0)
            a = interp_upcast(a).to(ACC)
        # Validity and weights per axis (two of each), the corners' offsets from the top-left one's:
        # the loop is instruction-bound, and per-corner compares and index products were half of it.
        pix, in_x0, in_x1, in_y0, in_y1, wx0, wx1, wy0, wy1, _, _ = bilinear_cell(
            x, y, width, height, ALIGN_CORNERS, BORDER)
        wx0 = tl.where(in_x0, wx0, 0.0) * a
        wx1 = tl.where(in_x1, wx1, 0.0) * a
        wy0 = tl.where(in_y0, wy0, 0.0)
        wy1 = tl.where(in_y1, wy1, 0.0)
        if OFFSETS_64:
            top_left = value_lvl + pix.to(tl.int64)[:, None] * stride_vs + d_offs
        else:  # int32 offsets inside the level: fewer integer instructions per gather
            top_left = value_lvl + (pix * stride_vs)[:, None] + d_offs
        for corner in tl.static_range(4):
            in_map, wx, wy, _, _, offset = cell_corner(in_x0, in_x1, in_y0, in_y1, wx0, wx1, wy0, wy1, width,
                                                       corner % 2, corner // 2)
            if OFFSETS_64:
                rows = top_left + offset.to(tl.int64) * stride_vs
            else:
                rows = top_left + offset * stride_vs
            v = tl.load(rows, mask=qd_mask & in_map[:, None], other=0.0)
            acc += (wx * wy)[:, None] * interp_upcast(v).to(ACC)
    return acc


@triton.jit
def _fwd_tile(pid_q, m, n, value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr, Lq, M, D,
              stride_vn, stride_vs, stride_vm, stride_vd, stride_ln, stride_lq, stride_lm, stride_ll, stride_lp,
              stride_lc, stride_an, stride_aq, stride_am, stride_al, stride_ap,
              L: tl.constexpr, P: tl.constexpr, ALIGN_CORNERS: tl.constexpr, BORDER: tl.constexpr,
              ACC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL_LEVELS: tl.constexpr,
              OFFSETS_64: tl.constexpr, PAIRED_LOC: tl.constexpr, PAIRED_ATTN: tl.constexpr):
    """Output rows of query block `pid_q` of head `m` of batch `n` (int64). OFFSETS_64: element offsets
    inside one (batch, head) slice of value / locations / weights may pass int32 (decided on the host,
    `op._needs_64bit_offsets`); the slice bases are int64 either way."""
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < Lq
    q64 = q.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    qd_mask = q_mask[:, None] & d_mask[None, :]

    value_head = value_ptr + n * stride_vn + m * stride_vm
    loc_head = n * stride_ln + m * stride_lm
    attn_head = n * stride_an + m * stride_am
    # Paired loads address the locations / weights in pairs: the query strides halved here, the level
    # and point offsets in _fwd_level (all even: op._paired_loads).
    loc_stride_q = stride_lq // 2 if PAIRED_LOC else stride_lq
    attn_stride_q = stride_aq // 2 if PAIRED_ATTN else stride_aq
    if OFFSETS_64:
        d_offs = d[None, :].to(tl.int64) * stride_vd
        loc_q = q64 * loc_stride_q
        attn_q = q64 * attn_stride_q
    else:
        d_offs = d[None, :] * stride_vd
        loc_q = q * loc_stride_q
        attn_q = q * attn_stride_q

    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=ACC)
    if UNROLL_LEVELS:  # every level's gathers in one straight-line block: more loads in flight
        for lvl in tl.static_range(L):
            acc = _fwd_level(acc, lvl, value_head, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, loc_head, attn_head,
                             loc_q, attn_q, q_mask, qd_mask, d_offs, stride_vs, stride_ll, stride_lp, stride_lc,
                             stride_al, stride_ap, P, ALIGN_CORNERS, BORDER, ACC, OFFSETS_64, PAIRED_LOC,
                             PAIRED_ATTN)
    else:  # the round-1 loop: fewer registers, more programs per SM
        for lvl in range(L):
            acc = _fwd_level(acc, lvl, value_head, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, loc_head, attn_head,
                             loc_q, attn_q, q_mask, qd_mask, d_offs, stride_vs, stride_ll, stride_lp, stride_lc,
                             stride_al, stride_ap, P, ALIGN_CORNERS, BORDER, ACC, OFFSETS_64, PAIRED_LOC,
                             PAIRED_ATTN)

    # out is [N, Lq, M * D], contiguous.
    out_offs = (n * Lq + q64)[:, None] * (M * D) + m * D + d[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=qd_mask)


@triton.jit
def _persistent_tiles(Lq, N, M, NUM_SLOTS, BLOCK_Q: tl.constexpr):
    """The PERSISTENT schedule's share of this program (see msda_fwd_kernel): its (batch, head, query
    block) tiles are first, first + PROGRAMS_PER_SLOT, ... below end (int64), n_qb blocks per head."""
    n_qb = tl.cdiv(Lq, BLOCK_Q)
    pid = tl.program_id(0)
    slot = (pid % NUM_SLOTS).to(tl.int64)
    n_tiles = slot * 0 + N * M * n_qb  # int64 (N, M, n_qb may be compile-time constants)
    lo = slot * n_tiles // NUM_SLOTS
    hi = (slot + 1) * n_tiles // NUM_SLOTS
    return lo + pid // NUM_SLOTS, hi, n_qb


@triton.autotune(configs=fwd_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def msda_fwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
    N, Lq, M, D, LQ_BUCKET, NUM_SLOTS,
    stride_vn, stride_vs, stride_vm, stride_vd,
    stride_ln, stride_lq, stride_lm, stride_ll, stride_lp, stride_lc,
    stride_an, stride_aq, stride_am, stride_al, stride_ap,
    L: tl.constexpr, P: tl.constexpr, ALIGN_CORNERS: tl.constexpr, BORDER: tl.constexpr, ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL_LEVELS: tl.constexpr,
    PERSISTENT: tl.constexpr, PROGRAMS_PER_SLOT: tl.constexpr, OFFSETS_64: tl.constexpr = True,
    PAIRED_LOC: tl.constexpr = False, PAIRED_ATTN: tl.constexpr = False,
):
    """Grid: (query blocks, M, N), or with PERSISTENT (NUM_SLOTS * PROGRAMS_PER_SLOT,).

    PERSISTENT is a schedule for L1 locality: NUM_SLOTS is the SM count, and the (batch, head,
    query block) tiles, ordered head-major, are cut into NUM_SLOTS contiguous ranges; programs
    pid, pid + NUM_SLOTS, ... (which the block scheduler's round-robin tends to place on one SM)
    share range pid % NUM_SLOTS, so an SM gathers from one or two heads' value rows (a head's coarse
    levels fit in L1) instead of from every head in flight. Placement only affects speed: every tile
    is computed exactly once whatever SM its program lands on.
    """
    if PERSISTENT:
        first, end, n_qb = _persistent_tiles(Lq, N, M, NUM_SLOTS, BLOCK_Q)
        for t in range(first, end, PROGRAMS_PER_SLOT):
            head = t // n_qb
            _fwd_tile((t % n_qb).to(tl.int32), (head % M).to(tl.int32), head // M, value_ptr, shapes_ptr,
                      starts_ptr, loc_ptr, attn_ptr, out_ptr, Lq, M, D,
                      stride_vn, stride_vs, stride_vm, stride_vd, stride_ln, stride_lq, stride_lm, stride_ll,
                      stride_lp, stride_lc, stride_an, stride_aq, stride_am, stride_al, stride_ap,
                      L, P, ALIGN_CORNERS, BORDER, ACC, BLOCK_Q, BLOCK_D, UNROLL_LEVELS, OFFSETS_64,
                      PAIRED_LOC, PAIRED_ATTN)
    else:
        _fwd_tile(tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64), value_ptr, shapes_ptr,
                  starts_ptr, loc_ptr, attn_ptr, out_ptr, Lq, M, D,
                  stride_vn, stride_vs, stride_vm, stride_vd, stride_ln, stride_lq, stride_lm, stride_ll,
                  stride_lp, stride_lc, stride_an, stride_aq, stride_am, stride_al, stride_ap,
                  L, P, ALIGN_CORNERS, BORDER, ACC, BLOCK_Q, BLOCK_D, UNROLL_LEVELS, OFFSETS_64,
                  PAIRED_LOC, PAIRED_ATTN)


@triton.jit
def _bwd_level(lvl, value_head, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_value_head, grad_acc_head,
               grad_loc_ptr, grad_attn_ptr, dest_ptr, coef_ptr, g, point_base, loc_head, attn_head, n, m, N, M, D,
               S, split_row, q64, q_mask, qd_mask, d_offs, stride_vs, stride_lq, stride_ll, stride_lp, stride_lc,
               stride_aq, stride_al, stride_ap,
               P: tl.constexpr, P_BLOCK: tl.constexpr, ALIGN_CORNERS: tl.constexpr, BORDER: tl.constexpr,
               ACC: tl.constexpr, DETERMINISTIC: tl.constexpr, SPLIT: tl.constexpr, BLOCK_Q: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Gradients of level `lvl`'s P points: grad_attn / grad_loc stored, value's scattered (with SPLIT,
    rows below `split_row` straight into grad_value_head in its 16-bit dtype, the others into the ACC
    scratch grad_acc_head, rows split_row.. of value; see msda_bwd_kernel).

    The P points of a query and level are contiguous in grad_attn (and their (x, y) pairs in grad_loc):
    their gradients are gathered in [BLOCK_Q, P_BLOCK] / [BLOCK_Q, 2 * P_BLOCK] tiles and stored once
    per level, one L2 write per query instead of 2 P. The kernel is bound by its L2 traffic: on an H200
    this took B4 Q10000's backward from 915 to 819 us in fp32 and from 934 to 762 us in bf16 (whose
    2-byte partial writes cost the most), the encoder's from 1942 to 1728 us (fp32)."""
    height = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
    width = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
    start = tl.load(starts_ptr + lvl)
    value_lvl = value_head + start * stride_vs
    if SPLIT:
        direct = start < split_row  # levels are whole: a level's rows are all on one side of split_row
    p_col = tl.arange(0, P_BLOCK)[None, :]
    xy_col = tl.arange(0, 2 * P_BLOCK)[None, :]
    attn_tile = tl.zeros([BLOCK_Q, P_BLOCK], dtype=ACC)
    loc_tile = tl.zeros([BLOCK_Q, 2 * P_BLOCK], dtype=ACC)
    for pt in tl.static_range(P):
        # Loaded as 1-D vectors (one load per distinct query, not per replicated column element).
        q_1d = tl.reshape(q64, (BLOCK_Q,))
        mask_1d = tl.reshape(q_mask, (BLOCK_Q,))
        x, y = _sample_location(loc_ptr, loc_head + lvl * stride_ll + pt * stride_lp, q_1d, mask_1d,
                                stride_lq, stride_lc, ACC)
        a = tl.load(attn_ptr + attn_head + lvl * stride_al + pt * stride_ap + q_1d * stride_aq,
                    mask=mask_1d, other=0.0)
        a = interp_upcast(a).to(ACC)[:, None]
        x = x[:, None]
        y = y[:, None]
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
                if SPLIT:
                    if direct:
                        tl.atomic_add(grad_value_head + (start + pix64) * (M * D),
                                      contrib.to(grad_value_head.dtype.element_ty), mask=corner_mask, sem="relaxed")
                    else:
                        tl.atomic_add(grad_acc_head + (start - split_row + pix64) * (M * D), contrib,
                                      mask=corner_mask, sem="relaxed")
                else:
                    tl.atomic_add(grad_value_head + (start + pix64) * (M * D),
                                  contrib.to(grad_value_head.dtype.element_ty), mask=corner_mask, sem="relaxed")
        grad_a = tl.sum(g * sample, 1, keep_dims=True)
        grad_fx = tl.sum(g * sample_dfx, 1, keep_dims=True)
        grad_fy = tl.sum(g * sample_dfy, 1, keep_dims=True)
        attn_tile = tl.where(p_col == pt, grad_a, attn_tile)
        loc_tile = tl.where(xy_col == 2 * pt, a * grad_fx * dix_dx,
                            tl.where(xy_col == 2 * pt + 1, a * grad_fy * diy_dy, loc_tile))
    first_point = point_base + lvl * P
    tl.store(grad_attn_ptr + first_point + p_col, attn_tile.to(grad_attn_ptr.dtype.element_ty),
             mask=q_mask & (p_col < P))
    tl.store(grad_loc_ptr + first_point * 2 + xy_col, loc_tile.to(grad_loc_ptr.dtype.element_ty),
             mask=q_mask & (xy_col < 2 * P))


@triton.jit
def _bwd_tile(pid_q, m, n, value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
              grad_value_ptr, grad_acc_ptr, grad_loc_ptr, grad_attn_ptr, dest_ptr, coef_ptr, N, Lq, M, D, S,
              split_row,
              stride_vn, stride_vs, stride_vm, stride_vd, stride_ln, stride_lq, stride_lm, stride_ll, stride_lp,
              stride_lc, stride_an, stride_aq, stride_am, stride_al, stride_ap, stride_gn, stride_gq, stride_gc,
              L: tl.constexpr, P: tl.constexpr, P_BLOCK: tl.constexpr, ALIGN_CORNERS: tl.constexpr,
              BORDER: tl.constexpr, ACC: tl.constexpr, DETERMINISTIC: tl.constexpr, SPLIT: tl.constexpr,
              BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL_LEVELS: tl.constexpr,
              ROTATE_LEVELS: tl.constexpr):
    """Gradients of query block `pid_q` of head `m` of batch `n` (int64)."""
    # Per-query values are [BLOCK_Q, 1] columns rather than 1-D vectors: one layout family for the
    # whole kernel (1-D vectors mixed with row reductions of fp32 tiles tripped Triton 3.6's
    # RemoveLayoutConversions pass). Only the per-point location / weight loads are 1-D (expanded
    # right after): loads of columns repeat per replicated element (60 -> 24 loads per level on sm_90).
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
    grad_acc_head = grad_acc_ptr + (n * (S - split_row) * M + m) * D + d  # (used with SPLIT only)

    # Levels in a rotated order, starting at query block pid_q's: programs in flight are then spread
    # over all levels instead of reaching the coarse levels (few rows, hot atomics) together.
    first_level = (pid_q % L) if ROTATE_LEVELS else 0
    if UNROLL_LEVELS:
        for i in tl.static_range(L):
            lvl = (first_level + i) % L
            _bwd_level(lvl, value_head, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_value_head, grad_acc_head,
                       grad_loc_ptr, grad_attn_ptr, dest_ptr, coef_ptr, g, point_base, loc_head, attn_head, n, m,
                       N, M, D, S, split_row, q64, q_mask, qd_mask, d_offs, stride_vs, stride_lq, stride_ll,
                       stride_lp, stride_lc, stride_aq, stride_al, stride_ap, P, P_BLOCK, ALIGN_CORNERS, BORDER,
                       ACC, DETERMINISTIC, SPLIT, BLOCK_Q, BLOCK_D)
    else:
        for i in range(L):
            lvl = (first_level + i) % L
            _bwd_level(lvl, value_head, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_value_head, grad_acc_head,
                       grad_loc_ptr, grad_attn_ptr, dest_ptr, coef_ptr, g, point_base, loc_head, attn_head, n, m,
                       N, M, D, S, split_row, q64, q_mask, qd_mask, d_offs, stride_vs, stride_lq, stride_ll,
                       stride_lp, stride_lc, stride_aq, stride_al, stride_ap, P, P_BLOCK, ALIGN_CORNERS, BORDER,
                       ACC, DETERMINISTIC, SPLIT, BLOCK_Q, BLOCK_D)


@triton.autotune(configs=bwd_configs(), key=_KEY + ["DETERMINISTIC", "SPLIT"],
                 prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["grad_value_ptr", "grad_acc_ptr"])
@triton.jit
def msda_bwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
    grad_value_ptr, grad_acc_ptr, grad_loc_ptr, grad_attn_ptr, dest_ptr, coef_ptr,
    N, Lq, M, D, S, split_row, LQ_BUCKET, NUM_SLOTS,
    stride_vn, stride_vs, stride_vm, stride_vd,
    stride_ln, stride_lq, stride_lm, stride_ll, stride_lp, stride_lc,
    stride_an, stride_aq, stride_am, stride_al, stride_ap,
    stride_gn, stride_gq, stride_gc,
    L: tl.constexpr, P: tl.constexpr, ALIGN_CORNERS: tl.constexpr, BORDER: tl.constexpr, ACC: tl.constexpr,
    DETERMINISTIC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL_LEVELS: tl.constexpr,
    PERSISTENT: tl.constexpr, PROGRAMS_PER_SLOT: tl.constexpr, ROTATE_LEVELS: tl.constexpr, P_BLOCK: tl.constexpr,
    SPLIT: tl.constexpr = False,
):
    """Gradients of (batch, head, query block) tiles. Grid: (query blocks * M * N,), program
    (n * query blocks + query_block) * M + m; or the PERSISTENT schedule of msda_fwd_kernel.

    grad_value_ptr: [N, S, M, D] contiguous, zero-filled, written with atomics (unless DETERMINISTIC).
    SPLIT (16-bit value gradients): only rows s < split_row of grad_value_ptr take atomics (in its
    dtype, half the L2 bytes of fp32 ones); rows s >= split_row accumulate in the ACC scratch grad_acc_ptr,
    [N, S - split_row, M, D] contiguous and zero-filled, which the host converts into them afterwards.
    grad_loc_ptr / grad_attn_ptr: contiguous [N, Lq, M, L, P, 2] / [N, Lq, M, L, P], fully written.
    dest_ptr / coef_ptr (DETERMINISTIC only): [N, Lq, M, L, P, 4] destination row ((n * M + m) * S + s,
    or N * M * S for a corner outside the map) and coefficient of each corner's contribution.
    """
    if PERSISTENT:
        first, end, n_qb = _persistent_tiles(Lq, N, M, NUM_SLOTS, BLOCK_Q)
        for t in range(first, end, PROGRAMS_PER_SLOT):
            head = t // n_qb
            _bwd_tile((t % n_qb).to(tl.int32), (head % M).to(tl.int32), head // M,
                      value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
                      grad_value_ptr, grad_acc_ptr, grad_loc_ptr, grad_attn_ptr, dest_ptr, coef_ptr, N, Lq, M, D,
                      S, split_row,
                      stride_vn, stride_vs, stride_vm, stride_vd, stride_ln, stride_lq, stride_lm, stride_ll, stride_lp,
                      stride_lc, stride_an, stride_aq, stride_am, stride_al, stride_ap, stride_gn, stride_gq, stride_gc,
                      L, P, P_BLOCK, ALIGN_CORNERS, BORDER, ACC, DETERMINISTIC, SPLIT, BLOCK_Q, BLOCK_D,
                      UNROLL_LEVELS, ROTATE_LEVELS)
    else:
        # Heads fastest: the programs in flight scatter into every head's value-gradient rows, not all
        # into one head's (atomics on few hot addresses serialize in L2: on sm_90 this cut the 8x8
        # level's share of the backward from 236 to 72 us, B4 Q10000 M8). Batches in turn: the programs
        # in flight touch one batch's value and value-gradient rows, an L2-sized working set (11 MB at
        # B4 Q10000 fp32, 44 MB with every batch in flight as in sessions 5-10: H100 1015 -> 911 us,
        # and the benchmark's spread of fp32 fwd+bwd calls went from an IQR of 0.20-0.25 to 0.06-0.08 ms).
        pid = tl.program_id(0)
        per_batch = tl.cdiv(Lq, BLOCK_Q) * M
        rest = pid % per_batch
        _bwd_tile(rest // M, rest % M, (pid // per_batch).to(tl.int64),
                  value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
                  grad_value_ptr, grad_acc_ptr, grad_loc_ptr, grad_attn_ptr, dest_ptr, coef_ptr, N, Lq, M, D, S,
                  split_row,
                  stride_vn, stride_vs, stride_vm, stride_vd, stride_ln, stride_lq, stride_lm, stride_ll, stride_lp,
                  stride_lc, stride_an, stride_aq, stride_am, stride_al, stride_ap, stride_gn, stride_gq, stride_gc,
                  L, P, P_BLOCK, ALIGN_CORNERS, BORDER, ACC, DETERMINISTIC, SPLIT, BLOCK_Q, BLOCK_D,
                  UNROLL_LEVELS, ROTATE_LEVELS)


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

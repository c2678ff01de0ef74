"""Triton kernels: flash attention with 2D RoPE applied to q and k inside the kernel.

Layout of the rotation. Every channel pair (a, b) of a head is rotated by its own angle. The kernels
never materialize rotated q or k in memory: a tile is loaded as its two pair halves, `x_a` (first
elements of the pairs) and `x_b` (second elements), each [BLOCK, BLOCK_DH] with BLOCK_DH >= D/2:
    interleaved pairing: a = channel 2c,  b = channel 2c + 1
    half pairing:        a = channel c,   b = channel c + D/2
rotated in registers with the fp32 cos/sin table rows of the tile's tokens, and used as two
tensor-core operands: q.k = q_a.k_a + q_b.k_b, so no shuffle between halves is ever needed.
Prefix tokens (class, registers) read cos = 1, sin = 0, i.e. they are not rotated.

Forward (one program per (q tile, batch*head)): q is rotated once in the prologue, each k tile as it
is loaded; online softmax in base 2 with fp32 accumulation. Backward, deterministic and atomic-free,
as in FlashAttention-2: one kernel per k tile accumulates dk, dv over q tiles; one per q tile
accumulates dq over k tiles. dq and dk are accumulated in the rotated basis and rotated back by the
inverse rotation before the store.

Pre-rotation (PREROTATED flags, see PREROTATE_ENV): the streamed operand (k in the forward, q and k in
the backward) can instead be rotated once by `_rope2d_rotate_kernel` into a contiguous scratch slab
(a halves then b halves, storage dtype: bit-identical to rotating in the loop), which the loops then
load like plain flash attention, with no fp32 cos/sin tiles and no rotation per visited tile.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fattn.core import call_signature, empty
from fattn.core.launch import launcher
from fattn.core.runtime import autotune_limit, cdiv, env_flag, interpreter_enabled, next_power_of_2
from fattn.core.triton_helpers import (
    LOG2E,
    interp_upcast,
    online_softmax_finalize,
    online_softmax_update,
    probs_from_lse,
)

__all__ = ["rope2d_fwd_launch", "rope2d_bwd_launch", "pair_block", "prerotate_mode"]


def pair_block(head_dim: int) -> int:
    """Width of a pair-half tile: D/2 rounded up to a power of two, at least 16 (tl.dot's minimum K)."""
    return max(16, next_power_of_2(head_dim // 2))


# --------------------------------------------------------------------------------------------
# Autotuning: one small config under the interpreter, a handful of Hopper-friendly ones on a GPU.
# --------------------------------------------------------------------------------------------
def _configs(table: dict[int, list[tuple[int, ...]]]) -> list[triton.Config]:
    """Union of the per-head-dim-class tiles (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]);
    `_prune` keeps the class's own."""
    seen = dict.fromkeys(t for tiles in table.values() for t in tiles)
    return [triton.Config({"BLOCK_M": t[0], "BLOCK_N": t[1]}, num_warps=t[2], num_stages=t[3],
                          maxnreg=t[4] if len(t) > 4 else None) for t in seen]


def _tile(c: triton.Config) -> tuple[int, ...]:
    """A config's table row (the inverse of `_configs`)."""
    row = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
    return row + (c.maxnreg,) if c.maxnreg else row


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per pair-block width BLOCK_DH (16/32: D <= 64; 64: D <= 128;
# 128: D <= 256), chosen from sm_90 compiles (tests/_compile_check.py prints registers, spills and
# shared memory). For dkdv, the BLOCK_N tile is the program's own and BLOCK_M the streamed one.
# Few per class on purpose: every config is compiled (and timed) on first use of a shape, so D <= 64
# (every ViT) keeps 2-5 Hopper tilings per kernel, spill-free in both rotation paths (ptxas -v).
_FWD_TILES = {
    32: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 4), (64, 64, 4, 4)],
    64: [(128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 3)],
    128: [(64, 32, 8, 2), (32, 32, 4, 2)],
}
# D <= 64 backward: the autotuner's per-config times on an H100 (session 15; ViT-B/16 512 and ViT-L/14 518,
# bf16, whole rows): dK/dV 64 x 64 / 4 warps 1.53-1.67 ms against 1.98-2.07 (32 x 128 / 8) and 3.46-3.96
# (64 x 64 / 8); dQ 64 x 64 / 4 warps 0.70-0.77 ms against 1.28-1.48 (64 x 64 / 8). Session 16 (ViT-B): dK/dV
# 32 x 64 / 4 warps / 2 stages 1.37 ms against 1.53 for 64 x 64 (143 registers: three programs per SM
# instead of two); 16 x 64 1.54, 32 x 64 / 3 stages 1.57, 64 x 64 / 3 stages 1.55 (dropped).
_DKDV_TILES = {
    32: [(32, 64, 4, 2), (64, 64, 4, 2), (32, 128, 8, 3)],
    64: [(32, 64, 8, 2), (64, 64, 8, 2)],
    128: [(32, 32, 8, 1), (16, 32, 4, 2)],  # D > 128 spills registers in every tile tried
}
_DQ_TILES = {
    32: [(64, 64, 4, 3), (128, 64, 8, 3), (64, 64, 8, 3)],
    64: [(64, 32, 8, 2), (64, 64, 8, 2)],
    128: [(32, 32, 8, 1), (64, 16, 8, 1)],  # (spills too)
}
# fp32 inputs double every tile's shared memory and registers: where some of the class's tiles exceed
# sm_90's 227 KB (D 65-128) or spill (D <= 64: the one-warpgroup 64 x 64 backward tiles, 48-360 bytes),
# these replace them.
_FWD_TILES_FP32 = {64: [(64, 32, 8, 2)]}
_DKDV_TILES_FP32 = {32: [(32, 128, 8, 3)], 64: [(32, 64, 8, 2)]}
_DQ_TILES_FP32 = {32: [(64, 64, 8, 3), (128, 64, 8, 3)], 64: [(64, 32, 8, 2)]}
# Forward tiles that spill registers when k is rotated in the loop, but not when it streams from the
# pre-rotated slab (one warpgroup on 128 query rows, the tilings that won for fattn-swba's forward): kept
# only for PREROTATED_K launches (16-bit inputs).
# (128, 64, 8, 3) capped at 128 registers (5th entry, triton.Config's maxnreg) has no spill and fits two
# programs per SM instead of one (142 registers uncapped): programs out of phase overlap one's softmax
# with another's products. H100, ViT-B/16 512 bf16 whole rows: 671 us against 761 for 64 x 128 / 4 warps
# (and 913 uncapped); 64 x 64 / 4 warps / 2 stages (three programs per SM) 783, not kept.
_FWD_TILES_PREROTATED = {32: [(128, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3, 128)]}
# Forward tiles that spill with whole-row products (FULL_ROWS_ENV; the joined q tile costs registers):
# pruned from those launches. sm_90, D 64 bf16: (128 x 64, 4 warps) 255 registers + 128 bytes of spill.
_FWD_TILES_SPILL_FULL_ROWS = {32: [(128, 64, 4, 3)]}
_INTERPRETER_TILES = {c: [(16, 16, 1, 1)] for c in (32, 64, 128)}  # one small config: fast CPU tests

# The Hopper tables as written (the interpreter's replace them below): CPU tests check them too.
_HOPPER_TILES = {"fwd": _FWD_TILES, "fwd_prerotated": _FWD_TILES_PREROTATED, "dkdv": _DKDV_TILES, "dq": _DQ_TILES}

if interpreter_enabled():
    _FWD_TILES = _DKDV_TILES = _DQ_TILES = _INTERPRETER_TILES
    _FWD_TILES_FP32 = _DKDV_TILES_FP32 = _DQ_TILES_FP32 = _FWD_TILES_PREROTATED = {}
_FWD_CONFIGS = _configs({**_FWD_TILES, -1: [t for tiles in _FWD_TILES_FP32.values() for t in tiles],
                         -2: [t for tiles in _FWD_TILES_PREROTATED.values() for t in tiles]})
_DKDV_CONFIGS = _configs({**_DKDV_TILES, -1: [t for tiles in _DKDV_TILES_FP32.values() for t in tiles]})
_DQ_CONFIGS = _configs({**_DQ_TILES, -1: [t for tiles in _DQ_TILES_FP32.values() for t in tiles]})

# FATTN_ROPE2D_PREROTATE: "auto" (default), "1" (always), "0" (never: rotate k inside every attention
# program, the round-1 path). Pre-rotating writes rotated q/k once to a scratch buffer (one read and one
# write of the tensor) so the attention loops stream them like plain flash attention, instead of each
# program re-reading the fp32 cos/sin tiles and rotating every k (fwd/dq) or q (dkdv) tile it visits.
PREROTATE_ENV = "FATTN_ROPE2D_PREROTATE"
# "auto" pre-rotates k in the forward once a k tile would be rotated by at least this many q-tile programs
# of 128 rows. 1 (every N) since session 17: at ViT-S/16 224 (N 197, two q tiles) pre-rotation made the
# forward 1.32x faster on an H100 (148 against 195 us per call, same run; fwd+bwd 644 against 627, within
# that A/B's spread); the in-loop path (FATTN_ROPE2D_PREROTATE=0) saves the scratch slab.
PREROTATE_MIN_Q_TILES = 1


# FATTN_ROPE2D_FULL_ROWS (default on; read at import; 0 restores the half products): where D/2 is a power of two
# (D 32, 64, 128, 256), the kernels multiply whole (a | b) rows, one product per operand, instead of an
# a-half and a b-half product: rows of pre-rotated slabs as loaded, tiles rotated in the loop joined from
# their halves (register shuffles, 37-42 more registers on sm_90, same occupancy). sm_90 PTX at D 64:
# the two chained half products are two wgmma groups, each drained by its own wait (forward: 3 waits per
# k tile against 2; dQ: 5 against 3), and the backward's gradient accumulators (dq, dk) become one
# [rows, D] product each, every warpgroup's wgmma twice as wide (m64n64k16 instead of m64n32k16 /
# m64n16k16). Off: the half-tile products. The forward's q tile is joined once per program. H100, session
# 15 (autotuner's per-config times, same tiles): fwd+bwd 3.46 ms against 3.76 at ViT-B/16 512.
FULL_ROWS_ENV = "FATTN_ROPE2D_FULL_ROWS"
_FULL_ROWS = env_flag(FULL_ROWS_ENV, True)


def prerotate_mode() -> str:
    mode = os.environ.get(PREROTATE_ENV, "auto")
    return mode if mode in ("0", "1") else "auto"


def _head_dim_class(block_dh: int) -> int:
    return 32 if block_dh <= 32 else block_dh


def tile_order(cls: int, fp32: bool, prerotated: bool, full_rows: bool, table: dict[int, list[tuple[int, ...]]],
               fp32_table: dict[int, list[tuple[int, ...]]] | None = None,
               prerotated_table: dict[int, list[tuple[int, ...]]] | None = None,
               full_rows_spill: dict[int, list[tuple[int, ...]]] | None = None) -> list[tuple[int, ...]]:
    """The tiles a kernel may launch for head-dim class `cls`, in preference order: the fp32 table's for
    fp32 inputs (else the 16-bit table's), plus the pre-rotated-only tiles for pre-rotated 16-bit
    inputs, less the tiles that spill with whole-row products. (Its pruner and the tests' tile lists
    both read it.)"""
    order = (fp32_table or {}).get(cls) if fp32 else None
    order = order or table[cls]
    if prerotated and not fp32:
        order = order + (prerotated_table or {}).get(cls, [])
    if full_rows_spill and full_rows:
        order = [t for t in order if t not in full_rows_spill.get(cls, [])]
    return order


def _pruner(table: dict[int, list[tuple[int, ...]]],  # type: ignore[no-untyped-def]
            fp32_table: dict[int, list[tuple[int, ...]]] | None = None,
            prerotated_table: dict[int, list[tuple[int, ...]]] | None = None,
            full_rows_spill: dict[int, list[tuple[int, ...]]] | None = None):
    def prune(configs, named_args, **kwargs):  # type: ignore[no-untyped-def]
        """Keep the tiles of this head-dim class (and dtype); for short sequences drop tiles far longer than N."""
        block_dh = kwargs.get("BLOCK_DH", named_args.get("BLOCK_DH"))
        n = named_args["N"]
        cls = _head_dim_class(block_dh)
        q = named_args.get("q_ptr")
        fp32 = getattr(q, "dtype", None) == torch.float32
        prerotated = kwargs.get("PREROTATED_K", named_args.get("PREROTATED_K", False))
        full_rows = kwargs.get("FULL_ROWS", named_args.get("FULL_ROWS", False))
        order = tile_order(cls, fp32, prerotated, full_rows, table, fp32_table, prerotated_table, full_rows_spill)
        kept = [c for c in configs if _tile(c) in order]
        kept.sort(key=lambda c: order.index(_tile(c)))
        short = [c for c in kept if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= max(64, n)]
        kept = short or kept
        # FATTN_ROPE2D_AUTOTUNE_LIMIT=n (older FATTN_ROPE2D_AUTOTUNE=0 means 1): the first n tiles only.
        # The test suite sets 1: it checks numerics on many shapes, where autotuning would compile and
        # time every tile for each new N.
        limit = autotune_limit("rope2d")
        return kept[:limit] if limit else kept

    return prune


# Kernels do not specialize H, N and n_prefix (Triton would compile a variant for each value that is 1
# or a multiple of 16): they only bound loops and masks, and every variant costs a compile at warm-up.

# --------------------------------------------------------------------------------------------
# Tile helpers. Big offsets (batch, head, tile start) are int64 scalars folded into the base
# pointer; offsets inside a tile stay int32, which keeps address math and registers small.
# --------------------------------------------------------------------------------------------
@triton.jit
def _tile_and_head(N, BLOCK: tl.constexpr):
    """(first token of this program's tile, batch*head index) from a 1D grid of cdiv(N, BLOCK) * B*H
    programs. 1D because B*H can pass the 65535 limit of a grid's y dimension; tiles of one head are
    consecutive so programs running together share that head's k/v in L2."""
    n_tiles = tl.cdiv(N, BLOCK)
    pid = tl.program_id(0)
    return (pid % n_tiles) * BLOCK, pid // n_tiles


@triton.jit
def _load_cos_sin(cos_ptr, sin_ptr, start, n_tokens, n_prefix,
                  BLOCK: tl.constexpr, DH: tl.constexpr, BLOCK_DH: tl.constexpr):
    """[BLOCK, BLOCK_DH] fp32 cos and sin of the pair angles of tokens start..start+BLOCK; identity
    (cos 1, sin 0) for prefix tokens and padding."""
    rows = tl.arange(0, BLOCK)
    pairs = tl.arange(0, BLOCK_DH)
    tokens = start + rows
    row_ok = (tokens >= n_prefix) & (tokens < n_tokens)
    if DH == BLOCK_DH:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & (pairs < DH)[None, :]
    shift = tl.cast(start - n_prefix, tl.int64) * DH  # negative for prefix rows, which are masked
    local = rows[:, None] * DH + pairs[None, :]
    cos = tl.load(cos_ptr + shift + local, mask=mask, other=1.0)
    sin = tl.load(sin_ptr + shift + local, mask=mask, other=0.0)
    return cos, sin


@triton.jit
def _load_halves(base, start, n_tokens, stride_n, stride_d, BLOCK: tl.constexpr, D: tl.constexpr,
                 DH: tl.constexpr, BLOCK_DH: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The a and b halves ([BLOCK, BLOCK_DH] each, zero-padded, storage dtype) of rows
    start..start+BLOCK of a [N, D] slab. Interleaved pairs load the full rows (vectorized) and split."""
    rows = tl.arange(0, BLOCK)
    row_ok = (start + rows) < n_tokens
    base = base + tl.cast(start, tl.int64) * stride_n
    if INTERLEAVED:
        cols = tl.arange(0, 2 * BLOCK_DH)
        if D == 2 * BLOCK_DH:
            mask = row_ok[:, None]
        else:
            mask = row_ok[:, None] & (cols < D)[None, :]
        x = tl.load(base + rows[:, None] * stride_n + cols[None, :] * stride_d, mask=mask, other=0.0)
        x_a, x_b = tl.split(tl.reshape(x, [BLOCK, BLOCK_DH, 2]))
    else:
        pairs = tl.arange(0, BLOCK_DH)
        if DH == BLOCK_DH:
            mask = row_ok[:, None]
        else:
            mask = row_ok[:, None] & (pairs < DH)[None, :]
        offs = rows[:, None] * stride_n + pairs[None, :] * stride_d
        x_a = tl.load(base + offs, mask=mask, other=0.0)
        x_b = tl.load(base + DH * stride_d + offs, mask=mask, other=0.0)
    return x_a, x_b


@triton.jit
def _load_rows(base, start, n_tokens, stride_n, stride_d, BLOCK: tl.constexpr, D: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Rows start..start+BLOCK of a [N, D] slab as a [BLOCK, BLOCK_D] tile (v, do), zero-padded."""
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    row_ok = (start + rows) < n_tokens
    if D == BLOCK_D:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & (cols < D)[None, :]
    base = base + tl.cast(start, tl.int64) * stride_n
    return tl.load(base + rows[:, None] * stride_n + cols[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _store_rows(base, start, n_tokens, y, BLOCK: tl.constexpr, ROW: tl.constexpr, COLS: tl.constexpr,
                BLOCK_COLS: tl.constexpr):
    """Store a [BLOCK, BLOCK_COLS] tile (COLS of its columns) into rows start.. of a contiguous slab
    with ROW elements per row."""
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_COLS)
    mask = ((start + rows) < n_tokens)[:, None] & (cols < COLS)[None, :]
    base = base + tl.cast(start, tl.int64) * ROW
    tl.store(base + rows[:, None] * ROW + cols[None, :], y.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _store_halves(base, start, n_tokens, y_a, y_b, BLOCK: tl.constexpr, D: tl.constexpr, DH: tl.constexpr,
                  BLOCK_DH: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Store the a and b halves back into their channels of a contiguous [N, D] slab."""
    if INTERLEAVED:
        y = tl.reshape(tl.join(y_a, y_b), [BLOCK, 2 * BLOCK_DH])
        _store_rows(base, start, n_tokens, y, BLOCK, D, D, 2 * BLOCK_DH)
    else:
        _store_rows(base, start, n_tokens, y_a, BLOCK, D, DH, BLOCK_DH)
        _store_rows(base + DH, start, n_tokens, y_b, BLOCK, D, DH, BLOCK_DH)


@triton.jit
def _rotate(x_a, x_b, cos, sin):
    """(a, b) -> (a cos - b sin, a sin + b cos), in fp32."""
    a = interp_upcast(x_a).to(tl.float32)
    b = interp_upcast(x_b).to(tl.float32)
    return a * cos - b * sin, a * sin + b * cos


@triton.jit
def _rotate_back(g_a, g_b, cos, sin):
    """The transposed (inverse) rotation, for gradients: (a, b) -> (a cos + b sin, -a sin + b cos)."""
    return g_a * cos + g_b * sin, g_b * cos - g_a * sin


@triton.jit
def _halves_of(x, BLOCK: tl.constexpr, BLOCK_DH: tl.constexpr):
    """The a and b halves of a [BLOCK, 2 * BLOCK_DH] tile laid out (a | b)."""
    return tl.split(tl.permute(tl.reshape(x, [BLOCK, 2, BLOCK_DH]), (0, 2, 1)))


@triton.jit
def _rows_of(x_a, x_b, BLOCK: tl.constexpr, BLOCK_DH: tl.constexpr):
    """One [BLOCK, 2 * BLOCK_DH] tile laid out (a | b) from its halves (as a pre-rotated slab stores them)."""
    return tl.reshape(tl.permute(tl.join(x_a, x_b), (0, 2, 1)), [BLOCK, 2 * BLOCK_DH])


@triton.jit
def _load_rotated(base, cos_ptr, sin_ptr, start, n_tokens, n_prefix, stride_n, stride_d, scale,
                  BLOCK: tl.constexpr, D: tl.constexpr, DH: tl.constexpr, BLOCK_DH: tl.constexpr,
                  INTERLEAVED: tl.constexpr):
    """Rotated (and scaled) a/b halves of a q or k tile, rounded to the storage dtype for tensor cores,
    plus the tile's cos/sin (reused to rotate gradients back)."""
    cos, sin = _load_cos_sin(cos_ptr, sin_ptr, start, n_tokens, n_prefix, BLOCK, DH, BLOCK_DH)
    x_a, x_b = _load_halves(base, start, n_tokens, stride_n, stride_d, BLOCK, D, DH, BLOCK_DH, INTERLEAVED)
    r_a, r_b = _rotate(x_a, x_b, cos, sin)
    dtype = base.dtype.element_ty
    r_a = interp_upcast((r_a * scale).to(dtype))
    r_b = interp_upcast((r_b * scale).to(dtype))
    return r_a, r_b, cos, sin


@triton.jit
def _load_qk(base, cos_ptr, sin_ptr, start, n_tokens, n_prefix, stride_n, stride_d,
             BLOCK: tl.constexpr, D: tl.constexpr, DH: tl.constexpr, BLOCK_DH: tl.constexpr,
             INTERLEAVED: tl.constexpr, PREROTATED: tl.constexpr):
    """Rotated a/b halves of a q or k tile: straight from a pre-rotated scratch slab (contiguous, a
    channels then b channels, as `_rope2d_rotate_kernel` writes it) or rotated here from the input."""
    if PREROTATED:
        x_a, x_b = _load_halves(base, start, n_tokens, stride_n, stride_d, BLOCK, D, DH, BLOCK_DH, False)
        r_a = interp_upcast(x_a)
        r_b = interp_upcast(x_b)
    else:
        r_a, r_b, _, _ = _load_rotated(base, cos_ptr, sin_ptr, start, n_tokens, n_prefix, stride_n, stride_d, 1.0,
                                       BLOCK, D, DH, BLOCK_DH, INTERLEAVED)
    return r_a, r_b


@triton.jit
def _load_qk_tiles(base, cos_ptr, sin_ptr, start, n_tokens, n_prefix, stride_n, stride_d,
                   BLOCK: tl.constexpr, D: tl.constexpr, DH: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DH: tl.constexpr, INTERLEAVED: tl.constexpr, PREROTATED: tl.constexpr,
                   FULL_ROWS: tl.constexpr):
    """_load_qk's two halves, or with FULL_ROWS one whole-row (a | b) tile as the first (the slab's rows,
    or the rotated halves joined) and a 1-element placeholder, never used, as the second."""
    if FULL_ROWS and PREROTATED:
        x_a = interp_upcast(_load_rows(base, start, n_tokens, stride_n, stride_d, BLOCK, D, BLOCK_D))
        x_b = tl.zeros([1], x_a.dtype)
    else:
        x_a, x_b = _load_qk(base, cos_ptr, sin_ptr, start, n_tokens, n_prefix, stride_n, stride_d,
                            BLOCK, D, DH, BLOCK_DH, INTERLEAVED, PREROTATED)
        if FULL_ROWS:  # rotated here: the halves joined into one (a | b) tile
            x_a = _rows_of(x_a, x_b, BLOCK, BLOCK_DH)
            x_b = tl.zeros([1], x_a.dtype)
    return x_a, x_b


@triton.jit(do_not_specialize=["H", "N", "n_prefix"])
def _rope2d_rotate_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, stride_xb, stride_xh, stride_xn, stride_xd,
                          H, N, n_prefix, D: tl.constexpr, DH: tl.constexpr, BLOCK_DH: tl.constexpr,
                          INTERLEAVED: tl.constexpr, BLOCK: tl.constexpr):
    """out = rotated x in the storage dtype, contiguous [B, H, N, D] with the a halves of the pairs in
    channels [0, D/2) and the b halves in [D/2, D) (any pairing: q.k is a sum over pairs)."""
    start, pid_bh = _tile_and_head(N, BLOCK)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    r_a, r_b, _, _ = _load_rotated(x_ptr + b * stride_xb + h * stride_xh, cos_ptr, sin_ptr, start, N, n_prefix,
                                   stride_xn, stride_xd, 1.0, BLOCK, D, DH, BLOCK_DH, INTERLEAVED)
    _store_halves(out_ptr + pid_bh.to(tl.int64) * N * D, start, N, r_a, r_b, BLOCK, D, DH, BLOCK_DH, False)


@triton.jit
def _fwd_tile(q_a, q_b, m_i, l_i, acc, k_base, v_base, cos_ptr, sin_ptr, start_n, N, n_prefix,
              stride_kn, stride_kd, stride_vn, stride_vd,
              D: tl.constexpr, DH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
              INTERLEAVED: tl.constexpr, PREROTATED_K: tl.constexpr, FULL_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
              MASK_KEYS: tl.constexpr):
    """One k/v tile of the forward's online softmax. Only the last (partial) tile masks its keys: the
    select on every score is ALU work on the softmax path, which bounds flash attention at D=64.
    FULL_ROWS: q_a holds q's whole (a | b) rows (q_b is unused)."""
    k_a, k_b = _load_qk_tiles(k_base, cos_ptr, sin_ptr, start_n, N, n_prefix, stride_kn, stride_kd,
                              BLOCK_N, D, DH, BLOCK_D, BLOCK_DH, INTERLEAVED, PREROTATED_K, FULL_ROWS)
    if FULL_ROWS:
        scores = tl.dot(q_a, tl.trans(k_a))
    else:
        scores = tl.dot(q_b, tl.trans(k_b), tl.dot(q_a, tl.trans(k_a)))
    if MASK_KEYS:
        scores = tl.where((start_n + tl.arange(0, BLOCK_N) < N)[None, :], scores, float("-inf"))
    m_i, l_i, p, alpha = online_softmax_update(m_i, l_i, scores)
    v = interp_upcast(_load_rows(v_base, start_n, N, stride_vn, stride_vd, BLOCK_N, D, BLOCK_D))
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_i, l_i, acc


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@triton.autotune(configs=_FWD_CONFIGS, key=["N", "BLOCK_DH", "INTERLEAVED", "PREROTATED_K", "FULL_ROWS"],
                 prune_configs_by={"early_config_prune": _pruner(_FWD_TILES, _FWD_TILES_FP32,
                                                                 _FWD_TILES_PREROTATED, _FWD_TILES_SPILL_FULL_ROWS)})
@triton.jit(do_not_specialize=["H", "N", "n_prefix"])
def _rope2d_fwd_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    H, N, n_prefix, qk_scale,
    D: tl.constexpr, DH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
    INTERLEAVED: tl.constexpr, PREROTATED_K: tl.constexpr, FULL_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (q tile, batch*head). PREROTATED_K: k points at the rotated scratch slab;
    FULL_ROWS: one product over whole rows per k tile (see FULL_ROWS_ENV)."""
    start_m, pid_bh = _tile_and_head(N, BLOCK_M)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh

    # Prologue: rotate this q tile once, with softmax scale and log2(e) folded in before rounding.
    q_a, q_b, _qcos, _qsin = _load_rotated(q_base, cos_ptr, sin_ptr, start_m, N, n_prefix, stride_qn, stride_qd, qk_scale,
                                           BLOCK_M, D, DH, BLOCK_DH, INTERLEAVED)
    if FULL_ROWS:  # in the (a | b) channel order of k's rows
        q_a = _rows_of(q_a, q_b, BLOCK_M, BLOCK_DH)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        m_i, l_i, acc = _fwd_tile(q_a, q_b, m_i, l_i, acc, k_base, v_base, cos_ptr, sin_ptr, start_n, N, n_prefix,
                                  stride_kn, stride_kd, stride_vn, stride_vd, D, DH, BLOCK_D, BLOCK_DH,
                                  INTERLEAVED, PREROTATED_K, FULL_ROWS, BLOCK_N, False)
    if n_full < N:
        m_i, l_i, acc = _fwd_tile(q_a, q_b, m_i, l_i, acc, k_base, v_base, cos_ptr, sin_ptr, n_full, N, n_prefix,
                                  stride_kn, stride_kd, stride_vn, stride_vd, D, DH, BLOCK_D, BLOCK_DH,
                                  INTERLEAVED, PREROTATED_K, FULL_ROWS, BLOCK_N, True)

    out, lse = online_softmax_finalize(acc, m_i, l_i)
    # o [B, H, N, D] and lse [B, H, N] are contiguous
    _store_rows(o_ptr + pid_bh.to(tl.int64) * N * D, start_m, N, out, BLOCK_M, D, D, BLOCK_D)
    rows = start_m + tl.arange(0, BLOCK_M)
    tl.store(lse_ptr + pid_bh.to(tl.int64) * N + rows, lse, mask=rows < N)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["H", "N"])
def _bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, stride_dob, stride_doh, stride_don, stride_dod, H, N,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(o * do), the softmax-backward correction term, [B, H, N] fp32."""
    start_m, pid_bh = _tile_and_head(N, BLOCK_M)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    o = _load_rows(o_ptr + pid_bh.to(tl.int64) * N * D, start_m, N, D, 1, BLOCK_M, D, BLOCK_D)
    do = _load_rows(do_ptr + b * stride_dob + h * stride_doh, start_m, N, stride_don, stride_dod, BLOCK_M, D, BLOCK_D)
    delta = tl.sum(interp_upcast(o).to(tl.float32) * interp_upcast(do).to(tl.float32), axis=1)
    rows = start_m + tl.arange(0, BLOCK_M)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * N + rows, delta, mask=rows < N)


@triton.autotune(configs=_DKDV_CONFIGS, key=["N", "BLOCK_DH", "INTERLEAVED", "PREROTATED", "FULL_ROWS"],
                 prune_configs_by={"early_config_prune": _pruner(_DKDV_TILES, _DKDV_TILES_FP32)})
@triton.jit(do_not_specialize=["H", "N", "n_prefix"])
def _rope2d_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N, n_prefix, sm_scale,
    D: tl.constexpr, DH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
    INTERLEAVED: tl.constexpr, PREROTATED: tl.constexpr, FULL_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (k tile, batch*head): dk and dv of the tile, summed over all q tiles.
    PREROTATED: q and k point at the rotated scratch slabs; FULL_ROWS: whole-row products (see
    FULL_ROWS_ENV; the *_a tiles then hold whole rows and the *_b ones are unused)."""
    start_n, pid_bh = _tile_and_head(N, BLOCK_N)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    row_base = pid_bh.to(tl.int64) * N  # lse, delta: [B, H, N]
    qk_scale = sm_scale * LOG2E

    k_a, k_b = _load_qk_tiles(k_base, cos_ptr, sin_ptr, start_n, N, n_prefix, stride_kn, stride_kd,
                              BLOCK_N, D, DH, BLOCK_D, BLOCK_DH, INTERLEAVED, PREROTATED, FULL_ROWS)
    v = interp_upcast(_load_rows(v_base, start_n, N, stride_vn, stride_vd, BLOCK_N, D, BLOCK_D))

    dk_a = tl.zeros([BLOCK_N, BLOCK_D if FULL_ROWS else BLOCK_DH], tl.float32)
    dk_b = tl.zeros([BLOCK_N, BLOCK_DH], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        q_a, q_b = _load_qk_tiles(q_base, cos_ptr, sin_ptr, start_m, N, n_prefix, stride_qn, stride_qd,
                                  BLOCK_M, D, DH, BLOCK_D, BLOCK_DH, INTERLEAVED, PREROTATED, FULL_ROWS)
        do = interp_upcast(_load_rows(do_base, start_m, N, stride_don, stride_dod, BLOCK_M, D, BLOCK_D))
        rows = start_m + tl.arange(0, BLOCK_M)
        lse = tl.load(lse_ptr + row_base + rows, mask=rows < N, other=float("-inf"))
        delta = tl.load(delta_ptr + row_base + rows, mask=rows < N, other=0.0)

        # Transposed scores [BN, BM], as in FlashAttention-2's dk/dv pass: p^T and ds^T then come out
        # of the accumulator already in the layout of a left tensor-core operand (no transpose).
        if FULL_ROWS:
            scores_t = tl.dot(k_a, tl.trans(q_a)) * qk_scale
        else:
            scores_t = tl.dot(k_b, tl.trans(q_b), tl.dot(k_a, tl.trans(q_a))) * qk_scale
        lse2 = lse * LOG2E
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # padded q rows -> p = 0
        # Rows of padded keys (beyond N) are not masked: they only feed rows of dk/dv that are never stored.
        p_t = tl.math.exp2(scores_t - lse2[None, :])
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = (p_t * (dp_t - delta[None, :])).to(q_a.dtype)
        dk_a += tl.dot(ds_t, q_a)
        if not FULL_ROWS:
            dk_b += tl.dot(ds_t, q_b)

    if FULL_ROWS:
        dk_a, dk_b = _halves_of(dk_a, BLOCK_N, BLOCK_DH)
    # cos/sin are reloaded (from L2) rather than kept live across the loop: registers are the limit here
    kcos, ksin = _load_cos_sin(cos_ptr, sin_ptr, start_n, N, n_prefix, BLOCK_N, DH, BLOCK_DH)
    dk_a, dk_b = _rotate_back(dk_a * sm_scale, dk_b * sm_scale, kcos, ksin)
    slab = pid_bh.to(tl.int64) * N * D  # dk, dv are contiguous [B, H, N, D]
    _store_halves(dk_ptr + slab, start_n, N, dk_a, dk_b, BLOCK_N, D, DH, BLOCK_DH, INTERLEAVED)
    _store_rows(dv_ptr + slab, start_n, N, dv, BLOCK_N, D, D, BLOCK_D)


@triton.jit
def _dq_tile(q_a, q_b, do, lse, delta, dq_a, dq_b, k_base, v_base, cos_ptr, sin_ptr, start_n, N, n_prefix,
             stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
             D: tl.constexpr, DH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
             INTERLEAVED: tl.constexpr, PREROTATED: tl.constexpr, FULL_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
             MASK_KEYS: tl.constexpr):
    """One k/v tile of dq. Only the last (partial) tile masks its keys (zero-padded keys would otherwise
    get probability exp2(-lse), which can overflow). FULL_ROWS: q_a and dq_a hold whole rows."""
    k_a, k_b = _load_qk_tiles(k_base, cos_ptr, sin_ptr, start_n, N, n_prefix, stride_kn, stride_kd,
                              BLOCK_N, D, DH, BLOCK_D, BLOCK_DH, INTERLEAVED, PREROTATED, FULL_ROWS)
    v = interp_upcast(_load_rows(v_base, start_n, N, stride_vn, stride_vd, BLOCK_N, D, BLOCK_D))
    if FULL_ROWS:
        scores = tl.dot(q_a, tl.trans(k_a)) * qk_scale
    else:
        scores = (tl.dot(q_b, tl.trans(k_b), tl.dot(q_a, tl.trans(k_a)))) * qk_scale
    if MASK_KEYS:
        scores = tl.where((start_n + tl.arange(0, BLOCK_N) < N)[None, :], scores, float("-inf"))
    p = probs_from_lse(scores, lse)
    dp = tl.dot(do, tl.trans(v))
    ds = (p * (dp - delta[:, None])).to(k_a.dtype)
    dq_a += tl.dot(ds, k_a)
    if not FULL_ROWS:
        dq_b += tl.dot(ds, k_b)
    return dq_a, dq_b


@triton.autotune(configs=_DQ_CONFIGS, key=["N", "BLOCK_DH", "INTERLEAVED", "PREROTATED", "FULL_ROWS"],
                 prune_configs_by={"early_config_prune": _pruner(_DQ_TILES, _DQ_TILES_FP32)})
@triton.jit(do_not_specialize=["H", "N", "n_prefix"])
def _rope2d_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N, n_prefix, sm_scale,
    D: tl.constexpr, DH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
    INTERLEAVED: tl.constexpr, PREROTATED: tl.constexpr, FULL_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (q tile, batch*head): dq of the tile, summed over all k tiles.
    PREROTATED: q and k point at the rotated scratch slabs; FULL_ROWS: whole-row products."""
    start_m, pid_bh = _tile_and_head(N, BLOCK_M)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    row_base = pid_bh.to(tl.int64) * N
    qk_scale = sm_scale * LOG2E

    q_a, q_b = _load_qk_tiles(q_base, cos_ptr, sin_ptr, start_m, N, n_prefix, stride_qn, stride_qd,
                              BLOCK_M, D, DH, BLOCK_D, BLOCK_DH, INTERLEAVED, PREROTATED, FULL_ROWS)
    do = interp_upcast(_load_rows(do_base, start_m, N, stride_don, stride_dod, BLOCK_M, D, BLOCK_D))
    rows = start_m + tl.arange(0, BLOCK_M)
    lse = tl.load(lse_ptr + row_base + rows, mask=rows < N, other=float("-inf"))
    delta = tl.load(delta_ptr + row_base + rows, mask=rows < N, other=0.0)

    dq_a = tl.zeros([BLOCK_M, BLOCK_D if FULL_ROWS else BLOCK_DH], tl.float32)
    dq_b = tl.zeros([BLOCK_M, BLOCK_DH], tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq_a, dq_b = _dq_tile(q_a, q_b, do, lse, delta, dq_a, dq_b, k_base, v_base, cos_ptr, sin_ptr, start_n, N,
                              n_prefix, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, D, DH, BLOCK_D,
                              BLOCK_DH, INTERLEAVED, PREROTATED, FULL_ROWS, BLOCK_N, False)
    if n_full < N:
        dq_a, dq_b = _dq_tile(q_a, q_b, do, lse, delta, dq_a, dq_b, k_base, v_base, cos_ptr, sin_ptr, n_full, N,
                              n_prefix, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, D, DH, BLOCK_D,
                              BLOCK_DH, INTERLEAVED, PREROTATED, FULL_ROWS, BLOCK_N, True)

    if FULL_ROWS:
        dq_a, dq_b = _halves_of(dq_a, BLOCK_M, BLOCK_DH)
    cos, sin = _load_cos_sin(cos_ptr, sin_ptr, start_m, N, n_prefix, BLOCK_M, DH, BLOCK_DH)
    dq_a, dq_b = _rotate_back(dq_a * sm_scale, dq_b * sm_scale, cos, sin)
    _store_halves(dq_ptr + pid_bh.to(tl.int64) * N * D, start_m, N, dq_a, dq_b, BLOCK_M, D, DH, BLOCK_DH, INTERLEAVED)


# --------------------------------------------------------------------------------------------
# Launchers (called by the custom ops in op.py; inputs already validated)
# --------------------------------------------------------------------------------------------
def _meta(head_dim: int, pairing: str) -> dict[str, int | bool]:
    return {
        "D": head_dim,
        "DH": head_dim // 2,
        "BLOCK_D": 2 * pair_block(head_dim),
        "BLOCK_DH": pair_block(head_dim),
        "INTERLEAVED": pairing == "interleaved",
    }


def _rotate_block(head_dim: int) -> int:
    """Rows per program of the rotation pass: 64, or 32 for D > 128 (64 x 256 fp32 spills registers)."""
    return 64 if head_dim <= 128 else 32


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_prefix: int, pairing: str) -> torch.Tensor:
    """Rotated x (storage dtype) in a fresh contiguous [B, H, N, D] slab, pair halves split (a | b)."""
    B, H, N, D = x.shape
    out = empty((B, H, N, D), dtype=x.dtype, device=x.device)
    tensors = (x, cos, sin, out)

    def build() -> tuple:
        meta = _meta(D, pairing)
        block = _rotate_block(D)
        return (cdiv(N, block) * B * H,), (*tensors, *x.stride(), H, N, n_prefix), dict(
            D=D, DH=meta["DH"], BLOCK_DH=meta["BLOCK_DH"], INTERLEAVED=meta["INTERLEAVED"], BLOCK=block,
            num_warps=4)

    launcher(_rope2d_rotate_kernel).launch_planned(call_signature(x, n_prefix, pairing), tensors, build)
    return out


def _full_rows(head_dim: int, enabled: bool | None = None) -> bool:
    """Whether the kernels multiply whole (a | b) rows (FULL_ROWS_ENV, or `enabled`): D/2 a power of two
    (at least 16), so that the row is one unpadded tile."""
    enabled = _FULL_ROWS if enabled is None else enabled
    return enabled and head_dim == 2 * pair_block(head_dim)


def _fwd_prerotates_k(N: int) -> bool:
    mode = prerotate_mode()
    if mode != "auto":
        return mode == "1"
    return cdiv(N, 128) >= PREROTATE_MIN_Q_TILES


def _bwd_prerotates() -> bool:
    # The backward visits every (q tile, k tile) pair twice (dkdv and dq kernels), rotating the streamed
    # operand each time: one rotation pass of q and k is always cheaper there.
    return prerotate_mode() != "0"


def rope2d_fwd_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      out: torch.Tensor, lse: torch.Tensor, n_prefix: int, pairing: str, scale: float) -> None:
    """out: contiguous [B, H, N, D]; lse: contiguous [B, H, N] fp32; cos/sin: contiguous [HW, D/2] fp32."""
    B, H, N, D = q.shape
    prerotate = _fwd_prerotates_k(N)
    if prerotate:
        k = _rotated(k, cos, sin, n_prefix, pairing)
    tensors = (q, k, v, cos, sin, out, lse)

    def build() -> tuple:  # what the signature fixes: built once per signature (FastLauncher.launch_planned)
        grid = lambda meta: (cdiv(N, meta["BLOCK_M"]) * B * H,)
        args = (*tensors, *q.stride(), *k.stride(), *v.stride(), H, N, n_prefix, scale * 1.4426950408889634)
        return grid, args, dict(**_meta(D, pairing), PREROTATED_K=prerotate, FULL_ROWS=full_rows)

    full_rows = _full_rows(D)
    signature = call_signature(q, k, v, n_prefix, pairing, scale, prerotate, full_rows)
    launcher(_rope2d_fwd_kernel).launch_planned(signature, tensors, build)


def rope2d_bwd_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
                      dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, delta: torch.Tensor,
                      n_prefix: int, pairing: str, scale: float) -> None:
    """dq, dk, dv: contiguous [B, H, N, D]; delta: contiguous [B, H, N] fp32 scratch."""
    B, H, N, D = q.shape
    delta_tensors = (out, grad_out, delta)

    def build_delta() -> tuple:
        delta_block = 64
        return (cdiv(N, delta_block) * B * H,), (*delta_tensors, *grad_out.stride(), H, N), dict(
            D=D, BLOCK_D=_meta(D, pairing)["BLOCK_D"], BLOCK_M=delta_block)

    launcher(_bwd_delta_kernel).launch_planned(call_signature(out, grad_out, pairing), delta_tensors, build_delta)
    prerotate = _bwd_prerotates()
    if prerotate:
        q, k = _rotated(q, cos, sin, n_prefix, pairing), _rotated(k, cos, sin, n_prefix, pairing)
    # The arguments of both kernels are fixed by this signature: built once per signature each.
    full_rows = _full_rows(D)
    signature = call_signature(q, k, v, grad_out, n_prefix, pairing, scale, prerotate, full_rows)
    dkdv_tensors = (q, k, v, cos, sin, grad_out, lse, delta, dk, dv)
    dq_tensors = (q, k, v, cos, sin, grad_out, lse, delta, dq)

    def build(tensors: tuple, block: str) -> tuple:
        strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
        grid = lambda m: (cdiv(N, m[block]) * B * H,)
        return grid, (*tensors, *strides, H, N, n_prefix, scale), dict(**_meta(D, pairing), PREROTATED=prerotate,
                                                                        FULL_ROWS=full_rows)

    launcher(_rope2d_bwd_dkdv_kernel).launch_planned(signature, dkdv_tensors,
                                                      lambda: build(dkdv_tensors, "BLOCK_N"))
    launcher(_rope2d_bwd_dq_kernel).launch_planned(signature, dq_tensors, lambda: build(dq_tensors, "BLOCK_M"))

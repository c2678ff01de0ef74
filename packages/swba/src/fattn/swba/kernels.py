"""Triton kernels of block sliding-window attention (forward, backward preprocess, dK/dV, dQ).

Token t belongs to block t // block_size. A query in block i sees the keys of blocks j with
i - window < j <= i. Queries are the last n_q of the n_k tokens (q_off = n_k - n_q; training has
n_q == n_k, inference with a KV cache n_q < n_k).

Every kernel visits only the tiles that intersect the window, in two kinds of loop (as in Triton's
causal fused-attention tutorial): tiles where the block mask (or a ragged edge) cuts through are
"masked"; interior tiles wholly visible to every row of the other side skip all mask arithmetic.
For a query tile the visible keys are [lo, hi); the unmasked run [full_lo, full_hi) sits inside it,
so the forward and dQ loops are [lo, full_lo) masked, [full_lo, full_hi) unmasked, [full_hi, hi)
masked. The dK/dV kernel keeps one loop with a branch uniform over the tile instead: three
pipelined loops there (k, v, dk, dv all live) spilled registers on sm_90 (checked with ptxas).

The backward is deterministic (no atomics): one kernel per key tile accumulates dK and dV over the
query tiles that see it (and over the query heads sharing a KV head in GQA/MQA); another per query
tile accumulates dQ over its key tiles. A preprocess computes delta = rowsum(o * do) - dlse.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fattn.core.runtime import autotune_limit, env_flag, interpreter_enabled
from fattn.core.triton_helpers import (
    LOG2E,
    interp_upcast,
    offsets_2d,
    online_softmax_finalize,
    online_softmax_update,
)

__all__ = [
    "swba_fwd_kernel",
    "swba_bwd_preprocess_kernel",
    "swba_bwd_dkdv_kernel",
    "swba_bwd_dq_kernel",
    "tile_bounds",
    "tile_ranges",
    "autotune_enabled",
    "candidate_configs",
    "launch_config",
    "ALIGN",
    "is_aligned",
    "DKDV_ALIGNED_MAX_BLOCK_D",
    "block_id_masks",
]

# Hopper shared memory per block is 227 KB; leave room for the compiler's own buffers.
_SMEM_BUDGET = 200 * 1024


def autotune_enabled() -> bool:
    """False when the autotune limit is 1 (FATTN_SWBA_AUTOTUNE_LIMIT=1, or the older FATTN_SWBA_AUTOTUNE=0;
    the package's tests set it; see fattn.core.runtime.autotune_limit): every launch then uses the first
    config of its class, compiled once and never timed (autotuning compiles and times each candidate
    for every new shape key, which dominates a GPU test run)."""
    return autotune_limit("swba") != 1


@functools.cache
def _smem_budget(device: torch.device | None) -> int:
    """The pipelined-tile budget for `device`: ~88% of its opt-in shared memory per block (200 KB on
    H100/H200, ~143 KB on A100, less on consumer GPUs), so pruning never keeps a config that cannot launch."""
    if device is None or device.type != "cuda":
        return _SMEM_BUDGET
    optin = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0)
    return min(_SMEM_BUDGET, int(optin * 0.88)) if optin else _SMEM_BUDGET


def _config(block_m: int, block_n: int, warps: int, stages: int, maxnreg: int | None = None) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages,
                         maxnreg=maxnreg)


def _head_dim_class(block_d: int, elem: int) -> tuple[int, bool]:
    return (64 if block_d <= 64 else 128 if block_d <= 128 else 256), elem == 4


# Candidates per kernel and (padded head dim class, fp32): a few tilings each, all compiled for sm_90
# and free of register spills (`python packages/swba/tests/compile_check.py --all` prints registers,
# spills and shared memory). The first of each list is the default when autotuning is off, and the
# last is the smallest (kept when shared memory is short, e.g. on consumer GPUs).
# Resident tiles: fwd q + acc (BLOCK_M rows); dkdv k, v + dk, dv (BLOCK_N rows); dq q, do + dq (BLOCK_M rows).
# (128, 64, 8, 2) capped at 128 registers (maxnreg; 0 spills, 48 KB of shared memory) fits two 8-warp programs
# per SM where the uncapped 3-stage twin (167 registers) fits one: the same cap made fattn-rope2d's 128 x 64
# forward 27% faster on an H100. Added in session 16 from sm_90 compiles; not yet timed or run on a GPU.
FWD_TABLE = {
    (64, False): [_config(128, 64, 4, 3), _config(128, 64, 8, 3), _config(128, 128, 8, 3), _config(128, 64, 4, 4),
                  _config(64, 128, 4, 3), _config(128, 128, 8, 2), _config(128, 64, 8, 2, maxnreg=128),
                  _config(64, 64, 4, 3)],
    (128, False): [_config(128, 64, 8, 3), _config(128, 128, 8, 2), _config(128, 64, 8, 4), _config(64, 128, 4, 3),
                   _config(64, 64, 4, 3), _config(64, 32, 4, 2)],
    (256, False): [_config(64, 32, 8, 2), _config(64, 64, 8, 2), _config(128, 32, 8, 2), _config(32, 32, 4, 1)],
    (64, True): [_config(64, 32, 4, 2), _config(128, 64, 8, 3), _config(64, 64, 4, 3)],
    (128, True): [_config(128, 32, 8, 2), _config(64, 32, 4, 2)],
    (256, True): [_config(32, 32, 8, 2), _config(32, 16, 4, 2)],
}
# The 64-row dK/dV tiles (16-bit) and the D 64 dQ's (64, 128, 4, 3) come from the autotuner's per-config
# times on an H100 (session 15; B1 H12 N16384 bs256 w16): dK/dV 64 x 64 / 4 warps 1105 us at D 64 against
# 1269 for the best earlier candidate (32 x 64 / 4 / 3); 64 x 128 / 8 warps 1684 us at D 128 against 1908
# (32 x 128 / 8). They spill a little (MEASURED_SPILLS) and are faster anyway.
DKDV_TABLE = {
    (64, False): [_config(64, 64, 4, 2), _config(64, 128, 8, 2), _config(32, 64, 4, 3), _config(32, 64, 4, 2)],
    (128, False): [_config(32, 128, 8, 2), _config(64, 128, 8, 2), _config(16, 128, 8, 2), _config(32, 64, 8, 2)],
    (256, False): [_config(32, 32, 8, 2), _config(16, 64, 8, 1), _config(16, 32, 8, 2)],
    (64, True): [_config(32, 64, 4, 2), _config(32, 128, 8, 2), _config(16, 64, 4, 2)],
    (128, True): [_config(16, 64, 4, 2)],
    (256, True): [_config(16, 32, 8, 1)],
}
DQ_TABLE = {
    (64, False): [_config(128, 32, 4, 3), _config(64, 128, 4, 3), _config(64, 64, 4, 3), _config(128, 64, 8, 3),
                  _config(64, 32, 4, 2)],
    (128, False): [_config(128, 32, 8, 3), _config(128, 64, 8, 3), _config(128, 64, 8, 2), _config(128, 32, 8, 4),
                   _config(64, 64, 4, 3), _config(64, 32, 4, 2)],
    (256, False): [_config(64, 32, 8, 2), _config(64, 64, 8, 2), _config(32, 32, 4, 2)],
    (64, True): [_config(64, 32, 4, 2), _config(128, 32, 8, 3)],
    (128, True): [_config(32, 32, 4, 2)],
    (256, True): [_config(32, 16, 4, 2)],
}
# Candidates of ALIGNED launches only (see ALIGN; the general kernels spill with them), inserted before each
# list's last: sm_90, fp16 D 64 aligned forward 128 x 128 / 8 warps / 2 stages capped at 128 registers: no
# spill, 80 KB of shared memory, two programs per SM (uncapped: 164 registers, one). Compiled only; untimed.
ALIGNED_TABLES: dict[str, dict[tuple[int, bool], list[triton.Config]]] = {
    "fwd": {(64, False): [_config(128, 128, 8, 2, maxnreg=128)]},
    "dkdv": {},
    "dq": {},
}


def spill_key(c: triton.Config) -> tuple[int, ...]:
    """A config's key in MEASURED_SPILLS: (BLOCK_M, BLOCK_N, num_warps, num_stages), then its register cap
    if it has one (a capped config spills on its own terms, not its uncapped twin's)."""
    key = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
    return key + (c.maxnreg,) if c.maxnreg else key


# Tiles kept although they spill on sm_90, because they were measured faster than every spill-free candidate
# (see above): (kind, head-dim class) -> {spill_key(config): spilled bytes}.
# tests/compile_check.py accepts these spills (no more than listed) and fails on any other.
MEASURED_SPILLS = {
    ("dkdv", (64, False)): {(64, 64, 4, 2): 16, (64, 128, 8, 2): 8},
    ("dkdv", (128, False)): {(64, 128, 8, 2): 480},
}


# Tiles that spill only when the head dim is padded (masked loads along D, e.g. D=80 in a 128 block):
# sm_90 compile of the bf16 D=80 forward at 128x128 / 8 warps / 2 stages: 100 bytes of spills
# (D=128: none). (kind, head-dim class) -> (BLOCK_M, BLOCK_N, num_warps, num_stages).
_SPILL_WHEN_PADDED = {("fwd", (128, False)): {(128, 128, 8, 2)}}


def _smem_bytes(c: triton.Config, acc_rows: str, n_acc: int, block_d: int, elem: int) -> int:
    # The resident tile(s) once, two streamed operands per pipeline stage (matches ptxas within a few KB).
    bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
    resident, streamed = (bm, bn) if acc_rows == "M" else (bn, bm)
    return (n_acc * resident + max(c.num_stages, 1) * 2 * streamed) * block_d * elem


_KIND = {"fwd": (FWD_TABLE, "M", 1), "dkdv": (DKDV_TABLE, "N", 2), "dq": (DQ_TABLE, "M", 2)}


def candidate_configs(kind: str, block_d: int, elem: int, device: torch.device | None = None,
                      head_dim: int | None = None, aligned: bool = False) -> list[triton.Config]:
    """The configs `kind` ("fwd", "dkdv", "dq") may run with at this padded head dim and element size:
    its class's list (with its ALIGNED_TABLES entries for an aligned launch) less those over the device's
    shared memory (at least the smallest is kept), and less those that spill when `head_dim` (default:
    block_d) is padded up to block_d."""
    table, acc_rows, n_acc = _KIND[kind]
    head_class = _head_dim_class(block_d, elem)
    configs = table[head_class]
    extra = ALIGNED_TABLES[kind].get(head_class, []) if aligned else []
    if extra:
        configs = [*configs[:-1], *extra, configs[-1]]
    if head_dim is not None and head_dim != block_d:
        spills = _SPILL_WHEN_PADDED.get((kind, head_class), set())
        configs = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                   not in spills]
    budget = _smem_budget(device)
    kept = [c for c in configs if _smem_bytes(c, acc_rows, n_acc, block_d, elem) <= budget]
    return kept or configs[-1:]


def _prune(kind: str):  # type: ignore[no-untyped-def]
    def prune(configs, named_args, **kwargs):  # type: ignore[no-untyped-def]
        q = named_args["Q"]
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        aligned = kwargs.get("ALIGNED", named_args.get("ALIGNED", False))
        kept = candidate_configs(kind, block_d, q.element_size(), getattr(q, "device", None), head_dim, aligned)
        limit = autotune_limit("swba")
        return kept[:limit] if limit else kept
    return prune


def launch_config(kind: str, block_d: int, q: torch.Tensor) -> triton.Config:
    """The config used when autotuning is off: the first candidate (the only config under the interpreter)."""
    if interpreter_enabled():
        return {"fwd": FWD_CONFIGS, "dkdv": DKDV_CONFIGS, "dq": DQ_CONFIGS}[kind][0]
    return candidate_configs(kind, block_d, q.element_size(), q.device, q.shape[-1])[0]


if interpreter_enabled():
    # One small config of unequal tile sizes: fast on the CPU, and tiles of different sizes on the
    # two sides exercise the range arithmetic.
    FWD_CONFIGS = [_config(16, 32, 1, 1)]
    DKDV_CONFIGS = [_config(32, 16, 1, 1)]
    DQ_CONFIGS = [_config(16, 32, 1, 1)]
else:
    FWD_CONFIGS = [c for cs in (*FWD_TABLE.values(), *ALIGNED_TABLES["fwd"].values()) for c in cs]
    DKDV_CONFIGS = [c for cs in (*DKDV_TABLE.values(), *ALIGNED_TABLES["dkdv"].values()) for c in cs]
    DQ_CONFIGS = [c for cs in (*DQ_TABLE.values(), *ALIGNED_TABLES["dq"].values()) for c in cs]

# The largest tile of any config. When block_size, n_q and n_k are multiples of it (training on clips of
# 256- or 1024-token frames), every tile a kernel visits is wholly visible: tile_bounds leaves no masked
# tile, and the kernels are compiled without their masked loops or branch (ALIGNED). Those cost registers
# in the whole kernel: sm_90, fp16 D 64, forward 128 x 64 / 8 warps 167 -> 114 registers (two programs
# per SM instead of one), dQ 64 x 128 / 4 warps 255 -> 194, dK/dV 64 x 64 / 4 warps 255 + 16 bytes of spill
# -> 234 and none; bf16 D 128, forward 128 x 64 / 8 warps 235 -> 173, dK/dV 64 x 128 / 8 warps 480 -> 176
# bytes of spill. (sm_90 compiles only; not yet timed.) tests/test_swba.py enumerates tile_ranges to check it.
ALIGN = max(max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in (*FWD_CONFIGS, *DKDV_CONFIGS, *DQ_CONFIGS))


def is_aligned(n_q: int, n_k: int, block_size: int) -> bool:
    """Whether the kernels may run without their window masks (ALIGNED; block_size as clamped by the op).
    FATTN_SWBA_ALIGNED=0 turns the variant off (read when a call signature's launches are planned, for A/B
    timings: `python -m benchmarks.profile swba --op fwd+bwd --kernels 10 --also FATTN_SWBA_ALIGNED=0`)."""
    if not env_flag("FATTN_SWBA_ALIGNED", True):
        return False
    return block_size % ALIGN == 0 and n_q % ALIGN == 0 and n_k % ALIGN == 0


def block_id_masks(block_d: int, head_dim: int, elem: int) -> bool:
    """Whether the backward kernels' masked tiles compare block ids (a division per column) rather than
    positions with per-row bounds (`_keys_seen`, `_queries_seeing`; always in the forward). Positions take
    fewer registers for 16-bit D <= 128 (sm_90, general kernels: dQ fp16 D 64 128 x 64 / 8 warps 178 -> 141,
    64 x 128 / 4 warps 255 -> 217; dK/dV bf16 D 128 64 x 128 / 8 warps 480 -> 312 bytes of spill) but more
    beyond: dQ fp16 D 256 64 x 64 / 8 warps spilled 480 bytes, dK/dV bf16 D 80 32 x 128 32, fp32 D 96 16 x 64 20."""
    return block_d > 128 or head_dim != block_d or elem == 4


# Past this padded head dim the dK/dV kernel keeps its mask branch even when aligned: without it, two of the
# D 256 tiles spill on sm_90 (fp16 16 x 64 / 8 warps 708 bytes, fp32 16 x 32 / 8 warps 12; none with it).
DKDV_ALIGNED_MAX_BLOCK_D = 128


# Tuned per (bucketed) sequence lengths, window geometry and head dim; the length buckets keep a
# growing KV cache from re-tuning on every decoding step.
_KEY = ["q_bucket", "k_bucket", "block_size", "window", "HEAD_DIM"]
# Scalars whose values say little to the compiler: specializing them (on == 1, on divisibility by 16)
# would compile a new variant for many new shapes. Strides stay specialized (vectorized loads).
_NO_SPECIALIZE = ["n_heads", "kv_group", "n_q", "n_k", "block_size", "window", "q_bucket", "k_bucket"]


@triton.jit
def tile_bounds(first, last, block_size, window, n_other, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """The tiles of the other side that a run of positions [first, last] (one tile) must visit.

    Forward/dQ (REVERSE=False): rows are queries at absolute positions first..last; returns key
    bounds. dK/dV (REVERSE=True): rows are keys; returns query bounds in absolute positions.
    Returns (lo, full_lo, full_hi, hi): lo aligned down to BLOCK; [full_lo, full_hi) is the
    BLOCK-aligned run visible to every row (empty runs collapse onto hi); hi is not aligned
    (the last tile may be ragged, and is then masked).
    """
    first_blk = first // block_size
    last_blk = last // block_size
    if REVERSE:
        # Key blocks j are seen by query blocks i with j <= i < j + window.
        lo = first_blk * block_size
        hi = tl.minimum((last_blk + window) * block_size, n_other)
        full_lo = last_blk * block_size
        full_hi = tl.minimum((first_blk + window) * block_size, n_other)
    else:
        lo = tl.maximum(first_blk - window + 1, 0) * block_size
        hi = tl.minimum((last_blk + 1) * block_size, n_other)
        full_lo = tl.maximum(last_blk - window + 1, 0) * block_size
        full_hi = tl.minimum((first_blk + 1) * block_size, n_other)
    lo = (lo // BLOCK) * BLOCK
    full_lo = tl.cdiv(full_lo, BLOCK) * BLOCK
    full_hi = (full_hi // BLOCK) * BLOCK
    empty = full_lo >= full_hi
    full_lo = tl.where(empty, hi, full_lo)
    full_hi = tl.where(empty, hi, full_hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def tile_ranges(pid, n_q, n_k, block_size, window, BLOCK_OWN: tl.constexpr, BLOCK_OTHER: tl.constexpr,
                KEY_TILE: tl.constexpr):
    """(lo, full_lo, full_hi, hi) of the other side's tiles that tile `pid` of BLOCK_OWN rows visits, as in
    tile_bounds. A query tile (KEY_TILE=False; forward, dQ) gets key positions; a key tile (dK/dV) gets query
    indices (0..n_q), BLOCK_OTHER-aligned."""
    q_off = n_k - n_q
    if KEY_TILE:
        first = pid * BLOCK_OWN
        last = tl.minimum(pid * BLOCK_OWN + BLOCK_OWN, n_k) - 1
        lo, full_lo, full_hi, hi = tile_bounds(first, last, block_size, window, n_k, BLOCK_OTHER, True)
        # Absolute query positions -> query indices; tiles stay BLOCK_OTHER-aligned in query indices.
        lo = (tl.maximum(lo - q_off, 0) // BLOCK_OTHER) * BLOCK_OTHER
        hi = tl.maximum(hi - q_off, 0)
        full_lo = tl.minimum(tl.cdiv(tl.maximum(full_lo - q_off, 0), BLOCK_OTHER) * BLOCK_OTHER, hi)
        full_hi = tl.maximum(tl.minimum((tl.maximum(full_hi - q_off, 0) // BLOCK_OTHER) * BLOCK_OTHER, hi), full_lo)
    else:
        first = q_off + pid * BLOCK_OWN
        last = q_off + tl.minimum(pid * BLOCK_OWN + BLOCK_OWN, n_q) - 1
        lo, full_lo, full_hi, hi = tile_bounds(first, last, block_size, window, n_k, BLOCK_OTHER, False)
    return lo, full_lo, full_hi, hi


# Triton 3.9 removed block pointers (tl.make_block_ptr raises); older releases keep them, and they
# are the faster path there. Newer releases load through a tensor of pointers instead.
_HAS_BLOCK_PTR = tl.constexpr("removed" not in (tl.make_block_ptr.__doc__ or ""))


@triton.jit
def _load_rows(base, start, n_rows, stride_row, stride_d,
               BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """Rows [start, start + BLOCK_R) of a [n_rows, HEAD_DIM] matrix as a [BLOCK_R, BLOCK_D] tile, zero-padded.

    A block pointer keeps only a scalar base and 64-bit strides live across the loop (a tensor of
    pointers would hold BLOCK_R * BLOCK_D 64-bit addresses in registers), and only what can be out
    of range is bounds-checked: nothing in interior tiles of a power-of-two head dim.
    """
    if _HAS_BLOCK_PTR:
        ptr = tl.make_block_ptr(base, (n_rows, HEAD_DIM), (stride_row, stride_d), (start, 0), (BLOCK_R, BLOCK_D),
                                (1, 0))
        if MASK_ROWS:
            if HEAD_DIM == BLOCK_D:
                return tl.load(ptr, boundary_check=(0,), padding_option="zero")
            else:
                return tl.load(ptr, boundary_check=(0, 1), padding_option="zero")
        else:
            if HEAD_DIM == BLOCK_D:
                return tl.load(ptr)
            else:
                return tl.load(ptr, boundary_check=(1,), padding_option="zero")
    else:
        rows = start + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        ptrs = base + rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_d
        mask = (rows < n_rows)[:, None] & (cols < HEAD_DIM)[None, :]
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _keys_seen(q_pos, n_k, block_size, window):
    """The keys [lo, hi) (positions) that the queries at positions q_pos [rows] see.

    The masked tiles compare positions with these per-row bounds: two compares per score, where block
    ids (a division per column in the loop) took ~40 more registers in the whole kernel (sm_90, fp16 D 64
    forward 128 x 64 / 8 warps: 167 -> 126, two programs per SM instead of one)."""
    q_blk = q_pos // block_size
    return tl.maximum(q_blk - window + 1, 0) * block_size, tl.minimum((q_blk + 1) * block_size, n_k)


@triton.jit
def _queries_seeing(k_pos, q_off, n_q, block_size, window):
    """The query indices [lo, hi) (0..n_q) that see the keys at positions k_pos [rows]."""
    k_blk = k_pos // block_size
    return k_blk * block_size - q_off, tl.minimum((k_blk + window) * block_size - q_off, n_q)


@triton.jit
def _blocks_visible(q_blk, k_blk, window):
    """[rows, cols] visibility of key blocks k_blk [cols] from query blocks q_blk [rows] (the backward kernels'
    masks where position bounds cost more registers, see `block_id_masks`)."""
    return (k_blk[None, :] <= q_blk[:, None]) & (k_blk[None, :] > q_blk[:, None] - window)


@triton.jit
def _in_range(x, lo, hi):
    """[rows, cols] mask: x [cols] in [lo, hi) of its row (lo, hi [rows])."""
    return (x[None, :] >= lo[:, None]) & (x[None, :] < hi[:, None])


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, k_lo, k_hi, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
               offs_d, start, end, n_k, qk_scale,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
               SCALE_NONNEG: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = interp_upcast(_load_rows(k_base, start_n, n_k, stride_kn, stride_kd, BLOCK_N, HEAD_DIM, BLOCK_D,
                                     MASKED))
        qk = tl.dot(q, tl.trans(k))
        if MASKED:
            s = tl.where(_in_range(offs_n, k_lo, k_hi), qk * qk_scale, float("-inf"))
            m_i, l_i, p, alpha = online_softmax_update(m_i, l_i, s)
        elif SCALE_NONNEG:
            # Interior tile: every score is finite, so the running max is finite after it and needs no
            # -inf guard; with scale >= 0, max(qk) * scale = max(qk * scale), so the scaling and the
            # max subtraction fuse into one FMA per score (as in Triton's fused-attention tutorial).
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        else:
            m_i, l_i, p, alpha = online_softmax_update(m_i, l_i, qk * qk_scale)
        v = interp_upcast(_load_rows(v_base, start_n, n_k, stride_vn, stride_vd, BLOCK_N, HEAD_DIM, BLOCK_D,
                                     MASKED))
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_i, l_i


@triton.autotune(configs=FWD_CONFIGS, key=[*_KEY, "ALIGNED"], prune_configs_by={"early_config_prune": _prune("fwd")})
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def swba_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    n_heads, kv_group, n_q, n_k, block_size, window, qk_scale, q_bucket, k_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SCALE_NONNEG: tl.constexpr, ALIGNED: tl.constexpr = False,
):
    """Grid (B * H, cdiv(n_q, BLOCK_M)). Writes O [B, H, n_q, D] and LSE [B, H, n_q] (fp32, natural log).
    SCALE_NONNEG: qk_scale >= 0 (always, unless a caller passes a negative scale). ALIGNED: `is_aligned`."""
    # Last query tiles first: with a window wider than the sequence so far (block-causal start)
    # they see the most keys, and starting the longest programs first balances the tail.
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    pid_bh = tl.program_id(0)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    hk = h // kv_group
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    q_off = n_k - n_q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < n_q
    io_mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = interp_upcast(tl.load(q_base + offsets_2d(offs_m, offs_d, stride_qn, stride_qd), mask=io_mask, other=0.0))
    k_lo, k_hi = _keys_seen(q_off + offs_m, n_k, block_size, window)

    lo, full_lo, full_hi, hi = tile_ranges(pid_m, n_q, n_k, block_size, window, BLOCK_M, BLOCK_N, False)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for_tiles = (q, k_lo, k_hi, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_d)
    if not ALIGNED:  # (aligned: the masked runs are empty, and compiling them would cost registers)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, *for_tiles, lo, full_lo, n_k, qk_scale,
                                   BLOCK_N, HEAD_DIM, BLOCK_D, True, SCALE_NONNEG)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, *for_tiles, full_lo, full_hi, n_k, qk_scale,
                               BLOCK_N, HEAD_DIM, BLOCK_D, False, SCALE_NONNEG)
    if not ALIGNED:
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, *for_tiles, full_hi, hi, n_k, qk_scale,
                                   BLOCK_N, HEAD_DIM, BLOCK_D, True, SCALE_NONNEG)
    out, lse = online_softmax_finalize(acc, m_i, l_i)

    o_base = O + b * stride_ob + h * stride_oh
    tl.store(o_base + offsets_2d(offs_m, offs_d, stride_on, stride_od), out.to(O.dtype.element_ty), mask=io_mask)
    tl.store(LSE + pid_bh.to(tl.int64) * n_q + offs_m, lse, mask=m_mask)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit
def swba_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    n_heads, n_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """delta = rowsum(o * do) - dlse, [B, H, n_q] fp32. Grid (B * H, cdiv(n_q, BLOCK_M)).

    Subtracting dlse folds the gradient of the returned log-sum-exp into the same formula:
    d lse / d s = p, so ds = p * (dp - delta + dlse).
    """
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(0)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < n_q
    mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offsets_2d(offs_m, offs_d, stride_on, stride_od), mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offsets_2d(offs_m, offs_d, stride_don, stride_dod),
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = pid_bh.to(tl.int64) * n_q + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=m_mask, other=0.0)
    tl.store(DELTA + row, delta, mask=m_mask)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_lo, q_hi, q_base, do_base, lse_row, delta_row,
                stride_qn, stride_qd, stride_don, stride_dod,
                offs_d, lo, full_lo, full_hi, hi, n_q, q_off, block_size, window, qk_scale,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr,
                BLOCK_IDS: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi) (relative query indices); only
    tiles outside [full_lo, full_hi) apply the window mask (a branch uniform over the block: one
    loop keeps register pressure lower than three). ALIGNED: no tile is outside (see ALIGN), and the
    branch is compiled out."""
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = interp_upcast(_load_rows(q_base, start_m, n_q, stride_qn, stride_qd, BLOCK_M, HEAD_DIM, BLOCK_D,
                                     not ALIGNED))
        lse = tl.load(lse_row + offs_m, mask=offs_m < n_q, other=0.0)
        # Transposed scores: rows are keys, columns queries, so dK/dV accumulate without a transpose.
        s_t = tl.dot(k, tl.trans(q)) * qk_scale
        p_t = tl.math.exp2(s_t - (lse * LOG2E)[None, :])
        if not ALIGNED:
            if (start_m < full_lo) | (start_m >= full_hi):
                if BLOCK_IDS:  # q_lo holds the keys' block ids; padded query rows get block -1 (never visible)
                    q_blk = tl.where(offs_m < n_q, (q_off + offs_m) // block_size, -1)
                    p_t = tl.where((q_blk[None, :] - q_lo[:, None]).to(tl.uint32) < window, p_t, 0.0)
                else:
                    p_t = tl.where(_in_range(offs_m, q_lo, q_hi), p_t, 0.0)  # (q_hi <= n_q: padded rows out)
        do = interp_upcast(_load_rows(do_base, start_m, n_q, stride_don, stride_dod, BLOCK_M, HEAD_DIM, BLOCK_D,
                                      not ALIGNED))
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        delta = tl.load(delta_row + offs_m, mask=offs_m < n_q, other=0.0)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.autotune(configs=DKDV_CONFIGS, key=[*_KEY, "ALIGNED"], prune_configs_by={"early_config_prune": _prune("dkdv")})
@triton.jit(do_not_specialize=[*_NO_SPECIALIZE, "n_kv_heads", "n_splits"])
def swba_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    n_heads, n_kv_heads, kv_group, n_splits, n_q, n_k, block_size, window, scale, qk_scale, q_bucket, k_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ALIGNED: tl.constexpr = False, BLOCK_IDS: tl.constexpr = False,
):
    """Grid (B * Hk * n_splits, cdiv(n_k, BLOCK_N)). dK, dV of one key tile of one KV head, summed
    over the query tiles that see it and over kv_group / n_splits of the query heads sharing the KV
    head (no atomics). DK, DV are [B, Hk * n_splits, n_k, D]: with n_splits > 1 (GQA/MQA with too
    few KV heads to fill the GPU) the caller sums the n_splits partial results, deterministically.
    ALIGNED: block_size, n_q and n_k are multiples of ALIGN (`is_aligned`); BLOCK_IDS: `block_id_masks`."""
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(0)
    b = (pid_bh // (n_kv_heads * n_splits)).to(tl.int64)
    out_h = (pid_bh % (n_kv_heads * n_splits)).to(tl.int64)  # head index in DK / DV
    hk = out_h // n_splits
    heads_per_split = kv_group // n_splits
    first_head = hk * kv_group + (out_h % n_splits) * heads_per_split

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < n_k)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = interp_upcast(tl.load(K + b * stride_kb + hk * stride_kh + offsets_2d(offs_n, offs_d, stride_kn, stride_kd),
                              mask=kv_mask, other=0.0))
    v = interp_upcast(tl.load(V + b * stride_vb + hk * stride_vh + offsets_2d(offs_n, offs_d, stride_vn, stride_vd),
                              mask=kv_mask, other=0.0))
    # Padded keys (offs_n >= n_k) only feed their own (unstored) dK/dV rows: no key mask needed.
    if BLOCK_IDS:
        q_lo, q_hi = offs_n // block_size, offs_n  # (q_hi unused)
    else:
        q_lo, q_hi = _queries_seeing(offs_n, n_k - n_q, n_q, block_size, window)
    lo, full_lo, full_hi, hi = tile_ranges(pid_n, n_q, n_k, block_size, window, BLOCK_N, BLOCK_M, True)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(0, heads_per_split):
        h = first_head + g
        row = (b * n_heads + h) * n_q
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_lo, q_hi, Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh,
                             LSE + row, DELTA + row, stride_qn, stride_qd, stride_don, stride_dod,
                             offs_d, lo, full_lo, full_hi, hi, n_q, n_k - n_q, block_size, window, qk_scale,
                             BLOCK_M, HEAD_DIM, BLOCK_D, ALIGNED, BLOCK_IDS)

    dk *= scale
    tl.store(DK + b * stride_dkb + out_h * stride_dkh + offsets_2d(offs_n, offs_d, stride_dkn, stride_dkd),
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + out_h * stride_dvh + offsets_2d(offs_n, offs_d, stride_dvn, stride_dvd),
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, k_lo, k_hi, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
              offs_d, start, end, n_k, block_size, window, qk_scale,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
              BLOCK_IDS: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = interp_upcast(_load_rows(k_base, start_n, n_k, stride_kn, stride_kd, BLOCK_N, HEAD_DIM, BLOCK_D,
                                     MASKED))
        v = interp_upcast(_load_rows(v_base, start_n, n_k, stride_vn, stride_vd, BLOCK_N, HEAD_DIM, BLOCK_D,
                                     MASKED))
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            if BLOCK_IDS:  # k_lo holds the queries' block ids
                vis = _blocks_visible(k_lo, offs_n // block_size, window) & (offs_n < n_k)[None, :]
            else:
                vis = _in_range(offs_n, k_lo, k_hi)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.autotune(configs=DQ_CONFIGS, key=[*_KEY, "ALIGNED"], prune_configs_by={"early_config_prune": _prune("dq")})
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def swba_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    n_heads, kv_group, n_q, n_k, block_size, window, scale, qk_scale, q_bucket, k_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ALIGNED: tl.constexpr = False, BLOCK_IDS: tl.constexpr = False,
):
    """Grid (B * H, cdiv(n_q, BLOCK_M)). dQ of one query tile over its visible key tiles. ALIGNED: `is_aligned`;
    BLOCK_IDS: `block_id_masks`."""
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # longest programs first, as in the forward
    pid_bh = tl.program_id(0)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    hk = h // kv_group
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    q_off = n_k - n_q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < n_q
    io_mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = interp_upcast(tl.load(Q + b * stride_qb + h * stride_qh + offsets_2d(offs_m, offs_d, stride_qn, stride_qd),
                              mask=io_mask, other=0.0))
    do = interp_upcast(tl.load(DO + b * stride_dob + h * stride_doh + offsets_2d(offs_m, offs_d, stride_don, stride_dod),
                               mask=io_mask, other=0.0))
    row = pid_bh.to(tl.int64) * n_q + offs_m
    # Padded rows get lse = +inf, so their probabilities are 0 even in unmasked tiles.
    lse2 = tl.load(LSE + row, mask=m_mask, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + row, mask=m_mask, other=0.0)
    if BLOCK_IDS:
        k_lo, k_hi = (q_off + offs_m) // block_size, offs_m  # (k_hi unused)
    else:
        k_lo, k_hi = _keys_seen(q_off + offs_m, n_k, block_size, window)

    lo, full_lo, full_hi, hi = tile_ranges(pid_m, n_q, n_k, block_size, window, BLOCK_M, BLOCK_N, False)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if not ALIGNED:  # as in the forward
        dq = _dq_tiles(dq, q, do, lse2, delta, k_lo, k_hi, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                       offs_d, lo, full_lo, n_k, block_size, window, qk_scale, BLOCK_N, HEAD_DIM, BLOCK_D, True,
                       BLOCK_IDS)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_lo, k_hi, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                   offs_d, full_lo, full_hi, n_k, block_size, window, qk_scale, BLOCK_N, HEAD_DIM, BLOCK_D, False,
                   BLOCK_IDS)
    if not ALIGNED:
        dq = _dq_tiles(dq, q, do, lse2, delta, k_lo, k_hi, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                       offs_d, full_hi, hi, n_k, block_size, window, qk_scale, BLOCK_N, HEAD_DIM, BLOCK_D, True,
                       BLOCK_IDS)
    dq *= scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offsets_2d(offs_m, offs_d, stride_dqn, stride_dqd),
             dq.to(DQ.dtype.element_ty), mask=io_mask)

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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fattn.core.runtime import interpreter_enabled
from fattn.core.triton_helpers import (
    LOG2E,
    interp_upcast,
    online_softmax_finalize,
    online_softmax_update,
    probs_from_lse,
)

__all__ = ["rope2d_fwd_launch", "rope2d_bwd_launch", "pair_block"]


def pair_block(head_dim: int) -> int:
    """Width of a pair-half tile: D/2 rounded up to a power of two, at least 16 (tl.dot's minimum K)."""
    return max(16, triton.next_power_of_2(head_dim // 2))


# --------------------------------------------------------------------------------------------
# Autotuning: one small config under the interpreter, a handful of Hopper-friendly ones on a GPU.
# --------------------------------------------------------------------------------------------
def _configs(pairs: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


if interpreter_enabled():
    _FWD_CONFIGS = _configs([(16, 16, 1, 1)])
    _BWD_CONFIGS = _configs([(16, 16, 1, 1)])
else:
    _FWD_CONFIGS = _configs([
        (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3),
        (128, 32, 4, 4), (64, 128, 4, 3), (64, 32, 4, 4),
    ])
    _BWD_CONFIGS = _configs([
        (64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (32, 64, 4, 3), (64, 32, 4, 4), (32, 32, 4, 2),
    ])


def _prune(configs, named_args, **kwargs):  # type: ignore[no-untyped-def]
    """Large head dims: keep the tiles that fit registers and shared memory; short sequences: drop
    tiles far longer than the sequence (they would only compute padding)."""
    block_dh = kwargs.get("BLOCK_DH", named_args.get("BLOCK_DH"))
    n = named_args["N"]
    kept = []
    for c in configs:
        m, nb = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if block_dh >= 128 and m * nb > 64 * 64:
            continue
        if block_dh >= 64 and m * nb > 128 * 64:
            continue
        if n <= 64 and max(m, nb) > 64:
            continue
        kept.append(c)
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


# --------------------------------------------------------------------------------------------
# Rotation helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _pair_columns(pairs, DH: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Channel index of the a and b element of each pair."""
    if INTERLEAVED:
        return 2 * pairs, 2 * pairs + 1
    else:
        return pairs, pairs + DH


@triton.jit
def _load_cos_sin(cos_ptr, sin_ptr, tokens, n_tokens, n_prefix, pairs, DH: tl.constexpr):
    """[BLOCK, BLOCK_DH] fp32 cos and sin of each token's pair angles; identity for prefix tokens
    and padding (cos 1, sin 0)."""
    patch = tokens - n_prefix
    mask = ((patch >= 0) & (tokens < n_tokens))[:, None] & (pairs < DH)[None, :]
    offs = patch.to(tl.int64)[:, None] * DH + pairs[None, :]
    cos = tl.load(cos_ptr + offs, mask=mask, other=1.0)
    sin = tl.load(sin_ptr + offs, mask=mask, other=0.0)
    return cos, sin


@triton.jit
def _load_halves(base, tokens, n_tokens, stride_n, stride_d, pairs, DH: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The a and b halves of a [BLOCK, D] tile, zero-padded, in their storage dtype."""
    col_a, col_b = _pair_columns(pairs, DH, INTERLEAVED)
    row = tokens.to(tl.int64)[:, None] * stride_n
    mask = (tokens < n_tokens)[:, None] & (pairs < DH)[None, :]
    x_a = tl.load(base + row + col_a.to(tl.int64)[None, :] * stride_d, mask=mask, other=0.0)
    x_b = tl.load(base + row + col_b.to(tl.int64)[None, :] * stride_d, mask=mask, other=0.0)
    return x_a, x_b


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
def _store_halves(base, tokens, n_tokens, stride_n, pairs, y_a, y_b, DH: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Store the a and b halves into a contiguous [N, D] slab (unit channel stride)."""
    col_a, col_b = _pair_columns(pairs, DH, INTERLEAVED)
    row = tokens.to(tl.int64)[:, None] * stride_n
    mask = (tokens < n_tokens)[:, None] & (pairs < DH)[None, :]
    ty = base.dtype.element_ty
    tl.store(base + row + col_a[None, :], y_a.to(ty), mask=mask)
    tl.store(base + row + col_b[None, :], y_b.to(ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@triton.autotune(configs=_FWD_CONFIGS, key=["N", "BLOCK_DH", "BLOCK_D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _rope2d_fwd_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    H, N, n_prefix, qk_scale,
    D: tl.constexpr, DH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.arange(0, BLOCK_DH)
    dims = tl.arange(0, BLOCK_D)
    dtype = q_ptr.dtype.element_ty

    # Prologue: rotate this q tile once, and fold softmax scale and log2(e) in before the cast.
    cos, sin = _load_cos_sin(cos_ptr, sin_ptr, rows, N, n_prefix, pairs, DH)
    q_a, q_b = _load_halves(q_base, rows, N, stride_qn, stride_qd, pairs, DH, INTERLEAVED)
    q_a, q_b = _rotate(q_a, q_b, cos, sin)
    q_a = interp_upcast((q_a * qk_scale).to(dtype))
    q_b = interp_upcast((q_b * qk_scale).to(dtype))

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kcos, ksin = _load_cos_sin(cos_ptr, sin_ptr, cols, N, n_prefix, pairs, DH)
        k_a, k_b = _load_halves(k_base, cols, N, stride_kn, stride_kd, pairs, DH, INTERLEAVED)
        k_a, k_b = _rotate(k_a, k_b, kcos, ksin)
        k_a = interp_upcast(k_a.to(dtype))
        k_b = interp_upcast(k_b.to(dtype))
        scores = tl.dot(q_a, tl.trans(k_a)) + tl.dot(q_b, tl.trans(k_b))
        scores = tl.where((cols < N)[None, :], scores, float("-inf"))
        m_i, l_i, p, alpha = online_softmax_update(m_i, l_i, scores)
        v_offs = cols.to(tl.int64)[:, None] * stride_vn + dims.to(tl.int64)[None, :] * stride_vd
        v = tl.load(v_base + v_offs, mask=(cols < N)[:, None] & (dims < D)[None, :], other=0.0)
        v = interp_upcast(v)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)

    out, lse = online_softmax_finalize(acc, m_i, l_i)
    # o and lse are contiguous [B, H, N, D] / [B, H, N]
    o_offs = (pid_bh.to(tl.int64) * N + rows.to(tl.int64))[:, None] * D + dims[None, :]
    tl.store(o_ptr + o_offs, out.to(o_ptr.dtype.element_ty), mask=(rows < N)[:, None] & (dims < D)[None, :])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * N + rows, lse, mask=rows < N)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, stride_dob, stride_doh, stride_don, stride_dod, H, N,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(o * do), the softmax-backward correction term, [B, H, N] fp32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (dims < D)[None, :]
    o_offs = (pid_bh.to(tl.int64) * N + rows.to(tl.int64))[:, None] * D + dims[None, :]
    o = tl.load(o_ptr + o_offs, mask=mask, other=0.0)
    do_offs = b * stride_dob + h * stride_doh + rows.to(tl.int64)[:, None] * stride_don \
        + dims.to(tl.int64)[None, :] * stride_dod
    do = tl.load(do_ptr + do_offs, mask=mask, other=0.0)
    delta = tl.sum(interp_upcast(o).to(tl.float32) * interp_upcast(do).to(tl.float32), axis=1)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * N + rows, delta, mask=rows < N)


@triton.autotune(configs=_BWD_CONFIGS, key=["N", "BLOCK_DH", "BLOCK_D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _rope2d_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N, n_prefix, sm_scale,
    D: tl.constexpr, DH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (k tile, batch*head): dk and dv of the tile, summed over all q tiles."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    row_base = pid_bh.to(tl.int64) * N  # lse, delta: [B, H, N]

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pairs = tl.arange(0, BLOCK_DH)
    dims = tl.arange(0, BLOCK_D)
    dtype = q_ptr.dtype.element_ty
    qk_scale = sm_scale * LOG2E

    kcos, ksin = _load_cos_sin(cos_ptr, sin_ptr, cols, N, n_prefix, pairs, DH)
    k_a, k_b = _load_halves(k_base, cols, N, stride_kn, stride_kd, pairs, DH, INTERLEAVED)
    k_a, k_b = _rotate(k_a, k_b, kcos, ksin)
    k_a = interp_upcast(k_a.to(dtype))
    k_b = interp_upcast(k_b.to(dtype))
    v_offs = cols.to(tl.int64)[:, None] * stride_vn + dims.to(tl.int64)[None, :] * stride_vd
    v = interp_upcast(tl.load(v_base + v_offs, mask=(cols < N)[:, None] & (dims < D)[None, :], other=0.0))

    dk_a = tl.zeros([BLOCK_N, BLOCK_DH], tl.float32)
    dk_b = tl.zeros([BLOCK_N, BLOCK_DH], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        cos, sin = _load_cos_sin(cos_ptr, sin_ptr, rows, N, n_prefix, pairs, DH)
        q_a, q_b = _load_halves(q_base, rows, N, stride_qn, stride_qd, pairs, DH, INTERLEAVED)
        q_a, q_b = _rotate(q_a, q_b, cos, sin)
        q_a = interp_upcast(q_a.to(dtype))
        q_b = interp_upcast(q_b.to(dtype))
        do_offs = rows.to(tl.int64)[:, None] * stride_don + dims.to(tl.int64)[None, :] * stride_dod
        do = interp_upcast(tl.load(do_base + do_offs, mask=(rows < N)[:, None] & (dims < D)[None, :], other=0.0))
        lse = tl.load(lse_ptr + row_base + rows, mask=rows < N, other=float("-inf"))
        delta = tl.load(delta_ptr + row_base + rows, mask=rows < N, other=0.0)

        scores = (tl.dot(q_a, tl.trans(k_a)) + tl.dot(q_b, tl.trans(k_b))) * qk_scale  # [BM, BN]
        scores = tl.where((cols < N)[None, :], scores, float("-inf"))
        p = probs_from_lse(scores, lse)  # padded rows have lse = -inf -> p = 0
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
        ds = (p * (dp - delta[:, None])).to(dtype)
        dk_a += tl.dot(tl.trans(ds), q_a)
        dk_b += tl.dot(tl.trans(ds), q_b)

    dk_a, dk_b = _rotate_back(dk_a * sm_scale, dk_b * sm_scale, kcos, ksin)
    slab = pid_bh.to(tl.int64) * N * D  # dk, dv are contiguous [B, H, N, D]
    _store_halves(dk_ptr + slab, cols, N, D, pairs, dk_a, dk_b, DH, INTERLEAVED)
    dv_offs = cols.to(tl.int64)[:, None] * D + dims[None, :]
    tl.store(dv_ptr + slab + dv_offs, dv.to(dv_ptr.dtype.element_ty), mask=(cols < N)[:, None] & (dims < D)[None, :])


@triton.autotune(configs=_BWD_CONFIGS, key=["N", "BLOCK_DH", "BLOCK_D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _rope2d_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N, n_prefix, sm_scale,
    D: tl.constexpr, DH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (q tile, batch*head): dq of the tile, summed over all k tiles."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    row_base = pid_bh.to(tl.int64) * N

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.arange(0, BLOCK_DH)
    dims = tl.arange(0, BLOCK_D)
    dtype = q_ptr.dtype.element_ty
    qk_scale = sm_scale * LOG2E

    cos, sin = _load_cos_sin(cos_ptr, sin_ptr, rows, N, n_prefix, pairs, DH)
    q_a, q_b = _load_halves(q_base, rows, N, stride_qn, stride_qd, pairs, DH, INTERLEAVED)
    q_a, q_b = _rotate(q_a, q_b, cos, sin)
    q_a = interp_upcast(q_a.to(dtype))
    q_b = interp_upcast(q_b.to(dtype))
    do_offs = rows.to(tl.int64)[:, None] * stride_don + dims.to(tl.int64)[None, :] * stride_dod
    do = interp_upcast(tl.load(do_base + do_offs, mask=(rows < N)[:, None] & (dims < D)[None, :], other=0.0))
    lse = tl.load(lse_ptr + row_base + rows, mask=rows < N, other=float("-inf"))
    delta = tl.load(delta_ptr + row_base + rows, mask=rows < N, other=0.0)

    dq_a = tl.zeros([BLOCK_M, BLOCK_DH], tl.float32)
    dq_b = tl.zeros([BLOCK_M, BLOCK_DH], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kcos, ksin = _load_cos_sin(cos_ptr, sin_ptr, cols, N, n_prefix, pairs, DH)
        k_a, k_b = _load_halves(k_base, cols, N, stride_kn, stride_kd, pairs, DH, INTERLEAVED)
        k_a, k_b = _rotate(k_a, k_b, kcos, ksin)
        k_a = interp_upcast(k_a.to(dtype))
        k_b = interp_upcast(k_b.to(dtype))
        v_offs = cols.to(tl.int64)[:, None] * stride_vn + dims.to(tl.int64)[None, :] * stride_vd
        v = interp_upcast(tl.load(v_base + v_offs, mask=(cols < N)[:, None] & (dims < D)[None, :], other=0.0))

        scores = (tl.dot(q_a, tl.trans(k_a)) + tl.dot(q_b, tl.trans(k_b))) * qk_scale
        scores = tl.where((cols < N)[None, :], scores, float("-inf"))
        p = probs_from_lse(scores, lse)
        dp = tl.dot(do, tl.trans(v))
        ds = (p * (dp - delta[:, None])).to(dtype)
        dq_a += tl.dot(ds, k_a)
        dq_b += tl.dot(ds, k_b)

    dq_a, dq_b = _rotate_back(dq_a * sm_scale, dq_b * sm_scale, cos, sin)
    slab = pid_bh.to(tl.int64) * N * D
    _store_halves(dq_ptr + slab, rows, N, D, pairs, dq_a, dq_b, DH, INTERLEAVED)


# --------------------------------------------------------------------------------------------
# Launchers (called by the custom ops in op.py; inputs already validated)
# --------------------------------------------------------------------------------------------
def _meta(head_dim: int, pairing: str) -> dict[str, int | bool]:
    return {
        "D": head_dim,
        "DH": head_dim // 2,
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "BLOCK_DH": pair_block(head_dim),
        "INTERLEAVED": pairing == "interleaved",
    }


def rope2d_fwd_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      out: torch.Tensor, lse: torch.Tensor, n_prefix: int, pairing: str, scale: float) -> None:
    """out: contiguous [B, H, N, D]; lse: contiguous [B, H, N] fp32; cos/sin: contiguous [HW, D/2] fp32."""
    B, H, N, D = q.shape
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)  # noqa: E731
    _rope2d_fwd_kernel[grid](
        q, k, v, cos, sin, out, lse,
        *q.stride(), *k.stride(), *v.stride(),
        H, N, n_prefix, scale * 1.4426950408889634,
        **_meta(D, pairing),
    )


def rope2d_bwd_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
                      dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, delta: torch.Tensor,
                      n_prefix: int, pairing: str, scale: float) -> None:
    """dq, dk, dv: contiguous [B, H, N, D]; delta: contiguous [B, H, N] fp32 scratch."""
    B, H, N, D = q.shape
    meta = _meta(D, pairing)
    delta_block = 64
    _bwd_delta_kernel[(triton.cdiv(N, delta_block), B * H)](
        out, grad_out, delta, *grad_out.stride(), H, N,
        D=D, BLOCK_D=meta["BLOCK_D"], BLOCK_M=delta_block,
    )
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    grid_n = lambda m: (triton.cdiv(N, m["BLOCK_N"]), B * H)  # noqa: E731
    _rope2d_bwd_dkdv_kernel[grid_n](
        q, k, v, cos, sin, grad_out, lse, delta, dk, dv, *strides, H, N, n_prefix, scale, **meta,
    )
    grid_m = lambda m: (triton.cdiv(N, m["BLOCK_M"]), B * H)  # noqa: E731
    _rope2d_bwd_dq_kernel[grid_m](
        q, k, v, cos, sin, grad_out, lse, delta, dq, *strides, H, N, n_prefix, scale, **meta,
    )

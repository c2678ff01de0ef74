"""The forward on Hopper (sm_90) in Gluon, with FlashAttention-3's overlap of tensor cores and softmax.

Triton's `tl.dot` (3.6) ends every product with `wgmma.wait_group 0`: a tile's softmax waits for its
scores and the tensor cores wait for the softmax, so a flash forward runs its two halves in turn. Gluon
(Triton's lower-level language, part of the same `pip install triton`) issues warpgroup MMAs
asynchronously and waits for them by count. This kernel computes tile j+1's scores and tile j-1's P @ V
while the warps run tile j's softmax:

    order of issue: S0 | S1 PV0 | S2 PV1 | ...
    tile j:  wait(1) -> S_j ready (PV_{j-1} may run);  issue S_{j+1};  softmax(S_j);
             wait(1) -> PV_{j-1} done (S_{j+1} may run);  O *= alpha;  issue PV_j

K and V tiles come through cp.async into three-slot rings, one iteration ahead, and the CTA meets at a
barrier each iteration (the slots' reuse and the copies' visibility to the tensor cores; Triton adds
one between the copies into a ring and the next product that reads it): with one
warpgroup per CTA (the default tile) that barrier holds one warpgroup only, and the several CTAs of an SM
run out of phase, the softmax of one beside the products of another.

Scope (`supported`): aligned geometry only (block_size, Nq and Nk multiples of 128: every visited tile is
wholly visible, so nothing is masked), fp16 / bf16, head dims 64 and 128, unit stride along D (any other
strides), a non-negative scale.
Everything else, and every GPU before sm_90, runs the Triton kernels. Opt-in (`FATTN_SWBA_HOPPER=1`)
until timed on a GPU.
"""

from __future__ import annotations

import functools

import torch
import triton

from fattn.core.launch import launcher
from fattn.core.runtime import env_flag, seq_bucket
from fattn.swba.kernels import autotune_enabled

try:  # Gluon is experimental; its API moves between Triton releases (compiled here: 3.5.1, 3.6.0, 3.9.0)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

    # cp.async from global to shared memory: renamed in Triton 3.9 (the old name raises there).
    _cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    # A barrier of the whole CTA: `thread_barrier` became `barrier` in Triton 3.9.
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    HAVE_GLUON = True
except (ImportError, AttributeError):  # pragma: no cover - Triton 3.4 has no Gluon Hopper module
    HAVE_GLUON = False

__all__ = ["ALIGN", "HAVE_GLUON", "TILES", "enabled", "launch_fwd", "supported"]

# (BLOCK_M, BLOCK_N, num_warps) candidates, the default first. BLOCK_N 64 gives every query tile at least two
# key tiles (visible runs are multiples of 128 keys), which the pipeline needs. sm_90, fp16 D 64 / bf16 D 128:
#   64 x 64 / 4 warps: 128 / 168 registers, 56 / 112 KiB shared memory: four / two programs per SM, each one
#     warpgroup, out of phase with the others (the CTA barrier of each iteration holds one warpgroup only);
#   128 x 64 / 8 warps: 128 / 164 registers, 64 / 128 KiB: two / one program per SM, two warpgroups in step.
TILES = ((64, 64, 4), (128, 64, 8))
HEAD_DIMS = (64, 128)
ALIGN = 128  # block_size, Nq and Nk: multiples of every tile's rows
STAGES = 3
# A tile forced for every launch (tests, A/B timings); None: autotuned, or the first when autotuning is off.
FORCE_TILE: tuple[int, int, int] | None = None


@functools.cache
def _device_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


def enabled() -> bool:
    """FATTN_SWBA_HOPPER=1 turns the Gluon forward on (off by default until it is timed on a GPU)."""
    return env_flag("FATTN_SWBA_HOPPER", False) and HAVE_GLUON


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, block_size: int) -> bool:
    """Whether this call may run the Gluon forward (see the module docstring); block_size as clamped by the op."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in HEAD_DIMS and scale >= 0):
        return False
    n_q, n_k = q.shape[2], k.shape[2]
    return (block_size % ALIGN == 0 and n_q % ALIGN == 0 and n_k % ALIGN == 0 and n_q > 0
            and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
            and _device_ok(q.device.index if q.device.index is not None else torch.cuda.current_device()))


if HAVE_GLUON:

    @gluon.jit
    def _copy_rows(smem, base, start, stride_n, BLOCK_R: gl.constexpr, HEAD_DIM: gl.constexpr,
                   layout: gl.constexpr):
        """cp.async rows [start, start + BLOCK_R) of a [rows, HEAD_DIM] matrix (unit stride along D) into smem."""
        rows = start + gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, layout))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
        _cp_async(smem, base + rows.to(gl.int64)[:, None] * stride_n + cols[None, :])

    @gluon.jit
    def _softmax_step(s, m_i, l_i, qk_scale, dtype: gl.constexpr, p_layout: gl.constexpr):
        """One tile of the online softmax on wholly visible scores s (log2 domain, qk_scale >= 0: the
        scaling and the max subtraction fuse into one FMA per score). Returns (p in p_layout, alpha, m, l)."""
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        return gl.convert_layout(p.to(dtype), p_layout), alpha, m_new, l_i

    @gluon.jit
    def swba_fwd_hopper_kernel(
        Q, K, V, O, LSE,
        stride_qb, stride_qh, stride_qn,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_on,
        n_heads, kv_group, n_q, n_k, block_size, window, qk_scale, q_bucket, k_bucket,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """Grid (B * H, n_q // BLOCK_M); writes O [B, H, n_q, D] and LSE [B, H, n_q] (fp32, natural log).
        Aligned geometry: BLOCK_M and BLOCK_N divide block_size, n_q and n_k. q_bucket, k_bucket: autotuning
        keys only (seq_bucket of n_q, n_k)."""
        gl.static_assert(STAGES == 3, "the slot-reuse argument below holds for three slots")
        dtype: gl.constexpr = Q.dtype.element_ty
        # Last query tiles first (they see the most keys at a block-causal start).
        pid_m = gl.num_programs(1) - 1 - gl.program_id(1)
        pid_bh = gl.program_id(0)
        b = (pid_bh // n_heads).to(gl.int64)
        h = (pid_bh % n_heads).to(gl.int64)
        hk = h // kv_group
        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh

        # The query tile lies in one block (BLOCK_M divides block_size); its keys are whole tiles.
        q_first = (n_k - n_q) + pid_m * BLOCK_M
        q_blk = q_first // block_size
        k_lo = gl.maximum(q_blk - window + 1, 0) * block_size
        k_hi = gl.minimum((q_blk + 1) * block_size, n_k)
        n_tiles = (k_hi - k_lo) // BLOCK_N

        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        # 16-byte copies: HEAD_DIM / 8 threads along a row.
        copy_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [num_warps, 1],
                                                     [1, 0])
        tile_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype))
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], tile_layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], tile_layout)

        # Prologue: Q, K0, K1, V0 (tile 1 clamped to the last: a redundant copy, never a read out of range).
        _copy_rows(q_smem, q_base, pid_m * BLOCK_M, stride_qn, BLOCK_M, HEAD_DIM, copy_layout)
        _copy_rows(k_smem.index(0), k_base, k_lo, stride_kn, BLOCK_N, HEAD_DIM, copy_layout)
        _copy_rows(k_smem.index(1), k_base, k_lo + gl.minimum(1, n_tiles - 1) * BLOCK_N, stride_kn, BLOCK_N,
                   HEAD_DIM, copy_layout)
        _copy_rows(v_smem.index(0), v_base, k_lo, stride_vn, BLOCK_N, HEAD_DIM, copy_layout)
        async_copy.commit_group()
        async_copy.wait_group(0)
        fence_async_shared()
        _cta_barrier()

        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
        o = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        s_tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)

        # Tile 0 (n_tiles >= 2: visible runs are multiples of 128 keys, BLOCK_N <= 64); no P @ V in flight yet.
        last = n_tiles - 1
        _copy_rows(k_smem.index(2), k_base, k_lo + gl.minimum(2, last) * BLOCK_N, stride_kn, BLOCK_N, HEAD_DIM,
                   copy_layout)
        _copy_rows(v_smem.index(1), v_base, k_lo + BLOCK_N, stride_vn, BLOCK_N, HEAD_DIM, copy_layout)
        async_copy.commit_group()
        s = warpgroup_mma_wait(0, deps=[s_tok])
        s_tok = warpgroup_mma(q_smem, k_smem.index(1).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale, dtype, p_layout)
        o_tok = warpgroup_mma(p, v_smem.index(0), o, use_acc=False, is_async=True)
        async_copy.wait_group(0)
        fence_async_shared()
        _cta_barrier()

        for j in range(1, last):
            # Slots of tiles j+2 (K; clamped to the last tile: a redundant copy, never out of range) and
            # j+1 (V) held K_{j-1} and V_{j-2}, which every warpgroup finished before the last barrier.
            _copy_rows(k_smem.index((j + 2) % STAGES), k_base, k_lo + gl.minimum(j + 2, last) * BLOCK_N, stride_kn,
                       BLOCK_N, HEAD_DIM, copy_layout)
            _copy_rows(v_smem.index((j + 1) % STAGES), v_base, k_lo + (j + 1) * BLOCK_N, stride_vn, BLOCK_N,
                       HEAD_DIM, copy_layout)
            async_copy.commit_group()

            s = warpgroup_mma_wait(1, deps=[s_tok])  # S_j (PV_{j-1} may still run)
            s_tok = warpgroup_mma(q_smem, k_smem.index((j + 1) % STAGES).permute((1, 0)), s_zero, use_acc=False,
                                  is_async=True)
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale, dtype, p_layout)
            o = warpgroup_mma_wait(1, deps=[o_tok])  # PV_{j-1} (S_{j+1} may still run)
            o = o * gl.convert_layout(alpha, row_o)[:, None]
            o_tok = warpgroup_mma(p, v_smem.index(j % STAGES), o, is_async=True)

            # Tiles j+2 (K) and j+1 (V) in shared memory and visible to the tensor cores; every warpgroup is
            # past S_j and PV_{j-1}, so the next iteration's copies may overwrite their slots.
            async_copy.wait_group(0)
            fence_async_shared()
            _cta_barrier()

        # Last tile: S_last and PV_{last-1} in flight, in that order.
        s = warpgroup_mma_wait(1, deps=[s_tok])
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale, dtype, p_layout)
        o = warpgroup_mma_wait(0, deps=[o_tok])
        o = o * gl.convert_layout(alpha, row_o)[:, None]
        o_tok = warpgroup_mma(p, v_smem.index(last % STAGES), o, is_async=True)
        o = warpgroup_mma_wait(0, deps=[o_tok])

        # Every row saw a whole tile of keys: l > 0.
        o = o / gl.convert_layout(l_i, row_o)[:, None]
        lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
        rows_o = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_o)
        cols_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        o_base = O + b * stride_ob + h * stride_oh
        gl.store(o_base + rows_o.to(gl.int64)[:, None] * stride_on + cols_o[None, :], o.to(dtype))
        rows_s = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_s)
        gl.store(LSE + pid_bh.to(gl.int64) * n_q + rows_s, lse)


def _config(tile: tuple[int, int, int]) -> triton.Config:
    block_m, block_n, warps = tile
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=1)


if HAVE_GLUON:
    swba_fwd_hopper_tuned = triton.autotune(
        configs=[_config(t) for t in TILES],
        key=["q_bucket", "k_bucket", "block_size", "window", "HEAD_DIM"],
    )(swba_fwd_hopper_kernel)


def launch_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
               block_size: int, window: int, qk_scale: float, signature: tuple | None) -> None:
    """Launch the Gluon forward (the caller checked `supported`) through fattn.core's planned launches, built
    once per call `signature` like the Triton kernels': autotuned over TILES unless FORCE_TILE is set or the
    package's autotune limit is 1 (then the first tile)."""
    if FORCE_TILE is not None and FORCE_TILE not in TILES:  # another tile may need what the kernel assumes
        raise ValueError(f"fattn.swba.hopper.FORCE_TILE must be one of {TILES} or None, got {FORCE_TILE!r}")
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    tensors = (q, k, v, out, lse)
    tuned = FORCE_TILE is None and autotune_enabled()

    def build() -> tuple:
        args = (*tensors,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                out.stride(0), out.stride(1), out.stride(2),
                h, h // h_kv, n_q, n_k, block_size, window, qk_scale, seq_bucket(n_q), seq_bucket(n_k))
        if tuned:
            return (lambda meta: (b * h, n_q // meta["BLOCK_M"])), args, dict(HEAD_DIM=d, STAGES=STAGES)
        block_m, block_n, warps = FORCE_TILE or TILES[0]
        return (b * h, n_q // block_m), args, dict(HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=STAGES,
                                                   num_warps=warps)

    kernel = swba_fwd_hopper_tuned if tuned else swba_fwd_hopper_kernel
    # (a forced tile is part of what the plan launches)
    launcher(kernel).launch_planned(None if signature is None else (signature, FORCE_TILE), tensors, build)

"""The `fattn::swba_fwd` / `fattn::swba_bwd` custom ops, their autograd, and the public function."""

from __future__ import annotations

import math
from typing import Optional

import torch

from fattn.core import (
    CheckedSignatures,
    Reason,
    call_signature,
    empty,
    fused_op,
    head_dim_reasons,
    int_reasons,
    raise_if_unsupported,
    register_autograd,
    same_device_reasons,
    same_dtype_reasons,
    tensor_reasons,
)
from fattn.core.launch import launcher
from fattn.core.runtime import cdiv, next_power_of_2, seq_bucket, sm_count
from fattn.swba import hopper
from fattn.swba.kernels import (
    DKDV_ALIGNED_MAX_BLOCK_D,
    autotune_enabled,
    block_id_masks,
    is_aligned,
    launch_config,
    swba_bwd_dkdv_kernel,
    swba_bwd_dq_kernel,
    swba_bwd_preprocess_kernel,
    swba_fwd_kernel,
)

__all__ = ["swba_attention", "not_supported_reasons", "swba_fwd", "swba_bwd", "SUPPORTED_DTYPES", "MAX_HEAD_DIM"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
_PREPROCESS_BLOCK_M = 64
# Tiles run along grid axis 1 (at most 65535 programs) with at least 64 tokens a tile.
_MAX_TOKENS = 65535 * 64


def _geometry(n_k: int, block_size: int, window: int) -> tuple[int, int]:
    """Equivalent (block_size, window) small enough for int32 arithmetic in the kernels.

    A block at least as long as the sequence holds every token, and a window at least the number of
    blocks sees every earlier block: clamping either changes nothing, and keeps products in range.
    """
    n = max(n_k, 1)
    block_size = min(block_size, n)
    window = min(window, cdiv(n, block_size))
    return block_size, window


def _kv_group_splits(b: int, h_kv: int, n_k: int, group: int, dev: torch.device) -> int:
    """How many programs share one KV head's query heads in the dK/dV kernel (a divisor of group).

    One program per (key tile, KV head) is enough when there are many KV heads; with MQA/GQA and
    few key tiles that leaves SMs idle, so the group is split until ~2 programs per SM exist.
    """
    if group == 1:
        return 1
    target = 2 * sm_count(dev.index) if dev.type == "cuda" else 4  # CPU: small, so tests cover both paths
    programs = b * h_kv * cdiv(n_k, 128)
    for splits in range(1, group + 1):
        if group % splits == 0 and programs * splits >= target:
            return splits
    return group


def _launch_planned(kernel, kind: str, signature: tuple | None, tensors: tuple[torch.Tensor, ...],  # type: ignore[no-untyped-def]
                    build, q: torch.Tensor, block_d: int) -> None:
    """Launch an autotuned kernel with `build()`'s (grid, args, kwargs), built once per `signature`
    (FastLauncher.launch_planned); with an autotune limit of 1 (FATTN_SWBA_AUTOTUNE_LIMIT=1) its
    default config is launched directly (no timing)."""
    if autotune_enabled():
        launcher(kernel).launch_planned(signature, tensors, build)
        return

    def build_pinned() -> tuple:
        grid, args, kwargs = build()
        return grid, args, kwargs | launch_config(kind, block_d, q).all_kwargs()

    launcher(kernel.fn).launch_planned(signature, tensors, build_pinned)


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


def _fwd_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, window: int,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, n_q, d = q.shape
    return q.new_empty((b, h, n_q, d)), q.new_empty((b, h, n_q), dtype=torch.float32)


@fused_op("swba_fwd", fake=_fwd_fake)
def swba_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, window: int,
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launch: (out [B, H, Nq, D] in q's dtype, lse [B, H, Nq] fp32). Inputs are validated."""
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    out = empty((b, h, n_q, d), dtype=q.dtype, device=q.device)
    lse = empty((b, h, n_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    signature = call_signature(q, k, v, block_size, window, scale)
    block_size, window = _geometry(n_k, block_size, window)
    if hopper.enabled() and hopper.supported(q, k, v, scale, block_size):
        hopper.launch_fwd(q, k, v, out, lse, block_size, window, scale * _LOG2E, signature)
        return out, lse
    block_d = max(16, next_power_of_2(d))
    tensors = (q, k, v, out, lse)

    def build() -> tuple:  # what the signature fixes: built once per signature
        # (B * H) on grid axis 0, whose limit is 2^31 - 1 (axis 1 allows only 65535 programs).
        def grid(meta):  # type: ignore[no-untyped-def]
            return (b * h, cdiv(n_q, meta["BLOCK_M"]))

        args = (*tensors, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                h, h // h_kv, n_q, n_k, block_size, window, scale * _LOG2E, seq_bucket(n_q), seq_bucket(n_k))
        return grid, args, dict(BLOCK_D=block_d, HEAD_DIM=d, SCALE_NONNEG=scale >= 0,
                                ALIGNED=is_aligned(n_q, n_k, block_size))

    _launch_planned(swba_fwd_kernel, "fwd", signature, tensors, build, q, block_d)
    return out, lse


def _bwd_fake(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, grad_lse: Optional[torch.Tensor], block_size: int, window: int,
              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@fused_op("swba_bwd", fake=_bwd_fake)
def swba_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, grad_lse: Optional[torch.Tensor], block_size: int, window: int,
             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launch: (dq, dk, dv), deterministic. grad_lse is the gradient of the returned lse, if any."""
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dk = empty(k.shape, dtype=k.dtype, device=k.device)
    dv = empty(v.shape, dtype=v.dtype, device=v.device)
    if dk.numel() == 0:
        return dq, dk, dv
    # One signature for the three launches: every integer argument, grid and constexpr below follows
    # from it (the fresh buffers' shapes and strides included).
    signature = call_signature(grad_out, q, k, v, out, lse, grad_lse, block_size, window, scale)
    block_size, window = _geometry(n_k, block_size, window)
    block_d = max(16, next_power_of_2(d))
    delta = empty((b, h, n_q), dtype=torch.float32, device=q.device)
    if n_q > 0:
        has_dlse = grad_lse is not None
        dlse = grad_lse.contiguous() if has_dlse else lse
        pre_tensors = (out, grad_out, dlse, delta)

        def build_pre() -> tuple:
            grid = (b * h, cdiv(n_q, _PREPROCESS_BLOCK_M))
            args = (*pre_tensors, *_strides(out), *_strides(grad_out), h, n_q)
            return grid, args, dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=_PREPROCESS_BLOCK_M, HAS_DLSE=has_dlse)

        launcher(swba_bwd_preprocess_kernel).launch_planned(signature, pre_tensors, build_pre)
    common = (n_q, n_k, block_size, window, scale, scale * _LOG2E, seq_bucket(n_q), seq_bucket(n_k))

    group = h // h_kv
    n_splits = _kv_group_splits(b, h_kv, n_k, group, q.device)
    if n_splits > 1:
        # Too few KV heads to fill the GPU: split each group's query heads over n_splits programs
        # writing fp32 partials, summed below (deterministic, unlike atomics).
        dk_out = empty((b, h_kv * n_splits, n_k, d), dtype=torch.float32, device=q.device)
        dv_out = empty((b, h_kv * n_splits, n_k, d), dtype=torch.float32, device=q.device)
    else:
        dk_out, dv_out = dk, dv

    # dK/dV for every key (keys no query sees get exact zeros).
    kv_tensors = (q, k, v, grad_out, lse, delta, dk_out, dv_out)

    def build_kv() -> tuple:
        def grid(meta):  # type: ignore[no-untyped-def]
            return (b * h_kv * n_splits, cdiv(n_k, meta["BLOCK_N"]))

        args = (*kv_tensors, *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk_out),
                *_strides(dv_out), h, h_kv, group, n_splits, *common)
        aligned = is_aligned(n_q, n_k, block_size) and block_d <= DKDV_ALIGNED_MAX_BLOCK_D
        return grid, args, dict(BLOCK_D=block_d, HEAD_DIM=d, ALIGNED=aligned,
                                BLOCK_IDS=block_id_masks(block_d, d, q.element_size()))

    _launch_planned(swba_bwd_dkdv_kernel, "dkdv", signature, kv_tensors, build_kv, q, block_d)
    if n_splits > 1:
        dk.copy_(dk_out.view(b, h_kv, n_splits, n_k, d).sum(2))
        dv.copy_(dv_out.view(b, h_kv, n_splits, n_k, d).sum(2))
    if n_q > 0:
        q_tensors = (q, k, v, grad_out, lse, delta, dq)

        def build_q() -> tuple:
            def grid(meta):  # type: ignore[no-untyped-def]
                return (b * h, cdiv(n_q, meta["BLOCK_M"]))

            args = (*q_tensors, *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq),
                    h, h // h_kv, *common)
            return grid, args, dict(BLOCK_D=block_d, HEAD_DIM=d, ALIGNED=is_aligned(n_q, n_k, block_size),
                                    BLOCK_IDS=block_id_masks(block_d, d, q.element_size()))

        _launch_planned(swba_bwd_dq_kernel, "dq", signature, q_tensors, build_q, q, block_d)
    return dq, dk, dv


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    q, k, v, block_size, window, scale = inputs
    out, lse = output
    # An output no loss reached arrives as None instead of a zeros tensor that autograd would fill on
    # its device thread before the backward (a kernel launch on the backward's critical path).
    ctx.set_materialize_grads(False)
    ctx.block_size, ctx.window, ctx.scale = block_size, window, scale
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(ctx, grad_out, grad_lse):  # type: ignore[no-untyped-def]
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = swba_bwd(grad_out, q, k, v, out, lse, grad_lse, ctx.block_size, ctx.window, ctx.scale)
    return dq, dk, dv, None, None, None


register_autograd(swba_fwd, setup_context=_setup_context, backward=_backward)


def _reasons(q: object, k: object, v: object, block_size: object, window: object, scale: object) -> list[Reason]:
    reasons: list[Reason] = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        reasons += tensor_reasons(name, t, ndim=4, dtypes=SUPPORTED_DTYPES)
    reasons += int_reasons("block_size", block_size, minimum=1)
    reasons += int_reasons("window", window, minimum=1)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        reasons.append(Reason(f"scale must be a finite float or None, got {scale!r}", TypeError))
    if reasons or not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return reasons
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    reasons += same_dtype_reasons(q=q, k=k, v=v)
    reasons += same_device_reasons(q=q, k=k, v=v)
    b, h, n_q, d = q.shape
    if k.shape != v.shape:
        reasons.append(Reason(f"k and v must have the same shape [B, Hk, Nk, D], got k {list(k.shape)} and "
                              f"v {list(v.shape)}"))
    bk, h_kv, n_k, dk = k.shape
    if bk != b:
        reasons.append(Reason(f"k must have the batch size of q (q is [B, H, Nq, D] = {list(q.shape)}), "
                              f"got k {list(k.shape)}"))
    if dk != d:
        reasons.append(Reason(f"k and v must have the head dim of q ({d}), got k {list(k.shape)}"))
    if h_kv < 1 or h % h_kv:
        reasons.append(Reason(f"the number of query heads (q.shape[1] = {h}) must be a multiple of the number "
                              f"of key/value heads (k.shape[1] = {h_kv})"))
    if n_k < n_q:
        reasons.append(Reason(f"k and v must have at least as many tokens as q (queries are the last Nq of Nk "
                              f"tokens): Nq = q.shape[2] = {n_q}, Nk = k.shape[2] = {n_k}"))
    if n_k > _MAX_TOKENS:
        reasons.append(Reason(f"k and v must have at most {_MAX_TOKENS} tokens, got Nk = {n_k}"))
    reasons += head_dim_reasons("q", d, maximum=MAX_HEAD_DIM)
    return reasons


# Signatures (fattn.core.call_signature: shapes, strides, dtypes, devices, scalar values) of
# swba_attention's arguments that passed its checks, which read nothing else.
_CHECKED = CheckedSignatures()


def not_supported_reasons(q: object, k: object, v: object, block_size: object, window: object,
                          scale: object = None) -> list[str]:
    """Why `swba_attention(q, k, v, block_size, window, scale=scale)` would be refused; empty if it runs."""
    return [str(r) for r in _reasons(q, k, v, block_size, window, scale)]


def swba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    window: int,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block sliding-window attention, fused forward and backward.

    Token t belongs to block t // block_size. A query in block i attends to every key in blocks j
    with i - window < j <= i: its own block (in full) and the window - 1 blocks before it.

    Args:
        q: [B, H, Nq, D] queries, the last Nq tokens of the sequence (Nq = Nk when training).
        k, v: [B, Hk, Nk, D] keys and values of all Nk >= Nq tokens so far; H a multiple of Hk
            (grouped-query / multi-query attention). Any strides; fp16, bf16 or fp32; D <= 256.
        block_size: tokens per block (e.g. tokens per video frame), >= 1; the last block may be partial.
        window: number of blocks a query sees, its own included, >= 1 (>= the number of blocks: block-causal).
        scale: softmax scale, default 1/sqrt(D).
        return_lse: also return the natural-log log-sum-exp of each query's scaled scores.

    Returns:
        out [B, H, Nq, D] in q's dtype, or (out, lse [B, H, Nq] fp32) when return_lse. Both are differentiable.
    """
    signature = call_signature(q, k, v, block_size, window, scale, return_lse)
    if signature not in _CHECKED:  # the checks depend on nothing but the signature: once per signature
        reasons = _reasons(q, k, v, block_size, window, scale)
        if not isinstance(return_lse, bool):
            reasons.append(Reason(f"return_lse must be a bool, got {type(return_lse).__name__} {return_lse!r}",
                                  TypeError))
        raise_if_unsupported("swba_attention", reasons)
        _CHECKED.add(signature)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = swba_fwd(q, k, v, block_size, window, scale)
    if return_lse:
        return out, lse
    return out

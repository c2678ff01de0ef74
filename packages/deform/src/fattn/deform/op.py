"""Custom ops `fattn::deform_fwd` / `fattn::deform_bwd`, their autograd, and the public function."""

from __future__ import annotations

import math
import struct
from typing import Optional

import torch
import triton.language as tl

from fattn.core import (
    CheckedSignatures,
    Reason,
    call_signature,
    choice_reasons,
    empty,
    fused_op,
    head_dim_reasons,
    int_reasons,
    raise_if_unsupported,
    register_autograd,
    same_device_reasons,
    same_dtype_reasons,
    shape_reasons,
    tensor_reasons,
)
from fattn.core.launch import launcher
from fattn.core.runtime import cdiv, next_power_of_2

from .kernels import _corner_keys_kernel, _deform_bwd_dkdv_kernel, _deform_bwd_kernel, _deform_fwd_kernel

__all__ = ["deform_attention", "deform_fwd", "deform_bwd", "not_supported_reasons"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PADDING_MODES = ("zeros", "border")
_MAX_HEAD_DIM = 256


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tl_acc(x: torch.Tensor) -> tl.dtype:
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _vis_arg(visibility: Optional[torch.Tensor], coords: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """uint8 view of the visibility mask and its strides (a dummy when there is none)."""
    if visibility is None:
        return coords, (0, 0, 0, 0)
    vis = visibility.view(torch.uint8) if visibility.dtype == torch.bool else visibility
    return vis, tuple(vis.stride())


def _needs_64bit_offsets(*maps: torch.Tensor) -> bool:
    """Whether element offsets inside one (batch, head) slice of K / V can pass int32 (the kernels
    compute them in int32 otherwise: cheaper gathers)."""
    for x in maps:
        _, T, _, HW, D = x.shape
        st, sp, sd = x.stride(1), x.stride(3), x.stride(4)
        if (T - 1) * st + (HW + 1) * sp + (D - 1) * sd + 2 * sp >= 2**31 - 1:
            return True
    return False


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
def split_scale(scale: float) -> tuple[float, float]:
    """`scale` as (hi, lo), both exact in fp32, hi + lo = scale to ~48 bits: the kernels take Python floats as
    fp32, and their fp64 path rebuilds the full scale from the two (kernels._softmax_scales)."""
    hi = struct.unpack("f", struct.pack("f", scale))[0]
    return hi, struct.unpack("f", struct.pack("f", scale - hi))[0]


def _fwd_fake(q, k, v, coords, visibility, width, height, scale, border, align_corners, deterministic):  # type: ignore[no-untyped-def]
    B, S, H, Lq, D = q.shape
    out = q.new_empty((B, S, H, Lq, D))
    lse = q.new_empty((B, S, H, Lq), dtype=_acc_dtype(q))
    return out, lse


@fused_op("deform_fwd", fake=_fwd_fake)
def deform_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coords: torch.Tensor,
    visibility: Optional[torch.Tensor],
    width: int,
    height: int,
    scale: float,
    border: bool,
    align_corners: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw forward launch (inputs already validated). Returns out [B, S, H, Lq, D] (contiguous) and the
    natural-log lse [B, S, H, Lq] (fp32; fp64 for fp64 inputs). `deterministic` only reaches the backward."""
    return _forward(q, k, v, coords, visibility, width, height, scale, border, align_corners)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coords: torch.Tensor,
             visibility: Optional[torch.Tensor], width: int, height: int, scale: float, border: bool,
             align_corners: bool) -> tuple[torch.Tensor, torch.Tensor]:
    B, S, H, Lq, D = q.shape
    T, P = coords.shape[3], coords.shape[4]
    out = empty((B, S, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = empty((B, S, H, Lq), dtype=_acc_dtype(q), device=q.device)
    vis, vis_strides = _vis_arg(visibility, coords)
    tensors = (q, k, v, coords, vis, out, lse)

    def build() -> tuple:  # what the signature fixes: built once per signature (FastLauncher.launch_planned)
        def grid(meta):  # type: ignore[no-untyped-def]
            return (cdiv(Lq, meta["BLOCK_M"]) * B * S * H,)

        args = (*tensors, *q.stride(), *k.stride(), *v.stride(), *coords.stride(), *vis_strides,
                S, H, Lq, T, P, D, width, height, *split_scale(scale))
        return grid, args, dict(
            BLOCK_D=next_power_of_2(D), EVEN_D=next_power_of_2(D) == D, ALIGN_CORNERS=align_corners, BORDER=border,
            HAS_VIS=visibility is not None, OFFSETS_64=_needs_64bit_offsets(k, v), ACC_DTYPE=_tl_acc(q))

    signature = call_signature(q, k, v, coords, visibility, width, height, scale, border, align_corners)
    launcher(_deform_fwd_kernel).launch_planned(signature, tensors, build)
    return out, lse


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
def _bwd_fake(grad_out, q, k, v, coords, visibility, out, lse, width, height, scale, border, align_corners,  # type: ignore[no-untyped-def]
              deterministic, need_dcoords):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), coords.new_empty(coords.shape))


def _row_alignment(*xs: torch.Tensor) -> int:
    """The largest of 16, 8, 4, 2, 1 dividing every row start (batch / group / head / query strides, data
    pointers in elements) of xs: lets the dK / dV gather use vector loads on rows found through a table."""
    for align in (16, 8, 4, 2):
        if all(x.data_ptr() % (align * x.element_size()) == 0 and all(st % align == 0 for st in x.stride()[:4])
               for x in xs):
            return align
    return 1


def dkdv_block_e(block_d: int, dtype: torch.dtype) -> int:
    """Entries per step of the dK / dV gather: [BLOCK_E, BLOCK_D] tiles of ~16 fp32 elements a thread."""
    return max(8, min(64, (1024 if dtype == torch.float64 else 4096) // block_d))


def _corner_entries(coords: torch.Tensor, q: torch.Tensor, grad_out: torch.Tensor, width: int, height: int,
                    border: bool, align_corners: bool, acc: torch.dtype,
                    signature: tuple | None) -> tuple[torch.Tensor, ...]:
    """Every (sample, corner) as a CSR list sorted by the pixel it touches, for the deterministic dK / dV:
    order (entry indices 4 * sample + corner sorted by pixel, stable), weights per entry (unsorted), the
    offsets of each sample's query row in q and grad_out (head 0), and offsets [B*T*HW + 1] into order.
    `signature`: the backward call's (fixes every launch argument but the tensors)."""
    B, S, Lq, T, P, _ = coords.shape
    n_samples = B * S * Lq * T * P
    sentinel = B * T * width * height
    dev = coords.device
    # int32 sort keys when they fit: a radix sort of half the passes.
    key = empty((n_samples * 4,), dtype=torch.int32 if sentinel < 2**31 - 1 else torch.int64, device=dev)
    weight = empty((n_samples * 4,), dtype=acc, device=dev)
    q_off = empty((n_samples,), dtype=torch.int64, device=dev)
    g_off = empty((n_samples,), dtype=torch.int64, device=dev)
    tensors = (coords.contiguous(), key, weight, q_off, g_off)

    def build() -> tuple:
        block = 256
        args = (*tensors, q.stride(0), q.stride(1), q.stride(3), grad_out.stride(0), grad_out.stride(1),
                grad_out.stride(3), n_samples, S * Lq * T * P, Lq, T, P, width, height, sentinel)
        return (cdiv(n_samples, block),), args, dict(
            ALIGN_CORNERS=align_corners, BORDER=border, ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32,
            BLOCK=block, num_warps=4)

    launcher(_corner_keys_kernel).launch_planned(signature, tensors, build)
    sorted_key, order = torch.sort(key, stable=True)
    offsets = torch.searchsorted(sorted_key, torch.arange(sentinel + 1, device=dev, dtype=key.dtype))
    return order, weight, q_off, g_off, offsets


@fused_op("deform_bwd", fake=_bwd_fake)
def deform_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coords: torch.Tensor,
    visibility: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    width: int,
    height: int,
    scale: float,
    border: bool,
    align_corners: bool,
    deterministic: bool,
    need_dcoords: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw backward launch. Returns (dq, dk, dv, dcoords), contiguous, in the inputs' dtypes."""
    B, S, H, Lq, D = q.shape
    T, P = coords.shape[3], coords.shape[4]
    HW = width * height
    acc = _acc_dtype(q)
    dev = q.device
    vis, vis_strides = _vis_arg(visibility, coords)
    # One signature for the three launches. The dK / dV gather's vector width also follows the row
    # starts' alignment in memory (_row_alignment), which the shapes and strides do not fix.
    row_align = _row_alignment(q, grad_out)
    signature = call_signature(grad_out, q, k, v, coords, visibility, out, lse, width, height, scale, border,
                               align_corners, need_dcoords, row_align)
    out = out.contiguous()
    lse = lse.contiguous()
    dq = empty(q.shape, dtype=q.dtype, device=dev)
    # Every output element is written exactly once: no zeroing, no atomics, the same bits every run
    # (a gather per pixel was 2-3x faster than scattering dK / dV with fp32 atomics on an H200).
    dk = empty(k.shape, dtype=k.dtype, device=dev)
    dv = empty(v.shape, dtype=v.dtype, device=dev)
    dc = empty((H if need_dcoords else 1, *coords.shape), dtype=acc, device=dev)
    ds = empty((B, H, S, Lq, T * P), dtype=acc, device=dev)
    pr = empty((B, H, S, Lq, T * P), dtype=acc, device=dev)
    block_d = next_power_of_2(D)
    bwd_tensors = (q, k, v, coords, vis, out, grad_out, lse, dq, dc, ds, pr)

    def build_bwd() -> tuple:
        def grid(meta):  # type: ignore[no-untyped-def]
            return (cdiv(Lq, meta["BLOCK_M"]) * B * S * H,)

        args = (*bwd_tensors, *q.stride(), *k.stride(), *v.stride(), *coords.stride(), *vis_strides,
                *grad_out.stride(), dc.stride(0), S, H, Lq, T, P, D, width, height, *split_scale(scale))
        return grid, args, dict(
            BLOCK_D=block_d, EVEN_D=block_d == D, ALIGN_CORNERS=align_corners, BORDER=border,
            HAS_VIS=visibility is not None, NEED_DCOORDS=need_dcoords, OFFSETS_64=_needs_64bit_offsets(k, v),
            ACC_DTYPE=_tl_acc(q))

    launcher(_deform_bwd_kernel).launch_planned(signature, bwd_tensors, build_bwd)
    order, weight, q_off, g_off, offsets = _corner_entries(coords, q, grad_out, width, height, border,
                                                           align_corners, acc, signature)
    dkdv_tensors = (q, grad_out, ds, pr, order, weight, q_off, g_off, offsets, dk, dv)

    def build_dkdv() -> tuple:
        args = (*dkdv_tensors, q.stride(2), q.stride(4), grad_out.stride(2), grad_out.stride(4),
                S, H, Lq, T, HW, T * P, D, *split_scale(scale))
        return (B * T * HW * H,), args, dict(
            BLOCK_D=block_d, EVEN_D=block_d == D, BLOCK_E=dkdv_block_e(block_d, q.dtype), ROW_ALIGN=row_align,
            ACC_DTYPE=_tl_acc(q), num_warps=4)

    launcher(_deform_bwd_dkdv_kernel).launch_planned(signature, dkdv_tensors, build_dkdv)
    dcoords = dc.sum(0) if need_dcoords else torch.zeros(coords.shape, dtype=acc, device=dev)
    return dq, dk, dv, dcoords.to(coords.dtype)


def _setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
    q, k, v, coords, visibility, width, height, scale, border, align_corners, deterministic = inputs
    out, lse = output
    # lse (kept for the backward) never has a gradient: without this, autograd would fill a zeros
    # tensor for it on its device thread before every backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, coords, visibility, out, lse)
    ctx.params = (width, height, scale, border, align_corners, deterministic)


def _backward(ctx, grad_out, grad_lse):  # type: ignore[no-untyped-def]
    q, k, v, coords, visibility, out, lse = ctx.saved_tensors
    if grad_out is None:  # (only through the custom op's lse, which the public function never returns)
        grad_out = torch.zeros_like(out)
    width, height, scale, border, align_corners, deterministic = ctx.params
    dq, dk, dv, dcoords = deform_bwd(grad_out, q, k, v, coords, visibility, out, lse, width, height, scale, border,
                                     align_corners, deterministic, bool(ctx.needs_input_grad[3]))
    return dq, dk, dv, (dcoords if ctx.needs_input_grad[3] else None), None, None, None, None, None, None, None


register_autograd(deform_fwd, setup_context=_setup_context, backward=_backward)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def not_supported_reasons(
    q: object,
    k: object,
    v: object,
    coords: object,
    width: object,
    height: object,
    *,
    scale: object = None,
    padding_mode: object = "zeros",
    align_corners: object = True,
    visibility: object = None,
    deterministic: object = False,
) -> list[Reason]:
    """Everything wrong with these inputs (empty when `deform_attention` supports them)."""
    reasons: list[Reason] = []
    reasons += tensor_reasons("q", q, ndim=5, dtypes=_DTYPES)
    reasons += tensor_reasons("k", k, ndim=5, dtypes=_DTYPES)
    reasons += tensor_reasons("v", v, ndim=5, dtypes=_DTYPES)
    reasons += tensor_reasons("coords", coords, ndim=6, dtypes=_DTYPES)
    reasons += int_reasons("width", width, minimum=1)
    reasons += int_reasons("height", height, minimum=1)
    reasons += choice_reasons("padding_mode", padding_mode, _PADDING_MODES)
    if not isinstance(align_corners, bool):
        reasons.append(Reason(f"align_corners must be a bool, got {type(align_corners).__name__}", TypeError))
    if not isinstance(deterministic, bool):
        reasons.append(Reason(f"deterministic must be a bool, got {type(deterministic).__name__}", TypeError))
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        reasons.append(Reason(f"scale must be a finite float or None, got {scale!r}", TypeError))
    if visibility is not None:
        reasons += tensor_reasons("visibility", visibility, ndim=4, dtypes=(torch.bool,))
    if reasons:
        return reasons  # shapes below need well-formed tensors

    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    assert isinstance(coords, torch.Tensor) and isinstance(width, int) and isinstance(height, int)
    B, S, H, Lq, D = q.shape
    T = k.shape[1]
    reasons += same_device_reasons(q=q, k=k, v=v, coords=coords, visibility=visibility)  # type: ignore[arg-type]
    reasons += same_dtype_reasons(q=q, k=k, v=v)
    if coords.dtype not in (q.dtype, torch.float32):
        reasons.append(Reason(f"coords must be float32 or q's dtype ({q.dtype}), got {coords.dtype}", TypeError))
    reasons += head_dim_reasons("q", D, maximum=_MAX_HEAD_DIM)
    hw = width * height
    reasons += shape_reasons("k", k, [B, None, H, hw, D], "[B, T, H, height*width, D] (q is [B, S, H, Lq, D])")
    if k.shape[3] != hw:
        reasons.append(Reason(f"k has {k.shape[3]} pixels per view (dim 3) but height*width = {height}*{width} = {hw}"))
    reasons += shape_reasons("v", v, list(k.shape), "[B, T, H, height*width, D], the shape of k")
    reasons += shape_reasons("coords", coords, [B, S, Lq, T, None, 2], "[B, S, Lq, T, P, 2] (x, y) in [0, 1]")
    if coords.shape[4] < 1:
        reasons.append(Reason("coords must have at least one sampling point (dim 4 = P >= 1)"))
    if visibility is not None:
        assert isinstance(visibility, torch.Tensor)
        reasons += shape_reasons("visibility", visibility, [B, S, Lq, T], "[B, S, Lq, T]")
    n_corners = 4 * B * S * Lq * T * coords.shape[4]
    if n_corners >= 2**31:
        reasons.append(Reason(f"too many sampling points: 4 * B * S * Lq * T * P = {n_corners} must be < 2**31 "
                              "(the backward indexes every sample corner in int32); split the batch"))
    k_rows = B * k.shape[1] * H * hw
    if k_rows >= 2**31:
        reasons.append(Reason(f"k has B * T * H * height*width = {k_rows} rows; must be < 2**31 (the backward "
                              "runs one program per row); split the batch"))
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.numel() == 0:
            reasons.append(Reason(f"{name} must not be empty, got shape {list(t.shape)}"))
    return reasons


# Signatures (fattn.core.call_signature: shapes, strides, dtypes, devices, scalar values) of
# deform_attention's arguments that passed not_supported_reasons, which reads nothing else.
_CHECKED = CheckedSignatures()


def deform_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coords: torch.Tensor,
    width: int,
    height: int,
    *,
    scale: float | None = None,
    padding_mode: str = "zeros",
    align_corners: bool = True,
    visibility: torch.Tensor | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """Multi-view deformable attention with bilinear sampling fused into flash attention.

    Args:
        q: [B, S, H, Lq, D] queries (S query groups of Lq queries each).
        k, v: [B, T, H, height*width, D] keys and values: T views, each a row-major height x width map.
        coords: [B, S, Lq, T, P, 2] sampling points (x, y) in [0, 1] per query, view and point, shared by
            all heads; float32 or q's dtype. Differentiable.
        width, height: the size of every view's map.
        scale: softmax scale (default 1/sqrt(D)).
        padding_mode: "zeros" (samples outside read zeros) or "border" (clamped), as in grid_sample.
        align_corners: as in grid_sample: True maps x to pixel x*(width-1), False to x*width - 0.5.
        visibility: optional bool [B, S, Lq, T]; False drops every point of that view from the query's
            softmax. A query that sees no view outputs zeros.
        deterministic: accepted for compatibility: the backward is always deterministic (bit-identical
            gradients every run, no atomics), which is also its fastest path.

    Returns:
        [B, S, H, Lq, D] in q's dtype: softmax(scale * q . key_(t,p)) @ value_(t,p) over the T*P samples,
        where key_(t,p) = grid_sample(k[:, t], 2 * coords[..., t, p, :] - 1) and likewise for v.

    fp16, bf16, fp32 and fp64 inputs (q, k, v of one dtype); head dims 1..256; any strides.
    """
    signature = call_signature(q, k, v, coords, width, height, scale, padding_mode, align_corners, visibility,
                               deterministic)
    if signature not in _CHECKED:  # the checks depend on nothing but the signature: once per signature
        raise_if_unsupported("deform_attention", not_supported_reasons(
            q, k, v, coords, width, height, scale=scale, padding_mode=padding_mode, align_corners=align_corners,
            visibility=visibility, deterministic=deterministic))
        _CHECKED.add(signature)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    out, _ = deform_fwd(q, k, v, coords, visibility, width, height, sm_scale, padding_mode == "border",
                        align_corners, deterministic)
    return out

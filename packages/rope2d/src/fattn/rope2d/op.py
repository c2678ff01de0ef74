"""Custom ops `fattn::rope2d_fwd` / `fattn::rope2d_bwd`, their autograd, and the public functions."""

from __future__ import annotations

import math

import torch

from fattn.core import (
    CheckedSignatures,
    Reason,
    TensorCache,
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
from fattn.rope2d.kernels import rope2d_bwd_launch, rope2d_fwd_launch

__all__ = ["rope2d_attention", "axial_angles", "not_supported_reasons", "rope2d_fwd", "rope2d_bwd"]

PAIRINGS = ("interleaved", "half")
AXIS_ORDERS = ("xy", "ij")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


# cos / sin tables per angle table: a ViT passes the same angles to every block, forward and backward,
# so they are computed once (two launches and their host time saved per call). An in-place change of
# the angles or another tensor computes them again; inference tensors (no version counter) every call.
_TABLES: TensorCache[tuple[torch.Tensor, torch.Tensor]] = TensorCache()


def _cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 contiguous cos and sin tables; fp64 tables keep their precision until the final rounding."""
    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        a = angles.detach()
        a = a if a.dtype == torch.float64 else a.float()
        return a.cos().float().contiguous(), a.sin().float().contiguous()

    return _TABLES.get_or_compute((angles,), None, compute)


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------
def _fwd_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angles: torch.Tensor, n_prefix: int,
              pairing: str, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, N, _ = q.shape
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((B, H, N), dtype=torch.float32, device=q.device))


@fused_op("rope2d_fwd", fake=_fwd_fake)
def rope2d_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angles: torch.Tensor, n_prefix: int,
               pairing: str, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, N, D] in q's dtype, lse [B, H, N] fp32 natural-log log-sum-exp of the scaled scores)."""
    B, H, N, _ = q.shape
    out = empty(q.shape, dtype=q.dtype, device=q.device)
    lse = empty((B, H, N), dtype=torch.float32, device=q.device)
    cos, sin = _cos_sin(angles)
    rope2d_fwd_launch(q, k, v, cos, sin, out, lse, n_prefix, pairing, scale)
    return out, lse


def _bwd_fake(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angles: torch.Tensor,
              out: torch.Tensor, lse: torch.Tensor, n_prefix: int, pairing: str,
              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))  # type: ignore[return-value]


@fused_op("rope2d_bwd", fake=_bwd_fake)
def rope2d_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angles: torch.Tensor,
               out: torch.Tensor, lse: torch.Tensor, n_prefix: int, pairing: str,
               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each [B, H, N, D] in the unrotated basis of the inputs."""
    B, H, N, _ = q.shape
    out = out.contiguous()
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dk = empty(k.shape, dtype=k.dtype, device=k.device)
    dv = empty(v.shape, dtype=v.dtype, device=v.device)
    delta = empty((B, H, N), dtype=torch.float32, device=q.device)
    cos, sin = _cos_sin(angles)
    rope2d_bwd_launch(q, k, v, cos, sin, out, lse.contiguous(), grad_out.to(q.dtype), dq, dk, dv, delta,
                      n_prefix, pairing, scale)
    return dq, dk, dv


def _setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
    q, k, v, angles, n_prefix, pairing, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    # lse's gradient arrives as None instead of a zeros tensor that autograd would fill on its device
    # thread before every backward.
    ctx.set_materialize_grads(False)
    ctx.n_prefix, ctx.pairing, ctx.scale = n_prefix, pairing, scale
    ctx.save_for_backward(q, k, v, angles, out, lse)


def _backward(ctx, grad_out, _grad_lse):  # type: ignore[no-untyped-def]
    q, k, v, angles, out, lse = ctx.saved_tensors
    if grad_out is None:  # (only when the output itself reached no loss)
        grad_out = torch.zeros_like(out)
    dq, dk, dv = rope2d_bwd(grad_out, q, k, v, angles, out, lse, ctx.n_prefix, ctx.pairing, ctx.scale)
    return dq, dk, dv, None, None, None, None


register_autograd(rope2d_fwd, setup_context=_setup_context, backward=_backward)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _reasons(q: object, k: object, v: object, angles: object, n_prefix: object, pairing: object,
             scale: object) -> list[Reason]:
    out: list[Reason] = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        out += tensor_reasons(name, t, ndim=4, dtypes=DTYPES)
    out += tensor_reasons("angles", angles, ndim=2, dtypes=(torch.float32, torch.float64, torch.float16,
                                                            torch.bfloat16))
    out += int_reasons("n_prefix", n_prefix, minimum=0)
    out += choice_reasons("pairing", pairing, PAIRINGS)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        out.append(Reason(f"scale must be a finite float or None, got {scale!r}", TypeError))
    if out or not all(isinstance(t, torch.Tensor) for t in (q, k, v, angles)):
        return out
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    assert isinstance(angles, torch.Tensor) and isinstance(n_prefix, int)
    out += same_dtype_reasons(q=q, k=k, v=v)
    out += same_device_reasons(q=q, k=k, v=v, angles=angles)
    B, H, N, D = q.shape
    out += shape_reasons("k", k, [B, H, N, D], "[B, H, N, D] like q")
    out += shape_reasons("v", v, [B, H, N, D], "[B, H, N, D] like q")
    out += head_dim_reasons("q", D, maximum=MAX_HEAD_DIM, multiple_of=4)
    if D % 4 == 0 and angles.shape[-1] != D // 2:
        out.append(Reason(f"angles must have shape [height*width, D/2] = [*, {D // 2}] for head dim D={D}, "
                          f"got {list(angles.shape)}"))
    if n_prefix > N:
        out.append(Reason(f"n_prefix must be <= N (q has N={N} tokens), got {n_prefix}"))
    elif angles.shape[0] != N - n_prefix:
        out.append(Reason(f"N must equal n_prefix + height*width: q has N={N} tokens and n_prefix={n_prefix}, so "
                          f"angles needs {N - n_prefix} rows (one per patch), got {angles.shape[0]} rows"))
    if angles.requires_grad and torch.is_grad_enabled():
        out.append(Reason("angles requires grad, but gradients with respect to the angle table are not "
                          "supported; pass angles.detach()"))
    return out


# Signatures (fattn.core.call_signature) of rope2d_attention's arguments whose checks passed.
_CHECKED = CheckedSignatures()


def not_supported_reasons(q: object, k: object, v: object, angles: object, *, n_prefix: object = 0,
                          pairing: object = "interleaved", scale: object = None) -> list[str]:
    """Why `rope2d_attention(q, k, v, angles, ...)` would reject these inputs (empty list: supported)."""
    return [r.message for r in _reasons(q, k, v, angles, n_prefix, pairing, scale)]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def rope2d_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angles: torch.Tensor, *,
                     n_prefix: int = 0, pairing: str = "interleaved", scale: float | None = None) -> torch.Tensor:
    """Softmax attention with 2D RoPE applied to q and k inside the kernel.

    Args:
        q, k, v: [B, H, N, D], fp16 / bf16 / fp32 (any strides, e.g. views of a fused qkv projection).
            N = n_prefix + height*width; D a multiple of 4, at most 256.
        angles: [height*width, D/2] rotation angle of each channel pair at each patch (row-major grid),
            e.g. from `axial_angles`; fp32 (fp64 accepted). Not differentiated.
        n_prefix: leading tokens (class, registers) that are not rotated.
        pairing: "interleaved" pairs channels (2c, 2c+1) (timm, RoPE-ViT); "half" pairs (c, c + D/2)
            (rotate-half, DINOv3). A pair (a, b) becomes (a cos - b sin, a sin + b cos).
        scale: softmax scale, default 1/sqrt(D).

    Returns:
        [B, H, N, D] in the input dtype (fp32 accumulation). Differentiable in q, k and v.
    """
    signature = call_signature(q, k, v, angles, n_prefix, pairing, scale, torch.is_grad_enabled())
    if signature not in _CHECKED:  # the checks depend on nothing else: once per signature
        raise_if_unsupported("rope2d_attention", _reasons(q, k, v, angles, n_prefix, pairing, scale))
        _CHECKED.add(signature)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = rope2d_fwd(q, k, v, angles, n_prefix, pairing, scale)
    return out


def axial_angles(height: int, width: int, head_dim: int, *, base: float = 100.0, axis_order: str = "xy",
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Axial 2D RoPE angle table, [height*width, head_dim/2] fp32 (patches row-major).

    Pair j < D/4 rotates by `x * base**(-j/(D/4))` and pair D/4 + j by `y * base**(-j/(D/4))`, where
    (x, y) is the patch's (column, row), with axis_order="xy" (timm's RoPE-ViT); "ij" swaps the axes.
    Computed in float64, rounded once to fp32.
    """
    reasons = int_reasons("height", height, minimum=1) + int_reasons("width", width, minimum=1)
    reasons += int_reasons("head_dim", head_dim, minimum=4)
    if not reasons:
        reasons += head_dim_reasons("head_dim", head_dim, maximum=MAX_HEAD_DIM, multiple_of=4)
    reasons += choice_reasons("axis_order", axis_order, AXIS_ORDERS)
    if isinstance(base, bool) or not isinstance(base, (int, float)):
        reasons.append(Reason(f"base must be a positive float, got {type(base).__name__} {base!r}", TypeError))
    elif not base > 0:
        reasons.append(Reason(f"base must be a positive float, got {base!r}"))
    raise_if_unsupported("axial_angles", reasons)
    from fattn.rope2d.reference import axial_angles_reference

    return axial_angles_reference(height, width, head_dim, base=float(base), axis_order=axis_order,
                                  dtype=torch.float64, device=device).float()

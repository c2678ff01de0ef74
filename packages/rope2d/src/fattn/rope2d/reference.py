"""Plain-PyTorch reference of `rope2d_attention`: rotate q and k, then softmax attention.

Works in any floating dtype (tests run it in float64 as the truth and in the input dtype to measure
PyTorch's own low-precision error). It is also the "RoPE in PyTorch + SDPA" baseline the benchmarks
compile.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["axial_angles_reference", "apply_rope2d", "rope2d_attention_reference"]


def axial_angles_reference(height: int, width: int, head_dim: int, *, base: float = 100.0,
                           axis_order: str = "xy", dtype: torch.dtype = torch.float64,
                           device: torch.device | str | None = None) -> torch.Tensor:
    """The axial angle table [height*width, head_dim/2], written out (see `fattn.rope2d.axial_angles`)."""
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    patch = torch.arange(height * width, device=device)
    x = (patch % width).to(torch.float64)
    y = torch.div(patch, width, rounding_mode="floor").to(torch.float64)
    first, second = (x, y) if axis_order == "xy" else (y, x)
    table = torch.cat([first[:, None] * freqs[None, :], second[:, None] * freqs[None, :]], dim=1)
    return table.to(dtype)


def apply_rope2d(x: torch.Tensor, angles: torch.Tensor, *, n_prefix: int = 0,
                 pairing: str = "interleaved") -> torch.Tensor:
    """Rotate the patch tokens of x [..., N, D] by angles [N - n_prefix, D/2]; prefix tokens pass unchanged.

    The math is done in x's dtype (cos/sin of the fp32/fp64 table cast to it), as a user's PyTorch
    code would.
    """
    d = x.shape[-1]
    cos = angles.cos().to(x.dtype)
    sin = angles.sin().to(x.dtype)
    prefix, patches = x[..., :n_prefix, :], x[..., n_prefix:, :]
    if pairing == "interleaved":
        a, b = patches[..., 0::2], patches[..., 1::2]
        rot = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    else:
        a, b = patches[..., : d // 2], patches[..., d // 2:]
        rot = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return torch.cat([prefix, rot], dim=-2)


def rope2d_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angles: torch.Tensor, *,
                               n_prefix: int = 0, pairing: str = "interleaved",
                               scale: float | None = None) -> torch.Tensor:
    """softmax(rope(q) rope(k)^T * scale) v with q, k, v [B, H, N, D] and angles [N - n_prefix, D/2]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qr = apply_rope2d(q, angles, n_prefix=n_prefix, pairing=pairing)
    kr = apply_rope2d(k, angles, n_prefix=n_prefix, pairing=pairing)
    if q.dtype == torch.float64:
        # explicit math: SDPA has no float64 kernel on every backend
        return torch.softmax((qr @ kr.transpose(-1, -2)) * scale, dim=-1) @ v
    return F.scaled_dot_product_attention(qr, kr, v, scale=scale)

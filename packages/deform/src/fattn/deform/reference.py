"""Plain-PyTorch multi-view deformable attention: `grid_sample` into a materialized tensor, then softmax.

This is the definition the fused kernel is tested against (it runs in float64 too), and the
"unfused" baseline of the benchmarks. It materializes [B, H, S, Lq, T, P, D] sampled keys and values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["deform_attention_reference", "sample_views"]


def sample_views(maps: torch.Tensor, coords: torch.Tensor, width: int, height: int, *,
                 padding_mode: str = "zeros", align_corners: bool = True) -> torch.Tensor:
    """Bilinear samples of every view's map at every query's points.

    maps [B, T, H, height*width, D], coords [B, S, Lq, T, P, 2] in [0, 1] -> [B, H, S, Lq, T, P, D].
    """
    B, T, H, _, D = maps.shape
    _, S, Lq, _, P, _ = coords.shape
    samples = []
    for t in range(T):
        image = maps[:, t].permute(0, 1, 3, 2).reshape(B * H, D, height, width)  # [B*H, D, height, width]
        grid = coords[:, :, :, t].reshape(B, 1, S * Lq, P, 2).expand(B, H, S * Lq, P, 2)
        grid = grid.reshape(B * H, S * Lq, P, 2).to(maps.dtype) * 2 - 1
        sampled = F.grid_sample(image, grid, mode="bilinear", padding_mode=padding_mode, align_corners=align_corners)
        samples.append(sampled.reshape(B, H, D, S, Lq, P))  # [B, H, D, S, Lq, P]
    return torch.stack(samples, dim=-1).permute(0, 1, 3, 4, 6, 5, 2)  # [B, H, S, Lq, T, P, D]


def deform_attention_reference(
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
) -> torch.Tensor:
    """Same contract as `fattn.deform.deform_attention`; returns [B, S, H, Lq, D] in q's dtype."""
    B, S, H, Lq, D = q.shape
    T, P = coords.shape[3], coords.shape[4]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    keys = sample_views(k, coords, width, height, padding_mode=padding_mode, align_corners=align_corners)
    values = sample_views(v, coords, width, height, padding_mode=padding_mode, align_corners=align_corners)
    keys = keys.reshape(B, H, S, Lq, T * P, D)
    values = values.reshape(B, H, S, Lq, T * P, D)
    scores = torch.einsum("bshld,bhslnd->bhsln", q, keys) * scale
    if visibility is not None:
        seen = visibility.permute(0, 1, 2, 3)[:, None, :, :, :, None].expand(B, H, S, Lq, T, P).reshape(B, H, S, Lq, T * P)
        any_seen = seen.any(dim=-1, keepdim=True)
        # A query that sees no view gets zeros; keep its softmax finite so gradients stay finite.
        scores = scores.masked_fill(~seen, float("-inf")).masked_fill(~any_seen, 0.0)
        probs = torch.softmax(scores, dim=-1) * any_seen
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhsln,bhslnd->bshld", probs, values)
    return out.to(q.dtype)

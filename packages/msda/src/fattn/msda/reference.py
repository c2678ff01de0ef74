"""Plain-PyTorch multiscale deformable attention: the per-level `grid_sample` formulation.

Works in any dtype `grid_sample` supports (float64 for the truth in tests); differentiable with
respect to value, sampling_locations and attention_weights. Slow and memory-hungry (it materializes
every sampled value): for testing and as a benchmark baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn_reference", "ms_deform_attn_core_pytorch"]


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | Sequence[Sequence[int]],
    level_start_index: torch.Tensor | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    padding_mode: str = "zeros",
    align_corners: bool = False,
    deterministic: bool = False,
) -> torch.Tensor:
    """Same signature and result as `fattn.msda.ms_deform_attn`: [N, Lq, M * D].

    value [N, S, M, D]; spatial_shapes [L, 2] as (H, W); sampling_locations [N, Lq, M, L, P, 2] (x, y)
    in [0, 1]; attention_weights [N, Lq, M, L, P]. Locations and weights are cast to value's dtype.
    `level_start_index` and `deterministic` are accepted for signature compatibility only.
    """
    n, _, m, d = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    shapes = spatial_shapes.tolist() if isinstance(spatial_shapes, torch.Tensor) else [list(s) for s in spatial_shapes]
    loc = sampling_locations.to(value.dtype)
    attn = attention_weights.to(value.dtype)
    value_levels = value.split([int(h) * int(w) for h, w in shapes], dim=1)
    grids = 2 * loc - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        v = value_levels[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, int(h), int(w))
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode=padding_mode,
                                     align_corners=align_corners))  # [N*M, D, Lq, P]
    # [N, Lq, M, L, P] -> [N*M, 1, Lq, L*P]
    weights = attn.transpose(1, 2).reshape(n * m, 1, lq, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


def ms_deform_attn_core_pytorch(value: torch.Tensor, value_spatial_shapes: torch.Tensor,
                                sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Deformable DETR's name and signature for the same reference."""
    return ms_deform_attn_reference(value, value_spatial_shapes, None, sampling_locations, attention_weights)

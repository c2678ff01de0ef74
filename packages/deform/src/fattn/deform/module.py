"""`nn.Module` wrapper: multi-view deformable attention as multi-view detectors use it.

Each query has a reference point in every view (e.g. a 3D anchor projected into each camera);
a linear layer predicts P sampling offsets per view from the query, and the fused kernel attends over
the bilinear samples of all views' keys and values.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fattn.deform.op import deform_attention

__all__ = ["MultiViewDeformableAttention"]


class MultiViewDeformableAttention(nn.Module):
    """Queries attend to P learned points around their reference point in each of T views.

    Args:
        embed_dim: channels C of queries and features (C = num_heads * head_dim).
        num_heads: attention heads H.
        num_views: views (cameras) T.
        num_points: sampling points P per view.
        offset_scale: initial spread of the points, in pixels around the reference point.
        padding_mode, align_corners: as in `deform_attention` / grid_sample.
        deterministic: bit-reproducible backward.

    Forward:
        query [B, S, Lq, C]; reference_points [B, S, Lq, T, 2] (x, y) in [0, 1] per view;
        features [B, T, height*width, C] (keys and values, or pass `value` [B, T, height*width, C]);
        spatial_shape (height, width); visibility optional bool [B, S, Lq, T].
        Returns [B, S, Lq, C].
    """

    def __init__(self, embed_dim: int, num_heads: int, num_views: int, num_points: int, *,
                 offset_scale: float = 2.0, padding_mode: str = "zeros", align_corners: bool = True,
                 deterministic: bool = False, bias: bool = True) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.num_views, self.num_points = num_views, num_points
        self.head_dim = embed_dim // num_heads
        self.offset_scale = offset_scale
        self.padding_mode, self.align_corners, self.deterministic = padding_mode, align_corners, deterministic
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        # Offsets are shared by the heads (the kernel samples the same points for every head).
        self.sampling_offsets = nn.Linear(embed_dim, num_views * num_points * 2)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        # As in Deformable DETR: start from points spread on rings around the reference point.
        nn.init.zeros_(self.sampling_offsets.weight)
        P = self.num_points
        angle = torch.arange(P, dtype=torch.float32) * (2 * math.pi / max(P, 1))
        radius = 1.0 + torch.arange(P, dtype=torch.float32) // 8
        ring = torch.stack([angle.cos(), angle.sin()], -1) * radius[:, None] * self.offset_scale
        if P == 1:
            ring.zero_()
        self.sampling_offsets.bias.copy_(ring.expand(self.num_views, P, 2).reshape(-1))

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, features: torch.Tensor,
                spatial_shape: tuple[int, int], *, value: torch.Tensor | None = None,
                visibility: torch.Tensor | None = None) -> torch.Tensor:
        height, width = spatial_shape
        B, S, Lq, C = query.shape
        T, P, H, D = self.num_views, self.num_points, self.num_heads, self.head_dim
        if features.dim() != 4 or features.shape[1] != T or features.shape[-1] != C:
            raise ValueError(f"features must be [B, T={T}, height*width, C={C}], got {list(features.shape)}")
        if reference_points.shape != (B, S, Lq, T, 2):
            raise ValueError(f"reference_points must be [B, S, Lq, T, 2] = {[B, S, Lq, T, 2]}, "
                             f"got {list(reference_points.shape)}")
        HW = features.shape[2]
        value = features if value is None else value
        # Heads as views of the projections (no copies: the kernel takes any strides).
        q = self.q_proj(query).view(B, S, Lq, H, D).transpose(2, 3)
        k = self.k_proj(features).view(B, T, HW, H, D).transpose(2, 3)
        v = self.v_proj(value).view(B, T, HW, H, D).transpose(2, 3)
        # Offsets are in pixels; normalize by the map size.
        pixel = reference_points.new_tensor([1.0 / width, 1.0 / height])
        offsets = self.sampling_offsets(query).view(B, S, Lq, T, P, 2)
        coords = reference_points[:, :, :, :, None, :] + offsets * pixel
        coords = coords.to(torch.float32) if coords.dtype != q.dtype else coords
        out = deform_attention(q, k, v, coords, width, height, padding_mode=self.padding_mode,
                               align_corners=self.align_corners, visibility=visibility,
                               deterministic=self.deterministic)
        return self.out_proj(out.transpose(2, 3).reshape(B, S, Lq, C))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_views={self.num_views}, "
                f"num_points={self.num_points}, padding_mode={self.padding_mode!r}, "
                f"align_corners={self.align_corners}")

"""`MSDeformAttn`: Deformable DETR's module (same constructor, parameters, state-dict keys, forward)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fattn.msda.op import ms_deform_attn

__all__ = ["MSDeformAttn"]


class MSDeformAttn(nn.Module):
    """Multiscale deformable attention, a drop-in for Deformable DETR's `MSDeformAttn`.

    A Deformable DETR (or DINO, ...) checkpoint loads unchanged: the parameters are `sampling_offsets`,
    `attention_weights`, `value_proj` and `output_proj` (nn.Linear each) with the original shapes and
    initialization. Head dims need not be powers of two (no warning here).

    Args:
        d_model: hidden size C (divisible by n_heads).
        n_levels: feature levels L.
        n_heads: attention heads M.
        n_points: sampling points P per head and level.
        padding_mode / align_corners: sampling options, Deformable DETR's ("zeros", False) by default.
        deterministic: bit-identical backward on every run (slower value gradient).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4, *,
                 padding_mode: str = "zeros", align_corners: bool = False, deterministic: bool = False) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, but got {d_model} and {n_heads}")
        self.im2col_step = 64  # kept for attribute compatibility; unused
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.padding_mode = padding_mode
        self.align_corners = align_corners
        self.deterministic = deterministic

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight.data, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (grid_init / grid_init.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid_init = grid_init.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid_init[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias = nn.Parameter(grid_init.view(-1))
        nn.init.constant_(self.attention_weights.weight.data, 0.0)
        nn.init.constant_(self.attention_weights.bias.data, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight.data)
        nn.init.constant_(self.value_proj.bias.data, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight.data)
        nn.init.constant_(self.output_proj.bias.data, 0.0)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                input_spatial_shapes: torch.Tensor, input_level_start_index: torch.Tensor,
                input_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            query: [N, Lq, C].
            reference_points: [N, Lq, L, 2] points (x, y) in [0, 1], or [N, Lq, L, 4] boxes (x, y, w, h).
            input_flatten: [N, S, C], the levels flattened and concatenated.
            input_spatial_shapes: [L, 2] (H, W) per level; input_level_start_index: [L].
            input_padding_mask: [N, S] bool, True at padding positions (their values are zeroed).

        Returns:
            [N, Lq, C].
        """
        n, len_q, _ = query.shape
        _, len_in, _ = input_flatten.shape
        if reference_points.shape[-1] not in (2, 4):
            raise ValueError(f"reference_points: last dim must be 2 (points) or 4 (boxes), "
                             f"got shape {list(reference_points.shape)}")

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, len_in, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, len_q, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, len_q, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(n, len_q, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalize by (W, H), in that order.
            normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        else:
            locations = reference_points[:, :, None, :, None, :2] \
                + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
        output = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations, weights,
                                padding_mode=self.padding_mode, align_corners=self.align_corners,
                                deterministic=self.deterministic)
        return self.output_proj(output)

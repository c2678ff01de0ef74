"""`RoPE2dAttention`: a ViT attention block (qkv projection, 2D-RoPE attention, output projection)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from fattn.rope2d.op import AXIS_ORDERS, PAIRINGS, axial_angles, rope2d_attention

__all__ = ["RoPE2dAttention", "use_grid_size"]


class RoPE2dAttention(nn.Module):
    """Drop-in for timm's ViT `Attention` (same parameter names: `qkv`, `q_norm`, `k_norm`, `proj`) with
    2D axial RoPE on the patch tokens.

    forward(x [B, N, C], grid_size=(height, width) or None, angles=None) -> [B, N, C], where
    N = n_prefix + height*width. Without grid_size the module's `grid_size` attribute is used (set it,
    or use `use_grid_size(model, grid)` for every block of a model whose blocks call attention without
    one, as timm's `Block` does), else the grid is taken as square; `angles` ([height*width,
    head_dim/2]) overrides the axial table (DINOv3 / EVA-02 style tables, jitter).
    """

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, qk_norm: bool = False,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, n_prefix: int = 1,
                 pairing: str = "interleaved", base: float = 100.0, axis_order: str = "xy",
                 norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        if attn_drop:
            raise ValueError(f"attn_drop must be 0 (attention dropout is not fused), got {attn_drop}")
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
        if axis_order not in AXIS_ORDERS:
            raise ValueError(f"axis_order must be one of {AXIS_ORDERS}, got {axis_order!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        if self.head_dim % 4:
            raise ValueError(f"head dim dim/num_heads must be a multiple of 4 for 2D RoPE, got {self.head_dim}")
        self.scale = self.head_dim ** -0.5
        self.n_prefix, self.pairing, self.base, self.axis_order = n_prefix, pairing, base, axis_order
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.norm: nn.Module = nn.Identity()  # timm's optional scale_norm before the projection
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        # the grid of calls that pass none (see use_grid_size); None: square
        self.grid_size: tuple[int, int] | None = None
        # angle tables per (grid, device), so eager calls do not rebuild them in every layer and step
        self._angles_cache: dict[tuple[int, int, str], torch.Tensor] = {}

    @classmethod
    def from_timm(cls, attn: nn.Module, *, n_prefix: int = 1, pairing: str = "interleaved", base: float = 100.0,
                  axis_order: str = "xy") -> RoPE2dAttention:
        """Build from a timm `Attention` module, sharing its weights (qkv, q_norm, k_norm, proj)."""
        qkv: nn.Linear = attn.qkv  # type: ignore[assignment]
        dim = qkv.in_features
        new = cls(dim, attn.num_heads, qkv_bias=qkv.bias is not None, n_prefix=n_prefix,  # type: ignore[arg-type]
                  pairing=pairing, base=base, axis_order=axis_order)
        new.qkv = qkv
        new.q_norm = getattr(attn, "q_norm", nn.Identity())
        new.k_norm = getattr(attn, "k_norm", nn.Identity())
        new.norm = getattr(attn, "norm", nn.Identity())
        new.proj = attn.proj  # type: ignore[assignment]
        new.proj_drop = getattr(attn, "proj_drop", nn.Identity())
        new.scale = float(getattr(attn, "scale", new.scale))
        return new

    def _axial_angles(self, grid_size: tuple[int, int], dev: torch.device) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced once and folded into the graph: no cache needed
            return axial_angles(grid_size[0], grid_size[1], self.head_dim, base=self.base,
                                axis_order=self.axis_order, device=dev)
        key = (int(grid_size[0]), int(grid_size[1]), str(dev))
        table = self._angles_cache.get(key)
        if table is None:
            table = axial_angles(key[0], key[1], self.head_dim, base=self.base, axis_order=self.axis_order,
                                 device=dev)
            self._angles_cache[key] = table
        return table

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False, *,
                grid_size: tuple[int, int] | None = None, angles: torch.Tensor | None = None) -> torch.Tensor:
        # attn_mask / is_causal: what timm's Block passes its attention (timm >= 1.0.20); only their defaults.
        if attn_mask is not None:
            raise ValueError("attn_mask is not supported by RoPE2dAttention (full attention only); pass None")
        if is_causal is not False:
            raise ValueError(f"is_causal must be False: RoPE2dAttention is full (bidirectional) attention, "
                             f"got {is_causal!r}")
        B, N, C = x.shape
        if angles is None:
            if grid_size is None:
                grid_size = self.grid_size
            if grid_size is None:
                side = math.isqrt(max(N - self.n_prefix, 0))
                if side * side != N - self.n_prefix:
                    raise ValueError(f"grid_size is required: N - n_prefix = {N} - {self.n_prefix} is not a square; "
                                     "pass grid_size=(height, width)")
                grid_size = (side, side)
            angles = self._axial_angles(grid_size, x.device)
        # [B, N, 3, H, Dh] -> three [B, H, N, Dh] strided views: the kernel reads them in place.
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = rope2d_attention(q, k, v, angles, n_prefix=self.n_prefix, pairing=self.pairing, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(self.norm(out)))


@contextlib.contextmanager
def use_grid_size(model: nn.Module, grid_size: tuple[int, int]) -> Iterator[None]:
    """Inside the `with` block, every `RoPE2dAttention` in `model` that is called without a grid_size
    uses `grid_size` = (height, width) of the patch grid: how non-square inputs run through a model
    whose blocks call their attention with no grid argument (timm's `Block`, `dynamic_img_size=True`).

        with use_grid_size(vit, (img_h // 16, img_w // 16)):
            out = vit(images)
    """
    if (not isinstance(grid_size, (tuple, list)) or len(grid_size) != 2
            or not all(type(g) is int and g >= 1 for g in grid_size)):
        raise ValueError(f"grid_size must be (height, width), two positive ints, got {grid_size!r}")
    blocks = [m for m in model.modules() if isinstance(m, RoPE2dAttention)]
    previous = [m.grid_size for m in blocks]
    for m in blocks:
        m.grid_size = (grid_size[0], grid_size[1])
    try:
        yield
    finally:
        for m, g in zip(blocks, previous):
            m.grid_size = g

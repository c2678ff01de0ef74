"""`nn.Module` wrapper: projections + block sliding-window attention, for video transformers."""

from __future__ import annotations

import torch
from torch import nn

from fattn.swba.op import swba_attention

__all__ = ["SlidingWindowBlockAttention"]


class SlidingWindowBlockAttention(nn.Module):
    """Multi-head self-attention over a token sequence cut into blocks (video frames).

    Each token attends to every token of its own frame and of the `window - 1` frames before it.
    Tokens are laid out frame after frame: x is [B, N, C] with N = frames * frame_size (the last
    frame may be partial). Supports grouped-query attention (`num_kv_heads`) and a KV cache for
    frame-by-frame autoregressive inference.

    Args:
        embed_dim: C, the model width.
        num_heads: query heads H; the head dim is C // H (at most 256).
        frame_size: tokens per frame, the attention block size.
        window: frames a token sees, its own included (>= the number of frames: block-causal).
        num_kv_heads: key/value heads (H a multiple of it); default H.
        bias: biases in the projections.
        qk_norm: RMS-normalize queries and keys per head (as in many recent video models).

    Shapes:
        forward(x [B, N, C]) -> [B, N, C].
        With `past_kv=(k, v)` ([B, Hk, Np, Dh] each, the cached keys/values of the Np earlier tokens),
        x holds the next N tokens; with `use_cache=True` the result is (out, (k, v)) with the cache
        extended by these tokens. Block ids count from the first cached token.
    """

    def __init__(self, embed_dim: int, num_heads: int, frame_size: int, window: int, *,
                 num_kv_heads: int | None = None, bias: bool = True, qk_norm: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if frame_size < 1:
            raise ValueError(f"frame_size must be >= 1, got {frame_size}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.frame_size, self.window = frame_size, window
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.kv_proj = nn.Linear(embed_dim, 2 * num_kv_heads * self.head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.q_norm = nn.RMSNorm(self.head_dim, **factory) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, **factory) if qk_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        past_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must have shape [B, N, {self.embed_dim}], got {list(x.shape)}")
        b, n, _ = x.shape
        # [B, N, H, Dh] -> [B, H, N, Dh] as views: the kernels take any strides, no copy.
        q = self.q_norm(self.q_proj(x).view(b, n, self.num_heads, self.head_dim)).transpose(1, 2)
        kv = self.kv_proj(x).view(b, n, 2, self.num_kv_heads, self.head_dim)
        k = self.k_norm(kv[:, :, 0]).transpose(1, 2)
        v = kv[:, :, 1].transpose(1, 2)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        out = swba_attention(q, k, v, self.frame_size, self.window)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, self.embed_dim))
        if use_cache:
            return out, (k, v)
        return out

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"frame_size={self.frame_size}, window={self.window}")

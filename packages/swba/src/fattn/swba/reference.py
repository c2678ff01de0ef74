"""Plain-PyTorch block sliding-window attention: the dense masked softmax (works in float64)."""

from __future__ import annotations

import math

import torch

__all__ = ["swba_mask", "swba_attention_reference"]


def swba_mask(n_q: int, n_k: int, block_size: int, window: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[n_q, n_k] bool, True where query i (absolute position n_k - n_q + i) may attend to key j.

    Token t is in block t // block_size; query block i sees key blocks j with i - window < j <= i.
    """
    q_blk = (torch.arange(n_q, device=device) + (n_k - n_q)) // block_size
    k_blk = torch.arange(n_k, device=device) // block_size
    return (k_blk[None, :] <= q_blk[:, None]) & (k_blk[None, :] > q_blk[:, None] - window)


def swba_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    window: int,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference of `fattn.swba.swba_attention`, materializing the [Nq, Nk] scores.

    q: [B, H, Nq, D]; k, v: [B, Hk, Nk, D] with H a multiple of Hk and Nk >= Nq.
    Returns out [B, H, Nq, D] (and lse [B, H, Nq] in fp32 precision or better when return_lse).
    """
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    if n_heads != n_kv_heads:
        group = n_heads // n_kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = swba_mask(q.shape[2], k.shape[2], block_size, window, device=q.device)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    if return_lse:
        return out, lse
    return out

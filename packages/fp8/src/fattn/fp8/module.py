"""nn.Module wrapper of `fp8_attention`."""

from __future__ import annotations

import torch
from torch import nn

from fattn.core.checks import choice_reasons, raise_if_unsupported
from fattn.fp8.op import GRANULARITIES, fp8_attention

__all__ = ["FP8Attention"]


class FP8Attention(nn.Module):
    """Drop-in for the `F.scaled_dot_product_attention(q, k, v, is_causal=..., scale=...)` call of an
    attention block, with both products in FP8.

    forward(q [B, H, Nq, D], k, v [B, Hkv, Nk, D]) -> [B, H, Nq, D] in q's dtype (fp16/bf16/fp32
    inputs; trains with full-precision gradients, straight-through over the quantization).
    Hkv may divide H (GQA/MQA), like SDPA's `enable_gqa=True`.
    granularity: how finely K and V are quantized, "head" (one scale per batch and head; two passes) or
    "block" (one pass: one scale per 64 keys and per 128 values; for tokens of very different magnitudes
    within a head), see `fp8_attention`.
    """

    def __init__(self, *, causal: bool = False, scale: float | None = None, granularity: str = "head") -> None:
        super().__init__()
        raise_if_unsupported("FP8Attention", choice_reasons("granularity", granularity, GRANULARITIES))
        self.causal = causal
        self.scale = scale
        self.granularity = granularity

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return fp8_attention(q, k, v, causal=self.causal, scale=self.scale, granularity=self.granularity)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, scale={self.scale}, granularity={self.granularity!r}"

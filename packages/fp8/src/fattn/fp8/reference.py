"""Plain-PyTorch references for fattn-fp8 (run them in float64 for the truth).

- `attention`: full-precision attention with fattn-fp8's semantics (GQA, bottom-right causal, rows
  that see no key give 0).
- `quantize_reference`: per-(batch, head) or per-block e4m3 quantization, as `fattn.fp8.quantize`
  (and, with a sample centre and 128-token blocks, the op's own one-pass quantization) does it.
- `dequantized_inputs`: exactly the dequantized q, k, v the FP8 kernel consumes for full-precision
  inputs (Q per row; granularity "head": K centred on its channel means and V, per head; "block": K
  centred on a sample's channel medians per 64-token block, V per 128-token block), so
  `attention(*dequantized_inputs(q, k, v))` isolates the error of the kernel's own FP8 math (P's
  quantization) from the error of quantizing the inputs.
- `fp8_attention_reference`: attention on e4m3 inputs with their descales (per head, or per block
  for q and k).
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention", "quantize_reference", "dequantized_inputs", "fp8_attention_reference", "expand_descale",
           "centre_sample", "QUANT_BLOCK", "V_QUANT_BLOCK"]

FP8_MAX = 448.0
QUANT_BLOCK = 64  # tokens per block of the per-block granularity
V_QUANT_BLOCK = 128  # tokens per V block of the op's own per-block quantization (granularity "block")
CENTRE_SAMPLE = 64  # tokens whose channel medians centre K in the op's one-pass quantization


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v. q [B, H, Nq, D], k, v [B, Hkv, Nk, D] -> [B, H, Nq, D] (q's dtype)."""
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if h != h_kv:
        k = k.repeat_interleave(h // h_kv, dim=1)
        v = v.repeat_interleave(h // h_kv, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        rows = torch.arange(n_q, device=q.device)[:, None]
        cols = torch.arange(n_k, device=q.device)[None, :]
        s = s.masked_fill(cols > rows + (n_k - n_q), float("-inf"))
    # Rows without any visible key: softmax would be NaN; they give 0 (as FlashAttention does).
    empty_row = torch.isinf(s).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty_row, 0.0), dim=-1).masked_fill(empty_row, 0.0)
    return torch.matmul(p, v)


def expand_descale(descale: torch.Tensor, n: int, block: int = QUANT_BLOCK) -> torch.Tensor:
    """A descale [B, H] or [B, H, ceil(n / block)] (per block of tokens) as [B, H, n, 1] float64, to multiply
    the n tokens of an e4m3 tensor [B, H, n, D] with."""
    d = descale.double()
    if d.dim() == 2:
        return d[:, :, None, None].expand(*d.shape, n, 1)
    return d.repeat_interleave(block, dim=2)[:, :, :n, None]


def centre_sample(n: int) -> list[int]:
    """The tokens whose channel medians centre K in the op's one-pass quantization: (i * n) // S for
    i < S = min(n, 64), spread evenly over the head."""
    s = min(n, CENTRE_SAMPLE)
    return [(i * n) // s for i in range(s)]


def quantize_reference(x: torch.Tensor, *, center: bool | str = False, granularity: str = "head",
                       block: int = QUANT_BLOCK, zero_descale: float = 1.0, pow2: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, H, N, D] -> (x8 e4m3, descale fp32, mean [B, H, 1, D]) with x - mean ~= x8 * descale:
    descale [B, H] for granularity "head", [B, H, ceil(N / block)] for "block" (amax of each block of
    `block` tokens / 448, after the centring; `zero_descale` for an all-zero block: 1 as `quantize`
    gives, 0 for V in the op's one-pass quantization); pow2: descales rounded up to a power of two (V in
    the op's one-pass quantization). center: False, True (each (batch, head)'s channel
    means) or "sample" (the channel's lower median over the tokens `centre_sample(N)`); returned as `mean`."""
    if granularity not in ("head", "block"):
        raise ValueError(f"granularity must be 'head' or 'block', got {granularity!r}")
    if center not in (False, True, "sample"):
        raise ValueError(f"center must be False, True or 'sample', got {center!r}")
    b, h, n, d = x.shape
    xf = x.double()
    if not center or n == 0:
        mean = torch.zeros_like(xf[:, :, :1])
    elif center == "sample":
        # the lower median of each channel over the sampled tokens (an element of x: exact)
        sample = xf[:, :, centre_sample(n)].sort(dim=2).values
        mean = sample[:, :, (sample.shape[2] - 1) // 2][:, :, None]
    else:
        mean = xf.mean(dim=2, keepdim=True)
    xc = xf - mean
    if granularity == "head":
        amax = xc.abs().amax(dim=(2, 3)).float() if n > 0 else torch.zeros(x.shape[:2], device=x.device)
    else:
        nb = -(-n // block)
        padded = torch.zeros([b, h, nb * block, d], dtype=torch.float64, device=x.device)
        padded[:, :, :n] = xc.abs()
        amax = padded.view(b, h, nb, block * d).amax(dim=-1).float() if nb > 0 else \
            torch.zeros([b, h, 0], device=x.device)
    descale = torch.where(amax > 0, amax / FP8_MAX, torch.full_like(amax, zero_descale))
    if pow2:  # rounded up to a power of two, exactly (on the fp32 bits, as the kernel)
        descale = ((descale.view(torch.int32) + 0x007FFFFF) & 0x7F800000).view(torch.float32)
    inv = torch.where(descale > 0, 1.0 / descale.double(), torch.zeros_like(descale, dtype=torch.float64))
    x8 = (xc * expand_descale(inv, n, block)).clamp(-FP8_MAX, FP8_MAX).float().to(torch.float8_e4m3fn)
    return x8, descale, mean


def dequantized_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, granularity: str = "head"
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float64 q, k, v the FP8 kernel works on for full-precision inputs: Q quantized per row; for
    granularity "head" K centred on its channel means and V quantized per (batch, head); for "block" K
    centred on the channel medians of the tokens `centre_sample(Nk)` and quantized per 64-token block, V per 128-token block
    (`fp8_attention(q, k, v, granularity=...)`)."""
    # Q: one scale per query row (amax over D), as the attention kernel quantizes it
    qf = q.double()
    amax = qf.abs().amax(dim=-1, keepdim=True).float()
    q_descale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q8 = (qf / q_descale.double()).clamp(-FP8_MAX, FP8_MAX).float().to(torch.float8_e4m3fn)
    out = [q8.double() * q_descale.double()]
    if granularity == "block":
        plans = ((k, dict(center="sample", granularity="block")),
                 (v, dict(granularity="block", block=V_QUANT_BLOCK, zero_descale=0.0, pow2=True)))
    else:
        plans = ((k, dict(center=True)), (v, {}))
    for x, how in plans:
        x8, descale, _ = quantize_reference(x, **how)  # type: ignore[arg-type]
        out.append(x8.double() * expand_descale(descale, x.shape[2], int(how.get("block", QUANT_BLOCK))))
    return out[0], out[1], out[2]


def fp8_attention_reference(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, q_descale: torch.Tensor,
                            k_descale: torch.Tensor, v_descale: torch.Tensor, *, causal: bool = False,
                            scale: float | None = None) -> torch.Tensor:
    """float64 attention on the dequantized e4m3 inputs: q8 * q_descale etc. -> [B, H, Nq, D] float64.
    q_descale [B, H] or [B, H, ceil(Nq / 64)], k_descale [B, Hkv] or [B, Hkv, ceil(Nk / 64)] (per
    64-token block), v_descale [B, Hkv]."""
    def deq(x8: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return x8.double() * expand_descale(s, x8.shape[2])

    return attention(deq(q8, q_descale), deq(k8, k_descale), deq(v8, v_descale), causal=causal, scale=scale)

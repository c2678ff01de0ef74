"""fattn-fp8: flash attention with both matrix products in FP8 (e4m3) on Hopper/Ada tensor cores.

    from fattn.fp8 import fp8_attention, quantize
    out = fp8_attention(q, k, v, causal=True)          # bf16/fp16 in: fused quantization, trainable
    q8, qd = quantize(q); k8, kd = quantize(k); v8, vd = quantize(v, tokens_contiguous=True)
    out = fp8_attention(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd)   # e4m3 in, bf16 out
"""

from fattn.fp8 import reference
from fattn.fp8.module import FP8Attention
from fattn.fp8.op import (
    FP8_DTYPE,
    HEAD_DIMS,
    fp8_attention,
    not_supported_reasons,
    quantize,
    scaled_dot_product_attention,
)

__version__ = "0.1.0.dev0"

__all__ = ["FP8Attention", "FP8_DTYPE", "HEAD_DIMS", "fp8_attention", "not_supported_reasons", "quantize",
           "reference", "scaled_dot_product_attention", "__version__"]

"""fattn-msda: multiscale deformable attention (Deformable DETR) in Triton.

A drop-in for Deformable DETR's `MSDeformAttnFunction` / `MSDeformAttn` with fp16/bf16 support, any
head dim and batch size, and a deterministic backward. No CUDA compile step.
"""

from fattn.msda.module import MSDeformAttn
from fattn.msda.op import MSDeformAttnFunction, ms_deform_attn, msda_bwd, msda_fwd, not_supported_reasons
from fattn.msda.reference import ms_deform_attn_core_pytorch, ms_deform_attn_reference

__version__ = "0.1.0.dev0"

__all__ = [
    "MSDeformAttn",
    "MSDeformAttnFunction",
    "ms_deform_attn",
    "ms_deform_attn_core_pytorch",
    "ms_deform_attn_reference",
    "msda_bwd",
    "msda_fwd",
    "not_supported_reasons",
]

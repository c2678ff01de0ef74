"""fattn-deform: multi-view deformable attention with bilinear sampling fused into flash attention.

    from fattn.deform import deform_attention, MultiViewDeformableAttention

`deform_attention(q, k, v, coords, width, height)` samples every view's keys and values at each query's
points inside the attention kernel (grid_sample semantics), so nothing sampled is materialized.
"""

from fattn.deform.module import MultiViewDeformableAttention
from fattn.deform.op import deform_attention, deform_bwd, deform_fwd, not_supported_reasons
from fattn.deform.reference import deform_attention_reference

__version__ = "0.1.0.dev0"

__all__ = [
    "MultiViewDeformableAttention",
    "deform_attention",
    "deform_attention_reference",
    "deform_bwd",
    "deform_fwd",
    "not_supported_reasons",
    "__version__",
]

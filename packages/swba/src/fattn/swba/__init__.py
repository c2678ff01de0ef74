"""fattn-swba: block sliding-window flash attention (forward and backward) in Triton.

`swba_attention(q, k, v, block_size, window)`: each query attends to the keys of its own block and
of the `window - 1` blocks before it (e.g. a video frame and the frames just before it).
"""

from fattn.swba.module import SlidingWindowBlockAttention
from fattn.swba.op import MAX_HEAD_DIM, SUPPORTED_DTYPES, not_supported_reasons, swba_attention
from fattn.swba.reference import swba_attention_reference, swba_mask

__version__ = "0.1.0.dev0"

__all__ = [
    "MAX_HEAD_DIM",
    "SUPPORTED_DTYPES",
    "SlidingWindowBlockAttention",
    "not_supported_reasons",
    "swba_attention",
    "swba_attention_reference",
    "swba_mask",
]

"""fattn-core: Triton helpers, op registration, input checks and the test harness shared by fattn."""

from fattn.core.alloc import empty, empty_like, poison_enabled, poisoning
from fattn.core.checks import (
    CheckedSignatures,
    Reason,
    call_signature,
    choice_reasons,
    format_shape,
    gpu_arch_reasons,
    head_dim_reasons,
    int_reasons,
    raise_if_unsupported,
    same_device_reasons,
    same_dtype_reasons,
    shape_reasons,
    tensor_reasons,
)
from fattn.core.ops import FusedOp, eager_fast_path, fused_op, register_autograd
from fattn.core.runtime import autotune_limit, device_summary, interpreter_enabled, kernel_device_reason
from fattn.core.tensor_cache import TensorCache

__version__ = "0.1.0.dev0"

__all__ = [
    "CheckedSignatures",
    "FusedOp",
    "Reason",
    "TensorCache",
    "autotune_limit",
    "call_signature",
    "choice_reasons",
    "format_shape",
    "device_summary",
    "eager_fast_path",
    "empty",
    "empty_like",
    "fused_op",
    "gpu_arch_reasons",
    "head_dim_reasons",
    "int_reasons",
    "interpreter_enabled",
    "kernel_device_reason",
    "poison_enabled",
    "poisoning",
    "raise_if_unsupported",
    "register_autograd",
    "same_device_reasons",
    "same_dtype_reasons",
    "shape_reasons",
    "tensor_reasons",
]

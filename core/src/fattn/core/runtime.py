"""Where kernels run: a CUDA GPU, or the CPU through Triton's interpreter.

`TRITON_INTERPRET=1` must be set before any module that defines a `@triton.jit` kernel is
imported: Triton decides at decoration time whether a kernel is compiled or interpreted.
"""

from __future__ import annotations

import functools
import os

import torch
import triton.language as tl

__all__ = [
    "INTERPRET",
    "device_summary",
    "interpreter_enabled",
    "is_compiling",
    "kernel_device_reason",
    "seq_bucket",
    "sm_count",
]


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU through `TRITON_INTERPRET=1`."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


# Read by kernels as a compile-time constant (a global `tl.constexpr`): the interpreter cannot do
# bfloat16 arithmetic, so kernels upcast bf16 operands there and keep them native on a GPU.
INTERPRET = tl.constexpr(interpreter_enabled())


def kernel_device_reason(name: str, tensor: torch.Tensor) -> str | None:
    """Why `tensor` cannot be handed to a Triton kernel, or None when it can."""
    if tensor.device.type == "cuda":
        return None
    if tensor.device.type == "cpu" and interpreter_enabled():
        return None
    if tensor.device.type == "cpu":
        return (
            f"{name} is on the CPU; fattn kernels run on a CUDA GPU "
            "(or on the CPU only under TRITON_INTERPRET=1, set before importing fattn, for testing)"
        )
    return f"{name} is on device {tensor.device}; fattn kernels run on CUDA GPUs"


def device_summary() -> str:
    """One line naming the device kernels run on, for reports and benchmark tables."""
    import triton

    if torch.cuda.is_available() and not interpreter_enabled():
        props = torch.cuda.get_device_properties(0)
        where = f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs)"
    elif interpreter_enabled():
        where = "CPU, Triton interpreter (TRITON_INTERPRET=1)"
    else:
        where = "CPU, no Triton backend (set TRITON_INTERPRET=1 to run kernels)"
    return f"{where}; torch {torch.__version__}, triton {triton.__version__}"


def is_compiling() -> bool:
    """True while torch.compile traces (data-dependent host checks must be skipped then)."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def seq_bucket(n: int) -> int:
    """Autotuning key of a length: the next power of two, so inputs whose lengths vary (multi-scale
    detection, video clips, a growing KV cache) reuse a tuned config instead of re-tuning per length."""
    import triton

    return triton.next_power_of_2(max(n, 1))


@functools.cache
def sm_count(index: int | None = None) -> int:
    """Multiprocessors of CUDA device `index` (cached: persistent grids ask on every launch)."""
    return torch.cuda.get_device_properties(index).multi_processor_count

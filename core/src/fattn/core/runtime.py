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
    "autotune_limit",
    "cdiv",
    "device_summary",
    "env_flag",
    "interpreter_enabled",
    "is_compiling",
    "kernel_device_reason",
    "next_power_of_2",
    "seq_bucket",
    "sm_count",
]


def env_flag(name: str, default: bool) -> bool:
    """An on/off environment variable: 1/0, true/false, yes/no, on/off (any case); unset or empty gives
    `default`. Raises ValueError naming the variable for anything else (a typo must not silently keep
    the default)."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={os.environ[name]!r}: expected 1 or 0 (also true/false, yes/no, on/off)")


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU through `TRITON_INTERPRET=1`."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


# Read by kernels as a compile-time constant (a global `tl.constexpr`): the interpreter cannot do
# bfloat16 arithmetic, so kernels upcast bf16 operands there and keep them native on a GPU.
INTERPRET = tl.constexpr(interpreter_enabled())


# Older per-package switches, still honoured: "<PKG>_AUTOTUNE" names are on/off switches (0: first config
# only, 1: search all), the others already counted configs.
_LEGACY_AUTOTUNE_ENV = {
    "swba": "FATTN_SWBA_AUTOTUNE",
    "rope2d": "FATTN_ROPE2D_AUTOTUNE",
    "msda": "FATTN_MSDA_AUTOTUNE",
    "fp8": "FATTN_FP8_TUNE_LIMIT",
}


def autotune_limit(package: str) -> int:
    """How many configs a kernel of fattn package `package` may autotune over; 0 means all of them.

    Read from the environment on every call (a test can change it after import), from the first set of:
      1. `FATTN_<PACKAGE>_AUTOTUNE_LIMIT=n` (e.g. FATTN_SWBA_AUTOTUNE_LIMIT);
      2. the package's older variable: FATTN_SWBA_AUTOTUNE, FATTN_ROPE2D_AUTOTUNE, FATTN_MSDA_AUTOTUNE
         (0: a limit of 1, 1: all) or FATTN_FP8_TUNE_LIMIT=n;
      3. `FATTN_AUTOTUNE_LIMIT=n`, for every package;
    else 0. An empty value counts as unset. The packages' test suites set a limit of 1 (each kernel's
    first candidate for the shape): autotuning compiles and times every candidate for every new shape,
    which would dominate a GPU test run. Benchmarks and users keep the default, the full search.
    Raises ValueError for a value that is not a non-negative integer (or not 0/1 for a switch).
    """
    pkg = package.upper()
    legacy = _LEGACY_AUTOTUNE_ENV.get(package)
    for name in (f"FATTN_{pkg}_AUTOTUNE_LIMIT", legacy, "FATTN_AUTOTUNE_LIMIT"):
        value = os.environ.get(name, "").strip() if name else ""
        if not value:
            continue
        if name.endswith("_AUTOTUNE"):  # an on/off switch
            if value not in ("0", "1"):
                raise ValueError(f"{name}={value!r}: expected 0 (first config only) or 1 (autotune over all)")
            return 1 if value == "0" else 0
        return env_int(name, 0, "configs to autotune over, 0: all")
    return 0


def env_int(name: str, default: int, meaning: str) -> int:
    """A non-negative integer environment variable; unset or empty gives `default`. Raises ValueError
    naming the variable and `meaning` for anything else."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise ValueError(f"{name}={os.environ[name]!r}: expected a non-negative integer ({meaning})")
    return number


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


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1). Host code calls this on every launch: Triton's
    own `triton.next_power_of_2` / `triton.cdiv` are constexpr functions since 3.4, several times
    slower to call from Python."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (grid sizes)."""
    return -(-a // b)


def seq_bucket(n: int) -> int:
    """Autotuning key of a length: the next power of two, so inputs whose lengths vary (multi-scale
    detection, video clips, a growing KV cache) reuse a tuned config instead of re-tuning per length."""
    return next_power_of_2(n)


@functools.cache
def sm_count(index: int | None = None) -> int:
    """Multiprocessors of CUDA device `index` (cached: persistent grids ask on every launch)."""
    return torch.cuda.get_device_properties(index).multi_processor_count

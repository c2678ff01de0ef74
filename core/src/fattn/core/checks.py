"""Input validation with errors that name the argument, what was expected and what was given.

Each op has a `not_supported_reasons(...)` that returns readable strings (empty when the inputs are
fine) and raises through `raise_if_unsupported`. The helpers here return `Reason`s so an op can
collect every problem at once; the first one decides the exception type (TypeError for a wrong
type or dtype, ValueError for everything else).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from fattn.core.runtime import kernel_device_reason

__all__ = [
    "CheckedSignatures",
    "Reason",
    "call_signature",
    "choice_reasons",
    "dtype_name",
    "format_shape",
    "gpu_arch_reasons",
    "head_dim_reasons",
    "int_reasons",
    "raise_if_unsupported",
    "same_device_reasons",
    "same_dtype_reasons",
    "shape_reasons",
    "tensor_reasons",
]


@dataclass(frozen=True)
class Reason:
    """Why an input is not supported; `error` is the exception type to raise for it."""

    message: str
    error: type[Exception] = ValueError

    def __str__(self) -> str:
        return self.message


def call_signature(*args: object) -> tuple | None:
    """What an op's checks and launch parameters can depend on, as a hashable tuple: per tensor its
    shape, strides, dtype, device and requires_grad; other arguments by type and value. None when an
    argument is not a plain tensor or hashable value (tensor subclasses, lists): check it in full."""
    parts: list[object] = []
    for a in args:
        if type(a) is torch.Tensor:
            parts.append((a.shape, a.stride(), a.dtype, a.device, a.requires_grad))
        elif a is None or type(a) in (bool, int, float, str):
            parts.append((type(a), a))
        else:
            return None
    return tuple(parts)


class CheckedSignatures:
    """Call signatures (`call_signature`) whose argument checks passed. A model calls an op with the
    same shapes and dtypes again and again; the checks depend only on the signature, so they run once
    per signature (tens of microseconds of host time saved per call). Checks of tensor *values* are
    not covered. Bounded: past `limit` signatures it starts over."""

    def __init__(self, limit: int = 1024) -> None:
        if type(limit) is not int or limit < 1:
            raise ValueError(f"CheckedSignatures: limit must be a positive int (signatures kept), got {limit!r}")
        self._seen: set[tuple] = set()
        self._limit = limit

    def __contains__(self, signature: tuple | None) -> bool:
        return signature is not None and signature in self._seen

    def add(self, signature: tuple | None) -> None:
        if signature is None:
            return
        if len(self._seen) >= self._limit:
            self._seen.clear()
        self._seen.add(signature)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def raise_if_unsupported(op: str, reasons: Iterable[Reason]) -> None:
    """Raise for the collected reasons: the first one's type, every message listed."""
    reasons = list(reasons)
    if not reasons:
        return
    head = reasons[0]
    if len(reasons) == 1:
        raise head.error(f"{op}: {head.message}")
    listed = "\n".join(f"  - {r.message}" for r in reasons)
    raise head.error(f"{op}: {len(reasons)} problems with the inputs:\n{listed}")


def format_shape(shape: Sequence[object]) -> str:
    """A shape as error messages write it: [2, 3, *] (None: any size)."""
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def tensor_reasons(
    name: str,
    x: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    kernel_device: bool = True,
) -> list[Reason]:
    """Is `x` a tensor of the right rank and dtype, on a device the kernels run on?"""
    if not isinstance(x, torch.Tensor):
        return [Reason(f"{name} must be a torch.Tensor, got {type(x).__name__}", TypeError)]
    out: list[Reason] = []
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(dtype_name(d) for d in dtypes)
        out.append(Reason(f"{name} must have dtype in ({allowed}), got {dtype_name(x.dtype)}", TypeError))
    if ndim is not None and x.dim() != ndim:
        out.append(Reason(f"{name} must be {ndim}-D, got {x.dim()}-D with shape {list(x.shape)}"))
    if kernel_device:
        why = kernel_device_reason(name, x)
        if why is not None:
            out.append(Reason(why))
    return out


def shape_reasons(name: str, x: torch.Tensor, expected: Sequence[int | None], meaning: str = "") -> list[Reason]:
    """Does x.shape match `expected` (None matches any size)? `meaning` names the dims, e.g. '[B, H, N, D]'."""
    actual = list(x.shape)
    ok = len(actual) == len(expected) and all(e is None or e == a for e, a in zip(expected, actual))
    if ok:
        return []
    what = f" {meaning}" if meaning else ""
    return [Reason(f"{name} must have shape {format_shape(expected)}{what}, got {actual}")]


def same_device_reasons(**tensors: torch.Tensor) -> list[Reason]:
    """All tensors on one device?"""
    items = [(n, t) for n, t in tensors.items() if isinstance(t, torch.Tensor)]
    if not items:
        return []
    first_name, first = items[0]
    bad = [f"{n} on {t.device}" for n, t in items[1:] if t.device != first.device]
    if not bad:
        return []
    return [Reason(f"all tensors must be on one device: {first_name} is on {first.device}, but " + ", ".join(bad))]


def same_dtype_reasons(**tensors: torch.Tensor) -> list[Reason]:
    """All tensors of one dtype?"""
    items = [(n, t) for n, t in tensors.items() if isinstance(t, torch.Tensor)]
    if not items:
        return []
    first_name, first = items[0]
    bad = [f"{n} is {dtype_name(t.dtype)}" for n, t in items[1:] if t.dtype != first.dtype]
    if not bad:
        return []
    return [
        Reason(
            f"inputs must share one dtype: {first_name} is {dtype_name(first.dtype)}, but " + ", ".join(bad),
            TypeError,
        )
    ]


def int_reasons(name: str, value: object, *, minimum: int | None = None, maximum: int | None = None) -> list[Reason]:
    """An int (not bool) within [minimum, maximum]?"""
    if isinstance(value, bool) or not isinstance(value, int):
        return [Reason(f"{name} must be an int, got {type(value).__name__} {value!r}", TypeError)]
    if minimum is not None and value < minimum:
        return [Reason(f"{name} must be >= {minimum}, got {value}")]
    if maximum is not None and value > maximum:
        return [Reason(f"{name} must be <= {maximum}, got {value}")]
    return []


def choice_reasons(name: str, value: object, choices: Sequence[object]) -> list[Reason]:
    """One of `choices`?"""
    if value in choices:
        return []
    return [Reason(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")]


def head_dim_reasons(name: str, head_dim: int, *, maximum: int = 256, multiple_of: int = 1,
                     allowed: Sequence[int] | None = None) -> list[Reason]:
    """A supported head dimension?"""
    if allowed is not None and head_dim not in allowed:
        return [Reason(f"{name}: head dim {head_dim} is not supported; supported: {', '.join(map(str, allowed))}")]
    if head_dim < 1 or head_dim > maximum:
        return [Reason(f"{name}: head dim must be between 1 and {maximum}, got {head_dim}")]
    if head_dim % multiple_of:
        return [Reason(f"{name}: head dim must be a multiple of {multiple_of}, got {head_dim}")]
    return []


def gpu_arch_reasons(x: torch.Tensor, *, minimum: tuple[int, int], feature: str) -> list[Reason]:
    """Is x's GPU at least compute capability `minimum` (e.g. (8, 9) for FP8 tensor cores)?

    CPU tensors under the Triton interpreter pass: the interpreter emulates every feature.
    """
    if x.device.type != "cuda":
        return []
    cc = torch.cuda.get_device_capability(x.device)
    if cc >= minimum:
        return []
    name = torch.cuda.get_device_name(x.device)
    return [
        Reason(
            f"{feature} needs a GPU of compute capability {minimum[0]}.{minimum[1]} or newer; "
            f"{name} is {cc[0]}.{cc[1]}"
        )
    ]

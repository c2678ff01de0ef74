"""Output allocation that tests can poison.

Kernels must write every element of their outputs. Ops allocate outputs through `empty` /
`empty_like`; when poisoning is on (`FATTN_POISON_ALLOC=1`, set by the fattn test plugin), fresh
floating-point buffers are filled with NaN and integer buffers with -1, so an element a kernel
forgot to write shows up as NaN in the comparison instead of passing by luck.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch

__all__ = ["empty", "empty_like", "poison_enabled", "poisoning"]

_override: bool | None = None
_from_env: bool | None = None  # FATTN_POISON_ALLOC, read on first use (not on every allocation)


def poison_enabled() -> bool:
    """Whether fresh outputs are filled with NaN (floating point) or -1 (integer): `poisoning`'s setting
    inside its block, else FATTN_POISON_ALLOC=1 as read on the first allocation of the process."""
    global _from_env
    if _override is not None:
        return _override
    if _from_env is None:
        _from_env = os.environ.get("FATTN_POISON_ALLOC", "0") == "1"
    return _from_env


@contextlib.contextmanager
def poisoning(enabled: bool = True) -> Iterator[None]:
    """Turn output poisoning on (or off) inside a `with` block."""
    global _override
    previous = _override
    _override = enabled
    try:
        yield
    finally:
        _override = previous


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(-1)
    return t


def empty(
    shape: Sequence[int], *, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """`torch.empty`, poisoned when poisoning is on."""
    t = torch.empty(tuple(shape), dtype=dtype, device=device)
    return _poison(t) if poison_enabled() else t


def empty_like(x: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous `torch.empty_like`, poisoned when poisoning is on."""
    t = torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)
    return _poison(t) if poison_enabled() else t

"""Values derived from tensors, reused while those exact tensors are alive and unmodified.

Ops recompute small things from their inputs on every call: fattn-msda reads `spatial_shapes` back to
the host to check it (a device sync), fattn-rope2d turns the angle table into cos/sin tables (two
launches). Models pass the same tensors to every layer, so the result can be kept, keyed by the
tensors' identity and version counters:
- an entry is dropped when its first key tensor is freed (weak references: the cache keeps no
  input alive);
- an in-place change of any key tensor bumps its `_version`, so the entry no longer matches;
- inference tensors carry no version counter: they are never cached (computed on every call).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch

__all__ = ["TensorCache"]

T = TypeVar("T")


def _versions(tensors: tuple[torch.Tensor, ...]) -> tuple[int, ...] | None:
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:  # an inference tensor: no version counter
        return None


class TensorCache(Generic[T]):
    """`get_or_compute((t0, t1, ...), extra, compute)`: compute() once per identical, unmodified key
    tensors and equal `extra` (any hashable, e.g. a size), then the stored value.

    Not a WeakKeyDictionary: that compares keys with `==`, which is elementwise for tensors.
    """

    def __init__(self) -> None:
        # id(first key tensor) -> (weak references to the key tensors, their versions, extra, value)
        self._entries: dict[int, tuple[tuple[weakref.ref, ...], tuple[int, ...], Hashable, T]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, tensors: tuple[torch.Tensor, ...], extra: Hashable = None) -> T | None:
        entry = self._entries.get(id(tensors[0]))
        if entry is None:
            return None
        refs, versions, entry_extra, value = entry
        if len(refs) != len(tensors) or any(r() is not t for r, t in zip(refs, tensors)):
            return None
        if _versions(tensors) != versions or entry_extra != extra:
            return None
        return value

    def put(self, tensors: tuple[torch.Tensor, ...], extra: Hashable, value: T) -> None:
        versions = _versions(tensors)
        if versions is None:
            return
        key = id(tensors[0])
        entries = self._entries

        def drop(ref: weakref.ref, key: int = key) -> None:
            # only if the entry still belongs to this (now freed) tensor
            entry = entries.get(key)
            if entry is not None and entry[0][0] is ref:
                del entries[key]

        refs = (weakref.ref(tensors[0], drop), *(weakref.ref(t) for t in tensors[1:]))
        entries[key] = (refs, versions, extra, value)

    def get_or_compute(self, tensors: tuple[torch.Tensor, ...], extra: Hashable, compute: Callable[[], T]) -> T:
        value = self.get(tensors, extra)
        if value is None:
            value = compute()
            self.put(tensors, extra, value)
        return value

    def clear(self) -> None:
        self._entries.clear()

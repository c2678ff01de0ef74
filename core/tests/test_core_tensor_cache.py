"""TensorCache: reuse only for the same live, unmodified tensors and equal extra keys."""

from __future__ import annotations

import gc

import torch

from fattn.core import TensorCache


def test_reused_for_same_tensors_and_extra() -> None:
    cache: TensorCache[int] = TensorCache()
    calls: list[int] = []
    a, b = torch.arange(4), torch.arange(3)

    def compute() -> int:
        calls.append(1)
        return int(a.sum() + b.sum())

    assert cache.get_or_compute((a, b), 7, compute) == 9
    assert cache.get_or_compute((a, b), 7, compute) == 9
    assert len(calls) == 1
    assert cache.get_or_compute((a, b), 8, compute) == 9  # another extra key: recomputed
    assert len(calls) == 2


def test_other_tensor_with_equal_values_is_a_miss() -> None:
    cache: TensorCache[str] = TensorCache()
    a, b = torch.arange(4), torch.arange(3)
    cache.put((a, b), None, "ab")
    assert cache.get((a, b.clone())) is None
    assert cache.get((a.clone(), b)) is None
    assert cache.get((a,)) is None
    assert cache.get((a, b)) == "ab"


def test_in_place_change_invalidates() -> None:
    cache: TensorCache[str] = TensorCache()
    a, b = torch.arange(4), torch.arange(3)
    cache.put((a, b), None, "v")
    b[0] = 5
    assert cache.get((a, b)) is None
    cache.put((a, b), None, "w")
    a.view(2, 2)[0, 0] = 1  # through a view: the base's version counter moves too
    assert cache.get((a, b)) is None


def test_entry_dropped_when_tensor_freed() -> None:
    cache: TensorCache[str] = TensorCache()
    a = torch.arange(4)
    cache.put((a,), None, "v")
    assert len(cache) == 1
    del a
    gc.collect()
    assert len(cache) == 0


def test_inference_tensors_never_cached() -> None:
    cache: TensorCache[str] = TensorCache()
    with torch.inference_mode():
        a = torch.arange(4)
    cache.put((a,), None, "v")
    assert cache.get((a,)) is None
    assert len(cache) == 0

"""Launch-key checks of fattn.core.launch, run by test_launch.py in a process without TRITON_INTERPRET
(the shortcut, and so its keys, exist only for compiled kernels). Exits 1 with a message on a failure."""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fattn.core.launch import FastLauncher


@triton.autotune(configs=[triton.Config({"BLOCK": 32}), triton.Config({"BLOCK": 64})], key=["n"])
@triton.jit
def _kernel(x_ptr, y_ptr, n, stride, scale, FLAG: tl.constexpr, BLOCK: tl.constexpr):
    pass


def main() -> int:
    fast = FastLauncher(_kernel)
    assert fast.usable, "compiled kernels must be usable"
    base = torch.zeros(256)
    x, y = base[:64], base[64:128]  # both 16-byte aligned

    def key(x=x, y=y, n=100, stride=32, scale=0.5, flag=True, **kw):  # type: ignore[no-untyped-def]
        return fast._key((x, y, n, stride, scale, flag), kw)

    def desc(t: torch.Tensor, block: list[int]) -> TensorDescriptor:  # a TMA descriptor over 64 elements
        return TensorDescriptor.from_tensor(t.view(8, 8), block_shape=block)

    same = [
        ("other tensors, same dtype and alignment", key(), key(x=base[128:192], y=base[192:])),
        ("another multiple of 16 for a specialized int", key(), key(stride=48)),
        ("another non-special int", key(stride=33), key(stride=35)),
        ("another float", key(), key(scale=0.25)),
        ("descriptors over other tensors", key(D=desc(x, [8, 8])), key(D=desc(base[128:192], [8, 8]))),
    ]
    differ = [
        ("dtype", key(), key(x=x.half())),
        ("alignment", key(), key(x=base[1:65])),
        ("int 1 against other ints", key(stride=1), key(stride=3)),
        ("multiple of 16 against not", key(stride=32), key(stride=33)),
        ("int32 against int64 range", key(stride=32), key(stride=2**35)),
        ("autotuning key value", key(n=100), key(n=101)),
        ("constexpr value", key(flag=True), key(flag=False)),
        ("constexpr 1 against True", key(flag=1), key(flag=True)),
        ("constexpr 1 against 1.0", key(flag=1), key(flag=1.0)),
        ("float against int argument", key(scale=1.0), key(scale=1)),
        ("keyword order", key(A=1, B=2), key(B=1, A=2)),
        ("keyword 1 against True", key(A=1), key(A=True)),
        ("descriptor block shape", key(D=desc(x, [8, 8])), key(D=desc(x, [4, 8]))),
        ("descriptor dtype", key(D=desc(x, [8, 8])), key(D=desc(base.half()[:64], [8, 8]))),
    ]
    failures = [f"same key expected: {name}" for name, a, b in same if a != b]
    failures += [f"different keys expected: {name}" for name, a, b in differ if a == b]
    if fast._key((x, y, 100, object(), 0.5, True), {}) is not None:
        failures.append("an unmodelled argument type must give no key")
    for f in failures:
        print(f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""interp_upcast, input checks, output poisoning and the harness itself."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from fattn.core import (
    empty,
    empty_like,
    gpu_arch_reasons,
    head_dim_reasons,
    int_reasons,
    poisoning,
    raise_if_unsupported,
    same_device_reasons,
    same_dtype_reasons,
    shape_reasons,
    tensor_reasons,
)
from fattn.core.testing import assert_close, device, make_noncontiguous, randn
from fattn.core.triton_helpers import interp_upcast, mask_2d, offsets_2d


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a = interp_upcast(tl.load(a_ptr + offsets_2d(rm, rk, K, 1), mask=mask_2d(rm, M, rk, K), other=0.0))
    b = interp_upcast(tl.load(b_ptr + offsets_2d(rk, rn, N, 1), mask=mask_2d(rk, K, rn, N), other=0.0))
    c = tl.dot(a, b)
    tl.store(c_ptr + offsets_2d(rm, rn, N, 1), c, mask=mask_2d(rm, M, rn, N))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_interp_upcast_gives_correct_bf16_dot(dtype: torch.dtype) -> None:
    # Runs on the interpreter too: that is where a raw bf16 dot returns garbage.
    M, N, K = 19, 23, 29
    a, b = randn([M, K], dtype), randn([K, N], dtype)
    c = empty([M, N], dtype=torch.float32, device=device())
    _dot_kernel[(1,)](a, b, c, M, N, K, BM=32, BN=32, BK=32)
    ref = a.double() @ b.double()
    assert_close("c", c, ref, floor=3e-3)


def test_poisoning_fills_nan_and_can_be_turned_off() -> None:
    with poisoning(True):
        x = empty([3, 4], dtype=torch.float16, device="cpu")
        i = empty_like(torch.zeros(5, dtype=torch.int32))
        assert torch.isnan(x).all() and (i == -1).all()
    with poisoning(False):
        assert empty([2], dtype=torch.float32, device="cpu").shape == (2,)


def test_reasons_name_argument_expected_and_actual() -> None:
    q = torch.zeros(2, 3, 4)
    r = tensor_reasons("q", q, ndim=4, dtypes=(torch.float16,), kernel_device=False)
    assert [x.error for x in r] == [TypeError, ValueError]
    assert "q must have dtype in (float16), got float32" in r[0].message
    assert "q must be 4-D, got 3-D" in r[1].message
    with pytest.raises(TypeError, match="myop: 2 problems"):
        raise_if_unsupported("myop", r)
    raise_if_unsupported("myop", [])  # nothing to raise

    (s,) = shape_reasons("k", q, [2, None, 5], "[B, N, D]")
    assert s.message == "k must have shape [2, *, 5] [B, N, D], got [2, 3, 4]"
    assert not shape_reasons("k", q, [2, None, 4])
    assert int_reasons("window", 0, minimum=1)[0].message == "window must be >= 1, got 0"
    assert int_reasons("window", True)[0].error is TypeError
    assert "head dim must be a multiple of 4, got 6" in head_dim_reasons("q", 6, multiple_of=4)[0].message
    assert "between 1 and 256, got 512" in head_dim_reasons("q", 512)[0].message
    assert same_dtype_reasons(a=q, b=q.double())[0].error is TypeError
    assert not same_device_reasons(a=q, b=q)
    assert not gpu_arch_reasons(q, minimum=(8, 9), feature="FP8")  # CPU: interpreter emulates
    assert tensor_reasons("x", [1, 2])[0].message == "x must be a torch.Tensor, got list"


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from fattn.core.runtime import kernel_device_reason

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    msg = kernel_device_reason("q", torch.zeros(1))
    assert msg is not None and "TRITON_INTERPRET=1" in msg and msg.startswith("q is on the CPU")


def test_assert_close_fails_on_wrong_values_and_nan() -> None:
    ref = torch.randn(50, dtype=torch.float64)
    good = ref.half()
    assert_close("x", good, ref, lowp=ref.half())
    with pytest.raises(AssertionError, match="max error"):
        assert_close("x", (ref * 1.01).half(), ref, lowp=ref.half())
    bad = good.clone()
    bad[3] = float("nan")
    with pytest.raises(AssertionError, match="unwritten"):
        assert_close("x", bad, ref, lowp=ref.half())


def test_make_noncontiguous_keeps_values() -> None:
    x = randn([3, 5, 7])
    y = make_noncontiguous(x)
    assert not y.is_contiguous() and y.stride(-1) == 2 and torch.equal(x, y)

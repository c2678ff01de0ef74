"""The op-declaration pattern end to end: a tiny fused op with autograd, opcheck and torch.compile."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fattn.core import empty_like, fused_op, raise_if_unsupported, register_autograd, tensor_reasons
from fattn.core.testing import check_custom_op, check_forward_backward, randn


@triton.jit
def _scaled_tanh_kernel(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m).to(tl.float32)
    e = tl.exp(-2.0 * tl.abs(x * scale))
    t = (1.0 - e) / (1.0 + e)
    y = tl.where(x < 0, -t, t)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)


def _fake(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@fused_op("selftest_scaled_tanh", fake=_fake)
def scaled_tanh_op(x: torch.Tensor, scale: float) -> torch.Tensor:
    xc = x.contiguous()
    y = empty_like(xc)
    n = xc.numel()
    _scaled_tanh_kernel[(triton.cdiv(n, 128),)](xc, y, n, scale, BLOCK=128)
    return y


def _setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
    ctx.scale = inputs[1]
    ctx.save_for_backward(output)


def _backward(ctx, grad):  # type: ignore[no-untyped-def]
    (y,) = ctx.saved_tensors
    return grad * ctx.scale * (1 - y.float() ** 2).to(y.dtype), None


register_autograd(scaled_tanh_op, setup_context=_setup, backward=_backward)


def scaled_tanh(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    raise_if_unsupported("scaled_tanh", tensor_reasons("x", x, dtypes=(torch.float32, torch.float16)))
    return scaled_tanh_op(x, scale)


def test_fused_op_pattern_opcheck_and_compile() -> None:
    x = randn([7, 13], requires_grad=True)
    check_custom_op(scaled_tanh_op, (x, 0.7), public_fn=scaled_tanh, public_args=(x, 0.7))


def test_fused_op_pattern_gradients() -> None:
    x = randn([5, 11], noncontiguous=True)
    check_forward_backward(lambda x: scaled_tanh(x, 0.5), lambda x: torch.tanh(0.5 * x), {"x": x},
                           grad_names=["x"])

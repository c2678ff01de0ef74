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


def test_eager_calls_skip_the_dispatcher_and_traced_calls_do_not(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """FusedOp: plain eager calls (with or without autograd) run the launch function directly; the
    fast path switched off, FakeTensors and TorchDispatchModes go through the custom op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fattn.core import eager_fast_path

    calls: list[str] = []
    custom = scaled_tanh_op.op

    def spy(*args):  # type: ignore[no-untyped-def]
        calls.append("custom op")
        return custom(*args)

    monkeypatch.setattr(scaled_tanh_op, "op", spy)
    x = randn([5, 9], requires_grad=True)
    with torch.no_grad():
        scaled_tanh(x, 0.5)
    y = scaled_tanh(x, 0.5)
    (gx,) = torch.autograd.grad(y.float().sum(), x)
    assert calls == [] and y.grad_fn is not None and type(y.grad_fn).__name__.startswith("Eager_")

    previous = eager_fast_path(False)
    try:
        y_op = scaled_tanh(x, 0.5)
        (gx_op,) = torch.autograd.grad(y_op.float().sum(), x)
    finally:
        eager_fast_path(previous)
    assert calls == ["custom op"]
    assert torch.equal(y, y_op) and torch.equal(gx, gx_op)

    calls.clear()
    plain = x.detach()
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(plain)
        out = scaled_tanh_op(fake, 0.5)
    assert calls == ["custom op"] and tuple(out.shape) == tuple(x.shape)


def test_fused_op_binds_keywords_and_defaults() -> None:
    x = randn([4, 3])
    assert torch.equal(scaled_tanh_op(x, scale=0.3), scaled_tanh_op(x, 0.3))


def test_fx_tracing_records_the_custom_op() -> None:
    """torch.fx symbolic tracing sees Proxies, not tensors: the call must reach the custom op."""
    import torch.fx

    def f(x):  # type: ignore[no-untyped-def]
        return scaled_tanh_op(x, 0.5)

    graph = torch.fx.symbolic_trace(f).graph
    targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
    assert any("selftest_scaled_tanh" in t for t in targets), targets


def test_eager_path_under_checkpoint_inference_mode_and_double_backward() -> None:
    """The eager autograd.Function behaves like the custom op: activation checkpointing recomputes
    it, inference mode runs it without a graph, and a backward written in torch arithmetic stays
    differentiable (create_graph=True gives the right second derivative)."""
    from torch.utils.checkpoint import checkpoint

    x = randn([6, 5], requires_grad=True)
    (g_plain,) = torch.autograd.grad(scaled_tanh(x, 0.5).sum(), x)
    y = checkpoint(lambda t: scaled_tanh(t, 0.5), x, use_reentrant=False)
    (g_ckpt,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g_plain, g_ckpt)

    with torch.inference_mode():
        z = scaled_tanh(x, 0.5)
    assert z.grad_fn is None and torch.equal(z, scaled_tanh(x.detach(), 0.5))

    (g,) = torch.autograd.grad(scaled_tanh(x, 0.5).sum(), x, create_graph=True)
    # _backward here is plain torch arithmetic, so it is differentiable: the second derivative exists.
    (gg,) = torch.autograd.grad(g.sum(), x)
    t = torch.tanh(0.5 * x.detach())
    torch.testing.assert_close(gg, -2 * 0.25 * t * (1 - t**2), rtol=1e-4, atol=1e-5)

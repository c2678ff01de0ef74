"""Declaring fattn ops as `torch.library` custom ops.

Every fattn op follows one pattern, which is what lets it run under
`torch.compile(fullgraph=True)` without graph breaks and pass `torch.library.opcheck`:

1. the forward kernel launch is a custom op `fattn::<name>` with a fake implementation that only
   allocates outputs of the right shape, dtype and device (what the compiler traces);
2. the backward kernel launch is a second custom op with its own fake implementation;
3. `register_autograd` connects them: setup_context saves tensors, backward calls op 2.

The public function validates its inputs in Python (clear errors before anything is traced or
launched), then calls op 1.

Example::

    @fused_op("swba_fwd", fake=_swba_fwd_fake)
    def swba_fwd(q: Tensor, k: Tensor, v: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
        ...launch the kernel...

    register_autograd(swba_fwd, setup_context=_setup, backward=_backward)

Calling the declared op dispatches (see `FusedOp`): in plain eager code it runs the launch function
directly (through an autograd.Function when a gradient is wanted); under torch.compile, tensor
subclasses (FakeTensor), functorch transforms or a TorchDispatchMode it goes through the custom op.
The dispatcher round trip of a Python custom op costs tens of microseconds of host time a call, as
much as a small attention kernel runs; the eager path skips it and gives the same results.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import _len_torch_dispatch_stack

from fattn.core.runtime import env_flag

__all__ = ["NAMESPACE", "FusedOp", "eager_fast_path", "fused_op", "qualified_name", "register_autograd"]

# FATTN_EAGER_FAST_PATH=0 sends every call through the custom op (to compare, or to rule the fast path out).
_EAGER_FAST_PATH = env_flag("FATTN_EAGER_FAST_PATH", True)


def eager_fast_path(enabled: bool | None = None) -> bool:
    """Whether eager calls skip the custom-op dispatch (default True; FATTN_EAGER_FAST_PATH=0 turns it
    off). With an argument, sets it and returns the previous setting."""
    global _EAGER_FAST_PATH
    previous = _EAGER_FAST_PATH
    if enabled is not None:
        _EAGER_FAST_PATH = bool(enabled)
    return previous

NAMESPACE = "fattn"


def qualified_name(name: str) -> str:
    """`name` in the fattn op namespace: 'msda_fwd' -> 'fattn::msda_fwd'."""
    if "::" in name:
        raise ValueError(f"op name must not carry a namespace, got {name!r}")
    return f"{NAMESPACE}::{name}"


class FusedOp:
    """A fattn op: the custom op `fattn::<name>` (`.op`) and the launch function it wraps (`.fn`).

    Calling it runs, for the same arguments:
    - the custom op, while torch.compile traces, when an argument overrides torch functions (tensor
      subclasses such as FakeTensor, torch.fx Proxies), under functorch transforms (vmap, grad) or a
      TorchDispatchMode, or with the fast path off: everything those see is the registered op;
    - otherwise (plain eager tensors) the launch function directly, through an autograd.Function
      built from the op's registered setup_context/backward when autograd needs a graph. That skips
      the dispatcher and the custom op's per-call checks, tens of microseconds of host time.
    Other attributes (register_fake, register_autograd, ...) are the custom op's.
    """

    def __init__(self, fn: Callable[..., Any], op: torch.library.CustomOpDef) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.op = op
        self._function: type[torch.autograd.Function] | None = None
        self._signature = inspect.signature(fn)
        self._n_params = len(self._signature.parameters)

    def __getattr__(self, name: str) -> Any:
        if name in ("op", "fn", "_function", "_signature", "_n_params"):  # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.op, name)

    def __repr__(self) -> str:
        return f"FusedOp({self.op!r})"

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """All arguments positionally, defaults filled (what setup_context receives from the custom op)."""
        if not kwargs and len(args) == self._n_params:
            return args
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return tuple(bound.arguments.values())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args = self._bind(args, kwargs)
        if not _eager_plain(args):
            return self.op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            if self._function is None:  # no autograd formula: the custom op raises the right error
                return self.op(*args)
            return self._function.apply(*args)
        return self.fn(*args)

    def _set_autograd(self, setup_context: Callable[..., None], backward: Callable[..., Any]) -> None:
        fn = self.fn

        def forward(ctx, *args):  # type: ignore[no-untyped-def]
            output = fn(*args)
            setup_context(ctx, args, output)
            return output

        def backward_(ctx, *grads):  # type: ignore[no-untyped-def]
            return backward(ctx, *grads)

        name = f"Eager_{self.op._name.replace('::', '_')}"
        self._function = type(name, (torch.autograd.Function,),
                              {"forward": staticmethod(forward), "backward": staticmethod(backward_)})


def _eager_plain(args: tuple[Any, ...]) -> bool:
    """True when the eager fast path gives what the custom op would: plain tensors, nothing tracing."""
    if not _EAGER_FAST_PATH or torch.compiler.is_compiling() or _len_torch_dispatch_stack() > 0:
        return False
    if torch._C._are_functorch_transforms_active() or torch.overrides.has_torch_function(args):
        return False  # (has_torch_function: tensor subclasses, torch.fx Proxies, ...)
    return all(type(a) is torch.Tensor for a in args if isinstance(a, torch.Tensor))


def fused_op(
    name: str,
    *,
    fake: Callable[..., Any],
    mutates_args: Sequence[str] = (),
) -> Callable[[Callable[..., Any]], FusedOp]:
    """Declare the decorated function as the custom op `fattn::<name>`, with its fake impl; returns a
    `FusedOp` (calling it picks the eager fast path or the custom op).

    The function needs full type annotations (torch.library derives the schema from them). It
    must return new tensors, never views of its inputs.
    """

    def decorate(fn: Callable[..., Any]) -> FusedOp:
        op = torch.library.custom_op(qualified_name(name), mutates_args=tuple(mutates_args))(fn)
        op.register_fake(fake)
        return FusedOp(fn, op)

    return decorate


def register_autograd(
    op: FusedOp | torch.library.CustomOpDef,
    *,
    setup_context: Callable[..., None],
    backward: Callable[..., Any],
) -> None:
    """Make `op` differentiable: `setup_context(ctx, inputs, output)` saves, `backward(ctx, *grads)`
    returns one gradient (or None) per input of `op`. The same two functions serve the custom op
    (torch.compile) and the eager fast path."""
    custom = op.op if isinstance(op, FusedOp) else op
    custom.register_autograd(backward, setup_context=setup_context)
    if isinstance(op, FusedOp):
        op._set_autograd(setup_context, backward)

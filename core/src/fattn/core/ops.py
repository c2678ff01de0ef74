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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["NAMESPACE", "fused_op", "qualified_name", "register_autograd"]

NAMESPACE = "fattn"


def qualified_name(name: str) -> str:
    """`name` in the fattn op namespace: 'msda_fwd' -> 'fattn::msda_fwd'."""
    if "::" in name:
        raise ValueError(f"op name must not carry a namespace, got {name!r}")
    return f"{NAMESPACE}::{name}"


def fused_op(
    name: str,
    *,
    fake: Callable[..., Any],
    mutates_args: Sequence[str] = (),
) -> Callable[[Callable[..., Any]], torch.library.CustomOpDef]:
    """Declare the decorated function as the custom op `fattn::<name>`, with its fake impl.

    The function needs full type annotations (torch.library derives the schema from them). It
    must return new tensors, never views of its inputs.
    """

    def decorate(fn: Callable[..., Any]) -> torch.library.CustomOpDef:
        op = torch.library.custom_op(qualified_name(name), mutates_args=tuple(mutates_args))(fn)
        op.register_fake(fake)
        return op

    return decorate


def register_autograd(
    op: torch.library.CustomOpDef,
    *,
    setup_context: Callable[..., None],
    backward: Callable[..., Any],
) -> None:
    """Make `op` differentiable: `setup_context(ctx, inputs, output)` saves, `backward(ctx, *grads)`
    returns one gradient (or None) per input of `op`."""
    op.register_autograd(backward, setup_context=setup_context)

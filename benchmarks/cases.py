"""One fattn call per package, at its benchmark module's shapes: what `benchmarks.overhead` and
`benchmarks.profile` measure, built in one place.

    fn, inputs, grad_names = fattn_case("msda", shape=0, dtype="fp32")
    out = fn(**inputs)   # grad_names: the inputs a backward differentiates
    calls = timed_calls(fattn_case("msda"))   # {"fwd": ..., "fwd+bwd": ...}, as the benchmarks time them

`smoke=True` gives each module's tiny CPU shape: `TRITON_INTERPRET=1 python -m benchmarks.cases` runs
every package's case forward and backward once on the CPU (a check of this file, not of the ops).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fattn.core.testing import device

Case = tuple[Callable[..., torch.Tensor], dict[str, torch.Tensor], tuple[str, ...]]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PACKAGES = ("msda", "deform", "rope2d", "swba", "fp8")
# Each package's default shape (an index into its module's shapes): the ones benchmarks.overhead has
# used since session 4, except swba's, now the N16384 window-4 shape (was N4096 window 4).
DEFAULT_SHAPE = {"msda": 0, "deform": 0, "rope2d": 0, "swba": 1, "fp8": 0}


def fattn_case(package: str, shape: int | None = None, dtype: str | None = None, smoke: bool = False) -> Case:
    """(fn, inputs, differentiable input names) for fattn's op of `package` at benchmark shape `shape`
    (default DEFAULT_SHAPE) in `dtype` (default: the shape's own, else fp32 / bf16 for rope2d and fp8)."""
    if package not in PACKAGES:
        raise ValueError(f"package must be one of {PACKAGES}, got {package!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    index = DEFAULT_SHAPE[package] if shape is None else shape
    dev = device()
    if package == "msda":
        from benchmarks import bench_msda as b

        s = b.SMOKE if smoke else b.SHAPES[index]
        inputs = b.make_inputs(s, DTYPES[dtype or "fp32"])
        return b._impl("fattn"), inputs, ("value", "sampling_locations", "attention_weights")
    if package == "deform":
        from benchmarks import bench_deform as b

        s = b.SMOKE if smoke else b.SHAPES[index]
        inputs = b.make_inputs(s, DTYPES[dtype or "fp32"])
        return b._impl("fattn", s), inputs, ("q", "k", "v", "coords")
    if package == "rope2d":
        from benchmarks import bench_rope2d as b
        from fattn.rope2d import axial_angles, rope2d_attention

        r = (b.SMOKE_SHAPES if smoke else b.GPU_SHAPES)[0 if smoke else index]
        dt = DTYPES[dtype or ("fp32" if smoke else "bf16")]
        q, k, v = (torch.randn(r.B, r.H, r.N, r.D, device=dev, dtype=dt) for _ in range(3))
        angles = axial_angles(r.side, r.side, r.D, device=dev)

        def rope2d(q, k, v, angles):  # type: ignore[no-untyped-def]
            return rope2d_attention(q, k, v, angles, n_prefix=r.n_prefix)

        return rope2d, dict(q=q, k=k, v=v, angles=angles), ("q", "k", "v")
    if package == "swba":
        from benchmarks import bench_swba as b
        from fattn.swba import swba_attention

        w = b.SMOKE if smoke else b.SHAPES[index]
        dt = DTYPES[dtype] if dtype else w["dtype"]
        q, k, v = (torch.randn(w["B"], w["H"], w["N"], w["D"], device=dev, dtype=dt) for _ in range(3))

        def swba(q, k, v):  # type: ignore[no-untyped-def]
            return swba_attention(q, k, v, w["bs"], w["w"])

        return swba, dict(q=q, k=k, v=v), ("q", "k", "v")
    from benchmarks import bench_fp8 as b
    from fattn.fp8 import fp8_attention

    name = list(b.SMOKE_SHAPES if smoke else b.SHAPES)[0 if smoke else index]
    bsz, heads, n, d, causal = (b.SMOKE_SHAPES if smoke else b.SHAPES)[name]
    dt = DTYPES[dtype or ("fp32" if smoke else "bf16")]
    q, k, v = (torch.randn(bsz, heads, n, d, device=dev, dtype=dt) for _ in range(3))

    def fp8(q, k, v):  # type: ignore[no-untyped-def]
        return fp8_attention(q, k, v, causal=causal)

    return fp8, dict(q=q, k=k, v=v), ("q", "k", "v")


def timed_calls(case: Case) -> dict[str, Callable[[], None]]:
    """The forward (no grad) and forward+backward calls of a case, as the benchmarks time them
    (benchmarks.harness.timed_call): fwd+bwd is `autograd.grad` of the inputs named in the case with
    a fixed random output gradient. Runs the forward once here (to size that gradient)."""
    fn, inputs, grads = case
    leaves = [inputs[g].requires_grad_(True) for g in grads]
    grad_out = torch.randn_like(fn(**inputs))

    def fwd() -> None:
        with torch.no_grad():
            fn(**inputs)

    def fwd_bwd() -> None:
        torch.autograd.grad(fn(**inputs), leaves, grad_out)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def main() -> None:
    for package in PACKAGES:
        fn, inputs, grads = fattn_case(package, smoke=True)
        for name in grads:
            inputs[name].requires_grad_(True)
        out = fn(**inputs)
        out.float().square().sum().backward()
        missing = [name for name in grads if inputs[name].grad is None]
        assert not missing, f"{package}: no gradient for {missing}"
        print(f"{package}: output {list(out.shape)} {out.dtype}, gradients for {', '.join(grads)}")


if __name__ == "__main__":
    main()

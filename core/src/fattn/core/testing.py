"""The test harness every fattn package uses.

- `device()`: CUDA when present, otherwise the CPU (kernels then need `TRITON_INTERPRET=1`, which the
  fattn pytest plugin in `tests_shared/` sets before anything imports a kernel).
- `randn` / `rand`: fresh random inputs, optionally as non-contiguous views.
- `check_forward_backward`: runs an op and its plain-PyTorch reference in float64 and in the input's
  own dtype, then checks the output and every input gradient: the op's error against float64 must be
  at most `factor` times PyTorch's own low-precision error, plus a small floor.
- `cases` / `case_id`: readable parametrization ids such as `B2-N197-H6-D64-fp16`, with bf16 cases
  marked so the plugin skips them under the interpreter (it cannot do bf16 arithmetic).
- `check_custom_op`: `torch.library.opcheck` plus a `torch.compile(fullgraph=True)` run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fattn.core.checks import dtype_name
from fattn.core.runtime import interpreter_enabled

__all__ = [
    "DTYPE_SHORT",
    "Comparison",
    "assert_close",
    "assert_deterministic",
    "case_id",
    "cases",
    "check_custom_op",
    "check_forward_backward",
    "compile_backend",
    "device",
    "error_floor",
    "make_noncontiguous",
    "on_gpu",
    "rand",
    "randn",
    "rel_l2",
    "test_dtypes",
    "zero_fills_during",
]

DTYPE_SHORT = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
}


def on_gpu() -> bool:
    """True when tests run kernels on a CUDA GPU (not the interpreter)."""
    return torch.cuda.is_available() and not interpreter_enabled()


def device() -> torch.device:
    """The device tests put inputs on: CUDA when kernels run there, else the CPU."""
    return torch.device("cuda") if on_gpu() else torch.device("cpu")


def test_dtypes(*, fp64: bool = False) -> list[torch.dtype]:
    """fp32, fp16 and bf16 (bf16 cases are marked and skipped under the interpreter)."""
    out = [torch.float32, torch.float16, torch.bfloat16]
    return ([torch.float64] if fp64 else []) + out


test_dtypes.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def case_id(**dims: Any) -> str:
    """Readable id: case_id(B=2, N=197, H=6, D=64, dtype=torch.float16) -> 'B2-N197-H6-D64-fp16'."""
    parts = []
    for key, value in dims.items():
        if isinstance(value, torch.dtype):
            parts.append(DTYPE_SHORT.get(value, dtype_name(value)))
        elif isinstance(value, bool):
            parts.append(key if value else f"no_{key}")
        elif isinstance(value, (tuple, list)):
            parts.append(key + "x".join(str(v) for v in value))
        elif isinstance(value, str):
            parts.append(value if key in ("mode", "name") else f"{key}_{value}")
        else:
            parts.append(f"{key}{value}")
    return "-".join(parts)


def cases(rows: Iterable[Mapping[str, Any]], *, gpu_only_dims: Callable[[Mapping[str, Any]], bool] | None = None):
    """pytest params for a list of dicts, with readable ids and marks.

    A case whose `dtype` is bf16 gets the `bf16` mark (skipped under the interpreter); a case for which
    `gpu_only_dims(row)` is true gets the `gpu` mark (too slow for the interpreter).
    Use: `@pytest.mark.parametrize("case", cases([...]))` and read `case["N"]` in the test.
    """
    import pytest

    params = []
    for row in rows:
        marks = []
        if row.get("dtype") is torch.bfloat16:
            marks.append(pytest.mark.bf16)
        if gpu_only_dims is not None and gpu_only_dims(row):
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(dict(row), id=case_id(**row), marks=marks))
    return params


def make_noncontiguous(x: torch.Tensor) -> torch.Tensor:
    """A copy of x with the same values, as a non-contiguous view (every dim stride-padded, last dim strided).

    The view is sliced out of a buffer with padding between rows and a stride of 2 in the last dim,
    so kernels that assume contiguity (or a unit last stride) read the wrong elements.
    """
    if x.dim() == 0:
        return x.clone()
    shape = list(x.shape)
    padded = shape[:-1] + [shape[-1] * 2 + 1]
    buf = torch.full(padded, float("nan"), dtype=x.dtype, device=x.device) if x.is_floating_point() \
        else torch.zeros(padded, dtype=x.dtype, device=x.device)
    view = buf[..., 1::2][..., : shape[-1]]
    view.copy_(x)
    assert not view.is_contiguous() or x.numel() <= 1
    return view.requires_grad_(x.requires_grad)


def randn(
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    noncontiguous: bool = False,
    requires_grad: bool = False,
    scale: float = 1.0,
    dev: torch.device | str | None = None,
) -> torch.Tensor:
    """Fresh standard-normal values (times `scale`), optionally as a non-contiguous view."""
    x = (torch.randn(tuple(shape), dtype=torch.float32, device=dev or device()) * scale).to(dtype)
    if noncontiguous:
        x = make_noncontiguous(x)
    return x.requires_grad_(requires_grad)


def rand(
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    low: float = 0.0,
    high: float = 1.0,
    noncontiguous: bool = False,
    requires_grad: bool = False,
    dev: torch.device | str | None = None,
    quantum: float | None = None,
) -> torch.Tensor:
    """Fresh uniform values in [low, high), optionally as a non-contiguous view.

    quantum: round values to multiples of it (e.g. 2**-12 for sampling coordinates, so that fp32 and
    float64 put a point in the same bilinear cell and gradient tests do not flake at cell borders).
    """
    x = torch.rand(tuple(shape), dtype=torch.float32, device=dev or device()) * (high - low) + low
    if quantum is not None:
        x = torch.round(x / quantum) * quantum
    x = x.to(dtype)
    if noncontiguous:
        x = make_noncontiguous(x)
    return x.requires_grad_(requires_grad)


# Error floors relative to the reference's magnitude. fp32 allows for tf32 matrix math on a GPU
# (Triton's default for an fp32 tl.dot, 10-bit mantissa; measured up to 3.4e-3 relative on attention
# gradients at D = 64..256 on an H200); under the interpreter fp32 dots are exact.
_FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}
_FLOOR_FP32_GPU = 5e-3


def error_floor(dtype: torch.dtype) -> float:
    """The relative error allowed whatever PyTorch's own error is (rounding of the output itself)."""
    if dtype == torch.float32 and on_gpu():
        return _FLOOR_FP32_GPU
    return _FLOOR.get(dtype, 1e-2)


@dataclass
class Comparison:
    """The result of comparing one tensor with its float64 reference."""

    name: str
    error: float  # max |actual - ref64|
    bound: float  # the allowed error
    lowp_error: float | None  # max |PyTorch low precision - ref64|
    scale: float  # magnitude of the reference used for the floor
    detail: str = ""
    ok: bool = field(init=False)

    def __post_init__(self) -> None:
        self.ok = self.error <= self.bound and math.isfinite(self.error)

    def __str__(self) -> str:
        lowp = "n/a" if self.lowp_error is None else f"{self.lowp_error:.3g}"
        return (f"{self.name}: max error {self.error:.3g} vs bound {self.bound:.3g} "
                f"(torch low-precision error {lowp}, ref scale {self.scale:.3g}){self.detail}")


def rel_l2(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error ||actual - ref|| / ||ref|| in float64 (the error measure of an accuracy bound
    such as fattn-fp8's 3%); asserts `actual` is finite (a NaN-poisoned output element left unwritten)."""
    a = actual.detach().double().cpu()
    r = ref.detach().double().cpu()
    assert torch.isfinite(a).all(), "non-finite values in the output (unwritten, NaN-poisoned elements?)"
    return float((a - r).norm() / r.norm().clamp_min(1e-30))


def assert_close(
    name: str,
    actual: torch.Tensor,
    ref64: torch.Tensor,
    *,
    lowp: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    factor: float = 2.0,
    floor: float | None = None,
    scale: float | None = None,
    atol: float = 0.0,
) -> Comparison:
    """Check `actual` against the float64 reference.

    bound = factor * max|lowp - ref64| + floor * scale, where lowp is PyTorch's computation of the
    same reference in the input dtype, floor defaults to `error_floor(dtype)` and scale to
    max(|ref64|) (at least 1e-3, so all-zero references still get a floor); `atol` is added as is
    (for results that are exactly zero in float64 but carry rounding in the op). NaN or inf where the
    reference is finite fails, whatever the bound: that is an unwritten or broken output.
    """
    if actual.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {list(actual.shape)} != reference {list(ref64.shape)}")
    dtype = dtype or actual.dtype
    a = actual.detach().to(torch.float64).cpu()
    r = ref64.detach().to(torch.float64).cpu()
    ref_finite = torch.isfinite(r)
    bad = ref_finite & ~torch.isfinite(a)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{name}: {int(bad.sum())} non-finite values where the reference is finite "
                             f"(first at {idx}: {a[idx].item()}); an unwritten (NaN-poisoned) output?")
    mismatch = ~ref_finite & (a != r) & ~(torch.isnan(a) & torch.isnan(r))
    if mismatch.any():
        raise AssertionError(f"{name}: reference has non-finite values the op does not reproduce")
    diff = (a - r).abs().where(ref_finite, torch.zeros_like(a))
    err = float(diff.max()) if diff.numel() else 0.0
    ref_scale = scale if scale is not None else max(float(r.where(ref_finite, 0).abs().max()) if r.numel() else 0.0, 1e-3)
    lowp_err = None
    if lowp is not None:
        lp = lowp.detach().to(torch.float64).cpu()
        lowp_err = float((lp - r).abs().where(ref_finite & torch.isfinite(lp), torch.zeros_like(r)).max()) \
            if r.numel() else 0.0
    fl = error_floor(dtype) if floor is None else floor
    bound = factor * (lowp_err or 0.0) + fl * ref_scale + atol
    detail = ""
    if err > bound and diff.numel():
        idx = tuple(int(i) for i in (diff == diff.max()).nonzero()[0])
        detail = f"; worst at {idx}: got {a[idx].item():.6g}, expected {r[idx].item():.6g}"
    result = Comparison(name, err, bound, lowp_err, ref_scale, detail)
    if not result.ok:
        raise AssertionError(str(result))
    return result


def _clone_inputs(inputs: Mapping[str, Any], grad_names: Sequence[str], dtype: torch.dtype | None) -> dict[str, Any]:
    out = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            t = value.detach()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            t = t.clone()
            if name in grad_names:
                t.requires_grad_(True)
            out[name] = t
        else:
            out[name] = value
    return out


def _as_tuple(x: Any) -> tuple[torch.Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def check_forward_backward(
    fn: Callable[..., Any],
    ref_fn: Callable[..., Any],
    inputs: Mapping[str, Any],
    *,
    grad_names: Sequence[str] = (),
    factor: float = 2.0,
    floor: Mapping[str, float] | None = None,
    atol: Mapping[str, float] | None = None,
    lowp_on_cpu_fallback: bool = True,
    noncontiguous_grad: bool = True,
) -> list[Comparison]:
    """Compare `fn(**inputs)` and the gradients of `grad_names` with `ref_fn` in float64.

    `inputs` are the op's inputs as the test made them (dtype, strides); the floating-point ones
    named in `grad_names` get gradients. The reference runs on float64 copies (the truth) and on
    copies in the inputs' own dtype (PyTorch's low-precision error, which sets the bound). The
    output gradient is fresh random data, given as a non-contiguous view when `noncontiguous_grad`.
    Outputs that are tuples are all compared; gradients flow from the first only. `floor` and `atol`
    map result names ("out", "out[1]", "grad_q", ...) to a relative floor / absolute tolerance.
    Returns the comparisons (for logging); raises AssertionError on the first failure.
    """
    floor = dict(floor or {})
    atol = dict(atol or {})
    lowp_dtype = next((v.dtype for v in inputs.values() if isinstance(v, torch.Tensor) and v.is_floating_point()),
                      torch.float32)

    run_inputs = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and name in grad_names:
            leaf = value.detach().clone() if value.is_contiguous() else make_noncontiguous(value.detach())
            run_inputs[name] = leaf.requires_grad_(True)
        else:
            run_inputs[name] = value
    outs = _as_tuple(fn(**run_inputs))

    ref_inputs = _clone_inputs(inputs, grad_names, torch.float64)
    refs = _as_tuple(ref_fn(**ref_inputs))

    lowp_inputs = _clone_inputs(inputs, grad_names, None)
    try:
        lowps: tuple[torch.Tensor, ...] | None = _as_tuple(ref_fn(**lowp_inputs))
    except (RuntimeError, NotImplementedError):
        if not lowp_on_cpu_fallback:
            raise
        lowps = None  # PyTorch lacks this dtype for some op here: the floor alone sets the bound

    results = []
    for i, (o, r) in enumerate(zip(outs, refs)):
        lp = None if lowps is None else lowps[i]
        name = "out" if i == 0 else f"out[{i}]"
        results.append(assert_close(name, o, r, lowp=lp, dtype=lowp_dtype, factor=factor, floor=floor.get(name),
                                    atol=atol.get(name, 0.0)))

    if grad_names:
        g = torch.randn(outs[0].shape, dtype=torch.float32, device=outs[0].device)
        g_op = g.to(outs[0].dtype)
        if noncontiguous_grad:
            g_op = make_noncontiguous(g_op)
        grads = torch.autograd.grad(outs[0], [run_inputs[n] for n in grad_names], g_op, allow_unused=True)
        ref_grads = torch.autograd.grad(refs[0], [ref_inputs[n] for n in grad_names], g.to(torch.float64).to(refs[0].device),
                                        allow_unused=True)
        lowp_grads: Sequence[torch.Tensor | None] = [None] * len(grad_names)
        if lowps is not None:
            lowp_grads = torch.autograd.grad(lowps[0], [lowp_inputs[n] for n in grad_names],
                                             g.to(lowps[0].dtype).to(lowps[0].device), allow_unused=True)
        for name, gr, rg, lg in zip(grad_names, grads, ref_grads, lowp_grads):
            if rg is None:
                rg = torch.zeros_like(run_inputs[name], dtype=torch.float64)
            if gr is None:
                raise AssertionError(f"grad_{name}: the op returned no gradient")
            key = f"grad_{name}"
            results.append(assert_close(key, gr, rg, lowp=lg, dtype=lowp_dtype, factor=factor, floor=floor.get(key),
                                        atol=atol.get(key, 0.0)))
    return results


def compile_backend() -> str:
    """torch.compile backend for tests: inductor on a GPU; aot_eager on the CPU (same Dynamo and
    AOTAutograd tracing, which is what a graph break would come from, without a C++ build)."""
    import os

    return os.environ.get("FATTN_COMPILE_BACKEND") or ("inductor" if on_gpu() else "aot_eager")


def check_custom_op(
    op: Any,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None = None,
    *,
    public_fn: Callable[..., Any] | None = None,
    public_args: Sequence[Any] | None = None,
    public_kwargs: Mapping[str, Any] | None = None,
    test_utils: Sequence[str] | None = None,
) -> None:
    """`torch.library.opcheck` on the custom op (all its checks, or `test_utils`), and
    `torch.compile(fullgraph=True)` of the public function (forward and backward) matching eager."""
    op = getattr(op, "op", op)  # a FusedOp: check its custom op
    if test_utils is None:
        torch.library.opcheck(op, tuple(args), dict(kwargs or {}))
    else:
        torch.library.opcheck(op, tuple(args), dict(kwargs or {}), test_utils=tuple(test_utils))
    if public_fn is None:
        return
    pargs = tuple(public_args if public_args is not None else args)
    pkw = dict(public_kwargs or {})
    torch._dynamo.reset()
    compiled = torch.compile(public_fn, fullgraph=True, backend=compile_backend())

    def run(f: Callable[..., Any]) -> tuple[torch.Tensor, ...]:
        leaves = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in pargs]
        out = _as_tuple(f(*leaves, **pkw))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
        grads: tuple[torch.Tensor, ...] = ()
        if tensors:
            grads = torch.autograd.grad(out[0].float().sum(), tensors, allow_unused=True)
            grads = tuple(g for g in grads if g is not None)
        return out + grads

    eager = run(public_fn)
    comp = run(compiled)
    for i, (a, b) in enumerate(zip(eager, comp)):
        if not torch.allclose(a.float(), b.float(), atol=1e-3, rtol=1e-3, equal_nan=True):
            raise AssertionError(f"torch.compile result {i} differs from eager: max diff "
                                 f"{(a.float() - b.float()).abs().max().item():.3g}")


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view(torch.uint8) if t.is_floating_point() else t


def assert_deterministic(fn: Callable[[], Sequence[torch.Tensor]], runs: int = 3) -> None:
    """Run `fn` several times and require bit-identical results every time."""
    first = [t.detach().clone() for t in fn()]
    for run in range(1, runs):
        again = fn()
        for i, (a, b) in enumerate(zip(first, again)):
            if not torch.equal(_bits(a), _bits(b.detach())):
                raise AssertionError(f"result {i} differs between run 0 and run {run}: not deterministic")


def zero_fills_during(fn: Callable[[], Any]) -> list[str]:
    """The `aten::zeros` / `aten::zeros_like` calls made while `fn` runs (CPU profiler events): e.g. a
    backward for which autograd materialized an unused output's gradient as a zeros tensor."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name in ("aten::zeros", "aten::zeros_like")]

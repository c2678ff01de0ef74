"""Benchmarks of fattn.msda against Deformable DETR's CUDA op, the grid_sample reference and msda-triton.

    python -m pytest benchmarks/bench_msda.py --benchmark-json=bench-out/msda.json        # GPU
    python -m pytest benchmarks/bench_msda.py --fattn-bench-smoke -q                      # CPU smoke run

Peers (never committed; each skipped when absent):
- msda_cuda: Deformable DETR's `models/ops`, exported to .peers/msda_cuda and compiled there by hand on
  the GPU machine for the measurement (fp32 only: it has no fp16/bf16);
- msda_triton: github.com/rziga/msda-triton, its `src/msda_triton` exported to .peers/msda_triton/src;
- grid_sample: fattn.msda.reference (always present).

Shapes (the issue's): B4, 10000 queries with uniformly random points on levels 64x64/32x32/16x16/8x8
(M8 D32 P4); and Deformable DETR's encoder at 800x1333 (levels 100x167/50x84/25x42/13x21, every token a
query, points near each query's own position as in a trained encoder), B4, M8 D32 P4. fp32 and bf16.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from benchmarks.harness import peer_path, timed_call
from fattn.core.testing import device
from fattn.msda import ms_deform_attn, ms_deform_attn_reference


@dataclass(frozen=True)
class Shape:
    name: str
    N: int
    Lq: int | None  # None: every token is a query (an encoder)
    M: int
    D: int
    levels: tuple[tuple[int, int], ...]
    P: int
    local: bool  # points near each query's own position (encoder) rather than uniform

    @property
    def S(self) -> int:
        return sum(h * w for h, w in self.levels)

    @property
    def queries(self) -> int:
        return self.Lq if self.Lq is not None else self.S


SHAPES = [
    Shape("B4-Q10000-64x64..8x8-M8-D32-P4", 4, 10000, 8, 32, ((64, 64), (32, 32), (16, 16), (8, 8)), 4, False),
    Shape("detr-enc-800x1333-B4-M8-D32-P4", 4, None, 8, 32, ((100, 167), (50, 84), (25, 42), (13, 21)), 4, True),
]
SMOKE = Shape("smoke", 1, None, 2, 8, ((5, 7), (3, 2)), 2, True)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ["fattn", "fattn-deterministic", "msda_cuda", "msda_triton", "grid_sample"]
OPS = ["fwd", "fwd+bwd"]


def make_inputs(shape: Shape, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    dev = device()
    gen = torch.Generator(device=dev).manual_seed(0)
    levels = torch.tensor(shape.levels, dtype=torch.int64, device=dev)
    sizes = levels[:, 0] * levels[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    n, lq, m, d, p, nl = shape.N, shape.queries, shape.M, shape.D, shape.P, len(shape.levels)
    value = torch.randn(n, shape.S, m, d, device=dev, generator=gen).to(dtype)
    if shape.local:
        # Query i sits at token i's pixel centre (of its own level); offsets of a few pixels, as a
        # trained encoder's are, keep neighbouring queries on neighbouring pixels.
        ref = torch.empty(lq, 2, device=dev)
        for (h, w), s0 in zip(shape.levels, starts.tolist()):
            ys, xs = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
            ref[s0:s0 + h * w, 0] = (xs.flatten() + 0.5) / w
            ref[s0:s0 + h * w, 1] = (ys.flatten() + 0.5) / h
        wh = torch.stack([levels[:, 1], levels[:, 0]], -1).to(torch.float32)  # (W, H) per level
        offsets = torch.randn(n, lq, m, nl, p, 2, device=dev, generator=gen) * 2.0 / wh[None, None, None, :, None, :]
        loc = ref[None, :, None, None, None, :] + offsets
    else:
        loc = torch.rand(n, lq, m, nl, p, 2, device=dev, generator=gen)
    attn = torch.rand(n, lq, m, nl, p, device=dev, generator=gen)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    return dict(value=value, spatial_shapes=levels, level_start_index=starts, sampling_locations=loc.to(dtype),
                attention_weights=attn.to(dtype))


# --------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------
def _msda_cuda() -> Callable[..., torch.Tensor] | None:
    root = peer_path("msda_cuda")
    if root is None or not torch.cuda.is_available():
        return None
    sys.path.insert(0, str(root))
    try:
        import MultiScaleDeformableAttention as MSDA  # type: ignore[import-not-found]
    except ImportError:
        return None
    finally:
        sys.path.remove(str(root))

    class Fn(torch.autograd.Function):
        # The same calls as Deformable DETR's MSDeformAttnFunction (im2col_step 64, as its module).
        @staticmethod
        def forward(ctx, value, shapes, starts, loc, attn):  # type: ignore[no-untyped-def]
            ctx.save_for_backward(value, shapes, starts, loc, attn)
            return MSDA.ms_deform_attn_forward(value, shapes, starts, loc, attn, 64)

        @staticmethod
        def backward(ctx, grad):  # type: ignore[no-untyped-def]
            value, shapes, starts, loc, attn = ctx.saved_tensors
            gv, gl, ga = MSDA.ms_deform_attn_backward(value, shapes, starts, loc, attn, grad.contiguous(), 64)
            return gv, None, None, gl, ga

    def run(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):  # type: ignore[no-untyped-def]
        return Fn.apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    return run


def _msda_triton() -> Callable[..., torch.Tensor] | None:
    root = peer_path("msda_triton")
    if root is None or not torch.cuda.is_available():
        return None
    pkg_dir = root / "src" / "msda_triton"
    if not (pkg_dir / "frontend.py").exists():
        return None
    # Its __init__ asks importlib.metadata for its version (it is not installed): load the package
    # shell by hand, then its modules.
    pkg = types.ModuleType("msda_triton")
    pkg.__path__ = [str(pkg_dir)]
    sys.modules.setdefault("msda_triton", pkg)
    try:
        spec = importlib.util.spec_from_file_location("msda_triton.frontend", pkg_dir / "frontend.py")
        assert spec is not None and spec.loader is not None
        frontend = importlib.util.module_from_spec(spec)
        sys.modules["msda_triton.frontend"] = frontend
        spec.loader.exec_module(frontend)
    except Exception:
        return None

    def run(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):  # type: ignore[no-untyped-def]
        out = frontend.triton_multiscale_deformable_attention(
            value, spatial_shapes, sampling_locations, attention_weights, "zeros", False)
        return out.flatten(2)

    return run


def _impl(name: str) -> Callable[..., torch.Tensor] | None:
    if name == "fattn":
        return ms_deform_attn
    if name == "fattn-deterministic":
        return lambda **kw: ms_deform_attn(**kw, deterministic=True)
    if name == "grid_sample":
        return ms_deform_attn_reference
    if name == "msda_cuda":
        return _msda_cuda()
    if name == "msda_triton":
        return _msda_triton()
    raise ValueError(name)


def _work(shape: Shape, dtype: torch.dtype, op: str) -> tuple[float, float]:
    """(flops, bytes) per call: 4 corners x D multiply-adds per point; value read once, plus
    locations, weights and output (the backward roughly triples both)."""
    points = shape.N * shape.queries * shape.M * len(shape.levels) * shape.P
    flops = points * 4 * shape.D * 2
    elt = torch.finfo(dtype).bits // 8
    moved = (shape.N * shape.S * shape.M * shape.D + points * 3 + shape.N * shape.queries * shape.M * shape.D) * elt
    factor = 1 if op == "fwd" else 3
    return flops * factor, moved * factor


def _cases() -> list:
    out = []
    for shape in SHAPES:
        for dt in DTYPES:
            for op in OPS:
                for impl in IMPLS:
                    if impl == "fattn-deterministic" and op == "fwd":
                        continue  # same forward as fattn
                    out.append(pytest.param(shape, dt, op, impl, id=f"{op}-{impl}-{shape.name}-{dt}"))
    for op in OPS:
        out.append(pytest.param(SMOKE, "fp32", op, "fattn", id=f"{op}-fattn-smoke-fp32"))
    return out


@pytest.mark.parametrize("shape,dtype_name,op,impl", _cases())
def test_msda(measure, smoke: bool, shape: Shape, dtype_name: str, op: str, impl: str) -> None:  # type: ignore[no-untyped-def]
    if smoke != (shape is SMOKE):
        pytest.skip("smoke runs use the tiny shape only" if smoke else "the smoke shape is for CPU runs")
    dtype = DTYPES[dtype_name]
    if impl == "msda_cuda" and dtype != torch.float32:
        pytest.skip("Deformable DETR's CUDA op supports fp32/fp64 only")
    fn = _impl(impl)
    if fn is None:
        pytest.skip(f"peer {impl} not available (export and build it under .peers/, see this file's docstring)")
    inputs = make_inputs(shape, dtype)
    grads = ("value", "sampling_locations", "attention_weights")
    call, _ = timed_call(fn, inputs, grads, op, impl)

    tuned = None
    if impl.startswith("fattn"):  # which schedule the autotuner picked (see kernels.py)
        from fattn.msda import kernels

        tuned = {"fwd": kernels.msda_fwd_kernel}
        if op != "fwd":
            tuned["bwd"] = kernels.msda_bwd_kernel
    flops, moved = _work(shape, dtype, op)
    measure.run(call, op=f"msda {op}", impl=impl, shape=f"{shape.name}-{dtype_name}", size=shape.queries,
                flops=flops, bytes_moved=moved, tuned=tuned, dtype=dtype_name)

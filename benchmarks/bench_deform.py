"""Benchmarks of fattn.deform against the public fused Triton kernel and the grid_sample reference.

    python -m pytest benchmarks/bench_deform.py --benchmark-json=bench-out/deform.json     # GPU
    python -m pytest benchmarks/bench_deform.py --fattn-bench-smoke -q                     # CPU smoke run

Peers (never committed; each skipped when absent):
- deform_fused: github.com/Alexander0Yang/fused-deform-multi-head-scaled-dot-product-attention-triton,
  its `ops/triton.py` exported to .peers/deform_fused/ops/triton.py (nothing to build). Its API is
  `deform_sdpa_triton(q, k, v, coords, W, H, sm_scale)` with q, k, v [B, S, H, W*H, D] (S query groups =
  S views, every pixel a query), coords [B, S, W*H, S, P, 2] in [0, 1], align_corners=True, no padding
  modes (points outside the map are dropped whole) and no coords gradient. Its forward autotunes 81
  configs per shape; to keep the run within minutes this file trims them to its num_stages=2 half with
  4 or 8 warps (18 configs, its BLOCK_M/BLOCK_N grid kept whole) unless FATTN_BENCH_PEER_FULL_TUNE=1.
- grid_sample: fattn.deform.reference (always present): grid_sample into [B, H, S, Lq, T, P, D], then softmax.

Shapes (the issue's): B2 H8 D32 18x18 with (T, P) = (8, 8) and (12, 12), and B2 T8 P32 H16 D32 14x14;
S = T views, every pixel of every view a query, points uniform in [0, 1]. fp32 and bf16.
`first_call_s` in extra_info: the first fattn call of the process for that case (Triton compile and
autotuning included, unless Triton's on-disk cache already holds the binaries).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from benchmarks.harness import peer_path, timed_call
from fattn.core.testing import device
from fattn.deform import deform_attention, deform_attention_reference


@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    T: int  # views (= query groups S)
    P: int
    H: int
    D: int
    width: int
    height: int

    @property
    def Lq(self) -> int:
        return self.width * self.height


SHAPES = [
    Shape("B2-H8-D32-18x18-T8-P8", 2, 8, 8, 8, 32, 18, 18),
    Shape("B2-H8-D32-18x18-T12-P12", 2, 12, 12, 8, 32, 18, 18),
    Shape("B2-H16-D32-14x14-T8-P32", 2, 8, 32, 16, 32, 14, 14),
]
SMOKE = Shape("smoke", 1, 2, 3, 2, 8, 5, 3)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ["fattn", "deform_fused", "grid_sample"]  # fattn's backward is always deterministic
OPS = ["fwd", "fwd+bwd"]


def make_inputs(shape: Shape, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    dev = device()
    gen = torch.Generator(device=dev).manual_seed(0)
    B, T, H, D, hw = shape.B, shape.T, shape.H, shape.D, shape.Lq
    q, k, v = (torch.randn(B, T, H, hw, D, device=dev, generator=gen).to(dtype) for _ in range(3))
    coords = torch.rand(B, T, hw, T, shape.P, 2, device=dev, generator=gen)
    return dict(q=q, k=k, v=v, coords=coords)


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------
_PEER: dict[str, Callable[..., torch.Tensor] | None] = {}


def _deform_fused() -> Callable[..., torch.Tensor] | None:
    if "deform_fused" in _PEER:
        return _PEER["deform_fused"]
    fn = None
    root = peer_path("deform_fused")
    source = root / "ops" / "triton.py" if root is not None else None
    if source is not None and source.exists() and torch.cuda.is_available():
        try:
            spec = importlib.util.spec_from_file_location("deform_fused_peer", source)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            if os.environ.get("FATTN_BENCH_PEER_FULL_TUNE") != "1":
                tuner = module._fwd_kernel
                tuner.configs = [c for c in tuner.configs if c.num_stages == 2 and c.num_warps in (4, 8)]
            fn = module.deform_sdpa_triton
        except Exception:
            fn = None
    _PEER["deform_fused"] = fn
    return fn


def _impl(name: str, shape: Shape) -> Callable[..., torch.Tensor] | None:
    scale = shape.D ** -0.5
    W, Hh = shape.width, shape.height
    if name == "fattn":
        return lambda q, k, v, coords: deform_attention(q, k, v, coords, W, Hh, scale=scale)
    if name == "grid_sample":
        return lambda q, k, v, coords: deform_attention_reference(q, k, v, coords, W, Hh, scale=scale)
    if name == "deform_fused":
        peer = _deform_fused()
        if peer is None:
            return None
        return lambda q, k, v, coords: peer(q, k, v, coords, W, Hh, scale)
    raise ValueError(name)


def _work(shape: Shape, dtype: torch.dtype, op: str) -> tuple[float, float]:
    """(flops, bytes) per call: per query and sample, q.k and p.v over D after 4-corner blends of K and V;
    bytes: q, k, v, coords and output once (the backward roughly triples both)."""
    samples = shape.B * shape.T * shape.H * shape.Lq * shape.T * shape.P
    flops = samples * shape.D * (2 * 2 + 2 * 4 * 2)
    elt = torch.finfo(dtype).bits // 8
    tensor = shape.B * shape.T * shape.H * shape.Lq * shape.D
    moved = 4 * tensor * elt + shape.B * shape.T * shape.Lq * shape.T * shape.P * 2 * 4
    factor = 1 if op == "fwd" else 3
    return flops * factor, moved * factor


def _cases() -> list:
    out = []
    for shape in SHAPES:
        for dt in DTYPES:
            for op in OPS:
                for impl in IMPLS:
                    out.append(pytest.param(shape, dt, op, impl, id=f"{op}-{impl}-{shape.name}-{dt}"))
    for op in OPS:
        for impl in ("fattn", "grid_sample"):
            out.append(pytest.param(SMOKE, "fp32", op, impl, id=f"{op}-{impl}-smoke-fp32"))
    return out


@pytest.mark.parametrize("shape,dtype_name,op,impl", _cases())
def test_deform(measure, smoke: bool, shape: Shape, dtype_name: str, op: str, impl: str) -> None:  # type: ignore[no-untyped-def]
    if smoke != (shape is SMOKE):
        pytest.skip("smoke runs use the tiny shape only" if smoke else "the smoke shape is for CPU runs")
    dtype = DTYPES[dtype_name]
    if impl == "deform_fused" and dtype_name == "bf16":
        # Its kernel stores `acc.to(tl.float16)` into bf16 outputs: a CompilationError with triton 3.6.
        pytest.skip("deform_fused has no working bf16 path (CompilationError in its kernel)")
    fn = _impl(impl, shape)
    if fn is None:
        pytest.skip(f"peer {impl} not available (export it under .peers/, see this file's docstring)")
    inputs = make_inputs(shape, dtype)
    # The issue asks for gradients of q, k, v and coords; the peer has no coords gradient.
    grads = ("q", "k", "v") if impl == "deform_fused" else ("q", "k", "v", "coords")
    call, first_call_s = timed_call(fn, inputs, grads, op, impl)

    flops, moved = _work(shape, dtype, op)
    out_bytes = inputs["q"].numel() * inputs["q"].element_size()  # the output has q's shape and dtype
    io_mb = (sum(t.numel() * t.element_size() for t in inputs.values()) + out_bytes) / 2**20
    tuned = None
    if impl == "fattn":  # which tiles the autotuner picked, and every candidate's time (FATTN_BENCH_TUNING)
        from fattn.deform import kernels

        tuned = {"fwd": kernels._deform_fwd_kernel}
        if op != "fwd":
            tuned["bwd"] = kernels._deform_bwd_kernel
    measure.run(call, op=f"deform {op}", impl=impl, shape=f"{shape.name}-{dtype_name}", size=shape.T * shape.P,
                flops=flops, bytes_moved=moved, tuned=tuned, dtype=dtype_name, first_call_s=first_call_s,
                io_mb=io_mb)

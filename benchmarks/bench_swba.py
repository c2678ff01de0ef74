"""fattn.swba against torch.compile(flex_attention) with the equivalent BlockMask and naive masked attention.

GPU: `python -m pytest benchmarks/bench_swba.py --benchmark-json=swba.json` (the issue's comparisons and
the N=65536 growth point, ~1-2 min); `FATTN_BENCH_FULL=1 ...` for every impl on every shape and the N sweep.
CPU smoke (tiny shapes, interpreter): `python -m pytest benchmarks/bench_swba.py --fattn-bench-smoke -q`

Peers need nothing exported: FlexAttention ships with torch (>= 2.5); the naive peers are plain PyTorch.
TFLOP/s count only the visible (query, key) pairs: 4 * D flops a pair forward, 10 * D forward+backward.
"""

from __future__ import annotations

import functools
import math
import os
import time

import pytest
import torch

from fattn.core.testing import device
from fattn.swba import kernels as swba_kernels
from fattn.swba import swba_attention, swba_mask

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


def _shape(B: int, H: int, N: int, D: int, dtype: torch.dtype, bs: int, w: int) -> dict:
    short = {F16: "fp16", BF16: "bf16", F32: "fp32"}[dtype]
    return {"name": f"B{B}-H{H}-N{N}-D{D}-{short}-bs{bs}-w{w}", "B": B, "H": H, "N": N, "D": D,
            "dtype": dtype, "bs": bs, "w": w}


KEY_SHAPES = [  # the shapes: fattn against compiled FlexAttention
    _shape(1, 12, 16384, 64, F16, 256, 16),
    _shape(1, 12, 16384, 64, F16, 256, 4),
    _shape(1, 12, 16384, 128, BF16, 256, 16),
]
NAIVE_SHAPE = _shape(1, 12, 4096, 64, F16, 256, 16)  # fattn against naive masked attention (N x N scores)
# Scaling in N at a fixed window: time should grow linearly (x4 from 16384 to 65536). The default run
# measures N=65536 (fattn only) for the growth check; FATTN_BENCH_FULL=1 adds the whole sweep.
SWEEP_SHAPES = [_shape(1, 12, n, 64, F16, 256, 16) for n in (4096, 8192, 32768, 65536)]
# Video-model geometry: 16x16-patch frames of 14x14 (196 tokens, not a multiple of 64).
VIDEO_SHAPE = _shape(2, 16, 196 * 32, 64, BF16, 196, 8)
SHAPES = [*KEY_SHAPES, NAIVE_SHAPE, *SWEEP_SHAPES[1:], VIDEO_SHAPE]
SMOKE = _shape(1, 2, 70, 16, F32, 8, 3)
# fattn-hopper: the Gluon forward for Hopper (fattn.swba.hopper, opt-in FATTN_SWBA_HOPPER=1) beside the default.
IMPLS = ["fattn", "fattn-hopper", "flex", "naive", "sdpa_mask"]
OPS = ["fwd", "fwd+bwd"]
# Dense peers materialize N x N scores (or an N x N mask): cap them so the run does not go out of memory.
DENSE_MAX_N = {"naive": 8192, "sdpa_mask": 16384}
FULL = os.environ.get("FATTN_BENCH_FULL", "0") == "1"


def _cases() -> list:
    """(shape, impl) pairs: by default the issue's comparisons only (the whole GPU run of every package
    has a few minutes); FATTN_BENCH_FULL=1 runs every impl on every shape."""
    if FULL:
        pairs = [(s, i) for s in SHAPES for i in IMPLS if not (i in DENSE_MAX_N and s["N"] > DENSE_MAX_N[i])]
    else:
        pairs = [(s, i) for s in KEY_SHAPES for i in ("fattn", "fattn-hopper", "flex")]
        pairs += [(NAIVE_SHAPE, "fattn"), (NAIVE_SHAPE, "naive"), (SWEEP_SHAPES[-1], "fattn")]
    return [pytest.param(s, i, id=f"{s['name']}-{i}") for s, i in pairs]


def visible_pairs(n: int, bs: int, w: int) -> int:
    """Number of (query, key) pairs the window lets through, summed exactly (ragged last block)."""
    t = torch.arange(n, dtype=torch.int64)
    blk = t // bs
    hi = torch.clamp((blk + 1) * bs, max=n)
    lo = torch.clamp((blk - w + 1) * bs, min=0)
    return int((hi - lo).sum())


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


def _flex_fn(smoke: bool):  # type: ignore[no-untyped-def]
    from torch.nn.attention.flex_attention import flex_attention

    if smoke:  # eager flex on the CPU: checks the mask wiring, no compile
        return flex_attention
    # A fresh compile per benchmark: one shared compiled function would hit Dynamo's recompile
    # limit across the shapes and silently fall back to (slow) eager flex_attention.
    torch._dynamo.reset()
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _flex_block_mask(n: int, bs: int, w: int, dev: torch.device):  # type: ignore[no-untyped-def]
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        qb = q_idx // bs
        kb = kv_idx // bs
        return (kb <= qb) & (kb > qb - w)

    # _compile=True builds the mask block by block instead of materializing N x N booleans (4 GiB at N=65536).
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=dev, _compile=dev.type == "cuda")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape, impl", _cases())
def test_swba(measure, smoke, shape, impl, op, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    if smoke:
        if shape is not KEY_SHAPES[0] and shape is not NAIVE_SHAPE:
            pytest.skip("smoke run: first shapes only")
        shape = SMOKE
    b, h, n, d, dtype, bs, w = (shape[x] for x in ("B", "H", "N", "D", "dtype", "bs", "w"))
    dev = device()
    backward = op == "fwd+bwd"
    if smoke and impl == "flex" and backward and dev.type == "cpu":
        pytest.skip("FlexAttention has no backward on the CPU")
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype, requires_grad=backward) for _ in range(3))
    grad = torch.randn(b, h, n, d, device=dev, dtype=dtype)
    info = {}

    if impl == "fattn-hopper":
        from fattn.swba import hopper

        if smoke or not hopper.supported(q, k, v, 1.0 / math.sqrt(d), bs) or not hopper.HAVE_GLUON:
            pytest.skip("the Gluon forward needs an sm_90 GPU, Gluon and aligned geometry")
        monkeypatch.setenv("FATTN_SWBA_HOPPER", "1")
    if impl in ("fattn", "fattn-hopper"):
        def attn():  # type: ignore[no-untyped-def]
            return swba_attention(q, k, v, bs, w)
    elif impl == "flex":
        start = time.perf_counter()
        block_mask = _flex_block_mask(n, bs, w, dev)
        info["block_mask_build_ms"] = (time.perf_counter() - start) * 1e3
        flex = _flex_fn(smoke)

        def attn():  # type: ignore[no-untyped-def]
            return flex(q, k, v, block_mask=block_mask)
    else:
        mask = swba_mask(n, n, bs, w, device=dev)
        if impl == "naive":
            def attn():  # type: ignore[no-untyped-def]
                return _naive(q, k, v, mask)
        else:
            def attn():  # type: ignore[no-untyped-def]
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    if backward:
        def fn():  # type: ignore[no-untyped-def]
            out = attn()
            return torch.autograd.grad(out, (q, k, v), grad)
    else:
        def fn():  # type: ignore[no-untyped-def]
            with torch.no_grad():
                return attn()

    pairs = b * h * visible_pairs(n, bs, w)
    flops = pairs * d * (10 if backward else 4)
    elem = q.element_size()
    bytes_moved = b * h * n * d * elem * (4 if not backward else 11)
    tuned = None
    if impl in ("fattn", "fattn-hopper"):
        if impl == "fattn-hopper":
            from fattn.swba import hopper

            tuned = {"fwd-gluon": hopper.swba_fwd_hopper_tuned}  # the tile the autotuner picked, and each one's time
        else:
            tuned = {"fwd": swba_kernels.swba_fwd_kernel}
        if backward:
            tuned.update(dkdv=swba_kernels.swba_bwd_dkdv_kernel, dq=swba_kernels.swba_bwd_dq_kernel)
    measure.run(fn, op=f"swba {op}", impl=impl, shape=shape["name"], size=n, flops=flops, bytes_moved=bytes_moved,
                tuned=tuned, visible_fraction=pairs / (b * h * n * n), **info)

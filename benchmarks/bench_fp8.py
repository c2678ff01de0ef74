"""fattn-fp8 benchmarks: FP8 attention forward against bf16 SDPA (cuDNN and flash backends).

Impls per shape (all in one run, so ratios compare like with like):
- `fattn-fp8`: fattn.fp8 on e4m3 inputs quantized beforehand (V tokens-contiguous), bf16 output;
- `fattn-fp8+quant`: fattn.fp8 on bf16 inputs, its fused quantization included in the timing;
- `fattn-fp8+quant-preq`: the same with Q quantized by its own kernel before the attention
  (FATTN_FP8_Q_PREQUANT, an experiment), timed beside the default;
- `fattn-fp8+quant-block`, `fattn-fp8+quant-block-preq`: the same two with `granularity="block"` (K and V
  quantized in one pass with per-block scales, session 20);
- `sdpa-cudnn-bf16`, `sdpa-flash-bf16`: F.scaled_dot_product_attention in bf16 with one backend;
- op "fp8 matmul ceiling": `torch._scaled_mm` on 8192^3 e4m3, the FP8 tensor-core limit of this GPU.
Every attention row carries `ceiling_tflops` and `fraction_of_ceiling` in extra_info.
Also "fp8 fwd+bwd": a training step (forward + backward of bf16 inputs) against SDPA bf16.

GPU: `python -m pytest benchmarks/bench_fp8.py --benchmark-json=fp8.json`
CPU smoke: `python -m pytest benchmarks/bench_fp8.py --fattn-bench-smoke -q`
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from fattn.core.testing import device
from fattn.fp8 import fp8_attention, quantize
from fattn.fp8 import kernels as fp8_kernels
from fattn.fp8 import op as fp8_op

# name -> (B, H, N, D, causal)
SHAPES = {
    "B4-H16-N4096-D128": (4, 16, 4096, 128, False),
    "B4-H16-N4096-D128-causal": (4, 16, 4096, 128, True),
    "B1-H16-N16384-D128": (1, 16, 16384, 128, False),
    "B1-H16-N16384-D128-causal": (1, 16, 16384, 128, True),
    "B4-H16-N4096-D64": (4, 16, 4096, 64, False),
    "B4-H16-N4096-D64-causal": (4, 16, 4096, 64, True),
    "B8-H16-N2048-D256": (8, 16, 2048, 256, False),
    "B16-H12-N1024-D64": (16, 12, 1024, 64, False),  # ViT-B-like sequence lengths
}
SMOKE_SHAPES = {
    "smoke-B1-H2-N45-D64": (1, 2, 45, 64, False),
    "smoke-B1-H2-N45-D64-causal": (1, 2, 45, 64, True),
}
TRAIN_SHAPES = ["B4-H16-N4096-D128", "B4-H16-N4096-D128-causal", "B4-H16-N4096-D64"]

FWD_IMPLS = ["fattn-fp8", "fattn-fp8+quant", "fattn-fp8+quant-preq", "fattn-fp8+quant-block", "fattn-fp8+quant-block-preq",
             "sdpa-cudnn-bf16", "sdpa-flash-bf16"]
TRAIN_IMPLS = ["fattn-fp8", "sdpa-cudnn-bf16", "sdpa-flash-bf16"]


def attention_flops(b: int, h: int, n: int, d: int, causal: bool) -> float:
    """Two matrix products of 2*N*N*D flops per (batch, head); half of them under a causal mask."""
    flops = 4.0 * b * h * n * n * d
    return flops / 2 if causal else flops


def _shape(name: str, smoke: bool) -> tuple[int, int, int, int, bool]:
    if smoke:
        return SMOKE_SHAPES["smoke-B1-H2-N45-D64" + ("-causal" if name.endswith("causal") else "")]
    return SHAPES[name]


def _sdpa_backend(impl: str):  # type: ignore[no-untyped-def]
    from torch.nn.attention import SDPBackend

    return SDPBackend.CUDNN_ATTENTION if "cudnn" in impl else SDPBackend.FLASH_ATTENTION


def _sdpa(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> Callable[[], torch.Tensor]:
    from torch.nn.attention import sdpa_kernel

    backend = _sdpa_backend(impl)

    def run() -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    try:
        run()
    except RuntimeError as e:  # backend unavailable for this GPU / shape / build
        pytest.skip(f"{impl} unavailable: {str(e).splitlines()[0][:200]}")
    return run


@functools.lru_cache(maxsize=1)
def fp8_ceiling_tflops() -> float | None:
    """TFLOP/s of torch._scaled_mm on 8192^3 e4m3 (bf16 out), timed with CUDA events; None without a GPU."""
    if not torch.cuda.is_available():
        return None
    fn = _scaled_mm_fn(8192)
    if fn is None:
        return None
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / reps
    return 2.0 * 8192**3 / seconds / 1e12


def _scaled_mm_fn(n: int) -> Callable[[], torch.Tensor] | None:
    if not hasattr(torch, "_scaled_mm") or not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()  # column-major second operand
    one = torch.tensor(1.0, device="cuda")

    def run() -> torch.Tensor:
        return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True)

    try:
        run()
    except (RuntimeError, TypeError):
        return None
    return run


def _ceiling_info(flops: float) -> dict[str, float]:
    ceiling = fp8_ceiling_tflops()
    return {} if ceiling is None else {"ceiling_tflops": ceiling}


def test_fp8_matmul_ceiling(measure, smoke: bool) -> None:  # type: ignore[no-untyped-def]
    if smoke or not torch.cuda.is_available():
        pytest.skip("the FP8 ceiling (torch._scaled_mm) needs a GPU with FP8 tensor cores")
    fn = _scaled_mm_fn(8192)
    if fn is None:
        pytest.skip("torch._scaled_mm is unavailable on this GPU / build")
    measure.run(fn, op="fp8 matmul ceiling", impl="torch._scaled_mm", shape="M8192-N8192-K8192", size=8192,
                flops=2.0 * 8192**3)


@pytest.mark.parametrize("impl", FWD_IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fp8_forward(measure, smoke: bool, shape: str, impl: str) -> None:  # type: ignore[no-untyped-def]
    b, h, n, d, causal = _shape(shape, smoke)
    if smoke and shape not in ("B4-H16-N4096-D64", "B4-H16-N4096-D64-causal"):
        pytest.skip("smoke run: one shape per mask")
    dev = device()
    in_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16  # the interpreter has no bf16 math
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=in_dtype) for _ in range(3))
    flops = attention_flops(b, h, n, d, causal)
    out_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16
    if impl == "fattn-fp8":
        (q8, qd), (k8, kd), (v8, vd) = quantize(q), quantize(k), quantize(v, tokens_contiguous=True)

        def fn() -> torch.Tensor:
            return fp8_attention(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, causal=causal,
                                 out_dtype=out_dtype)

        bytes_moved = 3 * q.numel() + q.numel() * 2
    elif impl.startswith("fattn-fp8+quant"):
        prequant = impl.endswith("-preq")
        granularity = "block" if "-block" in impl else "head"

        def fn() -> torch.Tensor:
            with fp8_op.q_prequant(prequant):
                return fp8_attention(q, k, v, causal=causal, granularity=granularity)

        # bf16 Q, K, V read, e4m3 K and V written and read, the output written; per head K and V are read twice
        bytes_moved = (3 * q.numel() * 2 + (0 if granularity == "block" else 2 * q.numel() * 2) + 2 * q.numel() * 2
                       + q.numel() * 2)
    else:
        if dev.type != "cuda":
            pytest.skip("SDPA backends are measured on the GPU")
        fn = _sdpa(impl, q, k, v, causal)
        bytes_moved = 4 * q.numel() * 2
    tuned = {"fwd": fp8_kernels._attn_fwd_kernel} if impl.startswith("fattn") else None
    measure.run(fn, op="fp8 fwd", impl=impl, shape=shape, size=n, flops=flops, bytes_moved=bytes_moved,
                tuned=tuned, head_dim=d, causal=causal, **_ceiling_info(flops))
    ceiling = measure.benchmark.extra_info.get("ceiling_tflops")
    tflops = measure.benchmark.extra_info.get("tflops")
    if ceiling and tflops:
        measure.benchmark.extra_info["fraction_of_ceiling"] = tflops / ceiling


@pytest.mark.parametrize("impl", TRAIN_IMPLS)
@pytest.mark.parametrize("shape", TRAIN_SHAPES)
def test_fp8_train_step(measure, smoke: bool, shape: str, impl: str) -> None:  # type: ignore[no-untyped-def]
    b, h, n, d, causal = _shape(shape, smoke)
    if smoke and shape != "B4-H16-N4096-D64":
        pytest.skip("smoke run: one shape")
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(b, h, n, d, device=dev, dtype=dtype)
    if impl == "fattn-fp8":
        def forward() -> torch.Tensor:
            return fp8_attention(q, k, v, causal=causal)
    else:
        if dev.type != "cuda":
            pytest.skip("SDPA backends are measured on the GPU")
        forward = _sdpa(impl, q, k, v, causal)

    def fn() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(forward(), (q, k, v), grad)

    # forward (2 products) + backward (5 products; the fattn backward also recomputes the forward)
    flops = attention_flops(b, h, n, d, causal) * 3.5
    tuned = None
    if impl.startswith("fattn"):
        tuned = {"fwd": fp8_kernels._attn_fwd_kernel, "dkdv": fp8_kernels._attn_bwd_dkdv_kernel,
                 "dq": fp8_kernels._attn_bwd_dq_kernel}
    measure.run(fn, op="fp8 fwd+bwd", impl=impl, shape=shape, size=n, flops=flops, tuned=tuned, head_dim=d,
                causal=causal)

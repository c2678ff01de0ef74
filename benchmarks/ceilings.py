"""Measure this GPU's two ceilings once: device-to-device copy bandwidth and dense matrix rates.

    python -m benchmarks.ceilings

Copy bandwidth counts bytes read plus bytes written. Matrix rates use random data (zeros run faster
than real data), bf16 via torch.matmul and fp8 e4m3 via torch._scaled_mm, each the median of timed
runs after warm-up.
"""

from __future__ import annotations

import torch
import triton.testing


def main() -> None:
    if not torch.cuda.is_available():
        print("no GPU")
        return
    dev = torch.device("cuda")
    n_bytes = 2 * 2**30
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    print(f"{torch.cuda.get_device_name(0)}: copy {2 * n_bytes / ms / 1e6:.0f} GB/s (read + write)")
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    print(f"bf16 matmul {n}^3: {2 * n**3 / ms / 1e9:.0f} TFLOP/s")
    if torch.cuda.get_device_capability() >= (8, 9):
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.ones((), device=dev)
        ms = triton.testing.do_bench(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                                     warmup=50, rep=300, return_mode="median")
        print(f"fp8 e4m3 _scaled_mm {n}^3: {2 * n**3 / ms / 1e9:.0f} TFLOP/s")


if __name__ == "__main__":
    main()

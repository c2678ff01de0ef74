"""Per-kernel GPU time of one deform_attention forward + backward (where the time goes).

    PYTHONPATH=core/src:packages/deform/src python packages/deform/tools/profile_deform.py [B T P H D W Hh dtype]
"""

from __future__ import annotations

import sys

import torch

from fattn.deform import deform_attention


def main() -> None:
    args = sys.argv[1:] or ["2", "12", "12", "8", "32", "18", "18", "fp32"]
    B, T, P, H, D, W, Hh = map(int, args[:7])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args[7]]
    hw = W * Hh
    q, k, v = (torch.randn(B, T, H, hw, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    coords = torch.rand(B, T, hw, T, P, 2, device="cuda", requires_grad=True)
    grad = torch.randn(B, T, H, hw, D, device="cuda", dtype=dtype)

    def step() -> None:
        out = deform_attention(q, k, v, coords, W, Hh)
        torch.autograd.grad(out, [q, k, v, coords], grad)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"B{B} T{T} P{P} H{H} D{D} {W}x{Hh} {args[7]}: per-kernel CUDA time over 5 fwd+bwd steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()

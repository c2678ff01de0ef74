"""Run one fattn op once inside a CUDA profiler range, for Nsight Compute.

    ncu --clock-control none --profile-from-start off -k regex:msda \\
        python -m benchmarks.profile msda --shape 0 --dtype fp32 --op fwd+bwd

The op is called a few times first (autotuning and compiles happen outside the range), then once
between cudaProfilerStart and cudaProfilerStop. Shapes and inputs come from benchmarks.cases.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.cases import DTYPES, PACKAGES, fattn_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", choices=PACKAGES)
    parser.add_argument("--shape", type=int, default=None,
                        help="index into the benchmark module's shapes (default: benchmarks.cases.DEFAULT_SHAPE)")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: the shape's own")
    parser.add_argument("--op", choices=["fwd", "fwd+bwd"], default="fwd")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    fn, inputs, grad_names = fattn_case(args.package, args.shape, args.dtype)
    backward = args.op == "fwd+bwd"
    if backward:
        for name in grad_names:
            inputs[name].requires_grad_(True)

    def once() -> None:
        out = fn(**inputs)
        if backward:
            out.backward(torch.ones_like(out))

    for _ in range(args.warmup):
        once()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    once()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled {args.package} {args.op} shape {args.shape} {args.dtype}")


if __name__ == "__main__":
    main()

"""Run one fattn op once inside a CUDA profiler range, for Nsight Compute.

    ncu --clock-control none --profile-from-start off -k regex:msda \\
        python -m benchmarks.profile msda --shape 0 --dtype fp32 --op fwd+bwd

The op is called a few times first (autotuning and compiles happen outside the range), then once
between cudaProfilerStart and cudaProfilerStop. Shapes are the benchmark modules' SHAPES.
"""

from __future__ import annotations

import argparse

import torch


def _call(package: str, shape_index: int, dtype_name: str):  # type: ignore[no-untyped-def]
    """(fn, inputs dict, names of the differentiable inputs)."""
    if package == "msda":
        from benchmarks import bench_msda as b

        shape = b.SHAPES[shape_index]
        inputs = b.make_inputs(shape, b.DTYPES[dtype_name])
        return b._impl("fattn"), inputs, ("value", "sampling_locations", "attention_weights")
    if package == "deform":
        from benchmarks import bench_deform as b

        shape = b.SHAPES[shape_index]
        inputs = b.make_inputs(shape, b.DTYPES[dtype_name])
        return b._impl("fattn", shape), inputs, ("q", "k", "v", "coords")
    raise SystemExit(f"no profile setup for package {package!r} (msda, deform)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package")
    parser.add_argument("--shape", type=int, default=0, help="index into the benchmark module's SHAPES")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--op", choices=["fwd", "fwd+bwd"], default="fwd")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    fn, inputs, grad_names = _call(args.package, args.shape, args.dtype)
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

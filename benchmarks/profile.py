"""Run one fattn op once inside a CUDA profiler range, for Nsight Compute.

    ncu --clock-control none --profile-from-start off -k regex:msda \\
        python -m benchmarks.profile msda --shape 0 --dtype fp32 --op fwd+bwd

The op is called a few times first (autotuning and compiles happen outside the range), then once
between cudaProfilerStart and cudaProfilerStop. Shapes and inputs come from benchmarks.cases.
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks.cases import DTYPES, PACKAGES, fattn_case, timed_calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", choices=PACKAGES)
    parser.add_argument("--shape", type=int, default=None,
                        help="index into the benchmark module's shapes (default: benchmarks.cases.DEFAULT_SHAPE)")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: the shape's own")
    parser.add_argument("--op", choices=["fwd", "fwd+bwd"], default="fwd")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--kernels", type=int, default=0, metavar="N",
                        help="no profiler range: run N calls under torch.profiler and print each GPU kernel's "
                             "time per call, and the wall time per call (no Nsight needed)")
    parser.add_argument("--also", action="append", default=[], metavar="NAME=VALUE",
                        help="with --kernels: print the table again after setting this environment variable "
                             "(repeatable; the op must read it per call, e.g. FATTN_FAST_LAUNCH=0)")
    args = parser.parse_args()
    if args.kernels < 0:
        parser.error(f"--kernels must be a non-negative number of calls, got {args.kernels}")
    if args.also and not args.kernels:
        parser.error("--also needs --kernels N (it repeats the kernel table)")
    for setting in args.also:
        if "=" not in setting or setting.startswith("="):
            parser.error(f"--also expects NAME=VALUE, got {setting!r}")

    once = timed_calls(fattn_case(args.package, args.shape, args.dtype))[args.op]

    for _ in range(args.warmup):
        once()
    torch.cuda.synchronize()
    if args.kernels:
        kernel_table(once, args.kernels)
        for setting in args.also:  # the same calls again with an environment variable changed
            name, _, value = setting.partition("=")
            os.environ[name] = value
            once()
            torch.cuda.synchronize()
            print(f"--- {setting}")
            kernel_table(once, args.kernels)
        return
    torch.cuda.cudart().cudaProfilerStart()
    once()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled {args.package} {args.op} shape {args.shape} {args.dtype}")


def kernel_table(once, calls: int) -> None:  # type: ignore[no-untyped-def]
    """Per-call GPU time of each kernel over `calls` calls, then the median wall time of a call."""
    import time

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            once()
        torch.cuda.synchronize()
    rows = [(e.device_time_total / calls, e.count / calls, e.key) for e in prof.key_averages()
            if e.device_time_total > 0]
    for us, count, name in sorted(rows, reverse=True):
        print(f"{us:10.1f} us  x{count:4.1f}  {name[:90]}")
    print(f"{sum(r[0] for r in rows):10.1f} us  GPU total per call")
    # The last call's kernels in launch order: a gap before a kernel is GPU time spent waiting for the host.
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    last = kernels[-(len(kernels) // calls):] if kernels else []
    end = last[0].time_range.start if last else 0
    for e in last:
        print(f"    gap {e.time_range.start - end:8.1f} us, then {e.time_range.elapsed_us():8.1f} us  {e.name[:70]}")
        end = e.time_range.end
    walls = []
    for _ in range(max(calls, 5)):
        start = time.perf_counter()
        once()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
    print(f"{sorted(walls)[len(walls) // 2] * 1e6:10.1f} us  wall per call (median)")


if __name__ == "__main__":
    main()

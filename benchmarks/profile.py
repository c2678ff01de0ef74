"""Run one fattn op once inside a CUDA profiler range, for Nsight Compute.

    ncu --clock-control none --profile-from-start off -k regex:msda \\
        python -m benchmarks.profile msda --shape 0 --dtype fp32 --op fwd+bwd

The op is called a few times first (autotuning and compiles happen outside the range), then once
between cudaProfilerStart and cudaProfilerStop. Shapes and inputs come from benchmarks.cases.

    python -m benchmarks.profile msda --op fwd+bwd --stamps 60    # host time of each step, no profiler

`--stamps N` times the host's steps of a call with perf_counter alone (the torch profiler slows the
host down by about as much as it measures): each fattn launch, each torch.empty / torch.zeros, the
op's autograd forward and backward (the backward runs on autograd's device thread), the call's return
and the synchronize after it, as medians over N calls in microseconds from the call's start.
    python -m benchmarks.profile msda --shape 1 --op fwd+bwd --interleave fp32,bf16 --rounds 200

`--interleave` times the op in each listed dtype, alternating call by call (the order flips every
round) so that both see the same host and GPU conditions: the wall-time medians and how often the
second dtype beat the first in a round. Benchmarks time one case after another, and the host's speed
drifts between them by more than a few percent.
`--smoke` runs on the package's tiny CPU shape (with TRITON_INTERPRET=1: a check of this tool).
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks.cases import DTYPES, PACKAGES, fattn_case, timed_calls
from benchmarks.harness import sync
from fattn.core.launch import clear_launch_caches


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
    parser.add_argument("--host", action="store_true",
                        help="with --kernels: also print the last call's host timeline (top-level CPU events and "
                             "kernel launches, each thread) beside its kernels, in microseconds from the call's start")
    parser.add_argument("--stamps", type=int, default=0, metavar="N",
                        help="no profiler: the host time of each step of a call (launches, allocations, the "
                             "op's autograd forward/backward), medians over N calls")
    parser.add_argument("--interleave", default="", metavar="DTYPES",
                        help="comma-separated dtypes (e.g. fp32,bf16): time the op in each, interleaved call by call (one dtype: a plain loop of calls)")
    parser.add_argument("--rounds", type=int, default=100, help="with --interleave: calls per dtype")
    parser.add_argument("--smoke", action="store_true", help="the package's tiny CPU shape (checks this tool)")
    parser.add_argument("--also", action="append", default=[], metavar="NAME=VALUE",
                        help="with --kernels: print the table again after setting this environment variable "
                             "(repeatable; the op must read it per call or when it plans a call's launches, e.g. "
                             "FATTN_FAST_LAUNCH=0, FATTN_SWBA_ALIGNED=0)")
    args = parser.parse_args()
    if args.kernels < 0:
        parser.error(f"--kernels must be a non-negative number of calls, got {args.kernels}")
    if (args.also or args.host) and not args.kernels:
        parser.error("--also and --host need --kernels N (they extend the kernel table)")
    for setting in args.also:
        if "=" not in setting or setting.startswith("="):
            parser.error(f"--also expects NAME=VALUE, got {setting!r}")

    if args.stamps < 0:
        parser.error(f"--stamps must be a non-negative number of calls, got {args.stamps}")
    if args.interleave:
        dtypes = [d.strip() for d in args.interleave.split(",") if d.strip()]
        unknown = [d for d in dtypes if d not in DTYPES]
        if not dtypes or unknown or args.rounds < 1:
            parser.error(f"--interleave needs one or more of {list(DTYPES)} and --rounds >= 1, got "
                         f"{args.interleave!r} / {args.rounds}")
        calls = {d: timed_calls(fattn_case(args.package, args.shape, d, smoke=args.smoke))[args.op] for d in dtypes}
        interleaved(calls, args.rounds, args.warmup)
        return
    once = timed_calls(fattn_case(args.package, args.shape, args.dtype, smoke=args.smoke))[args.op]

    for _ in range(args.warmup):
        once()
    sync()
    if args.stamps:
        print(f"{args.package} {args.op}: host steps, median us from the call's start over {args.stamps} calls "
              f"and since the previous step (M: the calling thread, W: another, e.g. autograd's device thread)")
        previous = 0.0
        for at, thread, step in host_stamps(once, args.package, args.stamps):
            print(f"{at:10.1f} {at - previous:+9.1f}  {thread}  {step}")
            previous = at
        return
    if args.kernels:
        kernel_table(once, args.kernels, host=args.host)
        for setting in args.also:  # the same calls again with an environment variable changed
            name, _, value = setting.partition("=")
            os.environ[name] = value
            clear_launch_caches()  # launch plans are built once per call signature: rebuild them with it
            once()
            torch.cuda.synchronize()
            print(f"--- {setting}")
            kernel_table(once, args.kernels, host=args.host)
        return
    torch.cuda.cudart().cudaProfilerStart()
    once()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled {args.package} {args.op} shape {args.shape} {args.dtype}")


def interleaved(calls: dict, rounds: int, warmup: int) -> None:  # type: ignore[type-arg]
    """Wall time of each call in `calls` ({label: callable}), one of each per round, the order reversed
    every other round; prints medians, quartiles and how often each beat the first label's call."""
    import statistics
    import time

    for once in calls.values():  # compiles and autotuning first, for every variant
        for _ in range(warmup):
            once()
    sync()
    labels = list(calls)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(rounds):
        for label in (labels if r % 2 == 0 else labels[::-1]):
            start = time.perf_counter()
            calls[label]()
            sync()
            times[label].append(time.perf_counter() - start)
    first = labels[0]
    print(f"{'variant':<10} {'median ms':>10} {'p25':>8} {'p75':>8}  faster than {first} in")
    for label in labels:
        t = sorted(times[label])
        q1, q3 = t[len(t) // 4], t[3 * len(t) // 4]
        wins = sum(a < b for a, b in zip(times[label], times[first]))
        print(f"{label:<10} {statistics.median(t) * 1e3:10.3f} {q1 * 1e3:8.3f} {q3 * 1e3:8.3f}  "
              f"{'-' if label == first else f'{wins} of {rounds} rounds'}")


def kernel_table(once, calls: int, host: bool = False) -> None:  # type: ignore[no-untyped-def]
    """Per-call GPU time of each kernel over `calls` calls, then the median wall time of a call; with
    `host`, the last call's host events and kernels on one time axis."""
    import time

    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if host else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            with record_function("fattn-profile-call"):
                once()
            torch.cuda.synchronize()
    # GPU activity only (CPU-side ops and the call marker also report the device time they caused).
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA" and e.name != "fattn-profile-call"),
                     key=lambda e: e.time_range.start)
    totals: dict[str, list[float]] = {}
    for e in kernels:
        total = totals.setdefault(e.name, [0.0, 0])
        total[0] += e.time_range.elapsed_us()
        total[1] += 1
    rows = [(us / calls, count / calls, name) for name, (us, count) in totals.items()]
    for us, count, name in sorted(rows, reverse=True):
        print(f"{us:10.1f} us  x{count:4.1f}  {name[:90]}")
    print(f"{sum(r[0] for r in rows):10.1f} us  GPU total per call")
    # The last call's kernels in launch order: a gap before a kernel is GPU time spent waiting for the host.
    last = kernels[-(len(kernels) // calls):] if kernels else []
    end = last[0].time_range.start if last else 0
    for e in last:
        print(f"    gap {e.time_range.start - end:8.1f} us, then {e.time_range.elapsed_us():8.1f} us  {e.name[:70]}")
        end = e.time_range.end
    if host:
        host_timeline(prof)
    walls = []
    for _ in range(max(calls, 5)):
        start = time.perf_counter()
        once()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
    print(f"{sorted(walls)[len(walls) // 2] * 1e6:10.1f} us  wall per call (median)")


def host_stamps(once, package: str, calls: int) -> list[tuple[float, str, str]]:  # type: ignore[no-untyped-def]
    """(median us from the call's start, "M" or "W", step) of each host step of `once` (see the module
    docstring), from `calls` calls. Steps are wrapped only while this runs."""
    import importlib
    import statistics
    import threading
    import time

    from fattn.core.launch import FastLauncher
    from fattn.core.ops import FusedOp

    stamps: list[tuple[str, int, int]] = []

    def mark(step: str) -> None:
        stamps.append((step, time.perf_counter_ns(), threading.get_ident()))

    def wrapped(fn, name):  # type: ignore[no-untyped-def]
        def stamped(*args, **kwargs):  # type: ignore[no-untyped-def]
            label = name(args) if callable(name) else name
            mark(label + " >")
            try:
                return fn(*args, **kwargs)
            finally:
                mark(label + " <")
        return stamped

    def kernel_name(args) -> str:  # type: ignore[no-untyped-def]
        return "launch " + args[0].jit.__name__  # (args[0]: the FastLauncher)

    patches: list[tuple[object, str, object]] = []

    def patch(owner: object, attr: str, value: object) -> None:
        patches.append((owner, attr, owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)))
        setattr(owner, attr, value)

    for attr in ("launch_planned", "run"):
        patch(FastLauncher, attr, wrapped(getattr(FastLauncher, attr), kernel_name))
    for attr in ("empty", "zeros", "empty_like", "zeros_like"):
        patch(torch, attr, wrapped(getattr(torch, attr), f"torch.{attr}"))
    op_module = importlib.import_module(f"fattn.{package}.op")
    for name, op in vars(op_module).items():
        if isinstance(op, FusedOp) and op._function is not None:  # the eager path's autograd.Function
            for attr in ("forward", "backward"):
                patch(op._function, attr, staticmethod(wrapped(getattr(op._function, attr), f"{name} {attr}")))
    runs = []
    try:
        for _ in range(calls):
            stamps.clear()
            mark("call")
            once()
            mark("returned")
            sync()
            mark("synchronized")
            runs.append(list(stamps))
    finally:
        for owner, attr, value in reversed(patches):
            setattr(owner, attr, value)
    # Calls whose steps came in the most common order (an autotuning or allocator hiccup may add steps).
    orders = [tuple(step for step, _, _ in run) for run in runs]
    usual = max(set(orders), key=orders.count)
    runs = [run for run, order in zip(runs, orders) if order == usual]
    main = runs[0][0][2]
    rows = []
    for i, (step, _, thread) in enumerate(runs[0]):
        at = statistics.median((run[i][1] - run[0][1]) / 1e3 for run in runs)
        rows.append((at, "M" if thread == main else "W", step))
    return rows


def host_timeline(prof) -> None:  # type: ignore[no-untyped-def]
    """The last profiled call: its top-level host events on every thread (autograd's worker thread
    runs the backward), kernel launches, and the kernels, sorted by start, in us from the call's start.
    What the GPU waits for shows as a launch issued after the previous kernel ended."""
    events = prof.events()
    marks = [e for e in events if e.name == "fattn-profile-call" and e.device_type.name == "CPU"]
    if not marks:
        return
    begin = marks[-1].time_range.start
    rows = []
    for e in events:  # everything from the last call's start on belongs to it (its kernels may end later)
        start = e.time_range.start
        if e.name == "fattn-profile-call" or start < begin:
            continue
        on_gpu = e.device_type.name == "CUDA"
        launch = "LaunchKernel" in e.name or "Memset" in e.name or "Memcpy" in e.name
        top = e.cpu_parent is None or e.cpu_parent.name == "fattn-profile-call"
        if on_gpu or launch or top:
            where = "gpu" if on_gpu else f"t{e.thread % 1000:03d}"
            rows.append((start - begin, e.time_range.elapsed_us(), where, e.name))
    print("--- last call, host and GPU (start us, duration us)")
    for start, dur, where, name in sorted(rows):
        print(f"{start:9.1f} {dur:9.1f}  {where}  {name[:80]}")


if __name__ == "__main__":
    main()

"""Where a call's time goes: the GPU's kernels, or the host's work before and between them.

    python -m benchmarks.overhead [msda deform rope2d swba fp8]
    python -m benchmarks.overhead --cprofile msda     # where the host's time goes (forward calls)
    python -m benchmarks.overhead --ab [msda ...]     # fattn.core.launch's shortcut on against off

For fattn at each package's default benchmark shape (benchmarks.cases), forward (no grad) and
forward+backward:
- wall: one call plus a synchronize, as the benchmarks time it (median of 30);
- kernels: the summed device time of every kernel the call launches (torch.profiler), and how many;
- host: the host's time to issue one call when it does not wait for the GPU (median over calls
  issued back to back; above `kernels`, the call is host-bound).
`floor` is an empty Triton kernel's row: the launch and synchronize latency every call pays.
wall - kernels is what the host adds to the GPU's work: the target of launch-path optimizations.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch


def _setups() -> dict[str, Callable[[], tuple[Callable[..., torch.Tensor], dict, tuple[str, ...]]]]:
    """Each package's call at its default benchmark shape (benchmarks.cases), and the floor row."""
    from benchmarks.cases import PACKAGES, fattn_case

    def floor():  # type: ignore[no-untyped-def]
        from fattn.core.launch import launcher

        x = torch.zeros(1, device="cuda", requires_grad=True)

        def empty_kernel(x):  # type: ignore[no-untyped-def]
            launcher(_empty_kernel())[(1,)](x)
            return x * 1.0  # (one elementwise kernel, and a graph for the fwd+bwd row)

        return empty_kernel, dict(x=x), ("x",)

    setups = {"floor": floor}
    for package in PACKAGES:
        setups[package] = lambda package=package: fattn_case(package)
    return setups


def _calls(name: str) -> dict[str, Callable[[], object]]:
    """The package's forward (no grad) and forward+backward calls, inputs built once."""
    from benchmarks.cases import timed_calls

    return timed_calls(_setups()[name]())


def _empty_kernel():  # type: ignore[no-untyped-def]
    import triton

    global _EMPTY
    if _EMPTY is None:
        @triton.jit
        def _noop(x_ptr):
            pass

        _EMPTY = _noop
    return _EMPTY


_EMPTY = None


def _measure(fn: Callable[[], object]) -> tuple[float, float, int, float]:
    """(wall s, kernel s, kernel count, host s) per call."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    walls = []
    for _ in range(30):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
    hosts = []
    for _ in range(10):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        hosts.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_us = sum(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total for e in events)
    return statistics.median(walls), kernel_us / 5 * 1e-6, round(len(events) / 5), statistics.median(hosts)


def _cprofile(name: str, calls: int = 200) -> None:
    """The host-side functions that take the time of `calls` forward calls (no grad), then of
    calls // 4 forward+backward calls: the top entries by own time."""
    import cProfile
    import pstats

    for op, call in _calls(name).items():
        count = calls if op == "fwd" else calls // 4
        for _ in range(5):
            call()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(count):
            call()
        prof.disable()
        torch.cuda.synchronize()
        print(f"== {name} {op}, {count} calls")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def _host_and_wall(fn: Callable[[], object], batch: int = 20) -> tuple[float, float]:
    """(host s, wall s) per call: `batch` calls issued back to back without waiting for the GPU, then
    `batch` calls each followed by a synchronize (as the benchmarks time them)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(batch):
        fn()
    host = (time.perf_counter() - t) / batch
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(batch):
        fn()
        torch.cuda.synchronize()
    return host, (time.perf_counter() - t) / batch


def _ab(names: list[str], rounds: int = 15) -> None:
    """The launch shortcut on against off, interleaved round by round in one process (the host's
    speed drifts by tens of percent between runs, so only a same-process comparison is fair); the
    median per-call host and wall time of each, and how many launches took the shortcut."""
    from fattn.core import launch

    for name in names:
        calls = _calls(name)
        for op, call in calls.items():
            results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
            for on in (True, False):  # warm both paths (compiles, autotuning, the shortcut's cache)
                launch.fast_launch_enabled(on)
                for _ in range(3):
                    call()
            hits_before = sum(f.hits for f in launch._LAUNCHERS.values())
            for _ in range(rounds):
                for on in (True, False):
                    launch.fast_launch_enabled(on)
                    results[on].append(_host_and_wall(call))
            hits = sum(f.hits for f in launch._LAUNCHERS.values()) - hits_before
            row = []
            for on in (True, False):
                host = statistics.median(h for h, _ in results[on]) * 1e6
                wall = statistics.median(w for _, w in results[on]) * 1e6
                row.append(f"{'on' if on else 'off'}: host {host:7.1f} us wall {wall:7.1f} us")
            print(f"{name:<8} {op:<8} " + " | ".join(row) + f" | shortcut launches {hits}", flush=True)


def main() -> None:
    setups = _setups()
    if sys.argv[1:2] == ["--ab"]:
        _ab(sys.argv[2:] or list(setups))
        return
    if sys.argv[1:2] == ["--cprofile"]:
        for name in sys.argv[2:] or list(setups):
            _cprofile(name)
        return
    names = sys.argv[1:] or list(setups)
    for name in names:
        for op, call in _calls(name).items():
            wall, kernels, count, host = _measure(call)
            print(f"{name:<8} {op:<8} wall {wall * 1e6:8.1f} us  kernels {kernels * 1e6:8.1f} us ({count})  "
                  f"host {host * 1e6:8.1f} us  wall-kernels {(wall - kernels) * 1e6:7.1f} us", flush=True)


if __name__ == "__main__":
    main()

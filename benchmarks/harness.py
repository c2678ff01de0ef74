"""Shared benchmark machinery: GPU-correct timing, peak memory, TFLOP/s, peers on disk.

Every benchmark goes through `Measure.run`, so all suites time the same way:
- the timed callable ends with `torch.cuda.synchronize()` (device work is asynchronous). It makes a
  *burst* of back-to-back calls (about `burst_s` of work, as a model's step issues its kernels, the host
  running ahead of the GPU), and the median is per call: the throughput time that TFLOP/s are about
  (as Triton's `do_bench` and `torch.utils.benchmark` measure). Each call's own host time is hidden
  while the GPU is busy with the previous one, and shows when the host is the bottleneck;
- one call from an idle device, synchronized alone (`latency_ms`, the "1-call ms" column), is recorded
  beside it: what a lone call costs, host time and launch latency included;
- warm-up calls first absorb Triton JIT compilation and autotuning, and torch.compile;
- peak memory is measured on its own call, in bytes requested above what was requested before it;
- `extra_info` carries op, impl, shape name, size, peak memory, TFLOP/s and GB/s, which the report
  CLI (`python -m benchmarks.report`) turns into tables and plots.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

__all__ = ["Measure", "describe_config", "gpu_slug", "peer_path", "sync"]

REPO = Path(__file__).resolve().parent.parent


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gpu_slug() -> str:
    """A file-name-safe name of the GPU model, so baselines compare like with like."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0)
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def peer_path(name: str) -> Path | None:
    """Where a peer implementation was exported for measuring beside fattn ($FATTN_PEERS or .peers/).

    Peers are never committed: a benchmark that needs one skips when this returns None.
    """
    root = Path(os.environ.get("FATTN_PEERS", REPO / ".peers"))
    path = root / name
    return path if path.exists() else None


@dataclass
class Measure:
    """Bound to one pytest-benchmark `benchmark` fixture; `run` measures one (op, impl, shape)."""

    benchmark: Any
    warmup: int = 3
    # Rounds: enough to fill min_time_s, within [rounds, max_rounds]. The host adds up to ~0.1 ms of
    # jitter to a call on the lent machines: 20 rounds of a 1 ms op gave medians 10% apart in one run.
    rounds: int = 20
    min_time_s: float = 0.5
    max_rounds: int = 300
    # Back-to-back calls per timed burst: about burst_s of work, within [1, max_burst].
    burst_s: float = 0.01
    max_burst: int = 50
    # One-call latencies: enough to fill latency_time_s, within [latency_calls, 4 * latency_calls].
    latency_calls: int = 10
    latency_time_s: float = 0.2

    def run(
        self,
        fn: Callable[[], Any],
        *,
        op: str,
        impl: str,
        shape: str,
        size: float | None = None,
        flops: float | None = None,
        bytes_moved: float | None = None,
        tuned: dict[str, Any] | None = None,
        **info: Any,
    ) -> None:
        """Time `fn` (a closure over prepared inputs) and record its metadata.

        op: the operation compared ("msda fwd"); impl: "fattn" or a peer's name; shape: a named shape;
        size: the x-axis for plots (e.g. N); flops / bytes_moved: per call, for TFLOP/s and GB/s;
        tuned: {name: @triton.autotune'd kernel} whose pick for this shape (after the warm-up) goes
        into extra_info["config"], so a table says which tiling produced each time.
        """
        from fattn.core import poisoning
        from fattn.core.launch import checking_plans

        # NaN-filling outputs and re-building planned launches' arguments are for tests (the plugin turns
        # both on for every pytest run here); they would cost time here.
        with poisoning(False), checking_plans(False):
            self._run(fn, op=op, impl=impl, shape=shape, size=size, flops=flops, bytes_moved=bytes_moved,
                      tuned=tuned, **info)

    def _run(self, fn: Callable[[], Any], *, op: str, impl: str, shape: str, size: float | None,
             flops: float | None, bytes_moved: float | None, tuned: dict[str, Any] | None, **info: Any) -> None:
        bench = self.benchmark
        bench.group = f"{op} | {shape}"
        cuda = torch.cuda.is_available()
        if cuda:  # every case starts from the same allocator state, whatever the previous case cached
            gc.collect()
            torch.cuda.empty_cache()
        started = time.perf_counter()
        for _ in range(self.warmup):
            fn()
        sync()
        # Warm-up time (compiles, autotuning, a peer's torch.compile): where a device call's minutes go.
        info["warmup_s"] = round(time.perf_counter() - started, 1)
        peak_mb = None
        call_s = 0.0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = _requested_bytes("current")
            call_started = time.perf_counter()
            fn()
            sync()
            call_s = time.perf_counter() - call_started
            peak_mb = (_requested_bytes("peak") - before) / 2**20

        # A burst is `burst` calls, the last one synchronized; pytest-benchmark times `burst` iterations
        # per round and keeps the time per call.
        burst = max(1, min(self.max_burst, round(self.burst_s / max(call_s, 1e-6)))) if cuda else 1
        calls = [0]

        def timed() -> None:
            fn()
            calls[0] += 1
            if calls[0] % burst == 0:
                sync()

        rounds = max(self.rounds, min(self.max_rounds, int(self.min_time_s / max(call_s * burst, 1e-6)))) if cuda else 1
        mallocs = _device_mallocs()
        bench.pedantic(timed, rounds=rounds, iterations=burst, warmup_rounds=1 if cuda else 0)
        # cudaMalloc/cudaFree calls while timing (each can synchronize the device): 0 in a steady state.
        info["device_mallocs"] = _device_mallocs() - mallocs
        info["burst"] = burst
        if cuda:
            info["latency_ms"] = _one_call_ms(fn, max(self.latency_calls, min(
                4 * self.latency_calls, int(self.latency_time_s / max(call_s, 1e-6)))))
        median = _median_seconds(bench)
        if tuned:  # after the timed calls: every kernel has launched for this shape
            info["config"] = "; ".join(f"{name} {describe_config(kernel)}" for name, kernel in tuned.items())
            _tuning_log(f"{op} | {shape} | {impl}", tuned)
        bench.extra_info.update(
            op=op, impl=impl, shape=shape, size=size, peak_mem_mb=peak_mb,
            device=torch.cuda.get_device_name(0) if cuda else "cpu-interpreter",
            **info,
        )
        if median and flops:
            bench.extra_info["tflops"] = flops / median / 1e12
        if median and bytes_moved:
            bench.extra_info["gbps"] = bytes_moved / median / 1e9
        _progress(bench.extra_info, median)


_LOGGED_TIMINGS: dict[int, int] = {}


def _one_call_ms(fn: Callable[[], Any], calls: int) -> float:
    """Median milliseconds of `calls` single calls, each from an idle device and synchronized alone."""
    times = []
    for _ in range(calls):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def _tuning_log(case: str, tuned: dict[str, Any]) -> None:
    """Append every candidate's time of each autotuning that ran for this case to $FATTN_BENCH_TUNING
    (Triton keeps the last tuning's timings on the autotuner; a result read from Triton's disk cache
    has none): which tiles lost, and by how much, without a separate A/B run."""
    path = os.environ.get("FATTN_BENCH_TUNING")
    if not path:
        return
    lines = []
    for name, kernel in tuned.items():
        timings = getattr(kernel, "configs_timings", None)
        if not timings or _LOGGED_TIMINGS.get(id(kernel)) == id(timings):
            continue
        _LOGGED_TIMINGS[id(kernel)] = id(timings)
        lines.append(f"{case} | {name}: {len(timings)} candidates")
        # (Triton times each candidate as [median, p20, p80] ms)
        median_ms = {config: t[0] if isinstance(t, (list, tuple)) else t for config, t in timings.items()}
        for config, ms in sorted(median_ms.items(), key=lambda kv: kv[1]):
            lines.append(f"  {ms * 1e3:9.1f} us  {_config_text(config)}")
    if lines:
        with open(path, "a") as f:
            f.write("\n".join(lines) + "\n")


def _requested_bytes(which: str) -> int:
    """Bytes the program asked the caching allocator for ("current" or "peak" since the last reset):
    unlike memory_allocated, not rounded up to the cached block that served a request (which may be up
    to 1 MiB larger and depends on what earlier cases cached)."""
    stats = torch.cuda.memory_stats()
    key = f"requested_bytes.all.{which}"
    if key in stats:
        return stats[key]
    return torch.cuda.memory_allocated() if which == "current" else torch.cuda.max_memory_allocated()


def _device_mallocs() -> int:
    """cudaMalloc + cudaFree calls of PyTorch's caching allocator so far (0 without CUDA)."""
    if not torch.cuda.is_available():
        return 0
    stats = torch.cuda.memory_stats()
    return stats.get("num_device_alloc", 0) + stats.get("num_device_free", 0)


def describe_config(kernel: Any) -> str:
    """The autotuner's pick at `kernel`'s last launch, e.g. 'BLOCK_M=128 BLOCK_N=64 w4 s3' ('-' when it
    has not been tuned in this process, e.g. a launch that bypasses the autotuner)."""
    config = getattr(kernel, "best_config", None)
    return "-" if config is None else _config_text(config)


def _config_text(config: Any) -> str:
    kwargs = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    cap = getattr(config, "maxnreg", None)
    return f"{kwargs} w{config.num_warps} s{config.num_stages}" + (f" maxnreg{cap}" if cap else "")


def _progress(info: dict[str, Any], median: float | None) -> None:
    """Append one line per measurement to $FATTN_BENCH_PROGRESS as soon as it is taken.

    pytest-benchmark writes its JSON only when the session ends; a run cut off by a time limit still
    leaves these lines behind.
    """
    path = os.environ.get("FATTN_BENCH_PROGRESS")
    if not path:
        return
    ms = f"{median * 1e3:.3f}" if median else "-"
    tflops = f"{info['tflops']:.1f}" if info.get("tflops") else "-"
    peak = f"{info['peak_mem_mb']:.0f}" if info.get("peak_mem_mb") is not None else "-"
    with open(path, "a") as f:
        config = f"  [{info['config']}]" if info.get("config") else ""
        warmup = f" {info['warmup_s']:6.1f} s warm-up" if info.get("warmup_s") is not None else ""
        if info.get("latency_ms") is not None:
            warmup += f" 1-call {info['latency_ms']:.3f} ms"
        if info.get("device_mallocs"):
            warmup += f" {info['device_mallocs']} cudaMalloc/Free while timed"
        f.write(f"{info['op']:<14} {info['shape']:<34} {info['impl']:<18} {ms:>9} ms {tflops:>7} TF/s {peak:>7} MB"
                f"{warmup}{config}\n")


def _median_seconds(bench: Any) -> float | None:
    stats = getattr(bench, "stats", None)
    inner = getattr(stats, "stats", None)
    data = getattr(inner, "data", None)
    if data:
        return statistics.median(data)
    return None


def timed_call(
    fn: Callable[..., torch.Tensor],
    inputs: dict[str, Any],
    grads: tuple[str, ...],
    op: str,
    impl: str,
) -> tuple[Callable[[], None], float]:
    """The callable to time for `op` ("fwd": `fn(**inputs)` without autograd; "fwd+bwd": forward and
    the gradients of the inputs named in `grads`), and the seconds its first call took (compilation
    and autotuning included).

    The first call runs here: a peer that fails or runs out of memory skips the test with the reason;
    a fattn failure is raised.
    """
    if op not in ("fwd", "fwd+bwd"):
        raise ValueError(f"op must be 'fwd' or 'fwd+bwd', got {op!r}")
    if op == "fwd+bwd":
        for name in grads:
            inputs[name].requires_grad_(True)
    leaves = [inputs[n] for n in grads]
    start = time.perf_counter()
    try:
        out = fn(**inputs)
        grad_out = torch.randn_like(out)
        if op == "fwd+bwd":
            torch.autograd.grad(out, leaves, grad_out)
        sync()
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{impl} runs out of memory")
    except Exception as e:
        if impl.startswith("fattn"):
            raise
        pytest.skip(f"{impl} failed: {type(e).__name__}: {e}")
    first_call_s = time.perf_counter() - start
    del out

    if op == "fwd":
        def call() -> None:
            with torch.no_grad():
                fn(**inputs)
    else:
        def call() -> None:
            torch.autograd.grad(fn(**inputs), leaves, grad_out)
    return call, first_call_s

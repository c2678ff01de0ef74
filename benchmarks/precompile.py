"""Compile every autotuning candidate of a package's benchmark cases in parallel, before the benchmark.

    python -m benchmarks.precompile msda                      # every shape and dtype of bench_msda
    python -m benchmarks.precompile swba --shapes 0 1         # two shapes, each in its own dtype

Triton's autotuner compiles its candidates one after another inside the first call of each new shape,
and a change to a kernel's source (or to the lines above it: Triton hashes the starting line number)
invalidates every cached binary. On the lent GPU machines that made a cold msda benchmark spend over
400 s compiling 76 candidates (session 11), most of a 10-minute call.

This spawns worker processes that share Triton's cache directory (set TRITON_CACHE_DIR to keep it,
as benchmarks/gpu_run.sh does). Each runs one benchmark case (benchmarks.cases: forward and backward)
with the autotuner's timing replaced by a compile without launch, for its share of the candidates
(candidate i goes to worker i mod workers-per-case); the autotuning results of these runs are not
stored. The benchmark that follows then finds every candidate compiled and only times binaries.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
from typing import Any

from benchmarks.cases import DTYPES, PACKAGES

_CHILD = "--worker"


def bench_dtypes(package: str) -> list[str]:
    """The dtypes the package's benchmark module runs (its DTYPES), else ["own"] (each shape's own)."""
    dtypes = getattr(_bench_module(package), "DTYPES", None)
    return [d for d in dtypes if d in DTYPES] if dtypes else ["own"]


def shape_count(package: str) -> int:
    """How many shapes the package's benchmark module defines (benchmarks.cases indexes them)."""
    module = _bench_module(package)
    return len(getattr(module, "GPU_SHAPES", None) or module.SHAPES)


def _bench_module(package: str) -> Any:
    return importlib.import_module(f"benchmarks.bench_{package}")


def compile_only(worker: int, workers: int) -> list[str]:
    """Patch Triton's Autotuner so that tuning compiles this worker's share of the candidates instead of
    timing them (no launch); returns the list the patch appends "kernel: config" to, per compile."""
    from triton.runtime.autotuner import Autotuner

    compiled: list[str] = []
    original_run = Autotuner.run

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._precompile_index = 0  # the candidates of one tuning are timed in order
        return original_run(self, *args, **kwargs)

    def bench(self: Any, *args: Any, config: Any, **meta: Any) -> list[float]:
        index = self._precompile_index
        self._precompile_index += 1
        if index % workers != worker:
            return [float("inf")] * 3
        current = {**meta, **config.all_kwargs(), "warmup": True}
        try:
            self.fn.run(*args, **current)
        except Exception as e:  # a candidate the compiler rejects is skipped by the real tuning too
            compiled.append(f"{self.base_fn.__name__}: {config} FAILED {type(e).__name__}")
            return [float("inf")] * 3
        compiled.append(f"{self.base_fn.__name__}: {config}")
        # The worker's first candidate "wins", so the launch after tuning needs no extra compile.
        return [float(index)] * 3

    Autotuner.run = run  # type: ignore[method-assign]
    Autotuner._bench = bench  # type: ignore[method-assign]
    return compiled


def _worker(package: str, shape: int, dtype: str, worker: int, workers: int) -> None:
    """Run one case's fwd and fwd+bwd with this worker's share of the candidates compiled ('own': the
    shape's own dtype)."""
    compiled = compile_only(worker, workers)
    from benchmarks.cases import fattn_case, timed_calls
    from benchmarks.harness import sync

    calls = timed_calls(fattn_case(package, shape, None if dtype == "own" else dtype))
    calls["fwd"]()  # (a no-grad forward may launch other variants than the one autograd records)
    calls["fwd+bwd"]()
    sync()
    print(f"{package} shape {shape} {dtype} worker {worker}/{workers}: {len(compiled)} compiled")
    for line in compiled:
        if "FAILED" in line:
            print("  " + line)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == _CHILD:
        package, shape, dtype, worker, workers = sys.argv[2:7]
        _worker(package, int(shape), dtype, int(worker), int(workers))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", choices=PACKAGES)
    parser.add_argument("--shapes", type=int, nargs="*", default=None, help="shape indices (default: all)")
    parser.add_argument("--dtypes", nargs="*", default=None, choices=["own", *DTYPES],
                        help="default: the benchmark module's DTYPES, else 'own' (each shape's own dtype)")
    parser.add_argument("--procs", type=int, default=12, help="worker processes at a time")
    parser.add_argument("--per-case", type=int, default=4, help="workers sharing one case's candidates")
    args = parser.parse_args()
    if args.procs < 1 or args.per_case < 1:
        parser.error(f"--procs and --per-case must be >= 1, got {args.procs} / {args.per_case}")
    count = shape_count(args.package)
    shapes = args.shapes if args.shapes is not None else list(range(count))
    if any(not 0 <= s < count for s in shapes):
        parser.error(f"--shapes must be indices into bench_{args.package}'s {count} shapes (0..{count - 1}), got {shapes}")
    dtypes = args.dtypes or bench_dtypes(args.package)
    jobs = [(args.package, s, d, w, args.per_case) for s in shapes for d in dtypes for w in range(args.per_case)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_CACHE_AUTOTUNING"}  # no bogus tunings stored
    start, running, failed = time.time(), [], 0
    while jobs or running:
        while jobs and len(running) < args.procs:
            job = jobs.pop(0)
            cmd = [sys.executable, "-m", "benchmarks.precompile", _CHILD, *map(str, job)]
            running.append((job, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                  text=True)))
        for entry in list(running):
            job, proc = entry
            if proc.poll() is None:
                continue
            running.remove(entry)
            out = proc.stdout.read() if proc.stdout else ""
            if proc.returncode:
                failed += 1
                print(f"worker {job} failed (exit {proc.returncode}):\n{out[-1500:]}")
            else:
                print(out.strip())
        time.sleep(0.1)
    print(f"precompile {args.package}: {time.time() - start:.0f} s, {failed} workers failed")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()

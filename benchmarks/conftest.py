"""Benchmark fixtures. Benchmarks run on a CUDA GPU; on the CPU they skip, unless
`--fattn-bench-smoke` asks for a tiny-shape smoke run under the interpreter (checks the code runs)."""

from __future__ import annotations

import pytest

from benchmarks.harness import Measure


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fattn-bench-smoke", action="store_true",
                     help="run benchmarks on tiny shapes under the CPU interpreter (no timings worth reading)")


@pytest.fixture
def smoke(request: pytest.FixtureRequest) -> bool:
    """True for a CPU smoke run: suites then use their tiny shapes."""
    return bool(request.config.getoption("--fattn-bench-smoke"))


@pytest.fixture
def measure(benchmark, request: pytest.FixtureRequest) -> Measure:  # type: ignore[no-untyped-def]
    import torch

    from fattn.core.testing import on_gpu

    if not on_gpu() and not request.config.getoption("--fattn-bench-smoke"):
        pytest.skip("benchmarks need a CUDA GPU (or --fattn-bench-smoke for a CPU smoke run)")
    return Measure(benchmark, warmup=3 if torch.cuda.is_available() else 0)

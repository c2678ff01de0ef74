"""pytest plugin loaded by every fattn test run (see the root conftest.py).

- Chooses where kernels run: a CUDA GPU when one is visible, else the CPU through the Triton
  interpreter (`TRITON_INTERPRET=1` is set here, before any test module imports a kernel).
- Poisons fresh outputs: `FATTN_POISON_ALLOC=1` makes `fattn.core.empty*` fill new buffers with NaN,
  so an element a kernel never writes fails the comparison.
- Checks launch plans: `FATTN_CHECK_PLANS=1` makes `FastLauncher.launch_planned` verify that calls
  with one signature build the same arguments (a signature that misses something would let a plan
  launch stale ones on a GPU); it runs under the interpreter too.
- Seeds every test from a per-run seed and the test's id: inputs are fresh each run, yet a failure
  can be replayed with `--fattn-seed` (the seed is printed in the header and in failure reports).
- Markers: `gpu` (needs a CUDA GPU; skipped otherwise), `bf16` (skipped under the interpreter, which
  cannot do bf16 arithmetic), `slow_interpreter` (skipped under the interpreter unless
  `--fattn-full`).
"""

from __future__ import annotations

import os
import random
import zlib

import pytest


def _cuda_visible() -> bool:
    if os.environ.get("FATTN_FORCE_INTERPRET") == "1":
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing or broken
        return False


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fattn")
    group.addoption("--fattn-seed", type=int, default=None, help="seed for this run (default: random)")
    group.addoption("--fattn-full", action="store_true", help="run slow_interpreter cases on the CPU too")


def pytest_configure(config: pytest.Config) -> None:
    if not _cuda_visible():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["FATTN_POISON_ALLOC"] = "1"
    # Launch plans (fattn.core.launch): check that each op's plan signatures fix all the arguments it builds.
    os.environ.setdefault("FATTN_CHECK_PLANS", "1")
    seed = config.getoption("--fattn-seed")
    if seed is None:
        seed = int(os.environ.get("FATTN_SEED", random.SystemRandom().randrange(2**31)))
    config._fattn_seed = seed  # type: ignore[attr-defined]
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on the CPU interpreter)")
    config.addinivalue_line("markers", "bf16: uses bfloat16 arithmetic (skipped on the CPU interpreter)")
    config.addinivalue_line("markers", "slow_interpreter: too slow for the CPU interpreter unless --fattn-full")


def pytest_report_header(config: pytest.Config) -> str:
    from fattn.core.runtime import device_summary

    return f"fattn: {device_summary()}; poisoned outputs; seed {config._fattn_seed} (--fattn-seed to replay)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from fattn.core.testing import on_gpu

    gpu = on_gpu()
    full = config.getoption("--fattn-full")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_bf16 = pytest.mark.skip(reason="bf16 arithmetic is not supported by the Triton interpreter")
    skip_slow = pytest.mark.skip(reason="too slow for the Triton interpreter (use --fattn-full)")
    for item in items:
        if gpu:
            continue
        if item.get_closest_marker("gpu"):
            item.add_marker(skip_gpu)
        elif item.get_closest_marker("bf16"):
            item.add_marker(skip_bf16)
        elif item.get_closest_marker("slow_interpreter") and not full:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _fattn_seed(request: pytest.FixtureRequest) -> int:
    import torch

    seed = (request.config._fattn_seed + zlib.crc32(request.node.nodeid.encode())) % (2**31)
    torch.manual_seed(seed)
    random.seed(seed)
    request.node._fattn_test_seed = seed
    return seed


@pytest.fixture
def fresh_launch_plans():  # type: ignore[no-untyped-def]
    """For a test that changes what a call signature launches behind its back (a forced tiling, a forced
    offset width): fattn.core's remembered kernels and launch plans are cleared before the test and after
    it (so none of its plans serves a later test). Call the returned function to clear them in between."""
    from fattn.core.launch import clear_launch_caches

    clear_launch_caches()
    yield clear_launch_caches
    clear_launch_caches()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.failed and hasattr(item, "_fattn_test_seed"):
        report.sections.append(
            ("fattn seed", f"run seed {item.config._fattn_seed} (replay with --fattn-seed "
                           f"{item.config._fattn_seed}); test seed {item._fattn_test_seed}")
        )

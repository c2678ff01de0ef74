"""The kernels compile for Hopper (sm_90) without register spills and within shared memory, without a
GPU: catches what the permissive interpreter accepts but the compiler does not. Runs compile_check.py
in a process without TRITON_INTERPRET (fattn.core.compile_check reads registers/spills from ptxas)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fattn.core.compile_check import run_compile_script
from fattn.core.testing import on_gpu

_SCRIPT = Path(__file__).with_name("compile_check.py")
# On a GPU the other tests compile and run the kernels themselves; this is for GPU-less CI.
pytestmark = pytest.mark.skipif(on_gpu(), reason="the GPU tests compile the kernels themselves")


def _passed(stdout: str) -> int:
    """Kernels reported "ok" (no spill) or "ok*" (only the spills listed in kernels.MEASURED_SPILLS)."""
    return sum(line.startswith(("ok ", "ok*")) for line in stdout.splitlines())


def test_default_configs_compile_for_sm90() -> None:
    """The configs used when autotuning is off (fp16 D=64, bf16 D=128), each kernel also without its masks
    (ALIGNED), and the Gluon forward for Hopper where this Triton has Gluon: ~25 s on 2 CPU cores."""
    pytest.importorskip("triton.backends.nvidia")
    from fattn.swba import hopper

    res = run_compile_script(_SCRIPT, "--quick")
    assert "FAIL" not in res.stdout and _passed(res.stdout) == 14 + 2 * len(hopper.TILES) * hopper.HAVE_GLUON, res.stdout


@pytest.mark.slow_interpreter
def test_every_candidate_config_compiles_for_sm90() -> None:
    """Every config the autotuner may pick, for every dtype / head-dim class (~3 min: --fattn-full)."""
    pytest.importorskip("triton.backends.nvidia")
    res = run_compile_script(_SCRIPT, "--all")
    assert "FAIL" not in res.stdout and _passed(res.stdout) >= 100, res.stdout

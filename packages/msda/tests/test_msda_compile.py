"""The kernels compile for Hopper (sm_90) without spilling: the interpreter accepts code that
compiled Triton rejects. Runs `compile_check.py --quick` (fattn.core.compile_check) in a process
without TRITON_INTERPRET; `python packages/msda/tests/compile_check.py` checks every autotune config."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_kernels_compile_for_sm90() -> None:
    pytest.importorskip("triton.backends.nvidia")
    from fattn.core.compile_check import run_compile_script

    res = run_compile_script(Path(__file__).with_name("compile_check.py"), "--quick", timeout=300)
    assert "fwd" in res.stdout and "bwd-atomic" in res.stdout and "value-grad" in res.stdout

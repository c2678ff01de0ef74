"""The kernels compile for Hopper (sm_90) without spilling: the interpreter accepts code that
compiled Triton rejects. Runs `compile_check.py --quick` in a process without TRITON_INTERPRET."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_kernels_compile_for_sm90() -> None:
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_check.py")
    res = subprocess.run([sys.executable, str(script), "--quick"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, f"compile check failed:\n{res.stdout}\n{res.stderr[-4000:]}"
    assert "fwd" in res.stdout and "bwd-atomic" in res.stdout

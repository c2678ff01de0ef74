"""The kernels compile for Hopper (sm_90) without a GPU: catches what the permissive interpreter accepts
but the compiler rejects. Runs tests/_compile_check.py --quick in a process without TRITON_INTERPRET."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def test_kernels_compile_for_sm90() -> None:
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = HERE.parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root / "core" / "src"), str(HERE.parent / "src"),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(HERE / "_compile_check.py"), "90", "--quick"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fwd" in proc.stdout and "dkdv" in proc.stdout and "dq" in proc.stdout, proc.stdout

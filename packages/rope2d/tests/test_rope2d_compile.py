"""The kernels compile for Hopper (sm_90) without a GPU: catches what the permissive interpreter accepts
but the compiler rejects, and register spills / shared memory over the limit. Runs
tests/_compile_check.py --quick (D=64 bf16, each kernel's first config, both rotation paths) in a process
without TRITON_INTERPRET via fattn.core.compile_check.run_compile_script."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def test_kernels_compile_for_sm90() -> None:
    pytest.importorskip("triton.backends.nvidia")
    from fattn.core.compile_check import run_compile_script

    proc = run_compile_script(HERE / "_compile_check.py", "90", "--quick", timeout=300)
    for kernel in ("rotate", "fwd", "dkdv", "dq"):
        assert kernel in proc.stdout, proc.stdout
    assert "SPILLS" not in proc.stdout and "FAIL" not in proc.stdout, proc.stdout

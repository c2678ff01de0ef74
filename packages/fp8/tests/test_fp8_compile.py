"""The forward kernel compiles for Hopper (sm_90) with real FP8 tensor-core math (wgmma on e4m3),
pipelined K/V loads and no register spills, for e4m3 and bf16 Q (see compile_check.py; its
`--full` mode compiles every tuned config of every kernel)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fattn.core.compile_check import run_compile_script


@pytest.mark.skipif(sys.platform != "linux", reason="compiles with the CUDA toolchain Triton ships for Linux")
def test_forward_kernel_compiles_to_fp8_wgmma_for_sm90() -> None:
    res = run_compile_script(Path(__file__).with_name("compile_check.py"), timeout=300)
    assert res.stdout.rstrip().endswith("OK"), res.stdout

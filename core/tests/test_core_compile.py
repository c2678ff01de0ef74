"""The core helpers compile for Hopper and Ampere (the interpreter accepts code compiled Triton rejects)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fattn.core.compile_check import run_compile_script


def test_core_kernels_compile_for_sm90_and_sm80() -> None:
    pytest.importorskip("triton.backends.nvidia")
    res = run_compile_script(Path(__file__).with_name("compile_core_kernels.py"))
    assert "bilinear_sample_W1 sm_90" in res.stdout and "dot_bf16 sm_80" in res.stdout
    # Static SASS counts come with each report (cuobjdump ships with Triton's NVIDIA backend).
    assert "SASS instructions" in res.stdout, res.stdout[-2000:]
    # compile_kernel recompiles for the PTX when the cache holds cubins alone (gpu_run.sh's carried cache).
    assert "binary-only cache hit: dot_fp16_cached" in res.stdout, res.stdout[-2000:]

"""Compile the rope2d kernels for a GPU target without a GPU (run in a process WITHOUT TRITON_INTERPRET).

Usage: python _compile_check.py [arch ...]   (default 90). Prints one line per kernel/config with
registers, spill stack bytes and shared memory, and exits non-zero on a compile error or too much shared memory.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import tempfile

import triton
from fattn.rope2d import kernels as K
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SMEM_LIMIT = 227 * 1024
TY = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def _sig(names: list[str], dtype: str, constexprs: dict) -> dict[str, str]:
    # contiguous channels: a launch passes stride 1, which Triton specializes to a constant
    for n in names:
        if n.startswith("stride") and n.endswith("d"):
            constexprs[n] = 1
    sig = {}
    for n in names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = "*fp32" if n.split("_")[0] in ("cos", "sin", "lse", "delta") else TY[dtype]
        elif n.startswith("stride"):
            sig[n] = "i32"
        elif n in ("qk_scale", "sm_scale"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    return sig


def _resources(c, arch: int) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """(registers, spill bytes) from `cuobjdump --dump-resource-usage` of the cubin (no GPU needed)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return int(regs.group(1)) if regs else -1, int(stack.group(1)) if stack else -1


def _attrs(names: list[str], constexprs: dict) -> dict:
    """What a real launch specializes: pointers and strides divisible by 16 (aligned, D a multiple of 16)."""
    div = [(i,) for i, n in enumerate(names) if n not in constexprs and (n.endswith("_ptr") or n.startswith("stride"))]
    return {k: [["tt.divisibility", 16]] for k in div}


def _compile(jit_fn, dtype: str, constexprs: dict, arch: int):  # type: ignore[no-untyped-def]
    src = ASTSource(fn=jit_fn, signature=_sig(jit_fn.arg_names, dtype, constexprs), constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 128))


def main(archs: list[int], quick: bool = False) -> int:
    """quick: fp16 and bf16 at D=64 with the first surviving config only (for the test suite)."""
    bad = 0
    dtypes, dims = (("fp16", "bf16"), (64,)) if quick else (("fp16", "bf16", "fp32"), (64, 80, 128, 256))
    for arch, dtype, d in itertools.product(archs, dtypes, dims):
        meta = K._meta(d, "interleaved")
        for name, kern, configs, tiles in (("fwd", K._rope2d_fwd_kernel, K._FWD_CONFIGS, K._FWD_TILES),
                                           ("dkdv", K._rope2d_bwd_dkdv_kernel, K._DKDV_CONFIGS, K._DKDV_TILES),
                                           ("dq", K._rope2d_bwd_dq_kernel, K._DQ_CONFIGS, K._DQ_TILES)):
            kept = K._pruner(tiles)(configs, {"N": 4096, **meta})
            for cfg in kept[:1] if quick else kept:
                for interleaved in (True,) if quick else (True, False):
                    ce = {**meta, "INTERLEAVED": interleaved, **cfg.kwargs}
                    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                    sig = _sig(kern.fn.arg_names, dtype, ce)
                    src = ASTSource(fn=kern.fn, signature=sig, constexprs=ce, attrs=_attrs(kern.fn.arg_names, ce))
                    try:
                        c = triton.compile(src, target=GPUTarget("cuda", arch, 128), options=opts)
                    except Exception as e:
                        print(f"FAIL sm{arch} {name} {dtype} D{d} {cfg}: {e}")
                        bad += 1
                        continue
                    shared = c.metadata.shared
                    regs, spills = _resources(c, arch)
                    # spills cost speed (reported); too much shared memory fails the launch (an error)
                    flag = "  <-- SPILLS" if spills else ""
                    if shared > SMEM_LIMIT:
                        flag = "  <-- SHARED MEMORY OVER LIMIT"
                        bad += 1
                    if flag or interleaved:
                        print(f"sm{arch} {name:4s} {dtype} D{d:3d} M{cfg.kwargs['BLOCK_M']:3d} N{cfg.kwargs['BLOCK_N']:3d} "
                              f"w{cfg.num_warps} s{cfg.num_stages}: regs {regs} stack {spills} "
                              f"smem {shared}{flag}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--quick"]
    sys.exit(main([int(a) for a in args] or [90], quick="--quick" in sys.argv))

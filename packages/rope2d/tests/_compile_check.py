"""Compile the rope2d kernels for a GPU target without a GPU (run in a process WITHOUT TRITON_INTERPRET).

Usage: python _compile_check.py [arch ...]   (default 90). Prints one line per kernel/config with
registers, spills and shared memory, and exits non-zero on a compile error, spills or too much shared memory.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fattn.rope2d import kernels as K

SMEM_LIMIT = 227 * 1024
TY = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def _sig(names: list[str], dtype: str, constexprs: dict) -> dict[str, str]:
    sig = {}
    for n in names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = "*fp32" if n.split("_")[0] in ("cos", "sin", "lse", "delta") else TY[dtype]
        elif n.startswith("stride"):
            sig[n] = "i64"
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


def _compile(jit_fn, dtype: str, constexprs: dict, arch: int):  # type: ignore[no-untyped-def]
    src = ASTSource(fn=jit_fn, signature=_sig(jit_fn.arg_names, dtype, constexprs), constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 128))


def main(archs: list[int]) -> int:
    bad = 0
    for arch, dtype, d in itertools.product(archs, ("fp16", "bf16", "fp32"), (64, 80, 128, 256)):
        meta = K._meta(d, "interleaved")
        for name, kern, configs in (("fwd", K._rope2d_fwd_kernel, K._FWD_CONFIGS),
                                    ("dkdv", K._rope2d_bwd_dkdv_kernel, K._BWD_CONFIGS),
                                    ("dq", K._rope2d_bwd_dq_kernel, K._BWD_CONFIGS)):
            kept = K._prune(configs, {"N": 4096, **meta})
            for cfg in kept:
                for interleaved in (True, False):
                    ce = {**meta, "INTERLEAVED": interleaved, **cfg.kwargs}
                    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                    src = ASTSource(fn=kern.fn, signature=_sig(kern.fn.arg_names, dtype, ce), constexprs=ce)
                    try:
                        c = triton.compile(src, target=GPUTarget("cuda", arch, 128), options=opts)
                    except Exception as e:  # noqa: BLE001
                        print(f"FAIL sm{arch} {name} {dtype} D{d} {cfg}: {e}")
                        bad += 1
                        continue
                    shared = c.metadata.shared
                    regs, spills = _resources(c, arch)
                    flag = "" if spills == 0 and shared <= SMEM_LIMIT else "  <-- BAD"
                    if flag:
                        bad += 1
                    if flag or interleaved:
                        print(f"sm{arch} {name:4s} {dtype} D{d:3d} M{cfg.kwargs['BLOCK_M']:3d} N{cfg.kwargs['BLOCK_N']:3d} "
                              f"w{cfg.num_warps} s{cfg.num_stages}: regs {regs} stack {spills} "
                              f"smem {shared}{flag}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [90]))

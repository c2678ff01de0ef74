"""Compile the deform kernels for a GPU target without a GPU (run without TRITON_INTERPRET).

    python packages/deform/tests/compile_check.py [--arch 90] [--all]

Prints registers, spills and shared memory per kernel / dtype / head dim / config; exits 1 when a
kernel fails to compile or needs more shared memory than an H100 block has.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton
import triton.language as tl
from fattn.deform import kernels
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_TY = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32", "fp64": "*fp64"}
_SHARED_LIMIT = 227 * 1024


def _strides(prefix: str, names: str) -> dict[str, str]:
    return {f"stride_{prefix}{n}": "i32" for n in names}


def _common(acc: str) -> dict[str, str]:
    sig: dict[str, str] = {}
    sig.update(_strides("q", "bshmd"))
    sig.update(_strides("k", "btgpd".replace("g", "h")))
    sig.update(_strides("v", "bthpd"))
    sig.update(_strides("c", "bsmtpc"))
    sig.update(_strides("w", "bsmt"))
    return sig


def fwd_signature(dtype: str, acc: str) -> dict[str, str]:
    t = _TY[dtype]
    sig = {"Q": t, "K": t, "V": t, "C": "*fp32", "VIS": "*u8", "O": t, "LSE": acc}
    sig.update(_common(acc))
    sig.update({n: "i32" for n in ("S", "H", "Lq", "T", "P", "HEAD_DIM", "width", "height")})
    sig["qk_scale"] = "fp32"
    for n in ("BLOCK_D", "ALIGN_CORNERS", "BORDER", "HAS_VIS", "ACC_DTYPE", "BLOCK_M", "BLOCK_N"):
        sig[n] = "constexpr"
    return sig


def bwd_signature(dtype: str, acc: str, deterministic: bool) -> dict[str, str]:
    t = _TY[dtype]
    dkv = t if deterministic else acc
    sig = {"Q": t, "K": t, "V": t, "C": "*fp32", "VIS": "*u8", "O": t, "DO": t, "LSE": acc, "DQ": t,
           "DK": dkv, "DV": dkv, "DC": acc, "DS": acc, "PR": acc}
    sig.update(_common(acc))
    sig.update(_strides("g", "bshmd"))
    sig["stride_dch"] = "i32"
    sig.update({n: "i32" for n in ("S", "H", "Lq", "T", "P", "HEAD_DIM", "width", "height")})
    sig["qk_scale"] = "fp32"
    for n in ("BLOCK_D", "ALIGN_CORNERS", "BORDER", "HAS_VIS", "DETERMINISTIC", "NEED_DCOORDS", "ACC_DTYPE",
              "BLOCK_M", "BLOCK_N"):
        sig[n] = "constexpr"
    return sig


def dkdv_signature(dtype: str, acc: str) -> dict[str, str]:
    t = _TY[dtype]
    sig = {"Q": t, "DO": t, "DS": acc, "PR": acc, "ENTRY_QROW": "*i32", "ENTRY_N": "*i32", "ENTRY_W": acc,
           "OFFSETS": "*i64", "DK": t, "DV": t}
    sig.update(_strides("q", "bshmd"))
    sig.update(_strides("g", "bshmd"))
    sig.update({n: "i32" for n in ("S", "H", "Lq", "T", "HW", "n_keys", "HEAD_DIM")})
    sig["qk_scale"] = "fp32"
    for n in ("BLOCK_D", "BLOCK_E", "ACC_DTYPE"):
        sig[n] = "constexpr"
    return sig


def _ptxas_info(compiled, arch: int) -> str:
    """Registers and spill bytes from `ptxas -v` (CompiledKernel.n_regs needs a GPU driver)."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    res = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    text = res.stderr + res.stdout
    regs = re.findall(r"Used (\d+) registers", text)
    regs = regs[-1] if regs else None
    spill = re.search(r"(\d+) bytes spill stores", text)
    return f"regs {regs or '?'} spill-stores {spill.group(1) if spill else '?'}B"


# Triton specializes integer arguments equal to 1 at launch: contiguous inputs give these unit strides.
_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_cc", "stride_gd")


def _compile(fn, sig, constexprs, arch, num_warps, num_stages):  # type: ignore[no-untyped-def]
    sig = dict(sig)
    constexprs = dict(constexprs)
    for name in _UNIT_STRIDES:
        if name in sig:
            sig[name] = "constexpr"
            constexprs[name] = 1
    # Launch-time specialization also marks pointers and integers divisible by 16 (contiguous inputs
    # with head dims that are multiples of 16): the row strides and every pointer here.
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(sig.items())
             if ty.startswith("*") or (name.startswith("stride_") and not name.endswith(("d", "cc", "cp", "ct", "ch")))}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 128 if arch >= 90 else 64),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--all", action="store_true", help="every dtype, head dim and config")
    parser.add_argument("--quick", action="store_true", help="bf16, head dim 64, first config only (the test)")
    args = parser.parse_args()
    dtypes = ["fp16", "bf16", "fp32", "fp64"] if args.all else ["bf16", "fp32"]
    head_dims = [32, 64, 128, 256] if args.all else [32, 256]
    if args.quick:
        dtypes, head_dims = ["bf16"], [64]
    failures = 0
    for dtype in dtypes:
        acc_tl = tl.float64 if dtype == "fp64" else tl.float32
        acc = "*fp64" if dtype == "fp64" else "*fp32"
        for block_d in head_dims:
            common = {"BLOCK_D": block_d, "ALIGN_CORNERS": True, "BORDER": False, "HAS_VIS": True, "ACC_DTYPE": acc_tl}
            named = {"T": 8, "P": 8, "Lq": 324}
            jobs = []
            fwd_cfgs = kernels._prune_fwd(kernels._fwd_configs(), named, BLOCK_D=block_d)
            bwd_cfgs = kernels._prune_bwd(kernels._bwd_configs(), named, BLOCK_D=block_d)
            if not args.all:
                keep = 1 if args.quick else 2
                fwd_cfgs, bwd_cfgs = fwd_cfgs[:keep], bwd_cfgs[:keep]
            for c in fwd_cfgs:
                jobs.append(("fwd", kernels._deform_fwd_kernel.fn, fwd_signature(dtype, acc), {**common, **c.kwargs}, c))
            for det in (False, True):
                for c in bwd_cfgs:
                    ce = {**common, **c.kwargs, "DETERMINISTIC": det, "NEED_DCOORDS": True}
                    jobs.append((f"bwd{'-det' if det else ''}", kernels._deform_bwd_kernel.fn,
                                 bwd_signature(dtype, acc, det), ce, c))
            jobs.append(("dkdv", kernels._deform_bwd_dkdv_kernel, dkdv_signature(dtype, acc),
                         {"BLOCK_D": block_d, "BLOCK_E": max(8, min(32, 4096 // block_d)), "ACC_DTYPE": acc_tl}, triton.Config({}, num_warps=4,
                                                                                                  num_stages=1)))
            for name, fn, sig, ce, cfg in jobs:
                try:
                    c = _compile(fn, sig, ce, args.arch, cfg.num_warps, cfg.num_stages)
                    shared = c.metadata.shared
                    bad = shared > _SHARED_LIMIT
                    failures += bad
                    print(f"{name:9s} {dtype} D{block_d:<3d} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}: "
                          f"{_ptxas_info(c, args.arch)} shared {shared}{'  TOO MUCH SHARED' if bad else ''}",
                          flush=True)
                except Exception as e:
                    failures += 1
                    print(f"{name:9s} {dtype} D{block_d}: COMPILE FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

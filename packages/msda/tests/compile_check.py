"""Compile the msda kernels for sm_90 / sm_80 without a GPU (run in a process without TRITON_INTERPRET).

Prints one line per kernel/config: registers, spills, shared memory. Exit code 1 on a compile error.
Usage: python packages/msda/tests/compile_check.py [--quick]
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import re
import subprocess
import tempfile

import triton
from fattn.msda.kernels import msda_bwd_kernel, msda_fwd_kernel, msda_value_grad_kernel
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TL = {"fp16": triton.language.float32, "bf16": triton.language.float32, "fp32": triton.language.float32,
      "fp64": triton.language.float64}


def _strides(prefix: str, names: str) -> dict[str, str]:
    return {f"stride_{prefix}{c}": "i64" if c == "x" else "i32" for c in names}


# What Triton's launcher specializes at run time for contiguous inputs with D % 16 == 0: unit strides
# become constants and pointers / row strides carry a divisibility-by-16 hint (enables vector loads).
UNIT_STRIDES = {"stride_vd", "stride_lc", "stride_ap", "stride_gc"}
DIV16 = {"stride_vn", "stride_vs", "stride_vm", "stride_gn", "stride_gq", "D"}


def _source(fn, sig: dict[str, str], consts: dict) -> ASTSource:
    for name in UNIT_STRIDES & set(sig):
        sig[name] = "constexpr"
        consts[name] = 1
    for name in consts:
        sig[name] = "constexpr"
    names = list(fn.arg_names)
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items()
             if k in DIV16 or (v.startswith("*") and k in names)}
    return ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)


def compile_fwd(dt: str, block_q: int, block_d: int, arch: int, warps: int = 4):
    sig = {"value_ptr": f"*{dt}", "shapes_ptr": "*i64", "starts_ptr": "*i64", "loc_ptr": f"*{dt}",
           "attn_ptr": f"*{dt}", "out_ptr": f"*{dt}", "Lq": "i32", "M": "i32", "D": "i32", "L": "i32",
           "LQ_BUCKET": "i32"}
    sig |= _strides("v", "nsmd") | _strides("l", "nqmlpc") | _strides("a", "nqmlp")
    consts = {"P": 4, "ALIGN_CORNERS": False, "BORDER": False, "ACC": TL[dt], "BLOCK_Q": block_q, "BLOCK_D": block_d}
    src = _source(msda_fwd_kernel.fn, sig, consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 128), options={"num_warps": warps})


def compile_bwd(dt: str, block_q: int, block_d: int, arch: int, deterministic: bool, warps: int = 4):
    gdt = "fp64" if dt == "fp64" else "fp32"
    sig = {"value_ptr": f"*{dt}", "shapes_ptr": "*i64", "starts_ptr": "*i64", "loc_ptr": f"*{dt}",
           "attn_ptr": f"*{dt}", "grad_out_ptr": f"*{dt}", "grad_value_ptr": f"*{gdt}", "grad_loc_ptr": f"*{dt}",
           "grad_attn_ptr": f"*{dt}", "dest_ptr": "*i32", "coef_ptr": f"*{gdt}",
           "Lq": "i32", "M": "i32", "D": "i32", "L": "i32", "S": "i32", "LQ_BUCKET": "i32"}
    sig |= _strides("v", "nsmd") | _strides("l", "nqmlpc") | _strides("a", "nqmlp") | _strides("g", "nqc")
    consts = {"P": 4, "ALIGN_CORNERS": False, "BORDER": True, "ACC": TL[dt], "DETERMINISTIC": deterministic,
              "BLOCK_Q": block_q, "BLOCK_D": block_d}
    src = _source(msda_bwd_kernel.fn, sig, consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 128), options={"num_warps": warps})


def compile_value_grad(dt: str, block_d: int, arch: int):
    gdt = "fp64" if dt == "fp64" else "fp32"
    sig = {"row_start_ptr": "*i64", "src_ptr": "*i32", "coef_ptr": f"*{gdt}", "grad_out_ptr": f"*{dt}",
           "grad_value_ptr": f"*{dt}", "n_rows": "i32", "Lq": "i32", "M": "i32", "D": "i32", "S": "i32"}
    sig |= _strides("g", "nqc")
    consts = {"ACC": TL[dt], "BLOCK_R": 16, "BLOCK_D": block_d}
    src = _source(msda_value_grad_kernel, sig, consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 128), options={"num_warps": 4})


# ptxas sometimes trades a few spilled words for occupancy at 8 warps; more than this is a tiling bug.
MAX_SPILL_BYTES = 64


def ptxas_stats(c, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from ptxas -v on the kernel's PTX (CompiledKernel.n_regs needs a GPU)."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(c.asm["ptx"])
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    res = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                         capture_output=True, text=True, check=True)
    os.unlink(f.name)
    regs = int(re.search(r"Used (\d+) registers", res.stderr).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill", res.stderr))
    return regs, spills


def main() -> int:
    quick = "--quick" in sys.argv
    dtypes = ["fp32", "bf16"] if quick else ["fp16", "bf16", "fp32", "fp64"]
    archs = [90] if quick else [90, 80]
    # (BLOCK_Q, D, num_warps): the tiles the autotuner keeps for common head dims.
    shapes = [(64, 32, 8), (32, 32, 4)] if quick else [(64, 32, 8), (32, 32, 4), (16, 32, 4), (8, 32, 4),
                                                        (32, 64, 8), (16, 64, 4), (8, 256, 8), (32, 24, 4)]
    failures = 0
    for arch in archs:
        for dt in dtypes:
            for bq, bd, warps in shapes:
                bd = triton.next_power_of_2(bd)
                if bq * bd / (32 * warps) > (4 if dt == "fp64" else 8):
                    continue  # pruned by the autotuner (kernels._prune)
                jobs = [("fwd", lambda: compile_fwd(dt, bq, bd, arch, warps)),
                        ("bwd-atomic", lambda: compile_bwd(dt, bq, bd, arch, False, warps)),
                        ("bwd-det", lambda: compile_bwd(dt, bq, bd, arch, True, warps))]
                if bq == shapes[0][0]:
                    jobs.append(("value-grad", lambda: compile_value_grad(dt, bd, arch)))
                for name, job in jobs:
                    try:
                        c = job()
                        regs, spills = ptxas_stats(c, arch)
                        print(f"sm_{arch} {dt} {name} BQ{bq} BD{bd} W{warps}: regs {regs} spill bytes {spills} "
                              f"shared {c.metadata.shared}")
                        if spills > MAX_SPILL_BYTES:
                            failures += 1
                    except Exception as e:
                        failures += 1
                        print(f"sm_{arch} {dt} {name} BQ{bq} BD{bd} W{warps}: COMPILE ERROR {type(e).__name__}: {e}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

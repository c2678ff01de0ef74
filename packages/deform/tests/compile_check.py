"""Compile the deform kernels for a GPU target without a GPU (run without TRITON_INTERPRET).

    python packages/deform/tests/compile_check.py [--arch 90] [--all]

Prints registers, spills and shared memory per kernel / dtype / head dim / config; exits 1 when a
kernel fails to compile or needs more shared memory than an H100 block has.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fattn.deform import kernels  # noqa: E402

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


def _compile(fn, sig, constexprs, arch, num_warps, num_stages):  # type: ignore[no-untyped-def]
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 128 if arch >= 90 else 64),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--all", action="store_true", help="every dtype, head dim and config")
    args = parser.parse_args()
    dtypes = ["fp16", "bf16", "fp32", "fp64"] if args.all else ["bf16", "fp32"]
    head_dims = [32, 64, 128, 256] if args.all else [32, 256]
    failures = 0
    for dtype in dtypes:
        acc_tl = tl.float64 if dtype == "fp64" else tl.float32
        acc = "*fp64" if dtype == "fp64" else "*fp32"
        for block_d in head_dims:
            common = {"BLOCK_D": block_d, "ALIGN_CORNERS": True, "BORDER": False, "HAS_VIS": True, "ACC_DTYPE": acc_tl}
            named = {"T": 8, "P": 8, "Lq": 324}
            jobs = []
            fwd_cfgs = kernels._prune(kernels._fwd_configs(), named, BLOCK_D=block_d)
            bwd_cfgs = kernels._prune(kernels._bwd_configs(), named, BLOCK_D=block_d)
            if not args.all:
                fwd_cfgs, bwd_cfgs = fwd_cfgs[:1], bwd_cfgs[:1]
            for c in fwd_cfgs:
                jobs.append(("fwd", kernels._deform_fwd_kernel.fn, fwd_signature(dtype, acc), {**common, **c.kwargs}, c))
            for det in (False, True):
                for c in bwd_cfgs:
                    ce = {**common, **c.kwargs, "DETERMINISTIC": det, "NEED_DCOORDS": True}
                    jobs.append((f"bwd{'-det' if det else ''}", kernels._deform_bwd_kernel.fn,
                                 bwd_signature(dtype, acc, det), ce, c))
            jobs.append(("dkdv", kernels._deform_bwd_dkdv_kernel, dkdv_signature(dtype, acc),
                         {"BLOCK_D": block_d, "BLOCK_E": 16, "ACC_DTYPE": acc_tl}, triton.Config({}, num_warps=4,
                                                                                                  num_stages=1)))
            for name, fn, sig, ce, cfg in jobs:
                try:
                    c = _compile(fn, sig, ce, args.arch, cfg.num_warps, cfg.num_stages)
                    shared = c.metadata.shared
                    bad = shared > _SHARED_LIMIT
                    failures += bad
                    print(f"{name:9s} {dtype} D{block_d:<3d} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}: "
                          f"regs {c.n_regs} spills {c.n_spills} shared {shared}{'  TOO MUCH SHARED' if bad else ''}",
                          flush=True)
                except Exception as e:  # noqa: BLE001
                    failures += 1
                    print(f"{name:9s} {dtype} D{block_d}: COMPILE FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile the deform kernels for a GPU target without a GPU (run without TRITON_INTERPRET).

    python packages/deform/tests/compile_check.py [--arch 90] [--all | --quick]

Prints registers, spills and shared memory per kernel / dtype / head dim / config (through
fattn.core.compile_check); exits 1 when a kernel fails to compile, spills, or needs more shared memory
than an H100 block has.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
import triton.language as tl

from fattn.core.compile_check import SHARED_MEMORY_LIMIT, compile_kernel
from fattn.deform import kernels
from fattn.deform.op import dkdv_block_e

_TY = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32", "fp64": "*fp64"}
_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
_SPILL_LIMIT = 64  # bytes of spill stores + loads per thread
# Triton specializes integer arguments equal to 1 at launch: contiguous inputs give these unit strides.
_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_cc", "stride_gd")
_DIMS = ("S", "H", "Lq", "T", "P", "HEAD_DIM", "width", "height")


def _strides(prefix: str, names: str) -> dict[str, str]:
    return {f"stride_{prefix}{n}": "i32" for n in names}


def _inputs() -> dict[str, str]:
    sig: dict[str, str] = {}
    for prefix, names in (("q", "bshmd"), ("k", "bthpd"), ("v", "bthpd"), ("c", "bsmtpc"), ("w", "bsmt")):
        sig.update(_strides(prefix, names))
    return sig


def fwd_signature(dtype: str, acc: str) -> dict[str, str]:
    t = _TY[dtype]
    sig = {"Q": t, "K": t, "V": t, "C": "*fp32", "VIS": "*u8", "O": t, "LSE": acc}
    sig.update(_inputs())
    sig.update({n: "i32" for n in _DIMS})
    sig["qk_scale"] = sig["qk_scale_lo"] = "fp32"
    return sig


def bwd_signature(dtype: str, acc: str) -> dict[str, str]:
    t = _TY[dtype]
    sig = {"Q": t, "K": t, "V": t, "C": "*fp32", "VIS": "*u8", "O": t, "DO": t, "LSE": acc, "DQ": t,
           "DC": acc, "DS": acc, "PR": acc}
    sig.update(_inputs())
    sig.update(_strides("g", "bshmd"))
    sig["stride_dch"] = "i32"
    sig.update({n: "i32" for n in _DIMS})
    sig["qk_scale"] = sig["qk_scale_lo"] = "fp32"
    return sig


def dkdv_signature(dtype: str, acc: str) -> dict[str, str]:
    t = _TY[dtype]
    sig = {"Q": t, "DO": t, "DS": acc, "PR": acc, "ORDER": "*i64", "W": acc, "QOFF": "*i64", "GOFF": "*i64",
           "OFFSETS": "*i64", "DK": t, "DV": t}
    sig.update(_strides("q", "hd"))
    sig.update(_strides("g", "hd"))
    sig.update({n: "i32" for n in ("S", "H", "Lq", "T", "HW", "n_keys", "HEAD_DIM")})
    sig["qk_scale"] = sig["qk_scale_lo"] = "fp32"
    return sig


def keys_signature(acc: str) -> dict[str, str]:
    sig = {"C": "*fp32", "KEY": "*i32", "W": acc, "QOFF": "*i64", "GOFF": "*i64"}
    sig.update(_strides("q", "bsm"))
    sig.update(_strides("g", "bsm"))
    sig.update({n: "i32" for n in ("n_samples", "per_batch", "Lq", "T", "P", "width", "height", "sentinel")})
    return sig


def _specialize(sig: dict[str, str], constexprs: dict) -> tuple[dict[str, str], dict, tuple[str, ...]]:
    """Mimic launch specialization of contiguous inputs with head dims that are multiples of 16: unit
    strides become constants, pointers and the other strides are multiples of 16."""
    sig, constexprs = dict(sig), dict(constexprs)
    for name in _UNIT_STRIDES:
        if name in sig:
            del sig[name]
            constexprs[name] = 1
    div16 = tuple(n for n, ty in sig.items()
                  if ty.startswith("*") or (n.startswith("stride_") and not n.endswith(("cp", "ct", "wt", "wm"))))
    return sig, constexprs, div16


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--all", action="store_true", help="every dtype, head dim and config")
    parser.add_argument("--quick", action="store_true",
                        help="bf16 and fp64 (its own scale path), head dim 32, first config only (the test)")
    args = parser.parse_args()
    dtypes = ["fp16", "bf16", "fp32", "fp64"] if args.all else ["bf16", "fp32"]
    head_dims = [32, 64, 128, 256] if args.all else [32, 256]
    if args.quick:
        dtypes, head_dims = ["bf16", "fp64"], [32]
    failures = 0
    for dtype in dtypes:
        acc_tl = tl.float64 if dtype == "fp64" else tl.float32
        acc = "*fp64" if dtype == "fp64" else "*fp32"
        for block_d in head_dims:
            common = {"BLOCK_D": block_d, "EVEN_D": True, "ALIGN_CORNERS": True, "BORDER": False, "HAS_VIS": False,
                      "OFFSETS_64": False, "ACC_DTYPE": acc_tl}
            named = {"T": 12, "P": 12, "Lq": 324, "Q": torch.empty(0, dtype=_TORCH[dtype])}
            fwd_cfgs = kernels._prune_fwd(kernels._fwd_configs(), named, BLOCK_D=block_d)
            bwd_cfgs = kernels._prune_bwd(kernels._bwd_configs(), named, BLOCK_D=block_d)
            if args.quick:
                fwd_cfgs, bwd_cfgs = fwd_cfgs[:1], bwd_cfgs[:1]
            # `.fn`: fattn.core.compile_check does not unwrap @triton.autotune kernels (an Autotuner has
            # `arg_names` too).
            jobs = [("fwd", kernels._deform_fwd_kernel.fn, fwd_signature(dtype, acc), {**common, **c.kwargs}, c)
                    for c in fwd_cfgs]
            jobs += [("bwd", kernels._deform_bwd_kernel.fn, bwd_signature(dtype, acc),
                      {**common, **c.kwargs, "NEED_DCOORDS": True}, c) for c in bwd_cfgs]
            jobs.append(("dkdv", kernels._deform_bwd_dkdv_kernel, dkdv_signature(dtype, acc),
                         {"BLOCK_D": block_d, "EVEN_D": True, "BLOCK_E": dkdv_block_e(block_d, _TORCH[dtype]), "ROW_ALIGN": 16, "ACC_DTYPE": acc_tl},
                         triton.Config({}, num_warps=4, num_stages=1)))
            jobs.append(("keys", kernels._corner_keys_kernel, keys_signature(acc),
                         {"ALIGN_CORNERS": True, "BORDER": False, "ACC_DTYPE": acc_tl, "BLOCK": 256},
                         triton.Config({}, num_warps=4, num_stages=1)))
            for name, fn, sig, ce, cfg in jobs:
                sig, ce, div16 = _specialize(sig, ce)
                cap = f" maxnreg {cfg.maxnreg}" if cfg.maxnreg else ""
                label = f"{name:5s} {dtype} D{block_d:<3d} {cfg.kwargs} w{cfg.num_warps}{cap}"
                try:
                    rep = compile_kernel(fn, sig, ce, arch=args.arch, num_warps=cfg.num_warps,
                                         num_stages=cfg.num_stages, divisible_by_16=div16, name=label,
                                         maxnreg=cfg.maxnreg)
                except Exception as e:
                    failures += 1
                    print(f"{label}: COMPILE FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)
                    continue
                # ptxas trades a few spilled bytes for occupancy at times (80 registers, 16 bytes): fine.
                bad = rep.shared_bytes > SHARED_MEMORY_LIMIT or rep.n_spills > _SPILL_LIMIT or rep.n_regs < 0
                failures += bad
                print(f"{rep}{'  <-- FAIL' if bad else ''}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

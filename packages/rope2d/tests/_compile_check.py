"""Compile the rope2d kernels for a GPU target without a GPU (run in a process WITHOUT TRITON_INTERPRET).

Usage: python _compile_check.py [arch ...] [--quick] [--dims 64,128]  (default 90; all: bf16 and fp32,
D 64/128/256, every config for interleaved pairs, the first for rotate-half; fp16 uses bf16's resources). Prints one line per kernel/config with
registers, spilled bytes (ptxas -v) and shared memory, and exits non-zero on a compile error, a spill in
a D <= 128 config, or too much shared memory. --quick: D=64 bf16, each kernel's first config, both rotation paths (for the test).
The generic plumbing is fattn.core.compile_check; this file only knows the rope2d signatures and configs.
"""

from __future__ import annotations

import itertools
import sys

import torch

from fattn.core.compile_check import SHARED_MEMORY_LIMIT, compile_kernel
from fattn.rope2d import kernels as K

TY = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def _signature(names: list[str], dtype: str, constexprs: dict) -> tuple[dict[str, str], tuple[str, ...]]:
    """Types of the non-constexpr arguments, and those a launch sees as multiples of 16 (aligned
    pointers, strides of contiguous D % 16 == 0 tensors)."""
    sig, div16 = {}, []
    for n in names:
        if n in constexprs:
            continue
        if n.endswith("_ptr"):
            sig[n] = "*fp32" if n.split("_")[0] in ("cos", "sin", "lse", "delta") else TY[dtype]
            div16.append(n)
        elif n.startswith("stride"):
            sig[n] = "i32"
            div16.append(n)
        elif n in ("qk_scale", "sm_scale"):
            sig[n] = "fp32"
        else:  # H, N, n_prefix
            sig[n] = "i32"
    return sig, tuple(div16)


def _unit_strides(names: list[str]) -> dict[str, int]:
    # contiguous channels: a launch passes stride 1, which Triton specializes to the constant 1
    return {n: 1 for n in names if n.startswith("stride") and n.endswith("d")}


def _check(kernel, dtype: str, constexprs: dict, num_warps: int, num_stages: int, label: str,  # type: ignore[no-untyped-def]
           spills_allowed: bool, maxnreg: int | None = None) -> int:
    jit = kernel
    while not hasattr(jit, "arg_names"):  # @triton.autotune wraps the JITFunction in .fn
        jit = jit.fn
    names = list(jit.arg_names)
    ce = {**_unit_strides(names), **constexprs}
    sig, div16 = _signature(names, dtype, ce)
    try:
        rep = compile_kernel(kernel, sig, ce, num_warps=num_warps, num_stages=num_stages, divisible_by_16=div16,
                             arch=ARCH[0], name=label, maxnreg=maxnreg)
    except Exception as e:  # report every failing config, then fail
        print(f"FAIL {label}: {type(e).__name__}: {str(e)[:400]}", flush=True)
        return 1
    bad = rep.shared_bytes > SHARED_MEMORY_LIMIT or (rep.n_spills > 0 and not spills_allowed)
    flag = "  <-- SHARED MEMORY OVER LIMIT" if rep.shared_bytes > SHARED_MEMORY_LIMIT else ("  <-- SPILLS" if rep.n_spills else "")
    print(f"{label}: regs {rep.n_regs} spills {rep.n_spills} smem {rep.shared_bytes} sass {rep.n_sass}{flag}",
          flush=True)
    return int(bad)


ARCH = [90]


def main(archs: list[int], quick: bool = False, only_dims: tuple[int, ...] = ()) -> int:
    bad = 0
    dtypes, dims = (("bf16",), (64,)) if quick else (("bf16", "fp32"), (64, 128, 256))
    dims = only_dims or dims
    for arch, dtype, d in itertools.product(archs, dtypes, dims):
        ARCH[0] = arch
        meta = K._meta(d, "interleaved")
        for interleaved in (True,) if quick else (True, False):
            base = {**meta, "INTERLEAVED": interleaved}
            tag = f"sm{arch} {dtype} D{d} {'il' if interleaved else 'half'}"
            rot = {k: base[k] for k in ("D", "DH", "BLOCK_DH", "INTERLEAVED")}
            bad += _check(K._rope2d_rotate_kernel, dtype, {**rot, "BLOCK": K._rotate_block(d)}, 4, 1,
                          f"{tag} rotate", spills_allowed=False)
            for name, kern, configs, tiles, fp32_tiles, pre_tiles, flag in (
                ("fwd", K._rope2d_fwd_kernel, K._FWD_CONFIGS, K._FWD_TILES, K._FWD_TILES_FP32, K._FWD_TILES_PREROTATED,
                 "PREROTATED_K"),
                ("dkdv", K._rope2d_bwd_dkdv_kernel, K._DKDV_CONFIGS, K._DKDV_TILES, K._DKDV_TILES_FP32, None,
                 "PREROTATED"),
                ("dq", K._rope2d_bwd_dq_kernel, K._DQ_CONFIGS, K._DQ_TILES, K._DQ_TILES_FP32, None, "PREROTATED"),
            ):
                q = torch.empty(0, dtype={"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
                pairs = []
                for prerotated in (False, True):
                    # whole-row products (FULL_ROWS_ENV) where the head dim allows them, and not; the forward
                    # keeps some tiles for pre-rotated k only: prune as a launch with those flags does
                    for full in sorted({False, K._full_rows(d, enabled=True)}):
                        spill = K._FWD_TILES_SPILL_FULL_ROWS if name == "fwd" else None
                        kept = K._pruner(tiles, fp32_tiles, pre_tiles, spill)(
                            configs, {"N": 4096, "q_ptr": q, **meta}, **{flag: prerotated, "FULL_ROWS": full})
                        if not interleaved or quick:
                            kept = kept[:1]  # the pairing only changes the loads: one config suffices
                        pairs += [(cfg, prerotated, {"FULL_ROWS": full}) for cfg in kept]
                for cfg, prerotated, full in pairs:
                    ce = {**base, flag: prerotated, **full, **cfg.kwargs}
                    label = (f"{tag} {name:4s} pre{int(prerotated)}{' full' if full.get('FULL_ROWS') else ''} M{cfg.kwargs['BLOCK_M']:3d} "
                             f"N{cfg.kwargs['BLOCK_N']:3d} w{cfg.num_warps} s{cfg.num_stages}"
                             + (f" cap{cfg.maxnreg}" if cfg.maxnreg else ""))
                    # spills cost speed, not correctness: tolerated for D > 128 and fp32 (not the fast paths)
                    bad += _check(kern, dtype, ce, cfg.num_warps, cfg.num_stages, label,
                                  spills_allowed=d > 128 or dtype == "fp32", maxnreg=cfg.maxnreg)
            if not quick:
                # Triton turns scalar int arguments equal to 1 into constants (H=1, N=1, one class token):
                # every kernel must still compile with them
                ones = {"H": 1, "N": 1, "n_prefix": 1}
                for kern, flag in ((K._rope2d_fwd_kernel, "PREROTATED_K"), (K._rope2d_bwd_dkdv_kernel, "PREROTATED"),
                                   (K._rope2d_bwd_dq_kernel, "PREROTATED")):
                    for prerotated in (False, True):
                        full = {"FULL_ROWS": K._full_rows(d, enabled=True)}
                        ce = {**base, flag: prerotated, **full, "BLOCK_M": 16, "BLOCK_N": 16, **ones}
                        bad += _check(kern, dtype, ce, 4, 2, f"{tag} {kern.fn.__name__} pre{int(prerotated)} H=N=n_prefix=1",
                                      spills_allowed=True)
                bad += _check(K._rope2d_rotate_kernel, dtype, {**rot, "BLOCK": K._rotate_block(d), **ones}, 4, 1,
                              f"{tag} rotate H=N=n_prefix=1", spills_allowed=True)
                bad += _check(K._bwd_delta_kernel, dtype, {"D": d, "BLOCK_D": base["BLOCK_D"], "BLOCK_M": 64, "H": 1,
                                                           "N": 1}, 4, 1, f"{tag} delta H=N=1", spills_allowed=True)
    return 1 if bad else 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    dims_arg = argv[argv.index("--dims") + 1] if "--dims" in argv else ""
    archs = [int(a) for a in argv if a.isdigit() and a != dims_arg]
    sys.exit(main(archs or [90], quick="--quick" in argv,
                  only_dims=tuple(int(d) for d in dims_arg.split(",") if d)))

"""Compile the msda kernels for sm_90 (and sm_80) without a GPU, with fattn.core.compile_check.

Prints one line per kernel / dtype / config: registers, spilled bytes, shared memory. Exits 1 on a
compile error, a spill over MAX_SPILL_BYTES, or shared memory over the sm_90 limit.

    python packages/msda/tests/compile_check.py           # every config the autotuner may keep, sm_90
    python packages/msda/tests/compile_check.py --quick   # what the test runs: the test-mode configs
    python packages/msda/tests/compile_check.py --sm80    # also Ampere
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton
import triton.language as tl

from fattn.core.compile_check import SHARED_MEMORY_LIMIT, compile_kernel
from fattn.msda import kernels

ACC = {"fp16": tl.float32, "bf16": tl.float32, "fp32": tl.float32, "fp64": tl.float64}
# ptxas sometimes trades a few spilled words for occupancy at 8 warps; more than this is a tiling bug.
MAX_SPILL_BYTES = 64

# What Triton's launcher specializes for contiguous inputs with D % 16 == 0: unit strides become
# constants, pointers and the row strides carry a divisibility-by-16 hint (vector loads / atomics).
UNIT_STRIDES = ("stride_vd", "stride_lc", "stride_ap", "stride_gc")
DIV16 = ("value_ptr", "shapes_ptr", "starts_ptr", "loc_ptr", "attn_ptr", "out_ptr", "grad_out_ptr",
         "grad_value_ptr", "grad_acc_ptr", "grad_loc_ptr", "grad_attn_ptr", "dest_ptr", "coef_ptr", "row_start_ptr", "src_ptr",
         "stride_vn", "stride_vs", "stride_vm", "stride_gn", "stride_gq", "D")


def _strides(prefix: str, names: str) -> dict[str, str]:
    return {f"stride_{prefix}{c}": "i32" for c in names}


def _common(dt: str, d: int, levels: int, cfg: triton.Config) -> tuple[dict[str, str], dict]:
    sig = {"value_ptr": f"*{dt}", "shapes_ptr": "*i64", "starts_ptr": "*i64", "loc_ptr": f"*{dt}",
           "attn_ptr": f"*{dt}", "Lq": "i32", "M": "i32", "D": "i32", "LQ_BUCKET": "i32"}
    sig |= _strides("v", "nsmd") | _strides("l", "nqmlpc") | _strides("a", "nqmlp")
    consts = {"L": levels, "P": 4, "ALIGN_CORNERS": False, "BORDER": False, "ACC": ACC[dt],
              "BLOCK_D": triton.next_power_of_2(d), **cfg.kwargs}
    return sig, consts


def _finish(kernel, sig: dict[str, str], consts: dict, name: str, arch: int, cfg: triton.Config):
    for s in UNIT_STRIDES:
        if s in sig:
            del sig[s]
            consts[s] = 1
    div = tuple(k for k in DIV16 if k in sig)
    return compile_kernel(kernel, sig, consts, name=name, arch=arch, num_warps=cfg.num_warps,
                          num_stages=cfg.num_stages, divisible_by_16=div)


def compile_fwd(dt: str, d: int, cfg: triton.Config, arch: int = 90, levels: int = 4):
    sig, consts = _common(dt, d, levels, cfg)
    sig |= {"out_ptr": f"*{dt}", "N": "i32", "NUM_SLOTS": "i32"}
    consts["OFFSETS_64"] = False  # int32 in-slice offsets: every realistic shape (op._needs_64bit_offsets)
    # contiguous inputs of 2- or 4-byte floats (op._paired_loads; never fp64)
    consts["PAIRED_LOC"] = consts["PAIRED_ATTN"] = dt != "fp64"
    return _finish(kernels.msda_fwd_kernel.fn, sig, consts, "fwd", arch, cfg)


def compile_bwd(dt: str, d: int, cfg: triton.Config, deterministic: bool, arch: int = 90, levels: int = 4,
                split: bool = False):
    """split: bf16 / fp16 atomics into the value gradient on the leading levels (msda_bwd_kernel's SPLIT)."""
    gdt = "fp64" if dt == "fp64" else "fp32"
    sig, consts = _common(dt, d, levels, cfg)
    sig |= {"grad_out_ptr": f"*{dt}", "grad_value_ptr": f"*{dt if split else gdt}", "grad_acc_ptr": f"*{gdt}",
            "grad_loc_ptr": f"*{dt}", "grad_attn_ptr": f"*{dt}", "dest_ptr": "*i32", "coef_ptr": f"*{gdt}",
            "S": "i32", "split_row": "i32", "N": "i32", "NUM_SLOTS": "i32"}
    sig |= _strides("g", "nqc")
    consts |= {"DETERMINISTIC": deterministic, "BORDER": True, "P_BLOCK": triton.next_power_of_2(consts["P"]),
               "SPLIT": split}
    consts.setdefault("ROTATE_LEVELS", True)
    name = "bwd-det" if deterministic else ("bwd-split" if split else "bwd-atomic")
    return _finish(kernels.msda_bwd_kernel.fn, sig, consts, name, arch, cfg)


def compile_value_grad(dt: str, d: int, arch: int = 90):
    gdt = "fp64" if dt == "fp64" else "fp32"
    sig = {"row_start_ptr": "*i32", "src_ptr": "*i32", "coef_ptr": f"*{gdt}", "grad_out_ptr": f"*{dt}",
           "grad_value_ptr": f"*{dt}", "n_rows": "i32", "Lq": "i32", "M": "i32", "D": "i32", "S": "i32"}
    sig |= _strides("g", "nqc")
    consts = {"ACC": ACC[dt], "BLOCK_R": 16, "BLOCK_D": triton.next_power_of_2(d)}
    cfg = triton.Config({}, num_warps=4, num_stages=3)
    return _finish(kernels.msda_value_grad_kernel, sig, consts, "value-grad", arch, cfg)


def _kept(configs: list[triton.Config], dt: str, d: int, lq: int = 1 << 20) -> list[triton.Config]:
    """The configs the autotuner's pruning keeps for this dtype / head dim (kernels._prune)."""
    import torch

    value = torch.empty(0, dtype={"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
                                  "fp64": torch.float64}[dt])
    return kernels._prune(configs, {"value_ptr": value, "Lq": lq, "BLOCK_D": triton.next_power_of_2(d)})


def _resident(regs: int, cfg: triton.Config) -> bool:
    """A persistent config's programs must all fit on one SM at once (65536 registers, allocated in
    units of 8 per thread), or the last one runs its share of the tiles alone at the end."""
    if not cfg.kwargs.get("PERSISTENT"):
        return True
    return cfg.kwargs["PROGRAMS_PER_SLOT"] * (-(-regs // 8) * 8) * 32 * cfg.num_warps <= 65536


def _describe(cfg: triton.Config) -> str:
    unroll = "unrolled" if cfg.kwargs.get("UNROLL_LEVELS") else "loop"
    persistent = f" persistent x{cfg.kwargs['PROGRAMS_PER_SLOT']}" if cfg.kwargs.get("PERSISTENT") else ""
    return f"BQ{cfg.kwargs['BLOCK_Q']} W{cfg.num_warps} S{cfg.num_stages} {unroll}{persistent}"


def main() -> int:
    quick = "--quick" in sys.argv
    archs = [90, 80] if "--sm80" in sys.argv else [90]
    if quick:
        # The looped test-mode tiles (FATTN_MSDA_AUTOTUNE_LIMIT=1) for the D=32 and a large head
        # dim; the unrolled ones take 10-30 s each to compile here, so only the full run has them.
        os.environ["FATTN_MSDA_AUTOTUNE_LIMIT"] = "1"
        plan = [("fp32", 32), ("bf16", 32), ("bf16", 256)]
    else:
        plan = [(dt, 32) for dt in ("fp32", "bf16", "fp16", "fp64")] + [("bf16", 256), ("fp32", 64), ("fp16", 24)]

    def configs(all_configs: list[triton.Config], dt: str, d: int) -> list[triton.Config]:
        kept = _kept(all_configs, dt, d)
        return [c for c in kept if not c.kwargs["UNROLL_LEVELS"]][:1] if quick else kept

    def persistent_loop(per_slot: int) -> list[triton.Config]:  # as fwd_configs / bwd_configs hold it
        return [triton.Config({"BLOCK_Q": 16, "UNROLL_LEVELS": False, "PERSISTENT": True,
                               "PROGRAMS_PER_SLOT": per_slot}, num_warps=4, num_stages=1)]

    failures = 0
    for arch in archs:
        for dt, d in plan:
            fwd = configs(kernels.fwd_configs(), dt, d) + (persistent_loop(6) if quick and d == 32 else [])
            bwd = configs(kernels.bwd_configs(), dt, d) + (persistent_loop(4) if quick and d == 32 else [])
            jobs = [(lambda c=c: compile_fwd(dt, d, c, arch), c) for c in fwd]
            jobs += [(lambda c=c: compile_bwd(dt, d, c, False, arch), c) for c in bwd]
            if dt == "bf16":  # the bf16 value gradient's atomics in bf16 on the leading levels (op._direct_rows)
                jobs += [(lambda c=c: compile_bwd(dt, d, c, False, arch, split=True), c) for c in bwd]
            if not quick or (d == 32 and dt == "fp32"):
                jobs += [(lambda c=c: compile_bwd(dt, d, c, True, arch), c) for c in bwd[:1]]
                jobs += [(lambda: compile_value_grad(dt, d, arch), triton.Config({"BLOCK_Q": 0}, num_warps=4))]
            for job, cfg in jobs:
                try:
                    r = job()
                except Exception as e:  # report every failing config, then fail
                    failures += 1
                    print(f"sm_{arch} {dt} D{d} {_describe(cfg)}: COMPILE ERROR {type(e).__name__}: {e}")
                    continue
                bad = r.n_spills > MAX_SPILL_BYTES or r.shared_bytes > SHARED_MEMORY_LIMIT or not _resident(r.n_regs, cfg)
                failures += bad
                print(f"sm_{arch} {dt} D{d} {r.name} {_describe(cfg)}: regs {r.n_regs} spill bytes {r.n_spills} "
                      f"shared {r.shared_bytes} sass {r.n_sass}{'  <-- FAIL' if bad else ''}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

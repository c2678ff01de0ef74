"""Compile the swba kernels for a GPU target without a GPU (run in a process without TRITON_INTERPRET).

    python packages/swba/tests/compile_check.py [--all | --quick] [--arch 90]

--all: every config the autotuner may pick (kernels.candidate_configs) for each dtype / head-dim
class; --quick (default): the config used when autotuning is off, for fp16 D=64 and bf16 D=128.
Prints registers, spills and shared memory per kernel / dtype / head dim / config (through
fattn.core.compile_check); exits 1 when a kernel fails to compile, spills (beyond the measured, accepted
spills of kernels.MEASURED_SPILLS, marked ok*), or needs more shared
memory than an H100 block has.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton

from fattn.core.compile_check import SHARED_MEMORY_LIMIT, compile_kernel
from fattn.swba import hopper, kernels

_IO = ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ")
_FP32_IO = ("LSE", "DELTA", "DLSE")
_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_KERNELS = {"fwd": kernels.swba_fwd_kernel, "dkdv": kernels.swba_bwd_dkdv_kernel, "dq": kernels.swba_bwd_dq_kernel}


def signature(kernel, dtype: str) -> tuple[dict[str, str], dict[str, int], tuple[str, ...]]:  # type: ignore[no-untyped-def]
    """(signature, unit strides as constexprs, args hinted divisible by 16), as Triton's launcher
    specializes contiguous inputs with a head dim that is a multiple of 16."""
    sig: dict[str, str] = {}
    for name in (kernel.fn if hasattr(kernel, "configs") else kernel).arg_names:
        if name in _IO:
            sig[name] = f"*{dtype}"
        elif name in _FP32_IO:
            sig[name] = "*fp32"
        elif name in ("qk_scale", "scale"):
            sig[name] = "fp32"
        elif name.isupper():
            continue  # constexpr
        else:
            sig[name] = "i32"
    units = {n: 1 for n in sig if n.startswith("stride_") and n.endswith("d")}
    for n in units:
        del sig[n]
    div16 = tuple(n for n, t in sig.items() if t.startswith("*") or n.startswith("stride_"))
    return sig, units, div16


def check(kind: str, dtype: str, head_dim: int, config: triton.Config, arch: int, aligned: bool = False) -> bool:
    """aligned: the kernel's variant without window masks (ALIGNED), held to the same spill limits."""
    kernel = _KERNELS[kind]
    block_d = max(16, triton.next_power_of_2(head_dim))
    sig, units, div16 = signature(kernel, dtype)
    consts = {**units, "HEAD_DIM": head_dim, "BLOCK_D": block_d, **config.kwargs}
    if kind == "fwd":
        consts["SCALE_NONNEG"] = True
    consts["ALIGNED"] = aligned
    if kind != "fwd":  # as the op launches them
        consts["BLOCK_IDS"] = kernels.block_id_masks(block_d, head_dim, _TORCH[dtype].itemsize)
    tiles = (f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']} w{config.num_warps} s{config.num_stages}"
             + (f" cap{config.maxnreg}" if config.maxnreg else "") + (" aligned" if aligned else ""))
    rep = compile_kernel(kernel, sig, consts, arch=arch, num_warps=config.num_warps, num_stages=config.num_stages,
                         maxnreg=config.maxnreg,
                         divisible_by_16=div16 if head_dim % 16 == 0 else tuple(n for n in div16 if sig[n][0] == "*"),
                         name=f"{kind} {dtype} D{head_dim} {tiles}")
    # spills measured and accepted (kernels.MEASURED_SPILLS; a padded head dim may spill a few bytes more)
    accepted = kernels.MEASURED_SPILLS.get((kind, kernels._head_dim_class(block_d, _TORCH[dtype].itemsize)), {})
    allowed = accepted.get(kernels.spill_key(config), 0)
    if allowed and head_dim != block_d:
        allowed += 64
    ok = rep.n_spills <= allowed and rep.shared_bytes <= SHARED_MEMORY_LIMIT
    print(("ok   " if ok and not rep.n_spills else "ok*  " if ok else "FAIL ") + str(rep), flush=True)
    return ok


def check_preprocess(dtype: str, head_dim: int, arch: int) -> bool:
    kernel = kernels.swba_bwd_preprocess_kernel
    sig, units, div16 = signature(kernel, dtype)
    block_d = max(16, triton.next_power_of_2(head_dim))
    rep = compile_kernel(kernel, sig, {**units, "HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_M": 64,
                                       "HAS_DLSE": False}, arch=arch, divisible_by_16=div16,
                         name=f"preprocess {dtype} D{head_dim}")
    ok = rep.n_spills == 0
    print(("ok   " if ok else "FAIL ") + str(rep), flush=True)
    return ok


def check_hopper(dtype: str, head_dim: int, tile: tuple[int, int, int], arch: int) -> bool:
    """The Gluon forward (fattn.swba.hopper): no spill, and its overlap intact, i.e. the PTX waits for all but
    one warpgroup MMA group inside the loop (`wgmma.wait_group 1`; a wait for 0 there would serialize it)."""
    import re

    if arch != 90 or not hopper.HAVE_GLUON:
        print(f"skip hopper {dtype} D{head_dim}: " + ("sm_90 only" if arch != 90 else "no Gluon in this Triton"))
        return True
    kernel = hopper.swba_fwd_hopper_kernel
    sig: dict[str, str] = {}
    for name in kernel.arg_names:
        if name in ("Q", "K", "V", "O"):
            sig[name] = f"*{dtype}"
        elif name == "LSE":
            sig[name] = "*fp32"
        elif name == "qk_scale":
            sig[name] = "fp32"
        elif not name.isupper() and name != "num_warps":
            sig[name] = "i32"
    block_m, block_n, warps = tile
    consts = {"HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n, "STAGES": hopper.STAGES,
              "num_warps": warps}
    div16 = tuple(n for n, t in sig.items() if t.startswith("*") or n.startswith("stride_"))
    rep = compile_kernel(kernel, sig, consts, arch=arch, num_warps=warps, num_stages=1, divisible_by_16=div16,
                         name=f"hopper fwd {dtype} D{head_dim} {block_m}x{block_n} w{warps}")
    waits = re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", rep.ptx)
    ok = rep.n_spills == 0 and rep.shared_bytes <= SHARED_MEMORY_LIMIT and waits.count("1") >= 3
    print(("ok   " if ok else "FAIL ") + str(rep) + f", wgmma waits {' '.join(waits)}", flush=True)
    return ok


class _Probe:
    """What candidate_configs reads of q, for a device with H100's shared memory."""

    def __init__(self, dtype: str) -> None:
        self.dtype = _TORCH[dtype]
        self.device = torch.device("cuda")

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--all", action="store_true", help="every candidate config of every class")
    parser.add_argument("--quick", action="store_true", help="the default configs of fp16 D=64 and bf16 D=128")
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    if args.all:
        classes = [("fp16", 64), ("bf16", 128), ("bf16", 80), ("fp16", 256), ("fp32", 64), ("fp32", 96), ("fp32", 256)]
    else:
        classes = [("fp16", 64), ("bf16", 128)]
    ok = True
    for dtype, d in classes:
        block_d = max(16, triton.next_power_of_2(d))
        elem = _Probe(dtype).element_size()
        for kind in _KERNELS:
            configs = kernels.candidate_configs(kind, block_d, elem, head_dim=d)  # no device: the Hopper budget
            for config in configs if args.all else configs[:1]:
                ok &= check(kind, dtype, d, config, args.arch)
            # the variant without masks (padded head dims compile it the same way), where the op uses it
            if d == block_d and (kind != "dkdv" or block_d <= kernels.DKDV_ALIGNED_MAX_BLOCK_D):
                configs = kernels.candidate_configs(kind, block_d, elem, head_dim=d, aligned=True)
                for config in configs if args.all else configs[:1]:
                    ok &= check(kind, dtype, d, config, args.arch, aligned=True)
        ok &= check_preprocess(dtype, d, args.arch)
        if d in hopper.HEAD_DIMS and dtype != "fp32":
            for tile in hopper.TILES:
                ok &= check_hopper(dtype, d, tile, args.arch)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

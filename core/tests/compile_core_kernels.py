"""Compile the core helpers' test kernels for sm_90 and sm_80 (no GPU needed; run without TRITON_INTERPRET).

Usage: python core/tests/compile_core_kernels.py   (prints one line per kernel; exit 1 on an error)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from test_core_bilinear import _sample_backward_kernel, _sample_kernel
from test_core_softmax_tiling import _softmax_av_kernel
from test_core_upcast_checks import _dot_kernel

from fattn.core.compile_check import compile_kernel


def main() -> int:
    reports = []
    for arch in (90, 80):
        if arch == 80:  # Ampere: just the kernels whose code differs by target
            sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32"}
            reports.append(compile_kernel(_dot_kernel, sig, {"BM": 64, "BN": 64, "BK": 64}, arch=arch, name="dot_bf16"))
            continue
        for width_is_one in (False, True):  # an int argument equal to 1 becomes a Python constant
            sig = {"map_ptr": "*fp32", "xy_ptr": "*fp32", "out_ptr": "*fp32", "P": "i32", "C": "i32", "H": "i32"}
            consts = {"ALIGN": False, "BORDER": True, "BP": 32, "BC": 16, "W": 1} if width_is_one else \
                {"ALIGN": False, "BORDER": True, "BP": 32, "BC": 16}
            if not width_is_one:
                sig["W"] = "i32"
            reports.append(compile_kernel(_sample_kernel, sig, consts, arch=arch,
                                          name=f"bilinear_sample{'_W1' if width_is_one else ''}"))
        sig = {"map_ptr": "*fp32", "xy_ptr": "*fp32", "gout_ptr": "*fp32", "gmap_ptr": "*fp32", "gxy_ptr": "*fp32",
               "P": "i32", "C": "i32", "W": "i32", "H": "i32"}
        reports.append(compile_kernel(_sample_backward_kernel, sig,
                                      {"ALIGN": True, "BORDER": False, "BP": 32, "BC": 16}, arch=arch))
        sig = {"s_ptr": "*fp32", "v_ptr": "*fp32", "o_ptr": "*fp32", "lse_ptr": "*fp32", "p_ptr": "*fp32",
               "M": "i32", "N": "i32", "D": "i32"}
        reports.append(compile_kernel(_softmax_av_kernel, sig, {"BM": 32, "BN": 32, "BD": 64}, arch=arch))
        for dt in ("fp16", "bf16"):
            sig = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "c_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32"}
            rep = compile_kernel(_dot_kernel, sig, {"BM": 64, "BN": 64, "BK": 64}, arch=arch, name=f"dot_{dt}")
            if dt == "bf16" and "bf16" not in rep.ptx:
                raise SystemExit(f"{rep.name}: expected native bf16 math in the PTX (interp_upcast must be a no-op)")
            reports.append(rep)
    for rep in reports:
        print(rep)
    print(_binary_only_cache_check())
    spills = [r for r in reports if r.n_spills]
    return 1 if spills else 0


def _binary_only_cache_check() -> str:
    """compile_kernel reports the same registers after a cache hit on cubins alone (what
    benchmarks/gpu_run.sh packs and carries between device calls: no PTX in the cache)."""
    import glob
    import os
    import tempfile

    sig = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32"}
    consts = {"BM": 64, "BN": 64, "BK": 32}
    previous = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            first = compile_kernel(_dot_kernel, sig, consts, name="dot_fp16_cached")
            stripped = [f for ext in ("source", "ttir", "ttgir", "llir", "ptx")
                        for f in glob.glob(os.path.join(cache, "*", f"*.{ext}"))]
            for f in stripped:
                os.remove(f)
            again = compile_kernel(_dot_kernel, sig, consts, name="dot_fp16_cached")
        finally:
            if previous is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = previous
    if not stripped or (again.n_regs, again.n_spills) != (first.n_regs, first.n_spills):
        raise SystemExit(f"binary-only cache: {len(stripped)} IR files removed; {first} then {again}")
    return f"binary-only cache hit: {again}"


if __name__ == "__main__":
    sys.exit(main())

"""The kernels compile for Hopper (sm_90) and Ampere (sm_80) without a GPU: catches what the
permissive interpreter accepts but the compiler does not, and shared-memory overflows."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_SCRIPT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fattn.swba import kernels as K

    def compile_one(kern, ptrs, const, arch, warps, stages):
        fn = kern.fn
        sig, attrs = {}, {}
        for i, n in enumerate(fn.arg_names):
            if n in const:
                sig[n] = "constexpr"
            elif n in ptrs:
                sig[n] = ptrs[n]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif n in ("qk_scale", "scale"):
                sig[n] = "fp32"
            else:
                sig[n] = "i32"
        c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                           target=GPUTarget("cuda", arch, 128), options={"num_warps": warps, "num_stages": stages})
        assert c.metadata.shared <= 227 * 1024, (kern.fn.__name__, const, c.metadata.shared)
        return c

    for dt, d, arch in (("bf16", 80, 90), ("fp16", 256, 90), ("fp32", 64, 80)):
        bd = max(16, triton.next_power_of_2(d))
        io = {n: "*" + dt for n in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ")}
        io.update(LSE="*fp32", DELTA="*fp32")
        for kern, prune in ((K.swba_fwd_kernel, K._prune_fwd), (K.swba_bwd_dkdv_kernel, K._prune_dkdv),
                            (K.swba_bwd_dq_kernel, K._prune_dq)):
            class T:
                def element_size(self):
                    return 4 if dt == "fp32" else 2
            cfg = prune(kern.configs, {"Q": T(), "BLOCK_D": bd}, BLOCK_D=bd)[0]
            compile_one(kern, io, {"HEAD_DIM": d, "BLOCK_D": bd, **cfg.kwargs}, arch, cfg.num_warps, cfg.num_stages)
    print("ok")
''')


@pytest.mark.slow_interpreter
def test_kernels_compile_for_gpu() -> None:
    """Compile one pruned config of each kernel per (dtype, head dim, arch) class in a subprocess
    without TRITON_INTERPRET (needs no GPU; ~1 min on 2 CPU cores, hence slow_interpreter)."""
    root = Path(__file__).resolve().parents[3]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "core/src"), str(root / "packages/swba/src"),
                                         env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-4000:]

"""fattn demo: every variant against its plain-PyTorch reference on a default input.

    python benchmarks/demo.py                 # all installed variants
    python benchmarks/demo.py --only msda     # one variant
    python benchmarks/demo.py --tiny          # tiny shapes (what the CPU interpreter runs)

Prints, per variant, the max error of the fused op and of PyTorch's own computation in the same
dtype (both against float64), the time of each, and their peak memory. On a GPU the default shapes are
real model shapes; without one the kernels run on the CPU under Triton's interpreter on small shapes,
and the table says so. Only `fattn.core` and the variants themselves are imported, so this also runs
against installed wheels.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

if __name__ == "__main__" and "TRITON_INTERPRET" not in os.environ:
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"  # must precede importing any kernel
    except ImportError:
        pass

import torch

VARIANTS = ["deform", "msda", "swba", "rope2d", "fp8"]


@dataclass
class Case:
    variant: str
    shape: str
    dtype: torch.dtype
    fused: Callable[[], Any]
    reference: Callable[[], Any]  # PyTorch in the inputs' dtype
    reference64: Callable[[], Any]  # the same in float64
    rel_tol: float | None = None  # allowed error relative to max|reference| (default: by dtype)


# Allowed error of the fused op, relative to the reference's magnitude, on top of twice PyTorch's
# own error in the same dtype (fp32 allows for tf32 tensor-core math on a GPU).
REL_TOL = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def _d64(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.double() if t.is_floating_point() else t for t in ts]


def case_msda(dev: torch.device, tiny: bool) -> Case:
    from fattn.msda import ms_deform_attn
    from fattn.msda.reference import ms_deform_attn_reference

    if tiny:
        n, lq, m, d, p, levels, dtype = 1, 13, 2, 8, 2, [(6, 5), (3, 3)], torch.float32
    else:
        n, lq, m, d, p, levels, dtype = 4, 10000, 8, 32, 4, [(64, 64), (32, 32), (16, 16), (8, 8)], torch.float32
    shapes = torch.tensor(levels, dtype=torch.long, device=dev)
    start = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.randn(n, s, m, d, device=dev, dtype=dtype)
    loc = torch.rand(n, lq, m, len(levels), p, 2, device=dev, dtype=dtype)
    w = torch.rand(n, lq, m, len(levels), p, device=dev, dtype=dtype)
    w = w / w.sum((-1, -2), keepdim=True)
    v64, loc64, w64 = _d64(value, loc, w)
    return Case("msda", f"N{n} Lq{lq} M{m} D{d} L{len(levels)} P{p}", dtype,
                lambda: ms_deform_attn(value, shapes, start, loc, w),
                lambda: ms_deform_attn_reference(value, shapes, start, loc, w),
                lambda: ms_deform_attn_reference(v64, shapes, start, loc64, w64))


def case_deform(dev: torch.device, tiny: bool) -> Case:
    from fattn.deform import deform_attention
    from fattn.deform.reference import deform_attention_reference

    if tiny:
        b, t, p, h, d, hh, ww, dtype = 1, 2, 3, 2, 8, 5, 6, torch.float32
    else:
        b, t, p, h, d, hh, ww, dtype = 2, 8, 8, 8, 32, 18, 18, torch.float32
    lq = hh * ww
    q = torch.randn(b, t, h, lq, d, device=dev, dtype=dtype)
    k = torch.randn(b, t, h, hh * ww, d, device=dev, dtype=dtype)
    v = torch.randn(b, t, h, hh * ww, d, device=dev, dtype=dtype)
    coords = torch.rand(b, t, lq, t, p, 2, device=dev, dtype=dtype)
    q64, k64, v64, c64 = _d64(q, k, v, coords)
    return Case("deform", f"B{b} T{t} P{p} H{h} D{d} {hh}x{ww}", dtype,
                lambda: deform_attention(q, k, v, coords, ww, hh),
                lambda: deform_attention_reference(q, k, v, coords, ww, hh),
                lambda: deform_attention_reference(q64, k64, v64, c64, ww, hh))


def case_swba(dev: torch.device, tiny: bool) -> Case:
    from fattn.swba import swba_attention
    from fattn.swba.reference import swba_attention_reference

    if tiny:
        b, h, n, d, block, window, dtype = 1, 2, 40, 16, 7, 2, torch.float32
    else:
        b, h, n, d, block, window, dtype = 1, 12, 4096, 64, 256, 4, torch.float16
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype) for _ in range(3))
    q64, k64, v64 = _d64(q, k, v)
    return Case("swba", f"B{b} H{h} N{n} D{d} block{block} window{window}", dtype,
                lambda: swba_attention(q, k, v, block, window),
                lambda: swba_attention_reference(q, k, v, block, window),
                lambda: swba_attention_reference(q64, k64, v64, block, window))


def case_rope2d(dev: torch.device, tiny: bool) -> Case:
    from fattn.rope2d import axial_angles, rope2d_attention
    from fattn.rope2d.reference import rope2d_attention_reference

    if tiny:
        b, h, gh, gw, prefix, d, dtype = 1, 2, 4, 5, 1, 16, torch.float32
    else:
        b, h, gh, gw, prefix, d, dtype = 64, 12, 32, 32, 1, 64, torch.bfloat16
    n = prefix + gh * gw
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype) for _ in range(3))
    angles = axial_angles(gh, gw, d).to(dev)
    q64, k64, v64 = _d64(q, k, v)
    return Case("rope2d", f"B{b} H{h} N{n} ({prefix}+{gh}x{gw}) D{d}", dtype,
                lambda: rope2d_attention(q, k, v, angles, n_prefix=prefix),
                lambda: rope2d_attention_reference(q, k, v, angles, n_prefix=prefix),
                lambda: rope2d_attention_reference(q64, k64, v64, angles, n_prefix=prefix))


def case_fp8(dev: torch.device, tiny: bool) -> Case:
    from fattn.fp8 import fp8_attention
    from fattn.fp8.reference import attention as attention_reference

    if tiny:
        b, h, n, d, dtype = 1, 2, 37, 64, torch.float16
    else:
        b, h, n, d, dtype = 4, 16, 4096, 128, torch.bfloat16
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype) for _ in range(3))
    q64, k64, v64 = _d64(q, k, v)
    return Case("fp8", f"B{b} H{h} N{n} D{d} (vs {str(dtype)[6:]} reference)", dtype,
                lambda: fp8_attention(q, k, v),
                lambda: attention_reference(q, k, v),
                lambda: attention_reference(q64, k64, v64),
                rel_tol=0.1)  # FP8 rounding of q, k, v and P: about 5% relative error is expected


CASES = {"deform": case_deform, "msda": case_msda, "swba": case_swba, "rope2d": case_rope2d, "fp8": case_fp8}


def _time(fn: Callable[[], Any], dev: torch.device, reps: int) -> tuple[float, float | None]:
    """Median ms over reps (after one warm-up) and peak MB above the memory in use before."""
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times), peak
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=VARIANTS, help="run only this variant (repeatable)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the default without a GPU)")
    args = parser.parse_args(argv)

    from fattn.core.runtime import device_summary, interpreter_enabled

    gpu = torch.cuda.is_available() and not interpreter_enabled()
    dev = torch.device("cuda" if gpu else "cpu")
    tiny = args.tiny or not gpu
    torch.manual_seed(0)
    wanted = args.only or VARIANTS
    print(f"fattn demo on {device_summary()}")
    if not gpu:
        print("No GPU: kernels run on the CPU through the Triton interpreter, on small shapes; "
              "times are the interpreter's, not a GPU's.")
    rows = []
    failed = []
    for name in wanted:
        if importlib.util.find_spec(f"fattn.{name}") is None:
            rows.append([name, "(not installed)", "", "", "", "", "", "", "", ""])
            continue
        try:
            case = CASES[name](dev, tiny)
            with torch.no_grad():
                ref64 = _first(case.reference64()).double()
                out = _first(case.fused()).double()
                lowp = _first(case.reference()).double()
                err = (out - ref64).abs().max().item()
                lowp_err = (lowp - ref64).abs().max().item()
                tol = 2 * lowp_err + (case.rel_tol or REL_TOL[case.dtype]) * ref64.abs().max().item()
                if not err <= tol:  # also catches NaN
                    failed.append(name)
                reps = 10 if gpu else 1
                t_fused, m_fused = _time(case.fused, dev, reps)
                t_ref, m_ref = _time(case.reference, dev, reps)
        except Exception as exc:  # report and go on: the demo shows every variant it can
            failed.append(name)
            rows.append([name, f"FAILED: {type(exc).__name__}: {exc}"[:90], "", "", "", "", "", "", "", ""])
            continue
        mem = (lambda m: "-" if m is None else f"{m:.1f}")
        verdict = "" if err <= tol else " (TOO LARGE)"
        rows.append([name, case.shape, str(case.dtype).replace("torch.", ""), f"{err:.2e}{verdict}", f"{lowp_err:.2e}",
                     f"{t_fused:.3f}", f"{t_ref:.3f}", f"{t_ref / t_fused:.1f}x", mem(m_fused), mem(m_ref)])
    header = ["variant", "shape", "dtype", "fused err", "torch err", "fused ms", "ref ms", "speedup",
              "fused MB", "ref MB"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print()
    print(line.format(*header))
    print(line.format(*["-" * w for w in widths]))
    for r in rows:
        print(line.format(*r))
    print("\nerr: max |x - float64 reference|; 'torch err' is PyTorch's own computation in the same dtype. "
          f"Device: {'GPU' if gpu else 'CPU interpreter (small shapes)'}.")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

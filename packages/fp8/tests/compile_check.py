"""Compile fattn-fp8's kernels for Hopper (sm_90) and Ada (sm_89) without a GPU; report registers,
spills and shared memory, and check that the forward runs FP8 tensor-core math.

    python packages/fp8/tests/compile_check.py           # the quick set (what the test runs)
    python packages/fp8/tests/compile_check.py --full    # every tuned config of every kernel

Arguments are specialized as Triton's launcher does at run time: unit strides become constants
and pointers / other strides are marked divisible by 16 (without that, loads are not vectorized
and the K/V pipeline is not built).
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton

from fattn.core.compile_check import SHARED_MEMORY_LIMIT, compile_kernel
from fattn.fp8 import kernels, op

TAIL = {"H": "i32", "GROUP": "i32", "N_Q": "i32", "N_K": "i32", "sm_scale": "fp32", "Q_BUCKET": "i32",
        "K_BUCKET": "i32"}


def _strides(prefixes: list[str], unit: list[str]) -> dict[str, str]:
    return {f"stride_{p}{c}": "i32" for p in prefixes for c in "bhnd" if f"stride_{p}{c}" not in unit}


def _compile(kernel, sig: dict[str, str], consts: dict[str, object], name: str, arch: int, warps: int,
             stages: int, maxnreg: int | None = None):  # type: ignore[no-untyped-def]
    divisible = tuple(k for k, v in sig.items() if v.startswith("*") or k.startswith("stride"))
    # an Autotuner has `arg_names` too, which stops core's unwrapping at it: hand over the JITFunction
    if isinstance(kernel, triton.runtime.Autotuner):
        kernel = kernel.fn
    return compile_kernel(kernel, sig, consts, name=name, arch=arch, num_warps=warps, num_stages=stages,
                          maxnreg=maxnreg,
                          divisible_by_16=divisible)


def forward(q_dtype: str, d: int, bm: int, bn: int, warps: int, stages: int, causal: bool, arch: int = 90,
            tma: bool = False, maxnreg: int | None = None, blocks: bool = False, rows: bool = False,
            vblocks: bool = False):
    """The FP8 forward: q_dtype "fp8e4nv" (e4m3 inputs) or "bf16" (Q quantized in the kernel); tma: K/V
    through tensor descriptors (what op.py passes on Hopper); blocks: per-64-token-block descales for K
    and, with e4m3 Q, for Q (Q_BLOCK_SCALES / K_BLOCK_SCALES); rows: e4m3 Q with one descale per row
    (Q_ROW_SCALES, FATTN_FP8_Q_PREQUANT); vblocks: per-128-token V descales (V_BLOCK_SCALES, granularity
    "block" of full-precision inputs, with blocks)."""
    unit = ["stride_qd", "stride_kd", "stride_vn", "stride_od", "stride_dod"]  # V tokens-contiguous
    sig = {"Q": f"*{q_dtype}", "K": "*fp8e4nv", "V": "*fp8e4nv", "Q_descale": "*fp32", "K_descale": "*fp32",
           "V_descale": "*fp32", "Out": "*bf16", "Lse": "*fp32", "DO": "*bf16", "Delta": "*fp32",
           **_strides(["q", "k", "v", "o", "do"], unit), **TAIL}
    consts = {"HEAD_DIM": d, "BLOCK_M": bm, "BLOCK_N": bn, "CAUSAL": causal, "FP8": True, "BWD_PREP": False,
              "TMA": tma, "KV_DESC": tma, "Q_BLOCK_SCALES": blocks and q_dtype == "fp8e4nv", "K_BLOCK_SCALES": blocks,
              "Q_ROW_SCALES": rows, "V_BLOCK_SCALES": vblocks, **dict.fromkeys(unit, 1)}
    if tma:
        sig.update(K_desc=f"tensordesc<fp8e4nv[{bn}, {d}]>", V_desc=f"tensordesc<fp8e4nv[{d}, {bn}]>")
    else:
        consts.update(K_desc=None, V_desc=None)
    return _compile(kernels._attn_fwd_kernel, sig, consts, f"fwd q={q_dtype} D{d} {bm}x{bn} w{warps} s{stages}"
                    f"{' causal' if causal else ''}{' tma' if tma else ''}{f' cap{maxnreg}' if maxnreg else ''}"
                    f"{' blocks' if blocks else ''}{' vblocks' if vblocks else ''}{' rows' if rows else ''}", arch, warps,
                    stages, maxnreg)


def backward(which: str, dtype: str, d: int, bm: int, bn: int, warps: int, stages: int, arch: int = 90):
    """The full-precision backward kernels: "prep" (lse, delta), "dkdv" or "dq"."""
    t = f"*{dtype}"
    if which == "prep":
        unit = ["stride_qd", "stride_kd", "stride_vd", "stride_dod"]
        sig = {"Q": t, "K": t, "V": t, "Q_descale": "*fp32", "K_descale": "*fp32", "V_descale": "*fp32",
               "Out": "*fp32", "Lse": "*fp32", "DO": t, "Delta": "*fp32",
               **_strides(["q", "k", "v", "o", "do"], unit), **TAIL}
        consts = {"HEAD_DIM": d, "BLOCK_M": bm, "BLOCK_N": bn, "CAUSAL": True, "FP8": False, "BWD_PREP": True,
                  "K_desc": None, "V_desc": None, "KV_DESC": False, "TMA": False, "Q_BLOCK_SCALES": False, "K_BLOCK_SCALES": False,
                  "Q_ROW_SCALES": False, "V_BLOCK_SCALES": False}
        kernel = kernels._attn_fwd_kernel
    else:
        outs = ["dk", "dv"] if which == "dkdv" else ["dq"]
        prefixes = ["q", "k", "v", "do", *outs]
        unit = [f"stride_{p}d" for p in prefixes]
        sig = {"Q": t, "K": t, "V": t, "DO": t, "Lse": "*fp32", "Delta": "*fp32",
               **{o.upper(): t for o in outs}, **_strides(prefixes, unit), **TAIL}
        consts = {"HEAD_DIM": d, "BLOCK_M": bm, "BLOCK_N": bn, "CAUSAL": True}
        kernel = kernels._attn_bwd_dkdv_kernel if which == "dkdv" else kernels._attn_bwd_dq_kernel
    consts.update(dict.fromkeys(unit, 1))
    return _compile(kernel, sig, consts, f"bwd {which} {dtype} D{d} {bm}x{bn} w{warps} s{stages}", arch, warps,
                    stages)


def quantization(dtype: str, d: int, arch: int = 90) -> dict:  # type: ignore[type-arg]
    """The quantization kernels, by name: per (batch, head) the statistics (as the op runs them: 512-token
    spans, and one tile per program), finalize and apply kernels (K centred, V tokens-contiguous); per block
    the centre and one-pass kernels (granularity "block"), `quantize(x, granularity="block")`'s kernel;
    Q's rows kernel (FATTN_FP8_Q_PREQUANT)."""
    unit_in = ["stride_x0d", "stride_x1d"]
    stats = {"X0": f"*{dtype}", "X1": f"*{dtype}", "ColSum": "*fp32", "ColMax": "*fp32", "ColMin": "*fp32",
             "H": "i32", "N": "i32", "n_tiles": "i32", **_strides(["x0", "x1"], unit_in)}
    unit_out = [*unit_in, "stride_y0d", "stride_y1n"]
    apply = {"X0": f"*{dtype}", "X1": f"*{dtype}", "Mean": "*fp32", "Descale": "*fp32", "Y0": "*fp8e4nv",
             "Y1": "*fp8e4nv", "H": "i32", "N": "i32", **_strides(["x0", "x1", "y0", "y1"], unit_out)}
    rows = {"X": f"*{dtype}", "Y": "*fp8e4nv", "Descale": "*fp32", "H": "i32", "N": "i32",
            **_strides(["x", "y"], ["stride_xd", "stride_yd"])}
    final = {"ColSum": "*fp32", "ColMax": "*fp32", "ColMin": "*fp32", "Mean": "*fp32", "Descale": "*fp32",
             "N": "i32", "n_tiles": "i32"}
    centre = {"K": f"*{dtype}", "Centre": "*fp32", "H": "i32", "N": "i32", **_strides(["k"], ["stride_kd"])}
    unit_blocks = ["stride_kd", "stride_vd", "stride_k8d", "stride_v8n"]
    one_pass = {"K": f"*{dtype}", "V": f"*{dtype}", "Centre": "*fp32", "K8": "*fp8e4nv", "V8": "*fp8e4nv",
                "KDescale": "*fp32", "VDescale": "*fp32", "H": "i32", "N": "i32",
                **_strides(["k", "v", "k8", "v8"], unit_blocks)}
    x_blocks = {"X": f"*{dtype}", "Y": "*fp8e4nv", "Descale": "*fp32", "H": "i32", "N": "i32",
                **_strides(["x", "y"], ["stride_xd", "stride_yd"])}
    stats_consts = {"D": d, "CENTER0": True, **dict.fromkeys(unit_in, 1)}
    span_rows, chunks, unroll = op.stats_span(d, 4 if dtype == "fp32" else 2)  # what the op launches
    return {
        "stats": _compile(kernels._quant_stats_kernel, stats, {**stats_consts, "BLOCK_N": span_rows, "TILES": chunks,
                                                                "UNROLL": unroll},
                          f"quant stats {span_rows * chunks}-token spans {dtype} D{d}", arch, 4, 1),
        "stats_tile": _compile(kernels._quant_stats_kernel, stats, {**stats_consts, "BLOCK_N": 64, "TILES": 1, "UNROLL": 1},
                               f"quant stats one tile {dtype}", arch, 4, 1),
        "finalize": _compile(kernels._quant_finalize_kernel, final, {"D": d, "BLOCK_T": 32, "CENTER0": True},
                             "quant finalize", arch, 4, 1),
        "apply": _compile(kernels._quant_apply_kernel, apply, {"D": d, "BLOCK_N": 64, "CENTER0": True,
                                                               **dict.fromkeys(unit_out, 1)},
                          f"quant apply {dtype}", arch, 4, 1),
        "centre": _compile(kernels._quant_centre_kernel, centre, {"D": d, "BLOCK_D": op.CENTRE_BLOCK_D, "stride_kd": 1},
                           f"quant centre {dtype}", arch, 4, 1),
        "one_pass": _compile(kernels._quant_blocks_kernel, one_pass, {"D": d, **dict.fromkeys(unit_blocks, 1)},
                             f"quant one-pass K / V blocks {dtype}", arch, 8, 1),
        "x_blocks": _compile(kernels._quant_x_blocks_kernel, x_blocks, {"D": d, "stride_xd": 1, "stride_yd": 1},
                             f"quant x blocks {dtype}", arch, 8, 1),
        "rows": _compile(kernels._quant_rows_kernel, rows, {"D": d, "BLOCK_N": 64, "stride_xd": 1, "stride_yd": 1},
                         f"quant rows {dtype}", arch, 4, 1),
    }


def _check_forward(report, tma: bool = False) -> None:  # type: ignore[no-untyped-def]
    ptx = report.ptx
    if report.arch == 90:
        assert "wgmma.mma_async" in ptx and "e4m3.e4m3" in ptx, f"{report.name}: no FP8 wgmma"
    if tma:
        assert "cp.async.bulk.tensor" in ptx, f"{report.name}: K/V are not loaded by TMA"
    else:
        assert "cp.async" in ptx, f"{report.name}: K/V loads are not pipelined"


def _check_blocks(per_block, per_head, failures: list[str]) -> None:  # type: ignore[no-untyped-def]
    """A per-block variant must not spill where its per-head twin does not."""
    if per_block.n_spills and not per_head.n_spills:
        failures.append(f"{per_block} spills where {per_head} does not")


def main(full: bool) -> None:
    os.environ["FATTN_FP8_AUTOTUNE_LIMIT"] = "0"  # every config (wins over the tests' limit, under any name)
    reports = []
    failures: list[str] = []
    if not full:
        for q_dtype, d, bm, bn, warps, stages, tma, cap in [("fp8e4nv", 128, 128, 64, 8, 3, False, None),
                                                             ("bf16", 64, 128, 128, 8, 3, False, None),
                                                             ("fp8e4nv", 128, 64, 128, 4, 2, True, None),
                                                             ("fp8e4nv", 64, 128, 64, 8, 3, True, 128)]:
            r = forward(q_dtype, d, bm, bn, warps, stages, causal=True, tma=tma, maxnreg=cap)
            _check_forward(r, tma)
            assert r.n_spills == 0, str(r)
            reports.append(r)
            if q_dtype == "fp8e4nv" and d == 128:
                # per-block q and k descales: 128 x 64 (one K descale per key tile), TMA 64 x 128 (one per column)
                rb = forward(q_dtype, d, bm, bn, warps, stages, causal=True, tma=tma, maxnreg=cap, blocks=True)
                _check_forward(rb, tma)
                assert rb.n_spills == 0, str(rb)
                reports.append(rb)
        for causal in (False, True):  # e4m3 Q with row descales (FATTN_FP8_Q_PREQUANT) in the capped 64 x 128 tile
            r = forward("fp8e4nv", 128, 64, 128, 4, 3, causal=causal, tma=True, maxnreg=168, rows=True)
            _check_forward(r, True)
            assert r.n_spills == 0, str(r)
            reports.append(r)
        # granularity "block" of bf16 inputs: per-block K and V descales, Q quantized in the kernel
        for causal in (False, True):
            for bm, bn, warps, stages in ((64, 128, 4, 2), (128, 128, 8, 3)):
                r = forward("bf16", 128, bm, bn, warps, stages, causal=causal, tma=True, blocks=True, vblocks=True)
                _check_forward(r, True)
                assert r.n_spills == 0, str(r)
                reports.append(r)
        quant = list(quantization("bf16", 128).values())
        assert not any(r.n_spills for r in quant), [str(r) for r in quant if r.n_spills]
        reports += quant
    else:
        for d in (32, 64, 128, 256):
            for q_dtype in ("fp8e4nv", "bf16"):
                configs = kernels._fwd_configs()
                # the configs tuned with per-block descales (a subset): K's and Q's for e4m3 Q, K's and V's for
                # bf16 Q (granularity "block")
                vblocks = q_dtype == "bf16"
                with_blocks = kernels._fwd_prune(configs, {"Q": _Elem(1 if q_dtype == "fp8e4nv" else 2)}, HEAD_DIM=d,
                                                 FP8=True, KV_DESC=True, K_BLOCK_SCALES=True, V_BLOCK_SCALES=vblocks)
                for c in kernels._fwd_prune(configs, {"Q": _Elem(1)}, HEAD_DIM=d, FP8=True, KV_DESC=True):
                    bm, bn, tma = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs.get("TMA", False)
                    for causal in (True, False):
                        r = forward(q_dtype, d, bm, bn, c.num_warps, c.num_stages, causal=causal, tma=tma,
                                    maxnreg=c.maxnreg)
                        _check_forward(r, tma)
                        reports.append(r)
                        if d in (64, 128) and any(b is c for b in with_blocks):  # per-block descales (K, and Q when e4m3)
                            rb = forward(q_dtype, d, bm, bn, c.num_warps, c.num_stages, causal=causal, tma=tma,
                                         maxnreg=c.maxnreg, blocks=True, vblocks=vblocks)
                            _check_forward(rb, tma)
                            _check_blocks(rb, r, failures)
                            reports.append(rb)
        reports.append(forward("fp8e4nv", 128, 128, 64, 8, 3, causal=False, arch=89))
        for dtype, elem in (("bf16", 2), ("fp16", 2), ("fp32", 4)):
            for d in (64, 128, 256):
                for c in kernels._fwd_prune(kernels._fwd_configs(), {"Q": _Elem(elem)}, HEAD_DIM=d, FP8=False)[:2]:
                    reports.append(backward("prep", dtype, d, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                            c.num_warps, c.num_stages))
                for which, inner in (("dkdv", "BLOCK_M"), ("dq", "BLOCK_N")):
                    for c in kernels._bwd_prune(kernels._bwd_configs(inner), {"Q": _Elem(elem)}, HEAD_DIM=d):
                        reports.append(backward(which, dtype, d, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                                c.num_warps, c.num_stages))
        for dtype in ("bf16", "fp16", "fp32"):
            for d in (64, 128, 256):
                quant = list(quantization(dtype, d).values())
                failures += [f"{r} spills" for r in quant if r.n_spills]  # (the default K/V statistics did, session 19)
                reports += quant
    for r in reports:
        assert r.shared_bytes <= SHARED_MEMORY_LIMIT, str(r)
        print(r, "SPILLS" if r.n_spills else "")
    assert not failures, "\n".join(failures)
    print("OK")


class _Elem:
    """Stands in for a tensor argument in the prune functions (they read element_size only)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def element_size(self) -> int:
        return self.size


if __name__ == "__main__":
    main(full="--full" in sys.argv)

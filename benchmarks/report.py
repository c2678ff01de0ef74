"""Benchmark report: tables (fattn vs peers, with ratios) and plots from pytest-benchmark JSON.

    python -m benchmarks.report bench-out/*.json                 # text table
    python -m benchmarks.report bench-out/*.json --markdown      # table for a README
    python -m benchmarks.report bench-out/*.json --plots bench-out/plots

For every (op, shape) group the table lists each implementation's median time per call (calls back to
back, see benchmarks/harness.py), one call's latency from an idle device, TFLOP/s or GB/s,
peak memory and `peer/fattn`: how many times longer the peer takes than fattn (above 1: fattn wins).
Plots show latency and peak memory against problem size for each op, one line per implementation.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any


def load(paths: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        data = json.loads(path.read_text())
        machine = data.get("machine_info", {})
        for b in data.get("benchmarks", []):
            info = b.get("extra_info", {})
            if "op" not in info:
                continue
            rows.append({
                "op": info["op"],
                "impl": info["impl"],
                "shape": info["shape"],
                "size": info.get("size"),
                "median_ms": b["stats"]["median"] * 1e3,
                "iqr_ms": b["stats"].get("iqr", 0.0) * 1e3,
                "latency_ms": info.get("latency_ms"),
                "tflops": info.get("tflops"),
                "gbps": info.get("gbps"),
                "peak_mb": info.get("peak_mem_mb"),
                "device": info.get("device", machine.get("node", "?")),
                "note": info.get("note", ""),
            })
    return rows


def _fmt(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["shape"])].append(r)
    header = ["op", "shape", "impl", "median ms", "1-call ms", "TFLOP/s", "GB/s", "peak MB", "peer/fattn"]
    lines = []
    for (op, shape), items in sorted(groups.items()):
        fattn = next((r for r in items if r["impl"] == "fattn"), None)
        for r in sorted(items, key=lambda r: (r["impl"] != "fattn", r["median_ms"])):
            ratio = None if fattn is None or r is fattn else r["median_ms"] / fattn["median_ms"]
            lines.append([op, shape, r["impl"], _fmt(r["median_ms"], ".3f"), _fmt(r["latency_ms"], ".3f"),
                          _fmt(r["tflops"], ".1f"),
                          _fmt(r["gbps"], ".0f"), _fmt(r["peak_mb"], ".1f"), _fmt(ratio, ".2f") + ("x" if ratio else "")])
    devices = sorted({r["device"] for r in rows})
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return f"Device: {', '.join(devices)}\n\n" + "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [f"device: {', '.join(devices)}", fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def plots(rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    by_op: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["size"] is not None:
            by_op[r["op"]].append(r)
    written = []
    ops = sorted(by_op)
    if not ops:
        return written
    fig, axes = plt.subplots(len(ops), 2, figsize=(11, 3.6 * len(ops)), squeeze=False)
    for row_axes, op in zip(axes, ops):
        impls: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in by_op[op]:
            impls[r["impl"]].append(r)
        for impl, items in sorted(impls.items()):
            items = sorted(items, key=lambda r: r["size"])
            xs = [r["size"] for r in items]
            row_axes[0].plot(xs, [r["median_ms"] for r in items], marker="o", label=impl)
            mem = [(x, r["peak_mb"]) for x, r in zip(xs, items) if r["peak_mb"] is not None]
            if mem:
                row_axes[1].plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=impl)
        for ax, what in zip(row_axes, ["latency (ms)", "peak memory (MB)"]):
            ax.set_title(f"{op}: {what}")
            ax.set_xlabel("problem size")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = folder / "benchmarks.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--plots", type=Path, default=None, help="folder to write PNG plots into")
    parser.add_argument("--op", action="append", default=None, help="only ops starting with this (repeatable)")
    args = parser.parse_args(argv)
    rows = load([p for p in args.json if p.exists()])
    if args.op:
        rows = [r for r in rows if any(r["op"].startswith(o) for o in args.op)]
    if not rows:
        print("no benchmark results found")
        return 1
    print(table(rows, markdown=args.markdown))
    if args.plots:
        for p in plots(rows, args.plots):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Compile Triton kernels for a GPU target without a GPU.

The CPU interpreter accepts code that compiled Triton rejects (and says nothing of registers,
spills or shared memory), so every package also compiles its kernels for Hopper (sm_90) and Ampere
(sm_80) in CI, where there is no GPU. Compilation must run in a process without TRITON_INTERPRET
(kernels are interpreted objects otherwise): packages keep a small script that calls
`compile_kernel` for their main configurations, and a test that runs it with `run_compile_script`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SHARED_MEMORY_LIMIT", "CompileReport", "compile_kernel", "run_compile_script", "sass_instruction_count"]

# Shared memory one block may use on Hopper (sm_90): 227 KiB with the opt-in limit.
SHARED_MEMORY_LIMIT = 227 * 1024


@dataclass
class CompileReport:
    """What the compiler says of one kernel configuration."""

    name: str
    arch: int
    n_regs: int
    n_spills: int
    shared_bytes: int
    ptx: str
    n_sass: int = -1  # static SASS instructions (cuobjdump), -1 when it is not available

    def __str__(self) -> str:
        sass = f", {self.n_sass} SASS instructions" if self.n_sass >= 0 else ""
        return (f"{self.name} sm_{self.arch}: {self.n_regs} registers, {self.n_spills} spills, "
                f"{self.shared_bytes / 1024:.1f} KiB shared{sass}")


def _jit_function(kernel: Any) -> Any:
    # @triton.autotune / @triton.heuristics wrap the JITFunction in `.fn` (and also carry arg_names).
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def compile_kernel(
    kernel: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    *,
    name: str | None = None,
    arch: int = 90,
    num_warps: int = 4,
    num_stages: int = 3,
    divisible_by_16: tuple[str, ...] = (),
    unit_strides: tuple[str, ...] = (),
    maxnreg: int | None = None,
) -> CompileReport:
    """Compile `kernel` for sm_<arch> and report registers, spills and shared memory.

    signature: every non-constexpr argument's type ("*fp16", "*bf16", "*fp32", "*fp8e4nv", "*i64",
    "i32", "i64", "fp32"); constexprs: the constexpr arguments' values (their signature entries are
    added). divisible_by_16: arguments to hint as multiples of 16, as Triton's launcher does for
    16-byte-aligned pointers and strides at run time (it enables vector loads). unit_strides:
    arguments the launcher would specialize to the constant 1 (contiguous last-dim strides); without
    these two, the compiled code has scalar loads and misleading register counts. maxnreg: a register
    cap per thread (triton.Config's maxnreg), as a launch with that config would compile. Gluon kernels
    (`triton.experimental.gluon.jit`) compile the same way; a `num_warps` parameter of theirs goes in
    `constexprs`.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(kernel)
    sig = dict(signature)
    constexprs = {**constexprs, **{name: 1 for name in unit_strides}}
    for key in constexprs:
        sig[key] = "constexpr"
    names = list(fn.arg_names)
    missing = [n for n in names if n not in sig]
    if missing:
        raise ValueError(f"compile_kernel: no signature entry for {', '.join(missing)}")
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in divisible_by_16}
    if getattr(fn, "is_gluon", lambda: False)():  # a Gluon kernel (triton.experimental.gluon.jit)
        from triton.experimental.gluon._runtime import GluonASTSource

        src = GluonASTSource(fn=fn, signature=sig, constexprs=dict(constexprs), attrs=attrs)
    else:
        src = ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs), attrs=attrs)
    options: dict[str, Any] = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    target = GPUTarget("cuda", arch, 128)
    compiled = triton.compile(src, target=target, options=options)
    if "ptx" not in compiled.asm:
        # A cache hit on a binary-only cache (benchmarks/gpu_run.sh packs and carries cubins alone):
        # compile again for the PTX that ptxas reports registers from.
        from triton import knobs

        with knobs.compilation.scope():
            knobs.compilation.always_compile = True
            knobs.compilation.store_binary_only = False
            compiled = triton.compile(src, target=target, options=options)
    shared = getattr(compiled.metadata, "shared", 0)
    regs, spills = _ptxas_usage(compiled.asm["ptx"], arch)
    return CompileReport(name or fn.__name__, arch, regs, spills, shared, compiled.asm["ptx"],
                         sass_instruction_count(compiled.asm.get("cubin", b"")))


def sass_instruction_count(cubin: bytes) -> int:
    """Static SASS instructions in a cubin (`cuobjdump -sass`, shipped with Triton), or -1.

    A proxy for kernels that ncu shows to be instruction-issue bound: fewer instructions per loop
    iteration is what such a kernel needs, and it can be counted without a GPU."""
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cubin or not tool.exists():
        return -1
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        res = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if res.returncode != 0:
        return -1
    return sum(1 for line in res.stdout.splitlines() if line.strip().startswith("/*") and ";" in line)


def _ptxas_path(arch: int) -> str:
    import triton

    try:  # the helper's signature changed across triton releases
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            return get_ptxas(arch).path
        except TypeError:
            return get_ptxas().path
    except (ImportError, AttributeError):
        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """Registers and spilled bytes per thread, from `ptxas -v` (Triton ships ptxas; the registers of a
    compiled kernel are otherwise only known once it is loaded on a GPU)."""
    import re
    import tempfile

    ptxas = _ptxas_path(arch)
    suffix = "a" if arch == 90 else ""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        res = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    stores = re.search(r"(\d+) bytes spill stores", text)
    loads = re.search(r"(\d+) bytes spill loads", text)
    spills = (int(stores.group(1)) if stores else 0) + (int(loads.group(1)) if loads else 0)
    return (int(regs.group(1)) if regs else -1), spills


def run_compile_script(script: str | Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a package's compile-check script in a fresh process without TRITON_INTERPRET.

    Raises AssertionError with the script's output when it fails (for use inside tests).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"{Path(script).name} failed (exit {res.returncode}):\n{res.stdout[-4000:]}\n"
                             f"{res.stderr[-4000:]}")
    return res

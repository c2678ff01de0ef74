"""fattn-rope2d against RoPE-in-PyTorch + SDPA (compiled and eager), the public fused kernel
`triton_fused_rope_flash_attn`, and plain SDPA without RoPE (the floor).

GPU:   python -m pytest benchmarks/bench_rope2d.py --benchmark-json=rope2d.json
Smoke: python -m pytest benchmarks/bench_rope2d.py --fattn-bench-smoke -q   (CPU, tiny shapes)

Each record's extra_info carries `max_err`: the forward output's max abs error against a float64
reference (computed on the first two images of the batch), so accuracy is compared in the same run.
The peer `rope_fused` is found with `peer_path("rope_fused")` (file `fa_rope_full.py` exported from
github.com/v1kstrand/triton_fused_rope_flash_attn); it only knows square grids with 0 or 1 class token,
so on the register shape it runs the closest equivalent (class token only, N = 1 + 37*37).

Warm-up budget (the whole file must run in ~2.5 minutes on an H100/H200): the peer compiles every
autotuning config for every shape (its sizes are constexprs), so its 72 configs per kernel are cut to
its 2 most plausible Hopper tilings per kernel (FATTN_PEER_TUNE=group4: the 24 configs of group size 4;
FATTN_PEER_TUNE=full or FATTN_PEER_FULL_TUNE=1: all 72). Eager PyTorch (slow, and no warm-up cost to
compare) is only run with FATTN_BENCH_FULL=1.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from benchmarks.harness import peer_path
from fattn.rope2d import axial_angles, rope2d_attention
from fattn.rope2d.reference import rope2d_attention_reference


@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    H: int
    side: int  # square patch grid side
    n_prefix: int
    D: int

    @property
    def N(self) -> int:
        return self.n_prefix + self.side * self.side


GPU_SHAPES = [
    Shape("vit_s16_224", 256, 6, 14, 1, 64),
    Shape("vit_b16_512", 64, 12, 32, 1, 64),
    Shape("vit_l14_518_reg4", 32, 16, 37, 5, 64),
]
SMOKE_SHAPES = [Shape("smoke", 1, 2, 3, 1, 16)]
IMPLS = ["fattn", "torch_compile", "rope_fused", "sdpa_norope"]
if os.environ.get("FATTN_BENCH_FULL") == "1":
    # fattn_inloop / fattn_prerotated: fattn with FATTN_ROPE2D_PREROTATE=0 (q/k rotated inside every
    # attention program, the round-1 path) / =1 (k and q always pre-rotated, even on short sequences),
    # to re-check the default ("auto") choice of when to pre-rotate
    IMPLS[1:1] = ["fattn_inloop", "fattn_prerotated", "eager"]
MODES = ["fwd", "fwd+bwd"]


def _rope_pytorch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """What users write: rotate interleaved pairs of the patch tokens in fp32, back to x's dtype."""
    prefix, patches = x[:, :, :n_prefix], x[:, :, n_prefix:].float()
    a, b = patches[..., 0::2], patches[..., 1::2]
    rot = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return torch.cat([prefix, rot.to(x.dtype)], dim=2)


def _rope_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               n_prefix: int) -> torch.Tensor:
    return F.scaled_dot_product_attention(_rope_pytorch(q, cos, sin, n_prefix), _rope_pytorch(k, cos, sin, n_prefix), v)


_PEER: list = []
_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}


def _compiled_rope_sdpa(smoke: bool) -> Callable[..., torch.Tensor]:
    key = "smoke" if smoke else "gpu"
    if key not in _COMPILED:
        # dynamic=False: one specialized graph per shape, as a user with a fixed resolution gets
        _COMPILED[key] = torch.compile(_rope_sdpa, backend="aot_eager" if smoke else "inductor", dynamic=False)
    return _COMPILED[key]


def _load_peer():  # type: ignore[no-untyped-def]
    root = peer_path("rope_fused")
    if root is None or not (root / "fa_rope_full.py").exists():
        return None
    spec = importlib.util.spec_from_file_location("fattn_peer_rope_fused", root / "fa_rope_full.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tune = "full" if os.environ.get("FATTN_PEER_FULL_TUNE") == "1" else os.environ.get("FATTN_PEER_TUNE", "small")
    if tune == "full":
        return module
    # (BLOCK_Q, BLOCK_KV) kept per kernel with its group size 4, 4 warps, 3 stages (the classic Hopper
    # flash-attention tilings in its own search space); "group4" keeps every config of group size 4.
    small = {"_attn_fwd": {(128, 64), (64, 64)}, "_attn_bwd_dk_dv_rope": {(32, 128), (64, 64)},
             "_attn_bwd_dq_rope": {(128, 32), (64, 64)}, "_attn_bwd_preprocess": {(128, None)}}
    for name, tiles in small.items():
        tuner = getattr(module, name, None)
        if tuner is None or not hasattr(tuner, "configs"):
            continue

        def keep(c, tiles=tiles) -> bool:  # type: ignore[no-untyped-def]
            if c.kwargs.get("GROUP_M", c.kwargs.get("GROUP_N", 4)) != 4:
                return False
            if tune == "group4":
                return True
            return ((c.kwargs.get("BLOCK_Q"), c.kwargs.get("BLOCK_KV")) in tiles and c.num_warps == 4
                    and c.num_stages == 3)

        if tune == "group4" and name == "_attn_bwd_preprocess":
            continue
        tuner.configs = [c for c in tuner.configs if keep(c)] or tuner.configs
    return module


def _case(impl: str, shape: Shape, dtype: torch.dtype, dev: torch.device, smoke: bool):  # type: ignore[no-untyped-def]
    """(forward closure over q, k, v, the inputs, a float64 reference closure, a note)."""
    n_prefix, note = shape.n_prefix, ""
    if impl == "rope_fused" and n_prefix > 1:
        n_prefix, note = 1, f"peer supports one class token only: ran N={1 + shape.side ** 2} without registers"
    n = n_prefix + shape.side * shape.side
    q, k, v = (torch.randn(shape.B, shape.H, n, shape.D, device=dev, dtype=dtype) for _ in range(3))
    # The peer's table rotates its first D/4 pairs by the row index: axis_order "ij" is the same math.
    axis_order = "ij" if impl == "rope_fused" else "xy"
    angles = axial_angles(shape.side, shape.side, shape.D, axis_order=axis_order, device=dev)
    cos, sin = angles.cos(), angles.sin()

    if impl in ("fattn", "fattn_inloop", "fattn_prerotated"):
        def fwd(q, k, v):  # type: ignore[no-untyped-def]
            return rope2d_attention(q, k, v, angles, n_prefix=n_prefix)
    elif impl == "torch_compile":
        compiled = _compiled_rope_sdpa(smoke)

        def fwd(q, k, v):  # type: ignore[no-untyped-def]
            return compiled(q, k, v, cos, sin, n_prefix)
    elif impl == "eager":
        def fwd(q, k, v):  # type: ignore[no-untyped-def]
            return _rope_sdpa(q, k, v, cos, sin, n_prefix)
    elif impl == "rope_fused":
        if not _PEER:
            _PEER.append(_load_peer())
        peer = _PEER[0]
        if peer is None:
            pytest.skip("peer rope_fused not exported (.peers/rope_fused/fa_rope_full.py)")
        if smoke:
            pytest.skip("peer rope_fused autotunes 72 configs: too slow for the CPU interpreter")
        table = peer.CosSinTable(base=100.0, H_img=shape.side, D=shape.D, device=dev)

        def fwd(q, k, v):  # type: ignore[no-untyped-def]
            return peer.TritonAttention.apply(q, k, v, table, shape.side, True)
    elif impl == "sdpa_norope":
        def fwd(q, k, v):  # type: ignore[no-untyped-def]
            return F.scaled_dot_product_attention(q, k, v)
    else:  # pragma: no cover
        raise AssertionError(impl)

    def ref64() -> torch.Tensor:
        sub = [t[:2].double() for t in (q, k, v)]
        if impl == "sdpa_norope":
            return torch.softmax(sub[0] @ sub[1].transpose(-1, -2) / math.sqrt(shape.D), -1) @ sub[2]
        return rope2d_attention_reference(*sub, angles.double(), n_prefix=n_prefix)

    return fwd, (q, k, v), ref64, note


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape_idx", range(3), ids=[s.name for s in GPU_SHAPES])
def test_rope2d(measure, smoke: bool, shape_idx: int, impl: str, mode: str,  # type: ignore[no-untyped-def]
                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FATTN_ROPE2D_AUTOTUNE_LIMIT", "0")  # in case the package's tests/conftest.py ran in this process
    if impl in ("fattn_inloop", "fattn_prerotated"):
        monkeypatch.setenv("FATTN_ROPE2D_PREROTATE", "0" if impl == "fattn_inloop" else "1")
    if smoke:
        if shape_idx:
            pytest.skip("smoke run: one tiny shape")
        shape, dtype, dev = SMOKE_SHAPES[0], torch.float32, torch.device("cpu")
    else:
        shape, dtype, dev = GPU_SHAPES[shape_idx], torch.bfloat16, torch.device("cuda")
    fwd, (q, k, v), ref64, note = _case(impl, shape, dtype, dev, smoke)

    with torch.no_grad():
        out = fwd(q, k, v)
        max_err = float((out[:2].double() - ref64()).abs().max())

    flops_fwd = 4.0 * shape.B * shape.H * q.shape[2] ** 2 * shape.D
    io_bytes = 4.0 * q.numel() * q.element_size()
    if mode == "fwd":
        def run() -> None:
            with torch.no_grad():
                fwd(q, k, v)
        flops = flops_fwd
    else:
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        grad_out = torch.randn_like(out)

        def run() -> None:
            o = fwd(*leaves)
            torch.autograd.grad(o, leaves, grad_out)
        flops = 3.5 * flops_fwd  # backward = 2.5x forward matmul work
        io_bytes *= 2.5

    tuned = None
    if impl.startswith("fattn"):
        from fattn.rope2d import kernels

        tuned = {"fwd": kernels._rope2d_fwd_kernel}
        if mode != "fwd":
            tuned.update(dkdv=kernels._rope2d_bwd_dkdv_kernel, dq=kernels._rope2d_bwd_dq_kernel)
    measure.run(run, op=f"rope2d {mode}", impl=impl, shape=shape.name, size=q.shape[2], flops=flops,
                bytes_moved=io_bytes, tuned=tuned, dtype=str(dtype).replace("torch.", ""), max_err=max_err,
                note=note, B=shape.B, H=shape.H, N=q.shape[2], D=shape.D)

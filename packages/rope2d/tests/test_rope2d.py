"""rope2d_attention against the float64 reference: forward, every gradient, layouts, dtypes, errors."""

from __future__ import annotations

import math

import pytest
import torch

from fattn.core.testing import (
    assert_close,
    assert_deterministic,
    cases,
    check_custom_op,
    check_forward_backward,
    device,
    on_gpu,
    randn,
    zero_fills_during,
)
from fattn.rope2d import axial_angles, not_supported_reasons, rope2d_attention
from fattn.rope2d.op import rope2d_fwd
from fattn.rope2d.reference import apply_rope2d, axial_angles_reference, rope2d_attention_reference

# CPU cases: odd, non-square grids, head dims that are not powers of two, every prefix count.
CPU_CASES = [
    dict(B=1, H=2, grid=(5, 7), D=64, prefix=1, pairing="interleaved", axes="xy", dtype=torch.float32),
    dict(B=1, H=2, grid=(3, 4), D=80, prefix=5, pairing="half", axes="xy", dtype=torch.float32),
    dict(B=2, H=2, grid=(4, 6), D=12, prefix=0, pairing="interleaved", axes="ij", dtype=torch.float32),
    dict(B=1, H=3, grid=(6, 5), D=32, prefix=1, pairing="half", axes="ij", dtype=torch.float16),
    dict(B=2, H=1, grid=(7, 3), D=64, prefix=5, pairing="interleaved", axes="xy", dtype=torch.float16),
    dict(B=1, H=2, grid=(2, 9), D=20, prefix=0, pairing="half", axes="xy", dtype=torch.float16),
    dict(B=1, H=2, grid=(5, 5), D=64, prefix=1, pairing="interleaved", axes="xy", dtype=torch.bfloat16),
    dict(B=1, H=2, grid=(3, 5), D=80, prefix=5, pairing="half", axes="ij", dtype=torch.bfloat16),
]
# GPU cases: real ViT shapes, every head-dim class up to 256, all dtypes.
GPU_CASES = [
    dict(B=2, H=6, grid=(14, 14), D=64, prefix=1, pairing="interleaved", axes="xy", dtype=dt)
    for dt in (torch.float32, torch.float16, torch.bfloat16)
] + [
    dict(B=1, H=4, grid=(37, 37), D=64, prefix=5, pairing="interleaved", axes="xy", dtype=torch.bfloat16),
    dict(B=1, H=2, grid=(23, 31), D=80, prefix=1, pairing="half", axes="ij", dtype=torch.bfloat16),
    dict(B=2, H=2, grid=(16, 12), D=128, prefix=0, pairing="half", axes="xy", dtype=torch.float16),
    dict(B=1, H=2, grid=(9, 21), D=256, prefix=5, pairing="interleaved", axes="xy", dtype=torch.bfloat16),
    dict(B=1, H=2, grid=(11, 13), D=256, prefix=1, pairing="half", axes="ij", dtype=torch.float32),
    dict(B=1, H=3, grid=(10, 10), D=4, prefix=1, pairing="interleaved", axes="xy", dtype=torch.float16),
    dict(B=1, H=3, grid=(12, 9), D=96, prefix=0, pairing="interleaved", axes="ij", dtype=torch.bfloat16),
]


def _inputs(case: dict, *, noncontiguous: bool = False) -> dict:
    h, w = case["grid"]
    n = case["prefix"] + h * w
    shape = [case["B"], case["H"], n, case["D"]]
    qkv = {name: randn(shape, case["dtype"], noncontiguous=noncontiguous) for name in ("q", "k", "v")}
    angles = axial_angles(h, w, case["D"], axis_order=case["axes"], device=device())
    return {**qkv, "angles": angles}


def _run(case: dict, noncontiguous: bool) -> None:
    inputs = _inputs(case, noncontiguous=noncontiguous)
    kw = dict(n_prefix=case["prefix"], pairing=case["pairing"])
    # fp16 gradients on the CPU: PyTorch's CPU SDPA (the low-precision reference) keeps P in fp32, while the
    # kernel rounds P to fp16 for its tensor-core products (as GPU flash kernels do); on tiny grids that
    # alone reached 2.4 fp16 ulps of dV (seed 897968070), past 2x the reference's error plus the 1e-3 floor.
    floor = None
    if case["dtype"] == torch.float16 and device().type == "cpu":
        floor = {f"grad_{name}": 2e-3 for name in ("q", "k", "v")}
    check_forward_backward(
        lambda q, k, v, angles: rope2d_attention(q, k, v, angles, **kw),
        lambda q, k, v, angles: rope2d_attention_reference(q, k, v, angles, **kw),
        inputs, grad_names=["q", "k", "v"], floor=floor,
    )


@pytest.mark.parametrize("case", cases(CPU_CASES))
def test_forward_backward(case: dict) -> None:
    _run(case, noncontiguous=False)


@pytest.mark.parametrize("case", cases(CPU_CASES[:2] + CPU_CASES[3:4]))
def test_forward_backward_noncontiguous(case: dict) -> None:
    _run(case, noncontiguous=True)


@pytest.mark.parametrize("case", cases(GPU_CASES, gpu_only_dims=lambda row: True))
def test_forward_backward_gpu(case: dict) -> None:
    _run(case, noncontiguous=case["D"] == 80)


PREROTATE_CASES = [CPU_CASES[0], CPU_CASES[3], CPU_CASES[5]]
GPU_PREROTATE_CASES = [GPU_CASES[3], GPU_CASES[5]]


@pytest.mark.parametrize("mode", ["0", "1"])
@pytest.mark.parametrize("case", cases(PREROTATE_CASES) + cases(GPU_PREROTATE_CASES, gpu_only_dims=lambda row: True))
def test_prerotate_paths(case: dict, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways of rotating: inside the attention loops ("0") or once into a scratch slab ("1");
    the default picks per pass (see kernels.PREROTATE_ENV), so force each one on every pass here."""
    monkeypatch.setenv("FATTN_ROPE2D_PREROTATE", mode)
    _run(case, noncontiguous=mode == "1")


# Whole-row backward products (kernels.FULL_ROWS_ENV): head dims whose D/2 is a power of two, each dtype.
FULL_ROW_CASES = [CPU_CASES[0], CPU_CASES[3], CPU_CASES[4]]
GPU_FULL_ROW_CASES = [GPU_CASES[0], GPU_CASES[3], GPU_CASES[5], GPU_CASES[6]]


@pytest.mark.parametrize("prerotate", ["1", "0"], ids=["prerotated", "inloop"])
@pytest.mark.parametrize("full_rows", [True, False], ids=["full_rows", "halves"])
@pytest.mark.parametrize("case", cases(FULL_ROW_CASES) + cases(GPU_FULL_ROW_CASES, gpu_only_dims=lambda row: True))
def test_row_products(case: dict, full_rows: bool, prerotate: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole-row products and half-tile products, each forced on (the default is FATTN_ROPE2D_FULL_ROWS,
    read at import), in the forward and the backward, on pre-rotated slabs ("1") and in-loop rotation ("0")."""
    from fattn.rope2d import kernels

    monkeypatch.setattr(kernels, "_FULL_ROWS", full_rows)
    monkeypatch.setenv("FATTN_ROPE2D_PREROTATE", prerotate)
    assert kernels._full_rows(case["D"]) is full_rows  # the cases' head dims allow whole rows
    _run(case, noncontiguous=True)


def test_full_rows_prune_spilling_forward_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward tiles that spill with whole rows (kernels._FWD_TILES_SPILL_FULL_ROWS) are kept for
    half-tile launches only."""
    from fattn.rope2d import kernels

    monkeypatch.setenv("FATTN_ROPE2D_AUTOTUNE_LIMIT", "0")
    tiles = [(128, 64, 8, 3), (128, 64, 4, 3)]
    configs = kernels._configs({32: tiles})
    prune = kernels._pruner({32: tiles}, None, None, {32: [tiles[1]]})
    q = torch.empty(0, dtype=torch.bfloat16)

    def kept(full_rows: bool) -> list[int]:
        return [c.num_warps for c in prune(configs, {"N": 4096, "q_ptr": q}, BLOCK_DH=32, FULL_ROWS=full_rows)]

    assert kept(False) == [8, 4]
    assert kept(True) == [8]


def _isolated_tiles(tables: dict, mode: str, head_dim: int) -> list[dict]:
    """The (fwd, dkdv, dq) tiles that test_every_tuned_tile_is_correct runs together, one triple at a time, from
    the D <= 64 rows of `tables` (kernels._HOPPER_TILES): with k pre-rotated ("1") the forward's pre-rotated-only
    tiles too; with whole rows not the forward tiles the pruner drops for them (they spill)."""
    from fattn.rope2d import kernels

    fwd = kernels.tile_order(32, False, mode == "1", kernels._full_rows(head_dim), tables["fwd"],
                             prerotated_table=tables["fwd_prerotated"],
                             full_rows_spill=kernels._FWD_TILES_SPILL_FULL_ROWS)
    dkdv, dq = list(tables["dkdv"][32]), list(tables["dq"][32])
    return [{"fwd": fwd[i % len(fwd)], "dkdv": dkdv[i % len(dkdv)], "dq": dq[i % len(dq)]}
            for i in range(max(len(fwd), len(dkdv), len(dq)))]


@pytest.mark.parametrize("mode", ["0", "1"])
def test_every_isolated_tile_is_launchable(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each Hopper tile the GPU test below isolates survives its kernel's pruner (built as the kernel's is) for
    the launch it runs in: a tile pruned away left that test with no config on the GPU (session 16)."""
    from fattn.rope2d import kernels

    monkeypatch.setenv("FATTN_ROPE2D_AUTOTUNE_LIMIT", "0")
    q = torch.empty(0, dtype=torch.bfloat16)
    flags = {"BLOCK_DH": 32, "FULL_ROWS": kernels._full_rows(64)}
    for tiles in _isolated_tiles(kernels._HOPPER_TILES, mode, 64):
        for name, tile in tiles.items():
            table = {32: [tile]}
            if name == "fwd":  # the narrowed table holds the tile; the pre-rotated extras are emptied
                prune = kernels._pruner(table, None, {32: []}, kernels._FWD_TILES_SPILL_FULL_ROWS)
                kept = prune(kernels._configs(table), {"N": 1025, "q_ptr": q}, PREROTATED_K=mode == "1", **flags)
            else:
                prune = kernels._pruner(table)
                kept = prune(kernels._configs(table), {"N": 1025, "q_ptr": q}, PREROTATED=mode == "1", **flags)
            assert [kernels._tile(c) for c in kept] == [tile], f"{name} tile {tile} (mode {mode}) is pruned away"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["0", "1"])
@pytest.mark.parametrize("case", cases([GPU_CASES[2], GPU_CASES[3]], gpu_only_dims=lambda row: True))
def test_every_tuned_tile_is_correct(case: dict, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Autotuning may pick any tile of the D <= 64 tables (every ViT): run each one on its own, the
    i-th forward, dK/dV and dQ tiles together, with k rotated in the loop ("0") and pre-rotated ("1",
    which adds the pre-rotated-only forward tiles). The tables are narrowed to one tile and the
    autotuners' caches cleared, so the test-mode limit of 1 launches exactly that tile."""
    from fattn.rope2d import kernels

    monkeypatch.setenv("FATTN_ROPE2D_PREROTATE", mode)
    cls = 32
    tuned = (kernels._rope2d_fwd_kernel, kernels._rope2d_bwd_dkdv_kernel, kernels._rope2d_bwd_dq_kernel)
    for tiles in _isolated_tiles(kernels._HOPPER_TILES, mode, case["D"]):
        monkeypatch.setitem(kernels._FWD_TILES, cls, [tiles["fwd"]])
        monkeypatch.setitem(kernels._FWD_TILES_PREROTATED, cls, [])
        monkeypatch.setitem(kernels._DKDV_TILES, cls, [tiles["dkdv"]])
        monkeypatch.setitem(kernels._DQ_TILES, cls, [tiles["dq"]])
        for kernel in tuned:
            kernel.cache.clear()
        try:
            _run(case, noncontiguous=True)
        except AssertionError as e:
            raise AssertionError(f"tiles {tiles}: {e}") from e
    for kernel in tuned:  # the next tests tune afresh with the full tables
        kernel.cache.clear()


def test_capped_tile_is_its_own_candidate(monkeypatch: pytest.MonkeyPatch) -> None:
    """A table row with a 5th entry (maxnreg) becomes a config with that register cap, kept apart from its
    uncapped twin by the pruner, in the table's order."""
    from fattn.rope2d import kernels

    monkeypatch.setenv("FATTN_ROPE2D_AUTOTUNE_LIMIT", "0")
    tiles = [(128, 64, 8, 3, 128), (64, 64, 4, 2), (128, 64, 8, 3)]
    configs = kernels._configs({32: tiles})
    assert [c.maxnreg for c in configs] == [128, None, None]
    prune = kernels._pruner({32: tiles[::-1]})
    q = torch.empty(0, dtype=torch.bfloat16)
    kept = prune(configs, {"N": 4096, "q_ptr": q}, BLOCK_DH=32)
    assert [kernels._tile(c) for c in kept] == tiles[::-1]
    only_capped = kernels._pruner({32: tiles[:1]})(configs, {"N": 4096, "q_ptr": q}, BLOCK_DH=32)
    assert [kernels._tile(c) for c in only_capped] == tiles[:1]


@pytest.mark.parametrize(("mode", "min_q_tiles", "expected"), [("0", 4, (0, 0)), ("1", 4, (1, 2)),
                                                               ("auto", 4, (0, 2)), ("auto", 1, (1, 2))])
def test_prerotate_mode_dispatch(mode: str, min_q_tiles: int, expected: tuple[int, int],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Which passes pre-rotate (so that test_prerotate_paths does cover both kernels' paths); "auto"
    pre-rotates the forward's k from PREROTATE_MIN_Q_TILES q tiles of 128 (lowered here: small N)."""
    from fattn.rope2d import kernels

    monkeypatch.setattr(kernels, "PREROTATE_MIN_Q_TILES", min_q_tiles)
    n_tokens = 13
    calls: list[int] = []
    rotated = kernels._rotated
    monkeypatch.setattr(kernels, "_rotated", lambda *a, **kw: calls.append(1) or rotated(*a, **kw))
    monkeypatch.setenv("FATTN_ROPE2D_PREROTATE", mode)
    d, n_prefix = 8, n_tokens - 12
    q, k, v = (randn([1, 1, n_tokens, d], requires_grad=True) for _ in range(3))
    angles = randn([12, d // 2])
    out = rope2d_attention(q, k, v, angles, n_prefix=n_prefix)
    n_fwd = len(calls)
    out.sum().backward()
    assert (n_fwd, len(calls) - n_fwd) == expected


def test_prerotated_only_tiles_are_pruned_for_in_loop_rotation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward tiles that spill when k is rotated in the loop are tried only for pre-rotated k, and
    never for fp32 (checked on the pruner itself: under the interpreter every table is one tile)."""
    import triton

    from fattn.rope2d import kernels

    monkeypatch.setenv("FATTN_ROPE2D_AUTOTUNE_LIMIT", "0")
    both, pre_only = (128, 64, 8, 3), (128, 64, 4, 3)
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in (both, pre_only)]
    prune = kernels._pruner({32: [both]}, None, {32: [pre_only]})

    def kept(prerotated: bool, dtype: torch.dtype) -> list[int]:
        q = torch.empty(0, dtype=dtype)
        return [c.num_warps for c in prune(configs, {"N": 4096, "q_ptr": q}, BLOCK_DH=32, PREROTATED_K=prerotated)]

    assert kept(False, torch.bfloat16) == [8]
    assert kept(True, torch.bfloat16) == [8, 4]
    assert kept(True, torch.float32) == [8]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_custom_scale_and_table(dtype: torch.dtype) -> None:
    """Any angle table (here random, like train-time jitter) and a non-default scale."""
    n_prefix, hw, d = 2, 17, 24
    inputs = {name: randn([1, 2, n_prefix + hw, d], dtype) for name in ("q", "k", "v")}
    inputs["angles"] = randn([hw, d // 2], torch.float32, scale=3.0)
    kw = dict(n_prefix=n_prefix, pairing="interleaved", scale=0.37)
    check_forward_backward(lambda q, k, v, angles: rope2d_attention(q, k, v, angles, **kw),
                           lambda q, k, v, angles: rope2d_attention_reference(q, k, v, angles, **kw),
                           inputs, grad_names=["q", "k", "v"])


def test_qkv_views_of_one_projection() -> None:
    """q, k, v as strided views of a fused [B, N, 3, H, D] qkv tensor (what the module passes)."""
    b, n_prefix, (h, w), heads, d = 2, 1, (3, 5), 2, 16
    n = n_prefix + h * w
    qkv = randn([b, n, 3, heads, d]).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    angles = axial_angles(h, w, d, device=device())
    out = rope2d_attention(q, k, v, angles, n_prefix=n_prefix)
    ref = rope2d_attention_reference(q.double(), k.double(), v.double(), angles.double(), n_prefix=n_prefix)
    assert_close("out", out, ref, lowp=rope2d_attention_reference(q, k, v, angles, n_prefix=n_prefix))


def test_rotation_is_relative() -> None:
    """RoPE's defining property: shifting the whole grid leaves attention unchanged (integer shifts)."""
    d, (h, w) = 16, (4, 5)
    q, k, v = (randn([1, 1, h * w, d], torch.float32) for _ in range(3))
    table = axial_angles_reference(h, w, d, dtype=torch.float64, device=device())
    freqs = 100.0 ** (-torch.arange(d // 4, dtype=torch.float64, device=device()) / (d // 4))
    shifted = table + torch.cat([3 * freqs, -2 * freqs])[None, :]  # x += 3, y -= 2
    a = rope2d_attention(q, k, v, table.float())
    b = rope2d_attention(q, k, v, shifted.float())
    # fp32 dots are exact under the interpreter, tf32 on a GPU (~1e-3 relative); a wrong rotation is O(0.1)
    tol = 2e-3 if on_gpu() else 2e-5
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_deterministic() -> None:
    case = dict(B=1, H=2, grid=(3, 6), D=16, prefix=1, pairing="interleaved", axes="xy", dtype=torch.float32)
    if on_gpu():
        case.update(B=2, H=4, grid=(14, 14), D=64, dtype=torch.float16)
    inputs = _inputs(case)
    q, k, v = (inputs[n].requires_grad_(True) for n in ("q", "k", "v"))

    def run() -> list[torch.Tensor]:
        out = rope2d_attention(q, k, v, inputs["angles"], n_prefix=1)
        return [out, *torch.autograd.grad(out.sum(), (q, k, v))]

    assert_deterministic(run, runs=2)


# --------------------------------------------------------------------------------------------
# The axial table and timm's RoPE-ViT convention
# --------------------------------------------------------------------------------------------
def _naver_rope_vit_qk(x: torch.Tensor, h: int, w: int, n_prefix: int, base: float) -> torch.Tensor:
    """RoPE-ViT's (naver-ai/rope-vit, timm's rope_vit 'axial') formula written out with complex numbers:
    freqs = 1/base**(arange(0, D, 4)[:D/4]/D), x-angles then y-angles, interleaved pairs as complex."""
    d = x.shape[-1]
    freqs = 1.0 / (base ** (torch.arange(0, d, 4, dtype=torch.float64)[: d // 4] / d))
    t = torch.arange(h * w, dtype=torch.float64)
    t_x, t_y = t % w, torch.div(t, w, rounding_mode="floor")
    angles = torch.cat([torch.outer(t_x, freqs), torch.outer(t_y, freqs)], dim=-1)
    cis = torch.polar(torch.ones_like(angles), angles).to(x.device)
    patches = torch.view_as_complex(x[..., n_prefix:, :].double().reshape(*x.shape[:-2], h * w, d // 2, 2).contiguous())
    rotated = torch.view_as_real(patches * cis).flatten(-2)
    return torch.cat([x[..., :n_prefix, :].double(), rotated], dim=-2)


def test_axial_angles_match_rope_vit_formula() -> None:
    h, w, d, n_prefix = 3, 5, 16, 1
    x = randn([1, 2, n_prefix + h * w, d], torch.float64)
    ours = apply_rope2d(x, axial_angles(h, w, d, base=100.0, device=device()).double(), n_prefix=n_prefix)
    torch.testing.assert_close(ours, _naver_rope_vit_qk(x, h, w, n_prefix, 100.0), atol=1e-6, rtol=1e-6)
    # "ij" swaps which axis the first D/4 pairs follow
    xy = axial_angles(h, w, d, axis_order="xy")
    ij = axial_angles(h, w, d, axis_order="ij")
    torch.testing.assert_close(ij[:, : d // 4], xy[:, d // 4:])
    torch.testing.assert_close(ij[:, d // 4:], xy[:, : d // 4])


def test_attention_matches_rope_vit_formula() -> None:
    """The fused kernel against RoPE-ViT's rotation + plain softmax attention."""
    h, w, d, n_prefix = 4, 3, 32, 1
    q, k, v = (randn([2, 2, n_prefix + h * w, d], torch.float32) for _ in range(3))
    out = rope2d_attention(q, k, v, axial_angles(h, w, d, device=device()), n_prefix=n_prefix)
    qr, kr = (_naver_rope_vit_qk(t, h, w, n_prefix, 100.0) for t in (q, k))
    ref = torch.softmax(qr @ kr.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v.double()
    assert_close("out", out, ref, floor=2e-5 if not on_gpu() else None)


@pytest.mark.parametrize("indexing", ["xy", "ij"])
def test_matches_timm_rope(indexing: str) -> None:
    """timm's own tables (build_rotary_pos_embed, language mode) and rotation (apply_rot_embed_cat)."""
    pytest.importorskip("timm")
    import inspect

    from timm.layers import pos_embed_sincos as pe

    if "grid_indexing" not in inspect.signature(pe.build_rotary_pos_embed).parameters:
        pytest.skip("this timm has no grid_indexing (RoPE-ViT support)")
    h, w, d, n_prefix = 5, 7, 32, 1
    sin, cos = pe.build_rotary_pos_embed([h, w], dim=d, temperature=100.0, in_pixels=False,
                                         grid_indexing=indexing, device=device())
    q, k, v = (randn([2, 3, n_prefix + h * w, d], torch.float32) for _ in range(3))

    def timm_rope(x: torch.Tensor) -> torch.Tensor:
        emb = torch.cat([sin, cos], dim=-1).double()
        rotated = pe.apply_rot_embed_cat(x[:, :, n_prefix:].double(), emb)
        return torch.cat([x[:, :, :n_prefix].double(), rotated], dim=2)

    ref = torch.softmax(timm_rope(q) @ timm_rope(k).transpose(-1, -2) / math.sqrt(d), dim=-1) @ v.double()
    out = rope2d_attention(q, k, v, axial_angles(h, w, d, axis_order=indexing, device=device()), n_prefix=n_prefix)
    assert_close("out", out, ref, floor=2e-5 if not on_gpu() else None)


def test_lse_gradient_is_not_materialized() -> None:
    """The op's lse output (kept for the backward, non-differentiable) makes autograd fill no zeros
    tensor on its device thread before the backward."""
    case = CPU_CASES[0]
    inputs = _inputs(case)
    leaves = [inputs[n].detach().requires_grad_(True) for n in ("q", "k", "v")]
    out = rope2d_attention(*leaves, inputs["angles"], n_prefix=case["prefix"], pairing=case["pairing"])
    grads = []
    assert not zero_fills_during(lambda: grads.extend(torch.autograd.grad(out, leaves, torch.randn_like(out))))
    assert all(bool(torch.isfinite(g).all()) for g in grads)


# --------------------------------------------------------------------------------------------
# Custom op: opcheck and torch.compile(fullgraph=True)
# --------------------------------------------------------------------------------------------
def test_custom_op_opcheck_and_compile() -> None:
    n_prefix, (h, w), d = 1, (3, 4), 16
    q, k, v = (randn([1, 2, n_prefix + h * w, d], requires_grad=True) for _ in range(3))
    angles = axial_angles(h, w, d, device=device())
    check_custom_op(rope2d_fwd, (q, k, v, angles, n_prefix, "interleaved", 0.25),
                    public_fn=lambda q, k, v, a: rope2d_attention(q, k, v, a, n_prefix=n_prefix),
                    public_args=(q, k, v, angles))


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def _good(d: int = 16, h: int = 3, w: int = 4, n_prefix: int = 1) -> tuple[torch.Tensor, ...]:
    q, k, v = (randn([1, 2, n_prefix + h * w, d]) for _ in range(3))
    return q, k, v, axial_angles(h, w, d, device=device())


def test_error_axial_angles_base() -> None:
    with pytest.raises(ValueError, match=r"base must be a positive float, got -1\.0"):
        axial_angles(3, 4, 16, base=-1.0)
    with pytest.raises(TypeError, match="base must be a positive float, got str"):
        axial_angles(3, 4, 16, base="100")


def test_error_head_dim_not_multiple_of_4() -> None:
    q, k, v = (randn([1, 2, 13, 18]) for _ in range(3))
    with pytest.raises(ValueError, match="multiple of 4, got 18"):
        rope2d_attention(q, k, v, torch.zeros(12, 9, device=device()), n_prefix=1)
    with pytest.raises(ValueError, match=r"head_dim.*multiple of 4"):
        axial_angles(3, 4, 18)


def test_error_angles_wrong_shape() -> None:
    q, k, v, angles = _good()
    with pytest.raises(ValueError, match=r"angles must have shape \[height\*width, D/2\]"):
        rope2d_attention(q, k, v, angles[:, :4], n_prefix=1)
    with pytest.raises(ValueError, match="angles must be 2-D"):
        rope2d_attention(q, k, v, angles[None], n_prefix=1)


def test_error_n_does_not_match_grid() -> None:
    q, k, v, angles = _good(n_prefix=1)
    with pytest.raises(ValueError, match=r"N must equal n_prefix \+ height\*width.*N=13.*n_prefix=0.*got 12 rows"):
        rope2d_attention(q, k, v, angles, n_prefix=0)
    with pytest.raises(ValueError, match="n_prefix must be <= N"):
        rope2d_attention(q, k, v, angles, n_prefix=14)


def test_error_types_and_choices() -> None:
    q, k, v, angles = _good()
    with pytest.raises(TypeError, match="q must have dtype in"):
        rope2d_attention(q.double(), k, v, angles, n_prefix=1)
    with pytest.raises(TypeError, match="share one dtype"):
        rope2d_attention(q, k.half(), v, angles, n_prefix=1)
    with pytest.raises(TypeError, match=r"k must be a torch\.Tensor"):
        rope2d_attention(q, None, v, angles, n_prefix=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pairing must be one of"):
        rope2d_attention(q, k, v, angles, n_prefix=1, pairing="rotate")
    with pytest.raises(ValueError, match=r"v must have shape \[1, 2, 13, 16\]"):
        rope2d_attention(q, k, v[:, :1], angles, n_prefix=1)
    with pytest.raises(TypeError, match="n_prefix must be an int"):
        rope2d_attention(q, k, v, angles, n_prefix=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="angles requires grad"):
        rope2d_attention(q, k, v, angles.clone().requires_grad_(), n_prefix=1)
    with pytest.raises(ValueError, match="axis_order must be one of"):
        axial_angles(3, 4, 16, axis_order="yx")
    assert not_supported_reasons(q, k, v, angles, n_prefix=1) == []
    assert any("head dim" in r for r in not_supported_reasons(q[..., :6], k[..., :6], v[..., :6], angles, n_prefix=1))


@pytest.mark.gpu
def test_beyond_int32_offsets() -> None:
    """B*H*N*D > 2^31 elements: batch/head offsets must be int64 (checked on the last images)."""
    b, heads, (h, w), d, n_prefix = 32800, 16, (8, 8), 64, 1
    n = n_prefix + h * w
    assert b * heads * n * d > 2**31
    q, k, v = (torch.randn(b, heads, n, d, device=device(), dtype=torch.float16) for _ in range(3))
    angles = axial_angles(h, w, d, device=device())
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    out = rope2d_attention(*leaves, angles, n_prefix=n_prefix)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    tail = [t[-2:].detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = rope2d_attention_reference(*tail, angles.double(), n_prefix=n_prefix)
    ref_grads = torch.autograd.grad(ref, tail, grad_out[-2:].double())
    assert_close("out", out[-2:], ref, dtype=torch.float16, floor=2e-3)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(f"grad_{name}", g[-2:], rg, dtype=torch.float16, floor=4e-3)


def test_error_after_a_checked_signature() -> None:
    """Checks run once per argument signature, which includes grad mode: angles that require grad
    pass under no_grad, and are still refused once gradients are recorded."""
    q, k, v, angles = _good()
    angles.requires_grad_(True)
    with torch.no_grad():
        rope2d_attention(q, k, v, angles, n_prefix=1)
        rope2d_attention(q, k, v, angles, n_prefix=1)
    with pytest.raises(ValueError, match="angles requires grad"):
        rope2d_attention(q, k, v, angles, n_prefix=1)
    with pytest.raises(ValueError, match="n_prefix must be <= N"):
        rope2d_attention(q, k, v, angles.detach(), n_prefix=100)

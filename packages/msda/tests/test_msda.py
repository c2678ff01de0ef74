"""fattn.msda against the per-level grid_sample reference in float64: forward and all gradients."""

from __future__ import annotations

import pytest
import torch

from fattn.core.testing import (
    assert_close,
    assert_deterministic,
    case_id,
    cases,
    check_custom_op,
    check_forward_backward,
    device,
    error_floor,
    on_gpu,
    rand,
    randn,
)
from fattn.msda import ms_deform_attn, ms_deform_attn_reference, msda_bwd, msda_fwd


def level_tensors(levels: list[tuple[int, int]], dev: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """spatial_shapes [L, 2], level_start_index [L] and S for a list of (H, W)."""
    dev = dev or device()
    shapes = torch.tensor(levels, dtype=torch.int64, device=dev)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return shapes, starts, int(sizes.sum())


def parse_levels(levels: str | list[tuple[int, int]]) -> list[tuple[int, int]]:
    """'5x7+2x3' -> [(5, 7), (2, 3)] (strings keep test ids readable)."""
    if isinstance(levels, str):
        return [tuple(int(v) for v in lv.split("x")) for lv in levels.split("+")]  # type: ignore[misc]
    return levels


def make_inputs(N: int, Lq: int, M: int, D: int, levels: str | list[tuple[int, int]], P: int, dtype: torch.dtype,
                loc_dtype: torch.dtype | None = None, noncontiguous: bool = False,
                attn_dtype: torch.dtype | None = None) -> dict:
    levels = parse_levels(levels)
    shapes, starts, S = level_tensors(levels)
    L = len(levels)
    loc_dtype = loc_dtype or dtype
    attn_dtype = attn_dtype or loc_dtype
    value = randn([N, S, M, D], dtype, noncontiguous=noncontiguous)
    # Inside, across the borders and far outside the maps.
    loc = rand([N, Lq, M, L, P, 2], torch.float32, low=-0.3, high=1.3)
    if loc.numel() >= 12:
        loc.view(-1, 2)[:6] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.5, 0.5], [0.5, 7.0], [1.0, 0.0], [0.3, 1.0]],
                                           device=loc.device)
    # Snap to multiples of 2^-12: then x * W - 0.5 is exact in fp32, so the kernel, the fp32 and the
    # fp64 references all pick the same bilinear cell (a gradient jumps where the cell changes).
    loc = (torch.round(loc * 4096) / 4096).to(loc_dtype)
    attn = rand([N, Lq, M, L, P], attn_dtype)
    if noncontiguous:
        from fattn.core.testing import make_noncontiguous

        loc, attn = make_noncontiguous(loc), make_noncontiguous(attn)
    return dict(value=value, spatial_shapes=shapes, level_start_index=starts, sampling_locations=loc,
                attention_weights=attn)


GRADS = ["value", "sampling_locations", "attention_weights"]

BASE = dict(N=2, Lq=37, M=2, D=12, levels="5x7+2x3", P=2)
SMALL_CASES = [
    {**BASE, "dtype": torch.float32, "padding": "zeros", "align": False, "det": False},
    {**BASE, "dtype": torch.float32, "padding": "border", "align": True, "det": False},
    {**BASE, "dtype": torch.float32, "padding": "zeros", "align": True, "det": True},
    {**BASE, "dtype": torch.float16, "padding": "zeros", "align": False, "det": False},
    {**BASE, "dtype": torch.float16, "padding": "border", "align": False, "det": True},
    # One level, a single-pixel row, head dim 5, three points.
    dict(N=1, Lq=21, M=3, D=5, levels="1x6", P=3, dtype=torch.float32, padding="border", align=False, det=False),
    # Three non-square levels, batch 3, one head of dim 17.
    dict(N=3, Lq=9, M=1, D=17, levels="4x9+3x2+1x1", P=1, dtype=torch.float32, padding="zeros",
         align=False, det=True),
    {**BASE, "dtype": torch.bfloat16, "padding": "zeros", "align": False, "det": False},
    {**BASE, "dtype": torch.bfloat16, "padding": "border", "align": True, "det": True},
]
# Realistic sizes: GPU only.
GPU_CASES = [
    dict(N=2, Lq=1000, M=8, D=32, levels="64x64+32x32+16x16+8x8", P=4, dtype=dt, padding="zeros",
         align=False, det=det)
    for dt in (torch.float32, torch.float16, torch.bfloat16) for det in (False, True)
] + [
    dict(N=1, Lq=777, M=6, D=48, levels="50x84+25x42+13x21", P=3, dtype=torch.bfloat16, padding="border",
         align=True, det=False),
    dict(N=3, Lq=300, M=8, D=256, levels="13x21+7x11", P=4, dtype=torch.float16, padding="zeros",
         align=False, det=False),
]


def _run(case: dict, noncontiguous: bool = False, loc_dtype: torch.dtype | None = None) -> None:
    inputs = make_inputs(case["N"], case["Lq"], case["M"], case["D"], case["levels"], case["P"], case["dtype"],
                         loc_dtype=loc_dtype, noncontiguous=noncontiguous)
    opts = dict(padding_mode=case["padding"], align_corners=case["align"])
    check_forward_backward(
        lambda **kw: ms_deform_attn(**kw, **opts, deterministic=case["det"]),
        lambda **kw: ms_deform_attn_reference(**kw, **opts),
        inputs, grad_names=GRADS,
    )


@pytest.mark.parametrize("case", cases(SMALL_CASES) + cases(GPU_CASES, gpu_only_dims=lambda r: True))
def test_forward_backward_match_reference(case: dict) -> None:
    _run(case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_noncontiguous_inputs_get_gradients(dtype: torch.dtype) -> None:
    # The seed Triton port silently dropped gradients of non-contiguous inputs.
    _run({**BASE, "dtype": dtype, "padding": "zeros", "align": False, "det": False}, noncontiguous=True)


@pytest.mark.parametrize("path", ["level_loop", "levels_unrolled", "persistent"])
def test_every_kernel_path_matches_reference(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The autotuner picks the level loop or its unrolled form and the grid or persistent schedule
    # per shape (both kernels): pin each in turn (a single config runs as is, without tuning).
    import triton

    from fattn.msda import kernels

    unroll = path == "levels_unrolled"
    extra = {"PERSISTENT": path == "persistent", "PROGRAMS_PER_SLOT": 2}
    monkeypatch.setattr(kernels.msda_fwd_kernel, "configs", [triton.Config(
        {"BLOCK_Q": 16, "UNROLL_LEVELS": unroll, **extra}, num_warps=4, num_stages=1 if unroll else 3)])
    # (the backward's level loop in program order; the other two paths rotate it, see _bwd_tile)
    monkeypatch.setattr(kernels.msda_bwd_kernel, "configs", [triton.Config(
        {"BLOCK_Q": 16, "UNROLL_LEVELS": unroll, "ROTATE_LEVELS": path != "level_loop", **extra},
        num_warps=4, num_stages=1)])
    # (the CPU suite's default path is the unrolled one: the others get both backward modes)
    for det in (False,) if unroll else (False, True):
        _run({**BASE, "levels": "5x7+2x3+1x2", "dtype": torch.float32, "padding": "zeros", "align": False,
              "det": det})


@pytest.mark.parametrize("split_level", [1, 2], ids=["scratch_from_level1", "scratch_from_level2"])
def test_split_value_gradient_matches_reference(split_level: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backward's split value gradient (leading levels' rows by atomics into the gradient itself,
    the rest into an fp32 scratch copied in afterwards), which bf16 inputs take on the GPU: forced here
    in fp32, where the CPU interpreter runs both halves."""
    from fattn.msda import op as op_module

    levels = [(5, 7), (2, 3), (1, 2)]
    start = sum(h * w for h, w in levels[:split_level])
    calls = []
    monkeypatch.setattr(op_module, "_direct_rows", lambda *args: calls.append(start) or start)
    _run({**BASE, "levels": levels, "dtype": torch.float32, "padding": "border", "align": False, "det": False})
    assert calls, "the backward did not ask for the split"


def test_direct_rows_decision() -> None:
    """Which rows of the value gradient take atomics in value's own dtype (op._direct_rows)."""
    from fattn.msda import op as op_module

    levels = [(64, 64), (32, 32), (16, 16), (8, 8)]
    shapes, starts, s = level_tensors(levels, torch.device("cpu"))
    n, m, d, points = 1, 2, 4, 4

    def direct(dtype: torch.dtype, lq: int, checked: bool = True) -> int:
        sh, st = (shapes, starts) if checked else (shapes.clone(), starts.clone())
        return op_module._direct_rows(torch.empty(n, s, m, d, dtype=dtype), sh, st, lq, points)

    assert op_module._index_reasons(shapes, starts, s) == []  # the forward's check: the sizes are now known
    limit = op_module.BF16_DIRECT_MAX_CONTRIBUTIONS
    # Level l takes lq * points * 4 / (H * W) contributions per row: bf16 atomics up to the first busy level.
    lq = limit * 16 * 16 // (points * 4)  # the 16x16 level exactly at the limit, 8x8 over it
    assert direct(torch.bfloat16, lq) == 64 * 64 + 32 * 32 + 16 * 16
    assert direct(torch.bfloat16, lq + 1) == 64 * 64 + 32 * 32
    assert direct(torch.bfloat16, 10) == s  # every level quiet: no scratch
    assert direct(torch.bfloat16, 10**6) == 0  # the finest level busy already: all in fp32
    assert direct(torch.bfloat16, lq, checked=False) == 0  # sizes never read on the host: all in fp32
    assert direct(torch.float16, lq) == 0
    assert direct(torch.float32, lq) == s
    assert direct(torch.float64, lq) == s


def test_backward_finds_the_level_sizes_the_forward_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backward's split (op._direct_rows) looks the level sizes up by the index tensors the forward
    checked: autograd must hand it those very tensors, unmodified, or bf16 silently loses the split."""
    from fattn.msda import op as op_module

    original = op_module._direct_rows
    seen = []

    def spy(value, spatial_shapes, level_start_index, lq, points):  # type: ignore[no-untyped-def]
        seen.append(op_module._CHECKED_INDEX.get((spatial_shapes, level_start_index), value.shape[1]))
        return original(value, spatial_shapes, level_start_index, lq, points)

    monkeypatch.setattr(op_module, "_direct_rows", spy)
    levels = [(5, 7), (2, 3)]
    inputs = make_inputs(2, 13, 2, 8, levels, 2, torch.float32)
    leaves = {k: inputs[k].requires_grad_(True) for k in GRADS}
    out = ms_deform_attn(**inputs)
    torch.autograd.grad(out, list(leaves.values()), torch.randn_like(out))
    assert seen == [(((5, 7), 0), ((2, 3), 35))]


def test_int64_offsets_path_matches_int32(monkeypatch: pytest.MonkeyPatch, fresh_launch_plans) -> None:  # type: ignore[no-untyped-def]
    """The forward's int64 in-slice offsets (value / locations / weights past 2**31 elements) give the
    same bits as the int32 ones, and the gradients do not change (the backward's offsets are int64
    throughout today; this holds it to that if it gains an int32 path): the deterministic backward's
    bits, the atomic one's to rounding."""
    from fattn.msda import op as op_module

    inputs = make_inputs(2, 13, 2, 8, [(5, 7), (2, 3)], 2, torch.float32)
    grad_out = torch.randn(2, 13, 2 * 8, device=inputs["value"].device)

    def run(deterministic: bool) -> tuple[torch.Tensor, ...]:
        leaves = {k: inputs[k].detach().clone().requires_grad_(True) for k in GRADS}
        out = ms_deform_attn(**{**inputs, **leaves}, deterministic=deterministic)
        return (out.detach(), *torch.autograd.grad(out, list(leaves.values()), grad_out))

    runs32 = {det: run(det) for det in (True, False)}
    monkeypatch.setattr(op_module, "_needs_64bit_offsets", lambda *args, **kwargs: True)
    # The launch plans of the int32 runs share these calls' signatures (in real use the offsets'
    # width follows from the signature): without clearing them a GPU run would relaunch the int32 kernel.
    fresh_launch_plans()
    for det in (True, False):
        for name, a, b in zip(["out", *GRADS], runs32[det], run(det)):
            if det or name != "value":
                assert torch.equal(a, b), name
            else:
                assert_close(name, b, a, dtype=torch.float32)
    ref64 = ms_deform_attn_reference(**{k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()})
    assert_close("out", runs32[True][0], ref64, dtype=torch.float32)


@pytest.mark.parametrize("loc_dtype", [torch.float32, torch.float16], ids=["loc_fp32", "loc_fp16"])
def test_paired_loads_match_single_loads(loc_dtype: torch.dtype) -> None:
    """The forward reads each point's (x, y), and two points' weights, as one 2x-wide load when the
    layout allows it (op._paired_loads); views one element off a pair boundary take single loads.
    Every combination must give the same bits and match the reference."""
    from fattn.msda.op import _paired_loads

    inputs = make_inputs(2, 13, 2, 8, [(5, 7), (2, 3)], 4, torch.float32, loc_dtype=loc_dtype)

    def shifted(t: torch.Tensor) -> torch.Tensor:  # the same values, every pair 1 element off its alignment
        storage = torch.full((t.numel() + 1,), float("nan"), dtype=t.dtype, device=t.device)
        view = storage[1:].view(t.shape)
        view.copy_(t)
        return view

    loc, attn = inputs["sampling_locations"], inputs["attention_weights"]
    assert _paired_loads(loc, attn) == (True, True)
    assert _paired_loads(shifted(loc), shifted(attn)) == (False, False)
    assert _paired_loads(loc.movedim(-1, 0).contiguous().movedim(0, -1), attn[..., :3]) == (False, False)
    assert _paired_loads(loc.double(), attn.double()) == (False, False)  # 16-byte pairs: no single load
    ref64 = ms_deform_attn_reference(**{k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()})
    paired = ms_deform_attn(**inputs)
    assert_close("out", paired, ref64, dtype=torch.float32)
    for loc_view, attn_view in [(shifted(loc), attn), (loc, shifted(attn)), (shifted(loc), shifted(attn))]:
        single = ms_deform_attn(**{**inputs, "sampling_locations": loc_view, "attention_weights": attn_view})
        assert torch.equal(paired, single)


def test_int64_offsets_decision() -> None:
    """The host's bound switches to int64 offsets before any in-slice offset can pass 2**31."""
    from fattn.msda.op import _needs_64bit_offsets

    def meta(shape, stride):  # type: ignore[no-untyped-def]
        return torch.empty_strided(shape, stride, device="meta")

    n, lq, m, d, levels, points = 1, 100, 8, 32, 4, 4
    loc = meta((n, lq, m, levels, points, 2), (lq * m * levels * points * 2, m * levels * points * 2,
                                               levels * points * 2, points * 2, 2, 1))
    attn = meta((n, lq, m, levels, points), (lq * m * levels * points, m * levels * points, levels * points,
                                             points, 1))
    small = meta((n, 21760, m, d), (21760 * m * d, m * d, d, 1))  # Deformable DETR's 800x1333 encoder
    assert not _needs_64bit_offsets(small, loc, attn)
    s = (2**31) // (4 * m * d) + 1  # 4 * S * stride_vs passes 2**31
    big = meta((n, s, m, d), (s * m * d, m * d, d, 1))
    assert _needs_64bit_offsets(big, loc, attn)
    long_loc = meta((n, 2**31 // 256, m, levels, points, 2), (0, 256, 32, 8, 2, 1))
    assert _needs_64bit_offsets(small, long_loc, attn)


@pytest.mark.parametrize("value_dtype,loc_dtype,attn_dtype", [
    (torch.float16, torch.float32, torch.float32),
    (torch.float32, torch.float16, torch.float16),
    pytest.param(torch.bfloat16, torch.float32, torch.float32, marks=pytest.mark.bf16),
    (torch.float16, torch.float32, torch.float16),
], ids=["value_fp16-loc_fp32", "value_fp32-loc_fp16", "value_bf16-loc_fp32", "value_fp16-loc_fp32-attn_fp16"])
def test_mixed_dtypes(value_dtype: torch.dtype, loc_dtype: torch.dtype, attn_dtype: torch.dtype) -> None:
    # Locations and weights may keep fp32 under autocast while value is half precision: the output
    # follows value, each gradient its own input's dtype; all of them match float64 to the
    # tolerance of the least precise input dtype.
    inputs = make_inputs(2, 13, 2, 8, [(3, 5), (2, 2)], 2, value_dtype, loc_dtype=loc_dtype, attn_dtype=attn_dtype)
    assert inputs["attention_weights"].dtype == attn_dtype
    low = max((value_dtype, loc_dtype, attn_dtype), key=error_floor)
    out = ms_deform_attn(**inputs)
    assert out.dtype == value_dtype
    for name in GRADS:
        inputs[name].requires_grad_(True)
    out = ms_deform_attn(**inputs)
    g = randn(list(out.shape), value_dtype)
    grads = torch.autograd.grad(out, [inputs[n] for n in GRADS], g)
    for name, grad in zip(GRADS, grads):
        assert grad.dtype == inputs[name].dtype and grad.shape == inputs[name].shape
    ref_inputs = {k: (v.detach().double().requires_grad_(k in GRADS) if v.is_floating_point() else v)
                  for k, v in inputs.items()}
    ref64 = ms_deform_attn_reference(**ref_inputs)
    assert_close("out", out, ref64, dtype=value_dtype)
    ref_grads = torch.autograd.grad(ref64, [ref_inputs[n] for n in GRADS], g.double())
    # Each gradient is rounded once from fp32, except bf16 value's: it takes bf16 atomics (op._direct_rows),
    # so its bound adds PyTorch's own bf16 error, as check_forward_backward's bounds do.
    lowp_value = None
    if value_dtype == torch.bfloat16:
        lowp_inputs = {**inputs, "value": inputs["value"].detach().clone().requires_grad_(True)}
        lowp_value = torch.autograd.grad(ms_deform_attn_reference(**lowp_inputs), lowp_inputs["value"], g)[0]
    for name, grad, ref in zip(GRADS, grads, ref_grads):
        assert_close(f"grad_{name}", grad, ref, lowp=lowp_value if name == "value" else None, dtype=low)


def test_gradcheck_fp64() -> None:
    inputs = make_inputs(1, 3, 1, 2, [(2, 3), (1, 2)], 1, torch.float64)
    # Keep points off pixel-cell boundaries, where bilinear sampling is not differentiable.
    inputs["sampling_locations"] = rand(list(inputs["sampling_locations"].shape), torch.float64, low=0.1, high=0.9)
    shapes, starts = inputs["spatial_shapes"], inputs["level_start_index"]
    args = [inputs[n].detach().requires_grad_(True) for n in GRADS]
    for det in (False, True):
        assert torch.autograd.gradcheck(
            lambda v, loc, a: ms_deform_attn(v, shapes, starts, loc, a, deterministic=det), args,
            eps=1e-6, atol=1e-5, fast_mode=True)


# (fp16 and bf16: on the GPU only, where atomics could reorder additions; the interpreter runs serially)
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float16, marks=pytest.mark.gpu),
                                   pytest.param(torch.bfloat16, marks=pytest.mark.gpu)], ids=["fp32", "fp16", "bf16"])
def test_deterministic_backward_is_bitwise_reproducible(dtype: torch.dtype) -> None:
    big = on_gpu()
    inputs = make_inputs(2, 2000 if big else 19, 4 if big else 2, 32 if big else 8,
                         [(32, 32), (16, 16)] if big else [(3, 4), (2, 2)], 4 if big else 2, dtype)
    # Many queries sampling the same few pixels: atomics would add in a different order every run.
    inputs["sampling_locations"] = rand(list(inputs["sampling_locations"].shape), dtype, low=0.4, high=0.6)
    leaves = [inputs[n].detach().requires_grad_(True) for n in GRADS]
    g = randn(list(ms_deform_attn(**inputs).shape), dtype)

    def grads() -> tuple[torch.Tensor, ...]:
        out = ms_deform_attn(leaves[0], inputs["spatial_shapes"], inputs["level_start_index"], leaves[1], leaves[2],
                             deterministic=True)
        return torch.autograd.grad(out, leaves, g)

    assert_deterministic(grads, runs=3)


def test_empty_queries() -> None:
    inputs = make_inputs(2, 0, 2, 4, [(3, 3)], 2, torch.float32)
    for name in GRADS:
        inputs[name].requires_grad_(True)
    out = ms_deform_attn(**inputs)
    assert out.shape == (2, 0, 8)
    grads = torch.autograd.grad(out.sum(), [inputs[n] for n in GRADS])
    assert float(grads[0].abs().sum()) == 0.0


@pytest.mark.parametrize("padding, det", [("zeros", False), ("border", True)], ids=["zeros-no_det", "border-det"])
def test_custom_op_opcheck_and_compile(padding: str, det: bool) -> None:
    inputs = make_inputs(1, 11, 2, 4, [(3, 4), (2, 1)], 2, torch.float32)
    for name in GRADS:
        inputs[name].requires_grad_(True)
    args = (inputs["value"], inputs["spatial_shapes"], inputs["level_start_index"], inputs["sampling_locations"],
            inputs["attention_weights"])
    check_custom_op(msda_fwd, args + (padding, False, det),
                    public_fn=lambda *a: ms_deform_attn(*a, padding_mode=padding, deterministic=det), public_args=args)
    # the backward op on its own (atomic or sort-based value gradient), on inputs that need no gradient
    g = randn([1, 11, 2 * 4])
    torch.library.opcheck(msda_bwd.op, (g, *(a.detach() for a in args), padding, False, det))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference_at_detr_scale(dtype: torch.dtype) -> None:
    # Deformable DETR's encoder levels at 800x1333 (one image, a slice of the queries).
    inputs = make_inputs(1, 4096, 8, 32, [(100, 167), (50, 84), (25, 42), (13, 21)], 4, dtype)
    check_forward_backward(ms_deform_attn, ms_deform_attn_reference, inputs, grad_names=GRADS)


def test_case_ids_are_readable() -> None:
    assert case_id(N=2, Lq=37, dtype=torch.float16) == "N2-Lq37-fp16"


def test_deformable_detr_function_shim() -> None:
    from fattn.msda import MSDeformAttnFunction, ms_deform_attn_core_pytorch

    inputs = make_inputs(2, 7, 2, 4, [(3, 4), (2, 2)], 2, torch.float32)
    out = MSDeformAttnFunction.apply(inputs["value"], inputs["spatial_shapes"], inputs["level_start_index"],
                                     inputs["sampling_locations"], inputs["attention_weights"], 64)
    ref = ms_deform_attn_core_pytorch(inputs["value"].double(), inputs["spatial_shapes"],
                                      inputs["sampling_locations"].double(), inputs["attention_weights"].double())
    assert_close("out", out, ref)
    assert torch.ops.fattn.msda_fwd.default is not None and torch.ops.fattn.msda_bwd.default is not None

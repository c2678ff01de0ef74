"""fattn.deform against the grid_sample reference in float64: forward and every gradient (q, k, v, coords)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fattn.core.compile_check import run_compile_script
from fattn.core.testing import (
    assert_close,
    assert_deterministic,
    cases,
    check_custom_op,
    check_forward_backward,
    device,
    on_gpu,
    rand,
    randn,
    zero_fills_during,
)
from fattn.deform import (
    MultiViewDeformableAttention,
    deform_attention,
    deform_attention_reference,
    deform_fwd,
    not_supported_reasons,
)

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


def make_inputs(B, S, H, Lq, D, T, P, width, height, dtype, *, noncontiguous=False, low=-0.15, high=1.15,
                visibility=False, coords_dtype=torch.float32):  # type: ignore[no-untyped-def]
    """Random inputs; coords in [low, high) so points land inside, on and across the borders."""
    hw = width * height
    inputs = {
        "q": randn([B, S, H, Lq, D], dtype, noncontiguous=noncontiguous),
        "k": randn([B, T, H, hw, D], dtype, noncontiguous=noncontiguous),
        "v": randn([B, T, H, hw, D], dtype, noncontiguous=noncontiguous),
        "coords": rand([B, S, Lq, T, P, 2], coords_dtype, low=low, high=high, noncontiguous=noncontiguous),
    }
    vis = None
    if visibility:
        vis = torch.rand(B, S, Lq, T, device=device()) > 0.3
        vis[:, :, 0] = False  # the first query of every group sees nothing: zeros, finite gradients
    return inputs, vis


# Small odd sizes (never multiples of the tiles) for the interpreter; each row stresses one feature.
CPU_CASES = [
    dict(B=1, S=2, H=2, Lq=9, D=5, T=2, P=3, W=5, Hh=4, dtype=F32, pad="zeros", align=True),
    dict(B=2, S=1, H=1, Lq=11, D=16, T=3, P=2, W=3, Hh=7, dtype=F32, pad="border", align=False),
    dict(B=1, S=2, H=2, Lq=6, D=8, T=1, P=1, W=4, Hh=3, dtype=F32, pad="zeros", align=False),
    dict(B=1, S=1, H=1, Lq=3, D=4, T=2, P=64, W=6, Hh=5, dtype=F32, pad="border", align=True),
    dict(B=1, S=3, H=1, Lq=5, D=33, T=3, P=2, W=2, Hh=2, dtype=F16, pad="zeros", align=True),
    dict(B=1, S=2, H=3, Lq=7, D=12, T=2, P=5, W=7, Hh=3, dtype=F16, pad="border", align=False),
]
GPU_CASES = [
    dict(B=2, S=8, H=8, Lq=324, D=32, T=8, P=8, W=18, Hh=18, dtype=dt, pad="zeros", align=True)
    for dt in (F32, F16, BF16)
] + [
    dict(B=1, S=2, H=4, Lq=333, D=d, T=3, P=5, W=17, Hh=9, dtype=dt, pad=pad, align=align)
    for d, dt, pad, align in [(64, F16, "border", False), (128, BF16, "zeros", True), (256, BF16, "border", True),
                              (256, F32, "zeros", False), (96, F16, "zeros", True), (48, BF16, "border", False)]
] + [dict(B=2, S=1, H=4, Lq=900, D=32, T=6, P=4, W=44, Hh=30, dtype=BF16, pad="zeros", align=True)]  # BEV queries


def _run_case(case, *, noncontiguous: bool, visibility: bool, deterministic: bool = False) -> None:  # type: ignore[no-untyped-def]
    W, Hh = case["W"], case["Hh"]
    inputs, vis = make_inputs(case["B"], case["S"], case["H"], case["Lq"], case["D"], case["T"], case["P"], W, Hh,
                              case["dtype"], noncontiguous=noncontiguous, visibility=visibility)
    kw = dict(padding_mode=case["pad"], align_corners=case["align"], visibility=vis)

    def op(q, k, v, coords):  # type: ignore[no-untyped-def]
        out = deform_attention(q, k, v, coords, W, Hh, deterministic=deterministic, **kw)
        assert out.dtype == q.dtype == case["dtype"], f"out is {out.dtype} for {q.dtype} inputs"
        return out

    def ref(q, k, v, coords):  # type: ignore[no-untyped-def]
        return deform_attention_reference(q, k, v, coords, W, Hh, **kw)

    floor = None
    if case["T"] * case["P"] == 1:
        # One key: the softmax is constant, so dq and dk are exactly 0 in float64 while the kernel gets
        # p * (dO.v - dO.out) = rounding of the stored output (~1e-7): allow 1e-6 absolute there.
        floor = {"grad_q": 1e-3, "grad_k": 1e-3}
    check_forward_backward(op, ref, inputs, grad_names=["q", "k", "v", "coords"], floor=floor)


@pytest.mark.parametrize("case", cases(CPU_CASES) + cases(GPU_CASES, gpu_only_dims=lambda r: True))
def test_forward_backward(case) -> None:  # type: ignore[no-untyped-def]
    _run_case(case, noncontiguous=False, visibility=False)


@pytest.mark.parametrize("case", cases([CPU_CASES[0], CPU_CASES[4]]) + cases(GPU_CASES[1:4], gpu_only_dims=lambda r: True))
def test_noncontiguous_and_visibility(case) -> None:  # type: ignore[no-untyped-def]
    _run_case(case, noncontiguous=True, visibility=True)


@pytest.mark.parametrize("case", cases([CPU_CASES[1]]) + cases([GPU_CASES[2], GPU_CASES[5]], gpu_only_dims=lambda r: True))
def test_deterministic_backward_is_correct(case) -> None:  # type: ignore[no-untyped-def]
    _run_case(case, noncontiguous=True, visibility=True, deterministic=True)


@pytest.mark.parametrize("shape", cases([dict(B=1, S=2, H=2, Lq=5, D=7, T=2, P=3, W=4, Hh=3)]
                                        + [dict(B=2, S=8, H=8, Lq=324, D=32, T=8, P=8, W=18, Hh=18, gpu=True)],
                                        gpu_only_dims=lambda r: r.get("gpu", False)))
def test_deterministic_backward_same_bits(shape) -> None:  # type: ignore[no-untyped-def]
    s = shape
    inputs, vis = make_inputs(s["B"], s["S"], s["H"], s["Lq"], s["D"], s["T"], s["P"], s["W"], s["Hh"], F32,
                              visibility=True)
    leaves = [inputs[n].requires_grad_(True) for n in ("q", "k", "v", "coords")]
    grad = randn([s["B"], s["S"], s["H"], s["Lq"], s["D"]], F32)

    def run():  # type: ignore[no-untyped-def]
        out = deform_attention(*leaves, s["W"], s["Hh"], visibility=vis, deterministic=True)
        return (out, *torch.autograd.grad(out, leaves, grad))

    assert_deterministic(run, runs=3)


def test_deterministic_algorithms_flag_selects_deterministic_path(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    seen = []
    import fattn.deform.op as op_module

    original = op_module.deform_fwd

    def spy(*args):  # type: ignore[no-untyped-def]
        seen.append(args[-1])
        return original(*args)

    monkeypatch.setattr(op_module, "deform_fwd", spy)
    inputs, _ = make_inputs(1, 1, 1, 3, 4, 1, 2, 3, 3, F32)
    inputs["q"].requires_grad_(True)  # the custom op (no-grad eager calls launch directly)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        op_module.deform_attention(*inputs.values(), 3, 3)
    finally:
        torch.use_deterministic_algorithms(prev)
    op_module.deform_attention(*inputs.values(), 3, 3)
    assert seen == [True, False]


def test_eager_fast_path_matches_the_custom_op() -> None:
    """Eager calls skip the dispatcher (fattn.core.FusedOp); the custom op gives the same bits."""
    inputs, vis = make_inputs(1, 2, 2, 7, 8, 2, 3, 4, 3, F32, visibility=True)
    with torch.no_grad():
        fast = deform_attention(*inputs.values(), 4, 3, visibility=vis)
    via_op, _ = deform_fwd.op(*inputs.values(), vis, 4, 3, 8 ** -0.5, False, True, False)
    assert torch.equal(fast, via_op)


def _launchers():  # type: ignore[no-untyped-def]
    """The FastLauncher of each kernel a fwd+bwd launches: the forward, then the backward's three."""
    from fattn.core.launch import launcher
    from fattn.deform import kernels

    return [launcher(kern) for kern in (kernels._deform_fwd_kernel, kernels._deform_bwd_kernel,
                                        kernels._corner_keys_kernel, kernels._deform_bwd_dkdv_kernel)]


def test_launches_are_signed(fresh_launch_plans) -> None:  # type: ignore[no-untyped-def]
    """Every launch of a fwd+bwd goes through launch_planned with a call signature, on the CPU too (where
    no plan is used, so test_launches_are_planned cannot tell): FATTN_CHECK_PLANS records the arguments
    each signature built. A repeated call keeps its signatures (else its plans would never serve it)."""
    from fattn.core.launch import checking_plans

    inputs, vis = make_inputs(1, 2, 2, 7, 8, 2, 3, 4, 3, F32, visibility=True)
    leaves = [t.detach().requires_grad_(True) for t in inputs.values()]
    with checking_plans():  # (on in every test run: forced, as this test reads what it records)
        for _ in range(2):
            out = deform_attention(*leaves, 4, 3, visibility=vis)
            torch.autograd.grad(out, leaves, torch.randn_like(out))
    assert [len(fast.built) for fast in _launchers()] == [1, 1, 1, 1]


def test_lse_gradient_is_not_materialized() -> None:
    """The op's second output (lse, kept for the backward) never gets a gradient: autograd must pass
    None for it rather than fill a zeros tensor on its device thread before every backward."""
    inputs, vis = make_inputs(1, 2, 2, 7, 8, 2, 3, 4, 3, F32, visibility=True)
    leaves = [t.detach().requires_grad_(True) for t in inputs.values()]
    out = deform_attention(*leaves, 4, 3, visibility=vis)
    grads = []
    assert not zero_fills_during(lambda: grads.extend(torch.autograd.grad(out, leaves, torch.randn_like(out))))
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.gpu
def test_launches_are_planned(fresh_launch_plans) -> None:  # type: ignore[no-untyped-def]
    """A second fwd+bwd with the same signature launches the forward and the backward's three kernels
    from their plans; FATTN_CHECK_PLANS, on in every test run, checks the plans' contents."""
    from fattn.core.launch import _Plan

    launchers = _launchers()
    inputs, vis = make_inputs(1, 2, 2, 7, 8, 2, 3, 4, 3, F32, visibility=True)
    leaves = [t.detach().requires_grad_(True) for t in inputs.values()]
    for _ in range(2):
        hits = [fast.hits for fast in launchers]
        out = deform_attention(*leaves, 4, 3, visibility=vis)
        torch.autograd.grad(out, leaves, torch.randn_like(out))
    assert [fast.hits - h for fast, h in zip(launchers, hits)] == [1, 1, 1, 1]
    assert all(any(type(plan) is _Plan for plan in fast.plans.values()) for fast in launchers)


def test_64bit_offsets_path_matches(monkeypatch, fresh_launch_plans) -> None:  # type: ignore[no-untyped-def]
    """The int64 gather offsets (K / V slices past 2**31 elements) compute the same as the int32 ones."""
    import fattn.deform.op as op_module

    monkeypatch.setattr(op_module, "_needs_64bit_offsets", lambda *maps: True)
    # Launch plans of earlier int32 runs of this case share its signatures (in real use the offsets'
    # width follows from the signature): the fixture clears them, and this test's int64 plans after it.
    _run_case(CPU_CASES[1], noncontiguous=True, visibility=True)


@pytest.mark.gpu  # (the interpreter's autotuning space is one config)
def test_every_tuned_backward_config_is_correct(monkeypatch, fresh_launch_plans) -> None:  # type: ignore[no-untyped-def]
    """Each backward config the autotuner may pick for fp32 at D 32, the register-capped one included,
    pinned in turn (a single config runs without tuning)."""
    from fattn.deform import kernels

    case = dict(B=1, S=2, H=3, Lq=75, D=32, T=3, P=5, W=9, Hh=7, dtype=F32, pad="zeros", align=True)
    named = {"T": case["T"], "P": case["P"], "Lq": case["Lq"], "Q": torch.empty(0, dtype=F32)}
    tuned = kernels._prune_bwd(kernels._bwd_configs(), named, BLOCK_D=32)
    assert any(c.maxnreg for c in tuned), "the capped twin is no longer searched: drop or update this test"
    for config in tuned:
        monkeypatch.setattr(kernels._deform_bwd_kernel, "configs", [config])
        fresh_launch_plans()
        _run_case(case, noncontiguous=False, visibility=True)


@pytest.mark.gpu  # (the interpreter's autotuning space is one config)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_every_tuned_forward_config_is_correct(dtype, monkeypatch, fresh_launch_plans) -> None:  # type: ignore[no-untyped-def]
    """Each forward config the autotuner may pick at D 32, the register-capped 16-bit ones included,
    pinned in turn."""
    from fattn.deform import kernels

    case = dict(B=1, S=2, H=3, Lq=75, D=32, T=3, P=5, W=9, Hh=7, dtype=dtype, pad="zeros", align=True)
    named = {"T": case["T"], "P": case["P"], "Lq": case["Lq"], "Q": torch.empty(0, dtype=dtype)}
    tuned = kernels._prune_fwd(kernels._fwd_configs(), named, BLOCK_D=32)
    if dtype == BF16:
        assert any(c.maxnreg for c in tuned), "no capped twin is searched: drop or update this test"
    for config in tuned:
        monkeypatch.setattr(kernels._deform_fwd_kernel, "configs", [config])
        fresh_launch_plans()
        _run_case(case, noncontiguous=False, visibility=True)


def test_gradcheck_fp64() -> None:
    inputs, vis = make_inputs(1, 2, 1, 3, 3, 2, 2, 4, 3, F64, low=0.05, high=0.95, visibility=True,
                              coords_dtype=F64)
    vis[0, 0, 0] = True
    leaves = [inputs[n].detach().requires_grad_(True) for n in ("q", "k", "v", "coords")]
    # The backward has no atomics (deterministic by construction): gradcheck's reentrancy check holds
    # on a GPU too.
    for det in (False, True):
        assert torch.autograd.gradcheck(
            lambda q, k, v, c: deform_attention(q, k, v, c, 4, 3, visibility=vis, deterministic=det),
            leaves, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_query_that_sees_nothing_outputs_zeros() -> None:
    inputs, vis = make_inputs(1, 2, 2, 5, 6, 3, 2, 4, 4, F32, visibility=True)
    vis[:, 1] = False
    q, k, v, coords = (inputs[n].requires_grad_(True) for n in ("q", "k", "v", "coords"))
    out = deform_attention(q, k, v, coords, 4, 4, visibility=vis)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    assert torch.equal(out[:, 0, :, 0], torch.zeros_like(out[:, 0, :, 0]))  # make_inputs hides query 0
    out.sum().backward()  # output gradient with stride 0 (an expanded view)
    for t in (q, k, v, coords):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, 1], torch.zeros_like(q.grad[:, 1]))


_GRAD_NAMES = ("q", "k", "v", "coords")


def _check_loss_backward(op, ref, inputs, loss):  # type: ignore[no-untyped-def]
    """`loss(out).backward()` through op and through ref in float64: the output and the gradients of q, k,
    v and coords must match. As in check_forward_backward, ref run in the inputs' dtype sets the bound
    (twice its error, plus error_floor(dtype) of the reference's magnitude). Returns the op's output, its
    gradients and the float64 output."""
    dtype = inputs["q"].dtype
    runs = {}
    for run, fn, to in (("op", op, None), ("ref64", ref, F64), ("lowp", ref, None)):
        leaves = [inputs[n].detach().to(to or inputs[n].dtype).clone().requires_grad_(True) for n in _GRAD_NAMES]
        try:
            out = fn(*leaves)
            loss(out).backward()
        except (RuntimeError, NotImplementedError):
            if run != "lowp":
                raise
            runs[run] = (None, [None] * len(leaves))  # PyTorch lacks this dtype here: the floor alone bounds
            continue
        runs[run] = (out, [leaf.grad for leaf in leaves])
    (out, grads), (ref_out, ref_grads), (lowp_out, lowp_grads) = runs["op"], runs["ref64"], runs["lowp"]
    assert_close("out", out, ref_out, lowp=lowp_out, dtype=dtype)
    for name, g, rg, lg in zip(_GRAD_NAMES, grads, ref_grads, lowp_grads):
        assert g is not None, f"grad_{name}: the op gave no gradient"
        assert_close(f"grad_{name}", g, rg, lowp=lg, dtype=dtype)
    return out, grads, ref_out.detach()


@pytest.mark.parametrize("case", cases([dict(CPU_CASES[0], vis=False), dict(CPU_CASES[1], vis=True)])
                         + cases([dict(GPU_CASES[1], vis=True), dict(GPU_CASES[2], vis=False)],
                                 gpu_only_dims=lambda r: True))
def test_sum_backward_stride0_grad_is_correct(case, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`out.sum().backward()`: autograd hands the backward an expanded output gradient (every stride 0).
    The gradients of q, k, v and coords must match those of the float64 reference's `ref_out.sum()`."""
    import fattn.deform.op as op_module

    W, Hh = case["W"], case["Hh"]
    inputs, vis = make_inputs(case["B"], case["S"], case["H"], case["Lq"], case["D"], case["T"], case["P"], W, Hh,
                              case["dtype"], visibility=case["vis"])
    kw = dict(padding_mode=case["pad"], align_corners=case["align"], visibility=vis)
    seen = []
    original = op_module.deform_bwd

    def spy(grad_out, *args):  # type: ignore[no-untyped-def]
        seen.append(grad_out.stride())
        return original(grad_out, *args)

    monkeypatch.setattr(op_module, "deform_bwd", spy)
    out, _, _ = _check_loss_backward(lambda q, k, v, c: deform_attention(q, k, v, c, W, Hh, **kw),
                                     lambda q, k, v, c: deform_attention_reference(q, k, v, c, W, Hh, **kw),
                                     inputs, lambda out: out.sum())
    assert seen == [(0, 0, 0, 0, 0)], f"the backward got output-gradient strides {seen}, not an expanded gradient"
    assert out.dtype == case["dtype"]


def _exact_points(n: int) -> list[float]:
    """Normalized coordinates along an axis of n pixels that land exactly on something: the edges (0, 1),
    the pixel centres of align_corners=True (k / (n - 1)) and of False ((k + 0.5) / n, 0.5 / n and
    1 - 0.5 / n among them), half a pixel and a pixel outside each edge, and points further out."""
    points = {0.0, 1.0, -0.5 / n, 1 + 0.5 / n, -0.25, 1.25} | {(k + 0.5) / n for k in range(n)}
    if n > 1:
        points |= {k / (n - 1) for k in range(n)} | {-1 / (n - 1), 1 + 1 / (n - 1)}
    return sorted(points)


# (width, height) per align_corners: every point of _exact_points that maps to a whole pixel coordinate
# (ix = x * (width - 1), or x * width - 0.5) is a dyadic fraction mapped without rounding, in the kernel
# and in grid_sample alike, so both pick the same bilinear cell there (where the coords gradient jumps)
# and the same clamp gradient on the border. The other points map to fractional pixels.
_EXACT_SIZES = {True: (5, 3), False: (4, 8)}


@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("align", [True, False], ids=["align", "no_align"])
@pytest.mark.parametrize("pad", ["zeros", "border"])
def test_points_on_borders_and_pixel_centres(pad, align, dtype) -> None:  # type: ignore[no-untyped-def]
    """Points exactly on the map's edges, on pixel centres, half a pixel and a pixel outside and further
    out, every (x, y) pair of them: output and every gradient (coords too) against grid_sample's."""
    W, Hh = _EXACT_SIZES[align]
    B, S, H, Lq, D, T, P = 1, 2, 2, 13, 5, 2, 7
    pairs = torch.tensor([(x, y) for x in _exact_points(W) for y in _exact_points(Hh)], dtype=F64)
    n = B * S * Lq * T * P
    assert len(pairs) <= n, "grow the shape: every pair must appear"
    pairs = pairs.repeat(-(-n // len(pairs)), 1)[:n][torch.randperm(n)]
    inputs, _ = make_inputs(B, S, H, Lq, D, T, P, W, Hh, dtype, coords_dtype=dtype)
    inputs["coords"] = pairs.reshape(B, S, Lq, T, P, 2).to(device=device(), dtype=dtype)
    kw = dict(padding_mode=pad, align_corners=align)
    check_forward_backward(lambda q, k, v, coords: deform_attention(q, k, v, coords, W, Hh, **kw),
                           lambda q, k, v, coords: deform_attention_reference(q, k, v, coords, W, Hh, **kw),
                           inputs, grad_names=list(_GRAD_NAMES))


@pytest.mark.gpu
@pytest.mark.parametrize("pad, align", [("zeros", True), ("border", False)], ids=["zeros-align", "border-no_align"])
def test_bf16_is_stored_natively(pad, align) -> None:  # type: ignore[no-untyped-def]
    """bf16 k and v around 1e5 (past fp16's largest finite value, 65504) with small q (moderate logits):
    a kernel that went through fp16 would give inf. The output and gradients stay bf16 and finite, and
    the output matches the float64 reference to bf16's relative tolerance."""
    B, S, H, Lq, D, T, P, W, Hh = 1, 2, 3, 37, 32, 3, 4, 9, 6
    inputs, _ = make_inputs(B, S, H, Lq, D, T, P, W, Hh, BF16, coords_dtype=BF16)
    inputs["q"] = randn([B, S, H, Lq, D], BF16, scale=1e-5)  # q . k ~ sqrt(D): logits ~ 1
    inputs["k"] = randn([B, T, H, W * Hh, D], BF16, scale=1e5)
    inputs["v"] = (randn([B, T, H, W * Hh, D], F32, scale=1e5) + 2e5).to(BF16)
    kw = dict(padding_mode=pad, align_corners=align)
    grad = randn([B, S, H, Lq, D], F32)
    out, grads, ref = _check_loss_backward(
        lambda q, k, v, c: deform_attention(q, k, v, c, W, Hh, **kw),
        lambda q, k, v, c: deform_attention_reference(q, k, v, c, W, Hh, **kw),
        inputs, lambda out: (out * grad.to(out.dtype)).sum())
    assert float(ref.abs().max()) > 65504 * 2, "the test needs outputs fp16 cannot hold"
    assert out.dtype == BF16 and bool(torch.isfinite(out).all())
    for name, g in zip(_GRAD_NAMES, grads):
        assert g.dtype == BF16 and bool(torch.isfinite(g).all()), f"grad_{name}: {g.dtype}"
    assert_close("out (bf16 relative)", out, ref, dtype=BF16)  # no slack from PyTorch's own bf16 error


def test_default_scale_and_explicit_scale() -> None:
    inputs, _ = make_inputs(1, 1, 2, 5, 9, 2, 3, 3, 5, F32)
    out = deform_attention(*inputs.values(), 3, 5, scale=0.37)
    assert out.dtype == F32
    ref = deform_attention_reference(*(x.double() for x in inputs.values()), 3, 5, scale=0.37)
    assert_close("out", out, ref)
    out = deform_attention(*inputs.values(), 3, 5)
    ref = deform_attention_reference(*(x.double() for x in inputs.values()), 3, 5, scale=1 / 3)
    assert_close("out", out, ref)


def test_coords_in_q_dtype() -> None:
    inputs, _ = make_inputs(1, 1, 1, 4, 8, 2, 2, 4, 4, F16, coords_dtype=F16)
    out = deform_attention(*inputs.values(), 4, 4)
    assert out.dtype == F16
    ref = deform_attention_reference(*(x.double() for x in inputs.values()), 4, 4)
    assert_close("out", out, ref, dtype=F16)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def _good():  # type: ignore[no-untyped-def]
    inputs, _ = make_inputs(1, 2, 2, 3, 4, 2, 2, 3, 2, F32)
    return inputs["q"], inputs["k"], inputs["v"], inputs["coords"]


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: (a[0][0], *a[1:]), ValueError, r"q must be 5-D"),
    (lambda a: (a[0].half(), *a[1:]), TypeError, r"inputs must share one dtype.*k is float32"),
    (lambda a: (a[0].int(), *a[1:]), TypeError, r"q must have dtype in"),
    (lambda a: (a[0], a[1][:, :, :, :5], a[2][:, :, :, :5], a[3]), ValueError, r"height\*width = 2\*3 = 6"),
    (lambda a: (a[0], a[1], a[2][..., :3], a[3]), ValueError, r"v must have shape"),
    (lambda a: (a[0], a[1][:, :1], a[2][:, :1], a[3]), ValueError, r"coords must have shape \[1, 2, 3, 1, \*, 2\]"),
    (lambda a: (a[0], a[1], a[2], a[3][..., :1]), ValueError, r"coords must have shape"),
    (lambda a: (a[0], a[1], a[2], a[3].double()), TypeError, r"coords must be float32 or q's dtype"),
    (lambda a: (a[0], a[1], a[2], a[3].to("meta")), ValueError, r"coords is on device meta"),
    (lambda a: (a[0], a[1][:, :, :1], a[2][:, :, :1], a[3]), ValueError, r"k must have shape \[1, \*, 2, 6, 4\]"),
])
def test_bad_inputs(mutate, error, match) -> None:  # type: ignore[no-untyped-def]
    args = mutate(_good())
    with pytest.raises(error, match=match):
        deform_attention(*args, 3, 2)


def test_bad_options() -> None:
    q, k, v, c = _good()
    with pytest.raises(ValueError, match="padding_mode must be one of 'zeros', 'border'; got 'reflection'"):
        deform_attention(q, k, v, c, 3, 2, padding_mode="reflection")
    with pytest.raises(TypeError, match="width must be an int"):
        deform_attention(q, k, v, c, 3.0, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="height must be >= 1"):
        deform_attention(q, k, v, c, 3, 0)
    with pytest.raises(TypeError, match="visibility must have dtype in \\(bool\\)"):
        deform_attention(q, k, v, c, 3, 2, visibility=torch.ones(1, 2, 3, 2, device=q.device))
    with pytest.raises(ValueError, match=r"visibility must have shape \[1, 2, 3, 2\]"):
        deform_attention(q, k, v, c, 3, 2, visibility=torch.ones(1, 2, 3, 3, dtype=torch.bool, device=q.device))
    with pytest.raises(TypeError, match="align_corners must be a bool"):
        deform_attention(q, k, v, c, 3, 2, align_corners=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="scale must be a finite float"):
        deform_attention(q, k, v, c, 3, 2, scale=float("nan"))
    big = randn([1, 1, 1, 2, 300], F32)
    kb = randn([1, 1, 1, 6, 300], F32)
    with pytest.raises(ValueError, match="head dim must be between 1 and 256, got 300"):
        deform_attention(big, kb, kb, rand([1, 1, 2, 1, 1, 2]), 3, 2)
    assert not_supported_reasons(q, k, v, c, 3, 2) == []


def test_too_many_key_rows_is_refused() -> None:
    # The backward's dK / dV runs one program per key row (B * T * H * height*width): at 2**31 rows the
    # grid would overflow. Expanded (stride-0) tensors give the shapes without the memory.
    dev = device()
    side = 2**15  # 2**30 pixels per view, 2 heads
    q = torch.zeros(1, device=dev).expand(1, 1, 2, 1, 4)
    k = torch.zeros(1, device=dev).expand(1, 1, 2, side * side, 4)
    c = torch.zeros(1, device=dev).expand(1, 1, 1, 1, 1, 2)
    with pytest.raises(ValueError, match=r"k has B \* T \* H \* height\*width = 2147483648 rows; must be < 2\*\*31"):
        deform_attention(q, k, k, c, side, side)
    half = k[:, :, :, : side * side // 2]
    assert not_supported_reasons(q, half, half, c, side, side // 2) == []


# --------------------------------------------------------------------------------------------
# Custom op, torch.compile, module
# --------------------------------------------------------------------------------------------
def test_custom_op_opcheck_and_compile() -> None:
    inputs, vis = make_inputs(1, 2, 2, 5, 4, 2, 2, 3, 3, F32, visibility=True)
    q, k, v, c = (inputs[n].requires_grad_(True) for n in ("q", "k", "v", "coords"))
    check_custom_op(deform_fwd, (q, k, v, c, vis, 3, 3, 0.5, False, True, False),
                    public_fn=lambda q, k, v, c: deform_attention(q, k, v, c, 3, 3, visibility=vis),
                    public_args=(q, k, v, c))
    check_custom_op(deform_fwd, (q, k, v, c, None, 3, 3, 0.5, True, False, True))


def test_module_matches_reference_and_trains() -> None:
    torch.manual_seed(0)
    B, S, Lq, T, P, C, H, height, width = 1, 2, 5, 2, 3, 16, 2, 3, 4
    dev = device()
    mod = MultiViewDeformableAttention(C, H, T, P, padding_mode="border").to(dev)
    with torch.no_grad():  # random offsets so the points move with the query
        mod.sampling_offsets.weight.normal_(0, 0.5)
    query = randn([B, S, Lq, C])
    ref_points = rand([B, S, Lq, T, 2])
    feats = randn([B, T, height * width, C])
    out = mod(query, ref_points, feats, (height, width))
    assert out.shape == (B, S, Lq, C)

    # The same composition with the reference op.
    D = C // H
    q = mod.q_proj(query).view(B, S, Lq, H, D).transpose(2, 3)
    k = mod.k_proj(feats).view(B, T, -1, H, D).transpose(2, 3)
    v = mod.v_proj(feats).view(B, T, -1, H, D).transpose(2, 3)
    coords = ref_points[:, :, :, :, None] + mod.sampling_offsets(query).view(B, S, Lq, T, P, 2) * \
        torch.tensor([1 / width, 1 / height], device=dev)
    ref = deform_attention_reference(q.double(), k.double(), v.double(), coords.double(), width, height,
                                     padding_mode="border")
    ref = mod.out_proj(ref.float().transpose(2, 3).reshape(B, S, Lq, C))
    assert_close("module out", out, ref.double(), floor=1e-4)

    out.square().mean().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert mod.sampling_offsets.weight.grad.abs().sum() > 0  # gradients reach the offsets through coords


def test_module_compiles_fullgraph() -> None:
    from fattn.core.testing import compile_backend

    mod = MultiViewDeformableAttention(8, 2, 2, 2).to(device())
    query, ref_points, feats = randn([1, 1, 3, 8]), rand([1, 1, 3, 2, 2]), randn([1, 2, 6, 8])
    eager = mod(query, ref_points, feats, (2, 3))
    torch._dynamo.reset()
    compiled = torch.compile(mod, fullgraph=True, backend=compile_backend())
    out = compiled(query, ref_points, feats, (2, 3))
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    out.sum().backward()


def test_kernels_compile_for_hopper() -> None:
    """The interpreter is permissive: compile the kernels for sm_90 (no GPU needed)."""
    if on_gpu():
        pytest.skip("the GPU tests compile the kernels for real")
    res = run_compile_script(Path(__file__).with_name("compile_check.py"), "--quick", timeout=300)
    assert "registers" in res.stdout, res.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_forward_memory_is_inputs_and_output_only(dtype) -> None:  # type: ignore[no-untyped-def]
    """Nothing sampled is materialized: a forward allocates its output and a [B, S, H, Lq] lse."""
    inputs, _ = make_inputs(2, 8, 8, 324, 32, 8, 8, 18, 18, dtype)
    deform_attention(*inputs.values(), 18, 18)  # compile and autotune first
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        out = deform_attention(*inputs.values(), 18, 18)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    io = sum(t.numel() * t.element_size() for t in inputs.values()) + out.numel() * out.element_size()
    assert peak <= 2 * io, f"forward peak {peak / 2**20:.1f} MiB > 2 x inputs+output {io / 2**20:.1f} MiB"
    assert peak <= out.numel() * out.element_size() * 1.5 + 2**20

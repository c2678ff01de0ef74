"""fattn.swba against the dense float64 reference: forward, lse, every gradient, GQA, KV cache, errors."""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from fattn.core.testing import (
    assert_deterministic,
    cases,
    check_custom_op,
    check_forward_backward,
    device,
    make_noncontiguous,
    on_gpu,
    randn,
)
from fattn.swba import not_supported_reasons, swba_attention, swba_attention_reference, swba_mask
from fattn.swba.kernels import tile_ranges
from fattn.swba.op import swba_bwd, swba_fwd

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# fp32 matmuls run in TF32 on a GPU (exact under the interpreter): direct comparisons allow for that.
TOL = 5e-3 if on_gpu() else 1e-5


def _inputs(case, noncontiguous=True):  # type: ignore[no-untyped-def]
    b, h, hk, nq, nk, d, dtype = (case[x] for x in ("B", "H", "Hk", "Nq", "Nk", "D", "dtype"))
    return {
        "q": randn([b, h, nq, d], dtype, noncontiguous=noncontiguous),
        "k": randn([b, hk, nk, d], dtype, noncontiguous=noncontiguous),
        "v": randn([b, hk, nk, d], dtype, noncontiguous=noncontiguous),
    }


def _case(B=1, H=2, Hk=None, Nq=37, Nk=None, D=24, bs=5, w=2, dtype=F32):  # type: ignore[no-untyped-def]
    return {"B": B, "H": H, "Hk": Hk or H, "Nq": Nq, "Nk": Nk or Nq, "D": D, "bs": bs, "w": w, "dtype": dtype}


CPU_CASES = [
    _case(B=2, H=3, Nq=37, D=24, bs=5, w=2),  # ragged last block, odd everything
    _case(H=2, Nq=45, D=32, bs=8, w=3, dtype=F16),
    _case(H=1, Nq=100, D=16, bs=32, w=2),  # blocks larger than tiles: unmasked interior tiles
    _case(H=1, Nq=33, D=16, bs=1, w=1),  # every query sees only itself
    _case(H=1, Nq=29, D=16, bs=1, w=5),  # token-level sliding window
    _case(H=2, Nq=29, D=20, bs=4, w=100),  # window >= blocks: block-causal
    _case(H=1, Nq=23, D=16, bs=64, w=1),  # one partial block: full attention
    _case(H=1, Nq=21, D=80, bs=6, w=2),  # head dim not a power of two
    _case(H=4, Hk=2, Nq=30, D=16, bs=7, w=2, dtype=F16),  # grouped-query
    _case(H=3, Hk=1, Nq=26, D=16, bs=5, w=3),  # multi-query
    _case(H=2, Nq=13, Nk=50, D=16, bs=7, w=2),  # KV cache: queries are the last 13 of 50 tokens
    _case(H=2, Hk=1, Nq=1, Nk=41, D=16, bs=8, w=3, dtype=F16),  # one decoding step, MQA
    _case(B=2, H=4, Hk=2, Nq=10, Nk=130, D=16, bs=9, w=2),  # GQA with enough KV tiles: unsplit dK/dV path
]

GPU_CASES = [
    _case(B=2, H=4, Nq=1000, D=64, bs=96, w=3, dtype=F16),
    _case(B=1, H=4, Nq=1000, D=64, bs=96, w=3, dtype=BF16),
    _case(B=1, H=3, Nq=777, D=128, bs=100, w=4, dtype=BF16),
    _case(B=1, H=2, Nq=777, D=128, bs=256, w=2, dtype=F16),
    _case(B=1, H=2, Nq=600, D=256, bs=64, w=3, dtype=F16),
    _case(B=1, H=2, Nq=600, D=256, bs=64, w=3, dtype=BF16),
    _case(B=1, H=2, Nq=500, D=80, bs=50, w=3, dtype=BF16),
    _case(B=1, H=2, Nq=500, D=96, bs=77, w=2, dtype=F32),
    _case(B=2, H=8, Hk=2, Nq=700, D=64, bs=64, w=4, dtype=BF16),
    _case(B=1, H=6, Hk=1, Nq=300, Nk=1500, D=128, bs=128, w=3, dtype=F16),
    _case(B=1, H=4, Nq=1, Nk=2049, D=64, bs=256, w=4, dtype=BF16),
    _case(B=1, H=2, Nq=1111, D=64, bs=1, w=17, dtype=F16),
    _case(B=1, H=2, Nq=1024, D=64, bs=128, w=100, dtype=BF16),
]


def _run_case(case, noncontiguous=True):  # type: ignore[no-untyped-def]
    bs, w = case["bs"], case["w"]
    # With one visible key per query, dq and dk are exactly 0 in float64, and ours are dP - delta, two
    # O(1) numbers computed by different paths: rounding (tf32 dots on a GPU: ~2e-3) is all that is left,
    # and the relative floor (max(|dq|, 1e-3) = 1e-3 times it) cannot allow for it. 1e-2 absolute here;
    # a wrong gradient would be O(1).
    atol = {"grad_q": 1e-2, "grad_k": 1e-2} if bs == 1 and w == 1 else None
    check_forward_backward(
        lambda q, k, v: swba_attention(q, k, v, bs, w, return_lse=True),
        lambda q, k, v: swba_attention_reference(q, k, v, bs, w, return_lse=True),
        _inputs(case, noncontiguous),
        grad_names=["q", "k", "v"],
        atol=atol,
    )


@pytest.mark.parametrize("case", cases(CPU_CASES))
def test_forward_backward(case) -> None:  # type: ignore[no-untyped-def]
    if on_gpu():
        # These cases are about window geometry. On a GPU every new head dim compiles every kernel again
        # (~1 s each), so they share head dims the other tests compile anyway: 16, and 96 for the one
        # not a power of two. GPU_CASES cover the head dims.
        case = {**case, "D": 16 if case["D"] <= 32 else 96}
    _run_case(case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", cases(GPU_CASES))
def test_forward_backward_gpu(case) -> None:  # type: ignore[no-untyped-def]
    _run_case(case, noncontiguous=case["Nq"] % 2 == 0)


def _launchers():  # type: ignore[no-untyped-def]
    """The FastLauncher of each kernel a fwd+bwd launches: preprocess, fwd, dK/dV, dQ (autotuned, or
    their @triton.jit functions when autotuning is off)."""
    from fattn.core.launch import launcher
    from fattn.swba import kernels

    tuned = kernels.autotune_enabled()
    return [launcher(kernels.swba_bwd_preprocess_kernel)] + [
        launcher(kern if tuned else kern.fn)
        for kern in (kernels.swba_fwd_kernel, kernels.swba_bwd_dkdv_kernel, kernels.swba_bwd_dq_kernel)]


def test_launches_are_signed(fresh_launch_plans) -> None:  # type: ignore[no-untyped-def]
    """Every launch of a fwd+bwd goes through launch_planned with a call signature, on the CPU too (where
    no plan is used, so test_launches_are_planned cannot tell): FATTN_CHECK_PLANS records the arguments
    each signature built. A repeated call keeps its signatures (else its plans would never serve it)."""
    from fattn.core.launch import checking_plans

    inputs = _inputs(_case(H=4, Hk=2, Nq=30, D=16, bs=7, w=2))  # GQA: dK/dV split over the group on the CPU
    leaves = [t.detach().requires_grad_(True) for t in inputs.values()]
    with checking_plans():  # (on in every test run: forced, as this test reads what it records)
        for _ in range(2):
            out = swba_attention(*leaves, 7, 2)
            torch.autograd.grad(out, leaves, torch.randn_like(out))
    assert [len(fast.built) for fast in _launchers()] == [1, 1, 1, 1]


@pytest.mark.parametrize("use", ["out", "lse", "both"])
def test_unused_output_gradients_are_not_materialized(use: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An lse no loss reached gives the backward None (not a zeros tensor autograd would fill on its
    device thread first, a launch on the backward's critical path); the gradients are the reference's
    whichever outputs the loss uses."""
    from fattn.swba import op

    seen = []

    def spy(grad_out, *args):  # type: ignore[no-untyped-def]
        seen.append((grad_out is None, args[5] is None))  # args[5]: grad_lse
        return swba_bwd(grad_out if grad_out is not None else torch.zeros_like(args[3]), *args)

    monkeypatch.setattr(op, "swba_bwd", spy)
    inputs = _inputs(_case(Nq=19, D=16, bs=4, w=2), noncontiguous=False)
    leaves = [t.detach().requires_grad_(True) for t in inputs.values()]
    ref_leaves = [t.detach().double().requires_grad_(True) for t in inputs.values()]
    losses = []
    for fn, args in ((swba_attention, leaves), (swba_attention_reference, ref_leaves)):
        out, lse = fn(*args, 4, 2, return_lse=True)
        losses.append({"out": out.sum(), "lse": lse.sum(), "both": out.sum() + lse.sum()}[use])
    grads = torch.autograd.grad(losses[0], leaves)
    # (the reference's lse does not depend on v: its gradient there is 0)
    ref_grads = [torch.zeros_like(x) if g is None else g
                 for x, g in zip(ref_leaves, torch.autograd.grad(losses[1], ref_leaves, allow_unused=True))]
    assert seen == [(False, use == "out")]  # (a missing grad_out becomes zeros in _backward: the kernels read it)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=TOL, rtol=TOL)


@pytest.mark.gpu
def test_launches_are_planned(fresh_launch_plans) -> None:  # type: ignore[no-untyped-def]
    """A second fwd+bwd with the same signature launches all four kernels from their plans (no argument
    building, no Triton launch path); FATTN_CHECK_PLANS, on in every test run, checks the plans' contents."""
    from fattn.core.launch import _Plan

    inputs = _inputs(_case(B=1, H=4, Hk=2, Nq=300, D=64, bs=50, w=3, dtype=F16))
    leaves = [t.detach().requires_grad_(True) for t in inputs.values()]
    for _ in range(2):
        hits = [fast.hits for fast in _launchers()]
        out = swba_attention(*leaves, 50, 3)
        torch.autograd.grad(out, leaves, torch.randn_like(out))
    assert [fast.hits - h for fast, h in zip(_launchers(), hits)] == [1, 1, 1, 1]
    assert all(any(type(plan) is _Plan for plan in fast.plans.values()) for fast in _launchers())


# One case per (head dim class, fp32) of the tilings tables: GQA, a ragged last block and tiles that
# straddle block edges, so every tiling meets masked and unmasked tiles.
EVERY_CONFIG_CASES = [
    _case(B=1, H=4, Hk=2, Nq=700, D=64, bs=96, w=3, dtype=F16),
    _case(B=1, H=2, Nq=600, D=128, bs=100, w=3, dtype=BF16),
    _case(B=1, H=2, Nq=300, D=256, bs=64, w=2, dtype=F16),
    _case(B=1, H=2, Nq=300, D=64, bs=50, w=3, dtype=F32),
    _case(B=1, H=2, Nq=300, D=128, bs=50, w=2, dtype=F32),
    _case(B=1, H=2, Nq=200, D=256, bs=50, w=2, dtype=F32),
    # aligned (kernels.ALIGN): the kernels without masks, and the candidates of aligned launches only
    _case(B=1, H=4, Hk=2, Nq=512, D=64, bs=256, w=2, dtype=F16),
    _case(B=1, H=2, Nq=512, D=128, bs=128, w=3, dtype=BF16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", cases(EVERY_CONFIG_CASES))
def test_every_tuned_config_is_correct(case, monkeypatch: pytest.MonkeyPatch, fresh_launch_plans) -> None:  # type: ignore[no-untyped-def]
    """Autotuning may pick any tiling of the tables: run each one on its own (autotuning off, the launch
    config forced), the i-th forward, dK/dV and dQ tilings together."""
    from fattn.swba import kernels, op

    monkeypatch.setenv("FATTN_SWBA_AUTOTUNE_LIMIT", "1")
    elem = case["dtype"].itemsize
    block_d = max(16, 1 << (case["D"] - 1).bit_length())
    aligned = kernels.is_aligned(case["Nq"], case["Nk"], case["bs"])
    tables = {kind: kernels.candidate_configs(kind, block_d, elem, device(), case["D"], aligned)
              for kind in ("fwd", "dkdv", "dq")}
    for i in range(max(len(t) for t in tables.values())):
        chosen = {kind: t[i % len(t)] for kind, t in tables.items()}
        monkeypatch.setattr(op, "launch_config", lambda kind, block_d, q, chosen=chosen: chosen[kind])
        fresh_launch_plans()  # the launch plans would keep the previous tiling (same signature)
        try:
            _run_case(case)
        except AssertionError as e:
            raise AssertionError(f"tilings {chosen}: {e}") from e


def test_padded_head_dims_skip_tiles_that_spill() -> None:
    """The bf16/fp16 forward's 128x128 / 8-warp / 2-stage tile spills registers when D=80 is padded to 128
    (sm_90 compile, tests/compile_check.py --all): the autotuner never gets it there, D=128 keeps it."""
    from fattn.swba import kernels

    def tiles(head_dim: int) -> set:
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                for c in kernels.candidate_configs("fwd", 128, 2, None, head_dim)}

    assert (128, 128, 8, 2) in tiles(128)
    assert (128, 128, 8, 2) not in tiles(80)
    assert tiles(80) == tiles(128) - {(128, 128, 8, 2)}


@pytest.mark.parametrize("case", cases([_case(H=2, Hk=1, Nq=19, Nk=27, D=16, bs=4, w=2),
                                        _case(H=4, Hk=2, Nq=21, Nk=30, D=16, bs=6, w=2, dtype=F16),
                                        _case(H=2, Nq=40, D=64, bs=16, w=2, dtype=BF16)]))
def test_lse_gradient(case) -> None:  # type: ignore[no-untyped-def]
    """Gradients flowing from the returned log-sum-exp (e.g. for merging attention states); out keeps q's
    dtype and lse is [B, H, Nq] fp32 whatever the input dtype."""
    bs, w = case["bs"], case["w"]
    inputs = _inputs(case)
    out, lse = swba_attention(*inputs.values(), bs, w, return_lse=True)
    assert out.dtype == case["dtype"] and out.shape == inputs["q"].shape
    assert lse.dtype == F32 and lse.shape == (case["B"], case["H"], case["Nq"])
    check_forward_backward(
        lambda q, k, v: swba_attention(q, k, v, bs, w, return_lse=True)[::-1],
        lambda q, k, v: swba_attention_reference(q, k, v, bs, w, return_lse=True)[::-1],
        inputs, grad_names=["q", "k", "v"],
    )


def test_custom_scale_and_layout() -> None:
    """A custom scale, and q/k/v as [B, N, H, D] tensors viewed as [B, H, N, D] (no copy)."""
    q, k, v = (randn([2, 31, 3, 16]).transpose(1, 2) for _ in range(3))
    check_forward_backward(
        lambda q, k, v: swba_attention(q, k, v, 6, 2, scale=0.37),
        lambda q, k, v: swba_attention_reference(q, k, v, 6, 2, scale=0.37),
        {"q": q, "k": k, "v": v}, grad_names=["q", "k", "v"],
    )


def test_negative_scale() -> None:
    """A negative scale takes the forward's generic softmax path (the interior-tile fast path relies on
    max(qk) * scale = max(qk * scale), true only for scale >= 0); blocks of 32 give interior tiles."""
    q, k, v = (randn([1, 1, 100, 16]) for _ in range(3))
    check_forward_backward(
        lambda q, k, v: swba_attention(q, k, v, 32, 2, scale=-0.3),
        lambda q, k, v: swba_attention_reference(q, k, v, 32, 2, scale=-0.3),
        {"q": q, "k": k, "v": v}, grad_names=["q", "k", "v"],
    )


def test_out_of_window_tiles_are_never_read() -> None:
    """NaN keys/values far outside every query's window must not leak into any result: the kernels
    never visit those tiles (this is what makes time linear in N at a fixed window)."""
    nq, nk, bs, w, d = 40, 200, 8, 2, 16  # queries at 160..199 see keys from 152 on
    q = randn([1, 2, nq, d], requires_grad=True)
    k = randn([1, 2, nk, d])
    v = randn([1, 2, nk, d])
    k[:, :, :96] = float("nan")
    v[:, :, :96] = float("nan")
    k.requires_grad_(True)
    v.requires_grad_(True)
    out = swba_attention(q, k, v, bs, w)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    kc, vc = (t.detach().nan_to_num(0.0).double() for t in (k, v))
    ref = swba_attention_reference(q.detach().double(), kc, vc, bs, w)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    torch.testing.assert_close(out.double(), ref, atol=10 * TOL, rtol=10 * TOL)
    assert torch.equal(dk[:, :, :96], torch.zeros_like(dk[:, :, :96]))
    assert torch.equal(dv[:, :, :96], torch.zeros_like(dv[:, :, :96]))
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


@triton.jit
def _tile_ranges_probe(Geometry, Out, n, BLOCK_OWN: tl.constexpr, BLOCK_OTHER: tl.constexpr,
                       KEY_TILE: tl.constexpr, BLOCK: tl.constexpr):
    """tile_ranges of n tiles at once: Geometry [5, n] int32 (tile, n_q, n_k, block_size, window) -> Out [4, n]."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    pid = tl.load(Geometry + i, mask=ok, other=0)
    n_q = tl.load(Geometry + n + i, mask=ok, other=1)
    n_k = tl.load(Geometry + 2 * n + i, mask=ok, other=1)
    block_size = tl.load(Geometry + 3 * n + i, mask=ok, other=1)
    window = tl.load(Geometry + 4 * n + i, mask=ok, other=1)
    lo, full_lo, full_hi, hi = tile_ranges(pid, n_q, n_k, block_size, window, BLOCK_OWN, BLOCK_OTHER, KEY_TILE)
    tl.store(Out + i, lo, mask=ok)
    tl.store(Out + n + i, full_lo, mask=ok)
    tl.store(Out + 2 * n + i, full_hi, mask=ok)
    tl.store(Out + 3 * n + i, hi, mask=ok)


@pytest.mark.parametrize("own, other", [(16, 128), (128, 16), (64, 64), (32, 128), (128, 64)])
@pytest.mark.parametrize("key_tile", [False, True], ids=["query_tiles", "key_tiles"])
def test_aligned_geometry_has_no_masked_tile(own: int, other: int, key_tile: bool) -> None:
    """What ALIGNED rests on (kernels.is_aligned): with block_size, n_q and n_k multiples of every tile size,
    the tiles a tile visits form one unmasked run ([lo, full_lo) and [full_hi, hi) are empty) and each is
    wholly visible to it, for the tile sizes of the GPU tables, every tile of every geometry enumerated."""
    align = 128
    rows = []
    for block_size in (align, 2 * align, 3 * align):
        for n_k in (align, 2 * align, 5 * align):
            for n_q in range(align, n_k + 1, align):
                for window in (1, 2, 3, 16):
                    # as the op clamps them (_geometry)
                    bs, w = min(block_size, n_k), min(window, -(-n_k // min(block_size, n_k)))
                    rows += [(t, n_q, n_k, bs, w) for t in range(-(-(n_k if key_tile else n_q) // own))]
    geometry = torch.tensor(rows, dtype=torch.int32, device=device()).T.contiguous()
    n = geometry.shape[1]
    out = torch.full((4, n), -1, dtype=torch.int32, device=device())
    _tile_ranges_probe[(triton.cdiv(n, 1024),)](geometry, out, n, own, other, key_tile, 1024)
    for (t, n_q, n_k, bs, w), (lo, full_lo, full_hi, hi) in zip(rows, out.T.tolist()):
        assert (lo, full_hi) == (full_lo, hi), f"masked tiles at tile {t}, n_q {n_q}, n_k {n_k}, block {bs}, window {w}"
        q_off = n_k - n_q
        for start in range(full_lo, full_hi, other):
            # own rows [t * own, t * own + own) against the other side's [start, start + other), as positions
            if key_tile:
                keys, queries = (t * own, t * own + own - 1), (q_off + start, q_off + start + other - 1)
                assert start + other <= n_q
            else:
                queries, keys = (q_off + t * own, q_off + t * own + own - 1), (start, start + other - 1)
                assert start + other <= n_k
            # every pair visible: the smallest and the largest block distance are in [0, window)
            assert queries[0] // bs - keys[1] // bs >= 0 and queries[1] // bs - keys[0] // bs < w, (
                f"tile {t} visits {start} unmasked, n_q {n_q}, n_k {n_k}, block {bs}, window {w}")


ALIGNED_CASES = [  # in units of kernels.ALIGN (32 under the interpreter, 128 on a GPU)
    _case(H=2, Nq=4, D=16, bs=1, w=2),  # training
    _case(H=2, Nq=1, Nk=5, D=16, bs=2, w=2),  # KV cache: the last block of queries
    _case(H=4, Hk=2, Nq=3, D=16, bs=1, w=1, dtype=F16),  # GQA, each block alone
    _case(H=2, Nq=6, D=16, bs=3, w=16),  # window beyond the blocks: block-causal
]


ALIGNED_GPU_CASES = [
    _case(B=2, H=4, Nq=8, D=64, bs=2, w=3, dtype=F16),
    _case(H=4, Hk=2, Nq=2, Nk=6, D=128, bs=1, w=4, dtype=BF16),
    _case(H=2, Nq=4, D=256, bs=1, w=2, dtype=BF16),  # D 256: dK/dV keeps its mask branch
    _case(H=2, Nq=4, D=80, bs=2, w=2, dtype=F32),
]


@pytest.mark.parametrize("case", cases([*ALIGNED_CASES, *ALIGNED_GPU_CASES],
                                       gpu_only_dims=lambda row: row in ALIGNED_GPU_CASES))
def test_aligned_kernels(case, monkeypatch: pytest.MonkeyPatch, fresh_launch_plans) -> None:  # type: ignore[no-untyped-def]
    """Aligned geometry runs the kernels without their masked loops (ALIGNED): against the reference, and bit
    for bit against the general kernels forced on the same inputs (the same tiles, in the same order)."""
    from fattn.swba import kernels

    a = kernels.ALIGN
    case = {**case, "Nq": case["Nq"] * a, "Nk": case["Nk"] * a, "bs": case["bs"] * a}
    assert kernels.is_aligned(case["Nq"], case["Nk"], min(case["bs"], case["Nk"]))
    _run_case(case)
    inputs = [t.requires_grad_(True) for t in _inputs(case).values()]

    def run() -> tuple[torch.Tensor, ...]:
        out, lse = swba_attention(*inputs, case["bs"], case["w"], return_lse=True)
        return (out, lse, *torch.autograd.grad((out.float() ** 2).sum() + lse.sum(), inputs))

    aligned = run()
    monkeypatch.setenv("FATTN_SWBA_ALIGNED", "0")  # the general kernels, as for an A/B timing
    assert not kernels.is_aligned(case["Nq"], case["Nk"], min(case["bs"], case["Nk"]))
    monkeypatch.setenv("FATTN_SWBA_ALIGNED", "of")  # a typo: refused, not read as on
    with pytest.raises(ValueError, match="FATTN_SWBA_ALIGNED='of': expected 1 or 0"):
        kernels.is_aligned(case["Nq"], case["Nk"], case["bs"])
    monkeypatch.setenv("FATTN_SWBA_ALIGNED", "0")
    fresh_launch_plans()
    general = run()
    for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), aligned, general):
        if on_gpu():  # (the autotuner tunes each variant on its own)
            torch.testing.assert_close(x, y, rtol=TOL, atol=TOL, msg=name)
        else:
            assert torch.equal(x, y), name


HOPPER_CASES = [  # in units of 128 tokens (the Gluon forward's alignment)
    _case(B=2, H=4, Nq=8, D=64, bs=2, w=3, dtype=F16),  # training
    _case(H=4, Hk=2, Nq=2, Nk=10, D=128, bs=1, w=4, dtype=BF16),  # KV cache, GQA
    _case(H=2, Nq=4, D=64, bs=1, w=1, dtype=BF16),  # each block alone: two key tiles, the fewest
    _case(H=3, Hk=1, Nq=6, D=128, bs=3, w=16, dtype=F16),  # window beyond the blocks: block-causal, MQA
    _case(H=2, Nq=3, Nk=7, D=64, bs=4, w=2, dtype=F16),  # KV cache with a partial last block
]


def _hopper_gluon() -> bool:
    from fattn.swba import hopper

    return on_gpu() and hopper.HAVE_GLUON and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("tile", ["64x64w4", "128x64w8"])
@pytest.mark.parametrize("case", cases(HOPPER_CASES))
def test_hopper_forward(case, tile: str, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The Gluon forward for Hopper (FATTN_SWBA_HOPPER=1), each tile: forward, lse and (through the Triton
    backward, which reads its lse) every gradient against the float64 reference; the same bits for q, k and v
    taken as views of packed projections (other strides); and every call of the test launched it."""
    if not _hopper_gluon():
        pytest.skip("needs an sm_90 GPU and a Triton with Gluon")
    from fattn.swba import hopper

    forced = next(t for t in hopper.TILES if f"{t[0]}x{t[1]}w{t[2]}" == tile)
    monkeypatch.setattr(hopper, "FORCE_TILE", forced)
    a = hopper.ALIGN
    case = {**case, "Nq": case["Nq"] * a, "Nk": case["Nk"] * a, "bs": case["bs"] * a}
    launches = []
    launch = hopper.launch_fwd
    monkeypatch.setattr(hopper, "launch_fwd", lambda *args: (launches.append(1), launch(*args))[1])
    monkeypatch.setenv("FATTN_SWBA_HOPPER", "1")
    _run_case(case, noncontiguous=False)
    assert launches, "the Gluon forward did not run"

    q, k, v = _inputs(case, noncontiguous=False).values()
    # Views of [B, N, H, D] / [B, N, 2, Hk, D] projections, as a fused qkv linear layer gives them.
    q_packed = q.transpose(1, 2).contiguous().transpose(1, 2)
    kv = torch.stack([k.transpose(1, 2), v.transpose(1, 2)], dim=2)
    k_packed, v_packed = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    assert not q_packed.is_contiguous() and not k_packed.is_contiguous()
    n = len(launches)
    out, lse = swba_attention(q, k, v, case["bs"], case["w"], return_lse=True)
    out_p, lse_p = swba_attention(q_packed, k_packed, v_packed, case["bs"], case["w"], return_lse=True)
    assert len(launches) == n + 2
    assert torch.equal(out, out_p) and torch.equal(lse, lse_p)
    # A unit stride along D is required: anything else runs the Triton forward.
    assert hopper.supported(q, k, v, 1.0, case["bs"])
    assert not hopper.supported(make_noncontiguous(q), k, v, 1.0, case["bs"])


def test_hopper_flag_runs_the_triton_forward_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """FATTN_SWBA_HOPPER=1 where the Gluon forward does not apply (the CPU, a ragged geometry on a GPU): the
    Triton kernels run, the same bits as without the flag; a typo in the flag is refused."""
    from fattn.swba import hopper

    case = _case(H=2, Nq=45, D=32, bs=8, w=3, dtype=F16)
    inputs = _inputs(case)
    want = swba_attention(*inputs.values(), 8, 3)
    launches = []
    monkeypatch.setattr(hopper, "launch_fwd", lambda *args: launches.append(1))
    monkeypatch.setenv("FATTN_SWBA_HOPPER", "1")
    assert torch.equal(swba_attention(*inputs.values(), 8, 3), want) and not launches
    monkeypatch.setenv("FATTN_SWBA_HOPPER", "yse")
    with pytest.raises(ValueError, match="FATTN_SWBA_HOPPER='yse'"):
        swba_attention(*inputs.values(), 8, 3)


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the interpreter's max of NaN rows
@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])  # the backward's two mask forms (block_id_masks)
@pytest.mark.parametrize("nan_keys", ["last", "first"])
def test_out_of_window_tiles_are_never_read_in_training(nan_keys: str, dtype: torch.dtype) -> None:
    """Training shape (Nq = Nk): NaN keys/values at the end (future tokens: the causal side) or at the start
    (behind every later window) reach no output or gradient outside their window's reach; what they cannot
    reach equals a run on clean inputs, bit for bit. A visited tile leaks NaN even where fully masked: p = 0
    times a NaN value (forward, dQ), or times the NaN delta of a query that saw them (dK/dV), as p * (dp - delta).

    Blocks of half the largest tile T and a window of 3 put every boundary below on a multiple of T, so no
    tile straddles one: the clean sets are exact (no margin), and visiting one block too many fails.
    The output gradient is 0 on rows that see NaN; their lse and delta are NaN all the same, which is why
    the keys they see (not only the NaN ones) get NaN dK/dV legitimately.
    """
    from fattn.swba import kernels

    # the largest tile any kernel may run with: 32 under the interpreter (fwd/dQ tiles 16 x 32, dK/dV 32 x 16:
    # 10 to 19 tiles a side), 128 on a GPU (any tiling of the tables)
    t = kernels.ALIGN
    bs, w, d = t // 2, 3, 16
    n = 9 * t + 13  # 301 under the interpreter: ragged in every tile size
    if nan_keys == "last":
        nan = slice(7 * t, n)  # blocks 14 on; query block i sees key blocks i - 2 .. i
        rows = slice(0, 7 * t)  # queries of blocks <= 13 see no NaN key
        keys = slice(0, 6 * t)  # keys of blocks <= 11 are seen by query blocks <= 13 only
    else:
        nan = slice(0, 2 * t)  # blocks 0..3, seen by query blocks 0..5
        rows = keys = slice(3 * t, n)  # blocks 6 on: they see, and are seen by, blocks 4 on only
    q = randn([1, 2, n, d], dtype)
    k = randn([1, 1, n, d], dtype)  # MQA: dK/dV also sum over the query heads (split over two programs)
    v = randn([1, 1, n, d], dtype)
    g = torch.zeros_like(q)
    g[:, :, rows] = randn([1, 2, rows.stop - rows.start, d], dtype)

    def run(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        out = swba_attention(*leaves, bs, w)
        out.backward(g)
        return (out.detach(), *(x.grad for x in leaves))

    clean = run(k, v)
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, nan] = float("nan")
    v_nan[:, :, nan] = float("nan")
    dirty = run(k_nan, v_nan)
    assert not torch.isfinite(dirty[0]).all()  # the NaN keys did reach the queries that see them
    for name, index, a, b in zip(("out", "dq", "dk", "dv"), (rows, rows, keys, keys), dirty, clean):
        a, b = a[:, :, index], b[:, :, index]
        assert torch.isfinite(a).all(), f"{name}: NaN at positions {index.start}..{index.stop - 1}, outside its reach"
        assert torch.equal(a, b), f"{name}: differs from the clean run at positions {index.start}..{index.stop - 1}"


def test_backward_is_deterministic() -> None:
    q, k, v = (randn([1, 4, 45, 16], F16) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA: dk/dv sum over query heads, still without atomics
    g = randn([1, 4, 45, 16], F16)

    def run() -> tuple[torch.Tensor, ...]:
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out = swba_attention(qq, kk, vv, 7, 3)
        return (out, *torch.autograd.grad(out, (qq, kk, vv), g))

    assert_deterministic(run, runs=3)


@pytest.mark.gpu
@pytest.mark.parametrize("case", cases([_case(B=1, H=8, Hk=2, Nq=1000, D=64, bs=96, w=3, dtype=BF16),
                                        _case(B=1, H=8, Hk=2, Nq=1000, D=128, bs=96, w=3, dtype=F16)]))
def test_backward_is_deterministic_gpu(case) -> None:  # type: ignore[no-untyped-def]
    """Three backwards of the same inputs and output gradient give bit-identical dq, dk, dv at a GPU size:
    GQA (dK/dV sum over 4 query heads, split over programs and the fp32 partials added in a fixed order)
    with many programs a kernel (no atomics anywhere)."""
    inputs = _inputs(case, noncontiguous=False)
    g = randn(inputs["q"].shape, case["dtype"])
    bs, w = case["bs"], case["w"]

    def run() -> list[torch.Tensor]:
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs.values()]
        out = swba_attention(*leaves, bs, w)
        out.backward(g)
        return [x.grad for x in leaves]

    first = run()
    assert all(torch.isfinite(x).all() for x in first)
    for i in (1, 2):
        for name, a, b in zip(("dq", "dk", "dv"), first, run()):
            # (the bits: torch.equal on the values would take -0.0 for +0.0)
            assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"{name} differs between run 0 and run {i}"


def test_mask_semantics() -> None:
    m = swba_mask(6, 6, 2, 2)
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(m, expected)
    # KV cache: the last 2 queries of 5 tokens, blocks of 2: positions 3 (block 1) and 4 (block 2).
    assert torch.equal(swba_mask(2, 5, 2, 1), torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool))


def test_kv_cache_matches_full_sequence() -> None:
    """Running the last Nq queries against the cache equals the last Nq rows of the full run."""
    q, k, v = (randn([1, 2, 43, 16]) for _ in range(3))
    full = swba_attention(q, k, v, 6, 3)
    tail = swba_attention(q[:, :, -10:], k, v, 6, 3)
    torch.testing.assert_close(tail, full[:, :, -10:], atol=TOL, rtol=TOL)


def test_custom_op_opcheck_and_compile() -> None:
    q = randn([1, 2, 19, 16], requires_grad=True)
    k = randn([1, 1, 23, 16], requires_grad=True)
    v = randn([1, 1, 23, 16], requires_grad=True)
    check_custom_op(swba_fwd, (q, k, v, 4, 2, 0.25), public_fn=lambda q, k, v: swba_attention(q, k, v, 4, 2),
                    public_args=(q, k, v))
    out, lse = swba_fwd(q.detach(), k.detach(), v.detach(), 4, 2, 0.25)
    g, glse = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(swba_bwd.op, (g, q.detach(), k.detach(), v.detach(), out, lse, glse, 4, 2, 0.25))
    torch.library.opcheck(swba_bwd.op, (g, q.detach(), k.detach(), v.detach(), out, lse, None, 4, 2, 0.25))


def test_compile_return_lse() -> None:
    q, k, v = (randn([1, 2, 17, 16], requires_grad=True) for _ in range(3))

    def f(q, k, v):  # type: ignore[no-untyped-def]
        out, lse = swba_attention(q, k, v, 5, 2, return_lse=True)
        return out.float().sum() + lse.sum()

    from fattn.core.testing import compile_backend

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=compile_backend())
    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    comp = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(eager, comp):
        torch.testing.assert_close(a, b, atol=10 * TOL, rtol=10 * TOL)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def _good() -> dict:
    return {"q": randn([1, 4, 10, 16]), "k": randn([1, 2, 12, 16]), "v": randn([1, 2, 12, 16]),
            "block_size": 4, "window": 2}


def _bad(**changes):  # type: ignore[no-untyped-def]
    args = _good()
    args.update(changes)
    return args


BAD_INPUTS = [
    ("window0", lambda: _bad(window=0), ValueError, "window must be >= 1"),
    ("window_float", lambda: _bad(window=2.0), TypeError, "window must be an int"),
    ("block_size0", lambda: _bad(block_size=0), ValueError, "block_size must be >= 1"),
    ("q_3d", lambda: _bad(q=randn([4, 10, 16])), ValueError, "q must be 4-D"),
    ("q_int", lambda: _bad(q=torch.ones(1, 4, 10, 16, dtype=torch.int32, device=device())), TypeError, "q must have dtype"),
    ("q_fp64", lambda: _bad(q=randn([1, 4, 10, 16], torch.float64)), TypeError, "q must have dtype"),
    ("mixed_dtype", lambda: _bad(k=randn([1, 2, 12, 16], F16), v=randn([1, 2, 12, 16], F16)), TypeError,
     "share one dtype"),
    ("kv_shape", lambda: _bad(v=randn([1, 2, 11, 16])), ValueError, "k and v must have the same shape"),
    ("heads", lambda: _bad(k=randn([1, 3, 12, 16]), v=randn([1, 3, 12, 16])), ValueError, "multiple of the number"),
    ("batch", lambda: _bad(k=randn([2, 2, 12, 16]), v=randn([2, 2, 12, 16])), ValueError, "batch size"),
    ("head_dim", lambda: _bad(k=randn([1, 2, 12, 8]), v=randn([1, 2, 12, 8])), ValueError, "head dim of q"),
    ("nk_lt_nq", lambda: _bad(k=randn([1, 2, 9, 16]), v=randn([1, 2, 9, 16])), ValueError, "at least as many tokens"),
    ("head_dim_big", lambda: _bad(q=randn([1, 4, 10, 264]), k=randn([1, 2, 12, 264]), v=randn([1, 2, 12, 264])),
     ValueError, "head dim must be between 1 and 256"),
    ("not_tensor", lambda: _bad(k=[1.0]), TypeError, "k must be a torch.Tensor"),
    ("scale_str", lambda: _bad(scale="x"), TypeError, "scale must be a finite float"),
    ("scale_nan", lambda: _bad(scale=math.nan), TypeError, "scale must be a finite float"),
]


@pytest.mark.parametrize("make, error, match", [pytest.param(m, e, s, id=i) for i, m, e, s in BAD_INPUTS])
def test_bad_inputs_raise(make, error, match) -> None:  # type: ignore[no-untyped-def]
    args = make()
    scale = args.pop("scale", None)
    with pytest.raises(error, match=match):
        swba_attention(**args, scale=scale)
    assert not_supported_reasons(**args, scale=scale)


def test_return_lse_must_be_bool() -> None:
    with pytest.raises(TypeError, match="return_lse must be a bool, got str"):
        swba_attention(**_good(), return_lse="yes")


def test_device_mismatch_raises() -> None:
    if not on_gpu():
        pytest.skip("needs a CUDA GPU and the CPU")
    args = _good()
    args["k"] = args["k"].cpu()
    with pytest.raises(ValueError, match="k is on"):
        swba_attention(**args)


def test_good_inputs_have_no_reasons() -> None:
    assert not_supported_reasons(**_good()) == []


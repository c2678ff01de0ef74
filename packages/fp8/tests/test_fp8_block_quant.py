"""fattn.fp8: per-block-of-tokens quantization (one descale per 64 consecutive tokens).

`quantize(x, granularity="block")` against `reference.quantize_reference`; `fp8_attention` with e4m3
inputs and per-block q / k descales against `reference.fp8_attention_reference`, over every kind of
tile (a tile of <= 64 tokens lies inside one block, a 128 tile spans two); the self-quantizing path
with `granularity="block"`; errors; the custom ops under opcheck and torch.compile.
"""

from __future__ import annotations

import pytest
import torch
import triton

from fattn.core.testing import cases, check_custom_op, device, make_noncontiguous, on_gpu, randn, rel_l2
from fattn.fp8 import fp8_attention, kernels, not_supported_reasons, op, quantize
from fattn.fp8 import reference as R
from fattn.fp8.op import QUANT_BLOCK, forced_configs, fp8_fwd, fp8_quantize

# The bounds of test_fp8_attention.py (the issue's).
TOL_DEQUANT = 0.03
TOL_FULL = 0.07


def n_blocks(n: int) -> int:
    return -(-n // 64)


def block_ramp(n: int) -> torch.Tensor:
    """[n, 1] per-token factors 1, 2, 0.5, 1, ... by 64-token block: every block has its own amax, so
    a descale read for the wrong block (or per head) changes the logits by 2x or 4x."""
    return (2.0 ** ((torch.arange(n, device=device()) // 64 + 1) % 3 - 1).float())[:, None]


def _cpu_or_gpu(row) -> bool:  # type: ignore[no-untyped-def]
    """GPU only: the shapes that would take the interpreter more than a few seconds."""
    return row["Nq"] * row["Nk"] * row["D"] * row["B"] * row["H"] > 40_000_000


def test_quant_block_constants() -> None:
    assert QUANT_BLOCK == 64 == R.QUANT_BLOCK == kernels.QUANT_BLOCK.value


# --------------------------------------------------------------------------------------------
# quantize(granularity="block")
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens_contiguous", [False, True], ids=["rowmajor", "tokens_contiguous"])
@pytest.mark.parametrize("n, d, dtype", [(150, 64, torch.float16), (199, 128, torch.float32), (64, 32, torch.float16),
                                         (45, 256, torch.float32)],
                         ids=["N150-D64-fp16", "N199-D128-fp32", "N64-D32-fp16", "N45-D256-fp32"])
def test_quantize_block_matches_reference(n: int, d: int, dtype: torch.dtype, tokens_contiguous: bool) -> None:
    x = randn([2, 3, n, d], torch.float32) * block_ramp(n)
    x[0, 1, : min(n, 70)] *= 1000.0  # one head's first block(s) far larger than its others
    if n > 64:
        x[1, 2, 64:128] = 0.0  # an all-zero block (partial when n < 128)
    x[1, 0, n - 1] *= 30.0  # one token outlier in the last (partial) block
    x = make_noncontiguous(x.to(dtype))
    x8, descale = quantize(x, granularity="block", tokens_contiguous=tokens_contiguous)
    nb = n_blocks(n)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape
    assert descale.dtype == torch.float32 and descale.shape == (2, 3, nb)
    if tokens_contiguous:
        assert x8.stride(2) == 1
    r8, rdescale, _ = R.quantize_reference(x, granularity="block")
    torch.testing.assert_close(descale, rdescale, rtol=1e-6, atol=0)
    # the descales are per block: amax over each block's tokens and channels / 448
    xd = x.double()
    for blk in range(nb):
        amax = xd[:, :, blk * 64:(blk + 1) * 64].abs().amax(dim=(2, 3))
        want = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
        torch.testing.assert_close(descale[:, :, blk].double(), want, rtol=1e-6, atol=0)
    # round trip: every element within half an e4m3 step of x (2^-4 relative; 2^-10 * descale in the
    # subnormals), and within one step of the reference's rounding (fp32 vs fp64 can flip a tie)
    scale = R.expand_descale(descale, n)
    deq = x8.double() * scale
    step = 2.0 ** -4 * xd.abs() + 2.0 ** -10 * scale
    assert ((deq - xd).abs() <= step * 1.0001).all()
    assert (x8.float() != r8.float()).float().mean() < 0.01
    # each block's amax maps to 448
    blocks = torch.nn.functional.pad(x8.float().abs(), (0, 0, 0, nb * 64 - n)).reshape(2, 3, nb, -1).amax(-1)
    assert (blocks[descale != 1] == 448).all(), "a block's amax must map to 448"
    if n > 64:
        assert (descale[1, 2, 1] == 1).all() and (x8[1, 2, 64:128].float() == 0).all()


def test_quantize_block_without_tokens() -> None:
    x8, descale = quantize(torch.zeros(1, 2, 0, 32, device=device()), granularity="block")
    assert x8.shape == (1, 2, 0, 32) and descale.shape == (1, 2, 0)


# --------------------------------------------------------------------------------------------
# e4m3 inputs with per-block q / k descales
# --------------------------------------------------------------------------------------------
def quantized_inputs(c: dict, which: str, *, v_tokens_contiguous: bool = True):  # type: ignore[no-untyped-def]
    """e4m3 q, k, v and their descales; q and / or k per block (`which` in "qk", "q", "k"), per head
    otherwise. Token magnitudes change from block to block (block_ramp) and from head to head (so a
    descale read for the wrong head is wrong too)."""
    hkv = c.get("Hkv", c["H"])
    per_head = lambda h: (0.75 ** torch.arange(h, device=device()))[:, None, None]
    q = randn([c["B"], c["H"], c["Nq"], c["D"]]) * block_ramp(c["Nq"]) * per_head(c["H"])
    k = randn([c["B"], hkv, c["Nk"], c["D"]]) * block_ramp(c["Nk"]).flip(0) * per_head(hkv)
    v = randn([c["B"], hkv, c["Nk"], c["D"]])
    q8, qd = quantize(q, granularity="block" if "q" in which else "head")
    k8, kd = quantize(k, granularity="block" if "k" in which else "head")
    v8, vd = quantize(v, tokens_contiguous=v_tokens_contiguous)
    assert qd.dim() == (3 if "q" in which else 2) and kd.dim() == (3 if "k" in which else 2)
    return q8, k8, v8, qd, kd, vd


E4M3_CASES = cases(
    [
        dict(B=1, H=2, Hkv=1, Nq=45, Nk=150, D=64, causal=False),
        dict(B=1, H=2, Hkv=1, Nq=45, Nk=150, D=64, causal=True),
        dict(B=1, H=4, Hkv=2, Nq=199, Nk=150, D=128, causal=True),  # Nq > Nk: the first queries see no key
        dict(B=1, H=2, Hkv=2, Nq=150, Nk=199, D=128, causal=False),
        dict(B=1, H=3, Hkv=1, Nq=70, Nk=130, D=256, causal=True),
        dict(B=2, H=8, Hkv=2, Nq=1000, Nk=1537, D=128, causal=True),
        dict(B=1, H=4, Hkv=4, Nq=777, Nk=777, D=64, causal=False),
    ],
    gpu_only_dims=_cpu_or_gpu,
)


@pytest.mark.parametrize("which", ["qk", "q", "k"], ids=["q_k_blocks", "q_blocks", "k_blocks"])
@pytest.mark.parametrize("case", E4M3_CASES)
def test_forward_fp8_inputs_block_descales(case: dict, which: str) -> None:
    q8, k8, v8, qd, kd, vd = quantized_inputs(case, which)
    out = fp8_attention(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, causal=case["causal"],
                        out_dtype=torch.float32)
    assert out.shape == q8.shape and out.dtype == torch.float32
    if case["causal"] and case["Nq"] > case["Nk"]:
        assert (out[:, :, : case["Nq"] - case["Nk"]] == 0).all(), "queries that see no key must output 0"
    ref = R.fp8_attention_reference(q8, k8, v8, qd, kd, vd, causal=case["causal"])
    err = rel_l2(out, ref)
    assert err <= TOL_DEQUANT, f"relative L2 error {err:.4f} against the dequantized reference"
    # a user scale, non-contiguous descales and a row-major V give the same
    out2 = fp8_attention(q8, k8, v8.contiguous(), q_descale=make_noncontiguous(qd), k_descale=make_noncontiguous(kd),
                         v_descale=vd, causal=case["causal"], scale=0.3, out_dtype=torch.float16)
    ref2 = R.fp8_attention_reference(q8, k8, v8, qd, kd, vd, causal=case["causal"], scale=0.3)
    assert out2.dtype == torch.float16 and rel_l2(out2, ref2) <= TOL_DEQUANT


def _tile_configs(q8: torch.Tensor, tma: bool) -> list[triton.Config]:
    """Forward tilings to force: on the GPU every tuned one (pruned for D = 128); under the interpreter
    query tiles inside one block and across two, key tiles of 32 and 64 (the per-tile K descale) and
    128 (a descale per column), pointer and TMA loads."""
    if on_gpu():
        return kernels._fwd_prune(kernels._fwd_configs(), {"Q": q8}, HEAD_DIM=128, FP8=True, KV_DESC=tma,
                                  K_BLOCK_SCALES=True)
    shapes = [(16, 32, False), (128, 64, False), (64, 128, False), (128, 128, False), (16, 128, True), (64, 64, True)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **({"TMA": True} if t else {})}, num_warps=4, num_stages=1,
                          pre_hook=kernels._set_tma_blocks) for bm, bn, t in shapes]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_tiling_reads_the_right_block_descales(causal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tiling gives the reference's output with per-block q and k descales (and with k alone).
    Nk = 208: a multiple of 16 (TMA loads), not of 64 or 128 (a last, partial key tile and block)."""
    monkeypatch.setenv("FATTN_FP8_AUTOTUNE_LIMIT", "0")
    if not on_gpu():
        monkeypatch.setattr(op, "_TMA_MODE", "1")
    c = dict(B=1, H=2, Hkv=1, Nq=199, Nk=208, D=128 if on_gpu() else 64)
    for which in ("qk", "k"):
        q8, k8, v8, qd, kd, vd = quantized_inputs(c, which)
        tma = op._tma_descriptors(k8, v8)[0] is not None
        configs = _tile_configs(q8, tma)
        if on_gpu() and torch.cuda.get_device_capability()[0] >= 9:
            assert tma and any(cf.kwargs.get("TMA") for cf in configs), "the TMA configs are not tested"
        ref = R.fp8_attention_reference(q8, k8, v8, qd, kd, vd, causal=causal)
        for config in configs:
            with forced_configs(fwd=config):
                out = fp8_attention(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, causal=causal,
                                    out_dtype=torch.float32)
            err = rel_l2(out, ref)
            assert err <= TOL_DEQUANT, f"{which} blocks, {config}: relative L2 error {err:.4f}"


def test_block_descales_match_equal_head_descales() -> None:
    """Per-block descales that all equal the per-head one give the per-head output (same e4m3 values)."""
    c = dict(B=1, H=4, Hkv=2, Nq=77, Nk=140, D=64)
    q8, k8, v8, qd, kd, vd = quantized_inputs(c, "")
    head = fp8_attention(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, causal=True, out_dtype=torch.float32)
    qb = qd[:, :, None].expand(-1, -1, n_blocks(77)).contiguous()
    kb = kd[:, :, None].expand(-1, -1, n_blocks(140)).contiguous()
    block = fp8_attention(q8, k8, v8, q_descale=qb, k_descale=kb, v_descale=vd, causal=True, out_dtype=torch.float32)
    torch.testing.assert_close(block, head, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# fp16 / fp32 inputs quantized by the op, granularity="block"
# --------------------------------------------------------------------------------------------
SELF_CASES = cases(
    [
        dict(B=1, H=2, Hkv=1, Nq=45, Nk=150, D=64, causal=False, dtype=torch.float16),
        dict(B=2, H=4, Hkv=2, Nq=199, Nk=150, D=128, causal=True, dtype=torch.float32),
        dict(B=1, H=2, Hkv=2, Nq=150, Nk=199, D=64, causal=True, dtype=torch.float16),
        dict(B=1, H=2, Hkv=1, Nq=70, Nk=130, D=256, causal=False, dtype=torch.float16),
        dict(B=2, H=8, Hkv=2, Nq=1000, Nk=1537, D=128, causal=True, dtype=torch.bfloat16),
        dict(B=2, H=8, Hkv=8, Nq=777, Nk=777, D=64, causal=False, dtype=torch.bfloat16),
    ],
    gpu_only_dims=_cpu_or_gpu,
)


def _qkv(c: dict):  # type: ignore[no-untyped-def]
    hkv = c.get("Hkv", c["H"])
    q = randn([c["B"], c["H"], c["Nq"], c["D"]], c["dtype"], noncontiguous=True)
    k = randn([c["B"], hkv, c["Nk"], c["D"]], c["dtype"], noncontiguous=True)
    v = randn([c["B"], hkv, c["Nk"], c["D"]], c["dtype"], noncontiguous=True)
    return q, k, v


def _errors(q, k, v, causal: bool, granularity: str) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(error against the dequantized reference of this granularity, error against full precision)."""
    out = fp8_attention(q, k, v, causal=causal, granularity=granularity)
    assert out.dtype == q.dtype and out.shape == q.shape
    deq = R.attention(*R.dequantized_inputs(q, k, v, granularity=granularity), causal=causal)
    full = R.attention(q.double(), k.double(), v.double(), causal=causal)
    return rel_l2(out, deq), rel_l2(out, full)


@pytest.mark.parametrize("case", SELF_CASES)
def test_self_quantized_block_granularity(case: dict) -> None:
    q, k, v = _qkv(case)
    err_deq, err_full = _errors(q, k, v, case["causal"], "block")
    assert err_deq <= TOL_DEQUANT, f"relative L2 error {err_deq:.4f} against the dequantized reference"
    assert err_full <= TOL_FULL, f"relative L2 error {err_full:.4f} against full precision"


def v_block_ramp(n: int) -> torch.Tensor:
    """[n, 1] per-token factors 1, 8, 1/16, 1, ... by 128-token V block (a V descale read for the wrong block,
    or per head, scales that block's contribution by 8x-128x)."""
    return (2.0 ** torch.tensor([0.0, 3.0, -4.0], device=device())[(torch.arange(n, device=device()) // 128) % 3])[:, None]


@pytest.mark.parametrize("n", [300, 150, 64, 20], ids=["N300", "N150", "N64", "N20"])
def test_one_pass_quantization_k_and_v_per_block(n: int) -> None:
    """granularity "block" of full-precision inputs: one pass over K and V (`_quant_blocks_kernel`). K centred
    on the channel means of the tokens `centre_sample(N)`, then one descale per 64-token block; V one descale
    per 128-token block (0 for an all-zero block), written tokens-contiguous. N = 300: the sample is strided,
    the last blocks partial."""
    k = (randn([2, 3, n, 64]) * block_ramp(n) + torch.linspace(-6, 6, 64, device=device())).to(torch.float16)
    k[1, 1, : min(n, 64)] = 7.0  # a constant block
    v = (randn([2, 3, n, 64]) * v_block_ramp(n)).to(torch.float16)
    if n > 128:
        v[0, 2, 128:256] = 0.0  # an all-zero V block (partial when n < 256)
    k, v = make_noncontiguous(k), make_noncontiguous(v)
    k8, kd, v8, vd = op._quantize_blocks_launch(k, v)
    rk8, rkd, rmean = R.quantize_reference(k, center="sample", granularity="block")
    rv8, rvd, _ = R.quantize_reference(v, granularity="block", block=R.V_QUANT_BLOCK, zero_descale=0.0, pow2=True)
    assert kd.shape == (2, 3, n_blocks(n)) and vd.shape == (2, 3, -(-n // 128)) and v8.stride(2) == 1
    assert k8.dtype == v8.dtype == torch.float8_e4m3fn and k8.shape == v8.shape == k.shape
    torch.testing.assert_close(kd, rkd, rtol=1e-5, atol=0)
    torch.testing.assert_close(vd, rvd, rtol=0, atol=0)
    assert (torch.frexp(vd[vd > 0])[0] == 0.5).all(), "V descales must be powers of two"
    amax_v = torch.nn.functional.pad(v.double().abs(), (0, 0, 0, -n % 128)).reshape(2, 3, -1, 128 * 64).amax(-1)
    assert ((vd.double() * 448 >= amax_v) & (vd.double() * 224 < amax_v) | (amax_v == 0)).all()
    assert (k8.float() != rk8.float()).float().mean() < 0.01
    assert (v8.float() != rv8.float()).float().mean() < 0.01  # (fp32 against fp64 can flip a rounding tie)
    if n > 128:
        assert vd[0, 2, 1] == 0 and (v8[0, 2, 128:256].float() == 0).all()
    # the centre removes the channel offsets: centred K is within a few sigma of 0 in every channel
    assert rmean[0, 0, 0, 0] < -4 and rmean[0, 0, 0, -1] > 4
    # round trip within half an e4m3 step (plus the subnormals' absolute step) of the centred K
    kc = k.double() - rmean
    scale = R.expand_descale(kd, n)
    assert ((k8.double() * scale - kc).abs() <= (2.0 ** -4 * kc.abs() + 2.0 ** -10 * scale) * 1.01 + 1e-6).all()


def test_one_pass_centre_is_the_sample_median() -> None:
    """K's centre is each channel's lower median over exactly the tokens (i * N) // 64: with channel 0 at +5
    on the sampled tokens and -5 elsewhere, the centre is 5 (every later block's amax is then ~10); one
    sampled token 640 larger moves no other block's descale (a mean would move by 10)."""
    n = 320  # sampled tokens 0, 5, 10, ...
    sampled = torch.tensor(R.centre_sample(n), device=device())
    assert R.centre_sample(n)[:3] == [0, 5, 10] and len(R.centre_sample(n)) == 64
    k = randn([1, 1, n, 32], torch.float32) * 0.5
    k[..., 0] = -5.0
    k[0, 0, sampled, 0] = 5.0
    _, kd, _, _ = op._quantize_blocks_launch(k, k)
    amax = kd[0, 0] * 448
    assert ((amax > 9.5) & (amax < 10.5)).all(), amax
    torch.testing.assert_close(kd, R.quantize_reference(k, center="sample", granularity="block")[1], rtol=1e-5, atol=0)
    outlier = k.clone()
    outlier[0, 0, 5, 1] += 640.0
    _, kd_out, _, _ = op._quantize_blocks_launch(outlier, outlier)
    torch.testing.assert_close(kd_out[..., 1:], kd[..., 1:], rtol=0, atol=0)
    assert kd_out[0, 0, 0] * 448 > 600


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_v_blocks_of_different_magnitudes(causal: bool) -> None:
    """V whose 128-token blocks differ by 2^7 in magnitude, one of them all zero: the op's per-block V scales
    give its dequantized reference within 3% and full precision within 7% (a scale read for the wrong block
    is off by 8x-128x there)."""
    c = dict(B=1, H=2, Hkv=1, Nq=70, Nk=400, D=64, dtype=torch.float16)
    q, k, v = _qkv(c)
    v = (v.float() * v_block_ramp(400)).to(torch.float16)
    v[:, :, 256:384] = 0.0
    err_deq, err_full = _errors(q, k, v, causal, "block")
    assert err_deq <= TOL_DEQUANT, f"relative L2 error {err_deq:.4f} against the dequantized reference"
    assert err_full <= TOL_FULL, f"relative L2 error {err_full:.4f} against full precision"


def test_all_zero_v_gives_zeros() -> None:
    """A head whose V is all zero (every V descale 0) outputs exact zeros, not NaN."""
    c = dict(B=1, H=2, Hkv=2, Nq=33, Nk=150, D=32, dtype=torch.float16)
    q, k, v = _qkv(c)
    v = v.clone()
    v[:, 1] = 0.0
    out = fp8_attention(q, k, v, granularity="block")
    assert (out[:, 1] == 0).all() and out[:, 0].abs().sum() > 0
    deq = R.attention(*R.dequantized_inputs(q, k, v, granularity="block"))
    assert rel_l2(out[:, 0], deq[:, 0]) <= TOL_DEQUANT


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_tiling_with_block_granularity(causal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every forward tiling with the op's own per-block K (64-token) and V (128-token) descales gives the
    dequantized reference: key tiles of 32, 64 and 128 (one V descale per tile), pointer and TMA loads.
    Nk = 336 (a multiple of 16 for TMA; 2.6 V blocks of different magnitudes)."""
    monkeypatch.setenv("FATTN_FP8_AUTOTUNE_LIMIT", "0")
    if not on_gpu():
        monkeypatch.setattr(op, "_TMA_MODE", "1")
    d = 128 if on_gpu() else 64
    c = dict(B=1, H=2, Hkv=1, Nq=199, Nk=336, D=d, dtype=torch.bfloat16 if on_gpu() else torch.float16)
    q, k, v = _qkv(c)
    v = (v.float() * v_block_ramp(336)).to(c["dtype"])
    deq = R.attention(*R.dequantized_inputs(q, k, v, granularity="block"), causal=causal)
    if on_gpu():
        configs = kernels._fwd_prune(kernels._fwd_configs(), {"Q": q}, HEAD_DIM=d, FP8=True, KV_DESC=True,
                                     K_BLOCK_SCALES=True, V_BLOCK_SCALES=True)
    else:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **({"TMA": True} if t else {})}, num_warps=4,
                                 num_stages=1, pre_hook=kernels._set_tma_blocks)
                   for bm, bn, t in [(16, 32, False), (64, 64, False), (32, 128, False), (16, 128, True)]]
    for config in configs:
        with forced_configs(fwd=config):
            out = fp8_attention(q, k, v, causal=causal, granularity="block")
        err = rel_l2(out, deq)
        assert err <= TOL_DEQUANT, f"{config}: relative L2 error {err:.4f}"


def test_token_outliers_30x() -> None:
    """A few tokens of K 30x larger (the issue's example). e4m3 is a floating-point format: a 30x larger
    scale moves the whole head's values down by five binades, which costs no relative precision until
    they reach e4m3's subnormals (below amax / 28672), so per-head and per-block K give about the same
    error, 8-11% against full precision, most of it the outlier tokens' own e4m3 rounding (their logits are
    30x larger), which the centre (the head's means, or a sample's medians) moves from draw to draw
    (per-block / per-head 0.74-1.40 on one draw, 1.035 on average over 30; CPU, D 64, 3 tokens 30x). So: the
    kernel within 3% of its dequantized reference for one draw, and per-block no worse than per-head on
    average over 48 draws (the references: the quantization alone; over 16 draws the mean ratio's spread,
    about 0.04, reached the 1.15 bound once in session 21)."""
    c = dict(B=1, H=2, Hkv=1, Nq=150, Nk=199, D=64, dtype=torch.float16)
    errors: dict[str, list[float]] = {"head": [], "block": []}
    for draw in range(48):
        q, k, v = _qkv(c)
        k = k.clone()
        k[:, :, 150:153] *= 30.0
        full = R.attention(q.double(), k.double(), v.double())
        for granularity in errors:
            errors[granularity].append(rel_l2(R.attention(*R.dequantized_inputs(q, k, v, granularity=granularity)),
                                              full))
        if draw == 0:
            for causal in (False, True):
                for granularity in errors:
                    deq, _ = _errors(q, k, v, causal, granularity)
                    assert deq <= TOL_DEQUANT, f"{granularity}: relative L2 error {deq:.4f} against its reference"
    block, head = (sum(errors[g]) / 48 for g in ("block", "head"))
    assert block <= head * 1.15, f"per-block {block:.4f}, per-head {head:.4f} (mean over 48 draws)"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_massive_outliers_per_block_beats_per_head(causal: bool) -> None:
    """Where per-block K wins: the first three keys (attention-sink-like tokens) carry +-5e4 in 4 channels
    that the queries do not read (q = 0 there, so the full-precision logits stay moderate). Per head,
    the other keys then sit ~2^14 below the head's amax, in e4m3's subnormals; per block only the
    first block's do. Measured (the references, 8 seeds, session 20's one-pass per-block quantization):
    per-head 6.5-7.8%, per-block 4.3-5.1% against full precision (ratio >= 1.41)."""
    n_k = 1024
    q = randn([1, 2, 64, 64])
    q[..., :4] = 0.0
    k = randn([1, 1, n_k, 64])
    k[:, :, 0:3, :4] = 5e4 * torch.tensor([1.0, -1.0, 1.0], device=device())[:, None]
    v = randn([1, 1, n_k, 64])
    q, k, v = q.half(), k.half(), v.half()
    deq_block, full_block = _errors(q, k, v, causal, "block")
    deq_head, full_head = _errors(q, k, v, causal, "head")
    assert deq_block <= TOL_DEQUANT and deq_head <= TOL_DEQUANT
    assert full_block <= TOL_FULL, f"per-block: relative L2 error {full_block:.4f} against full precision"
    assert full_block * 1.2 <= full_head, f"per-block {full_block:.4f} must beat per-head {full_head:.4f}"


def test_granularity_switch_and_backward() -> None:
    """One set of inputs through both granularities (launch plans keyed apart: FATTN_CHECK_PLANS fails a
    signature that misses the granularity); the backward is the same full-precision gradient."""
    c = dict(B=1, H=2, Hkv=1, Nq=40, Nk=100, D=32, causal=True, dtype=torch.float16)
    q, k, v = (t.detach().requires_grad_(True) for t in _qkv(c))
    g = randn([1, 2, 40, 32], torch.float16)
    outs, grads = [], []
    for granularity in ("head", "block", "head"):
        out = fp8_attention(q, k, v, causal=True, granularity=granularity)
        outs.append(out.detach())
        grads.append(torch.autograd.grad(out, (q, k, v), g))
    assert torch.equal(outs[0], outs[2])
    deq = R.attention(*R.dequantized_inputs(q.detach(), k.detach(), v.detach(), granularity="block"), causal=True)
    assert rel_l2(outs[1], deq) <= TOL_DEQUANT
    for a, b in zip(grads[0], grads[1]):
        assert torch.equal(a, b), "the backward must not depend on the forward's quantization"


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------
def _e4m3(b: int = 1, h: int = 2, hkv: int = 1, n_q: int = 70, n_k: int = 130, d: int = 32):
    z = lambda *s: torch.zeros(*s, device=device())
    qkv = [z(b, h, n_q, d), z(b, hkv, n_k, d), z(b, hkv, n_k, d)]
    return [t.to(torch.float8_e4m3fn) for t in qkv], z


@pytest.mark.parametrize(
    "descales, error, match",
    [
        (lambda z: dict(q_descale=z(1, 2, 3), k_descale=z(1, 1), v_descale=z(1, 1)), ValueError,
         r"q_descale must have shape \[1, 2\] .* or \[1, 2, 2\] .*ceil\(Nq / 64\).*got \[1, 2, 3\]"),
        (lambda z: dict(q_descale=z(1, 2), k_descale=z(1, 1, 2), v_descale=z(1, 1)), ValueError,
         r"k_descale must have shape \[1, 1\] .* or \[1, 1, 3\] .*ceil\(Nk / 64\).*got \[1, 1, 2\]"),
        (lambda z: dict(q_descale=z(1, 2), k_descale=z(1, 2, 3), v_descale=z(1, 1)), ValueError,
         r"k_descale must have shape .*got \[1, 2, 3\]"),
        (lambda z: dict(q_descale=z(1, 2, 2, 1), k_descale=z(1, 1), v_descale=z(1, 1)), ValueError,
         r"q_descale must have shape .*got \[1, 2, 2, 1\]"),
        (lambda z: dict(q_descale=z(1, 2), k_descale=z(1, 1), v_descale=z(1, 1, 3)), ValueError,
         r"v_descale must have shape \[1, 1\].*per-block V scales are not supported.*granularity='block'"),
        (lambda z: dict(q_descale=z(1, 2), k_descale=z(1, 1, 3).half(), v_descale=z(1, 1)), TypeError,
         r"k_descale must have dtype"),
        (lambda z: dict(q_descale=z(1, 2, 2), k_descale=z(1, 1, 3), v_descale=z(1, 1), granularity="block"),
         ValueError, r"granularity='block' is for fp16/bf16/fp32 inputs"),
        (lambda z: dict(q_descale=z(1, 2), k_descale=z(1, 1), v_descale=z(1, 1), granularity="tensor"),
         ValueError, r"granularity must be one of 'head', 'block'; got 'tensor'"),
    ],
    ids=["q_blocks_count", "k_blocks_count", "k_heads", "q_4d", "v_per_block", "k_dtype", "block_with_e4m3",
         "unknown_granularity_e4m3"],
)
def test_block_descale_errors_name_argument(descales, error, match) -> None:  # type: ignore[no-untyped-def]
    qkv, z = _e4m3()
    kwargs = descales(z)
    with pytest.raises(error, match=match):
        fp8_attention(*qkv, **kwargs)
    assert not_supported_reasons(*qkv, **kwargs)


@pytest.mark.parametrize("granularity", ["tensor", "Block", None, 1], ids=["tensor", "Block", "None", "int"])
def test_unknown_granularity(granularity: object) -> None:
    q = torch.zeros(1, 2, 8, 32, device=device(), dtype=torch.float16)
    with pytest.raises(ValueError, match=r"granularity must be one of 'head', 'block'"):
        fp8_attention(q, q, q, granularity=granularity)  # type: ignore[arg-type]
    assert any("granularity" in r for r in not_supported_reasons(q, q, q, granularity=granularity))
    with pytest.raises(ValueError, match=r"granularity must be one of 'head', 'block'"):
        quantize(q, granularity=granularity)  # type: ignore[arg-type]


def test_supported_block_descales_have_no_reasons() -> None:
    qkv, z = _e4m3()
    assert not_supported_reasons(*qkv, q_descale=z(1, 2, 2), k_descale=z(1, 1, 3), v_descale=z(1, 1)) == []
    q = torch.zeros(1, 2, 8, 32, device=device(), dtype=torch.float16)
    assert not_supported_reasons(q, q, q, granularity="block") == []


# --------------------------------------------------------------------------------------------
# custom ops: opcheck and torch.compile(fullgraph=True)
# --------------------------------------------------------------------------------------------
def test_custom_op_block_granularity_opcheck_and_compile() -> None:
    q, k, v = (t.detach().requires_grad_(True) for t in
               _qkv(dict(B=1, H=2, Hkv=1, Nq=21, Nk=70, D=32, dtype=torch.float16)))
    check_custom_op(fp8_fwd, (q, k, v, None, None, None, True, 0.17, torch.float16, "block"),
                    public_fn=lambda q, k, v: fp8_attention(q, k, v, causal=True, granularity="block"),
                    public_args=(q, k, v))


def test_custom_op_block_descales_opcheck_and_compile() -> None:
    q, k, v = _qkv(dict(B=1, H=2, Hkv=2, Nq=70, Nk=35, D=32, dtype=torch.float16))
    torch.library.opcheck(fp8_quantize.op, (q, False, "block"))
    torch.library.opcheck(fp8_quantize.op, (k, True, "block"))
    (q8, qd), (k8, kd) = quantize(q, granularity="block"), quantize(k, granularity="block")
    v8, vd = quantize(v, tokens_contiguous=True)
    assert qd.shape == (1, 2, 2) and kd.shape == (1, 2, 1)
    # (test_schema left out for e4m3 inputs, as in test_fp8_attention.py: PyTorch lacks float8 arithmetic)
    torch.library.opcheck(fp8_fwd.op, (q8, k8, v8, qd, kd, vd, False, 0.2, torch.float16),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))

    def pipeline(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        (q8, qd), (k8, kd) = quantize(q, granularity="block"), quantize(k, granularity="block")
        v8, vd = quantize(v, tokens_contiguous=True)
        return fp8_attention(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, out_dtype=torch.float16)

    check_custom_op(fp8_quantize, (k, False, "block"), public_fn=pipeline, public_args=(q, k, v))

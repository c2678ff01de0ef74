"""Custom ops `fattn::fp8_quantize`, `fattn::fp8_fwd`, `fattn::fp8_bwd`, and the public functions."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from fattn.core import (
    CheckedSignatures,
    Reason,
    call_signature,
    choice_reasons,
    empty,
    format_shape,
    fused_op,
    gpu_arch_reasons,
    head_dim_reasons,
    raise_if_unsupported,
    register_autograd,
    same_device_reasons,
    shape_reasons,
    tensor_reasons,
)
from fattn.core.launch import launcher
from fattn.core.runtime import cdiv, env_flag, env_int, interpreter_enabled, seq_bucket
from fattn.fp8 import kernels
from fattn.fp8.kernels import (
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _attn_fwd_kernel,
    _quant_apply_kernel,
    _quant_blocks_kernel,
    _quant_centre_kernel,
    _quant_finalize_kernel,
    _quant_rows_kernel,
    _quant_stats_kernel,
    _quant_x_blocks_kernel,
)

__all__ = ["fp8_attention", "quantize", "not_supported_reasons", "scaled_dot_product_attention", "fp8_fwd", "fp8_bwd", "fp8_quantize",
           "FP8_DTYPE", "HEAD_DIMS", "FULL_PRECISION_DTYPES", "OUT_DTYPES", "GRANULARITIES", "QUANT_BLOCK"]

FP8_DTYPE = torch.float8_e4m3fn
FULL_PRECISION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
HEAD_DIMS = (32, 64, 128, 256)
# "head": one descale per (batch, head); "block": one per QUANT_BLOCK consecutive tokens of a (batch, head).
GRANULARITIES = ("head", "block")
# Tokens per block of the per-block granularity (the kernels' QUANT_BLOCK): descales [B, H, ceil(N / 64)].
QUANT_BLOCK: int = kernels.QUANT_BLOCK.value
# Tokens per V descale when the op quantizes V per block (granularity "block"; kernels.V_QUANT_BLOCK): the
# largest key tile, so that each tile of P @ V has one V scale. Internal: e4m3 V takes per-head descales.
V_QUANT_BLOCK: int = kernels.V_QUANT_BLOCK.value


def n_blocks(n: int) -> int:
    """Quantization blocks of n tokens: ceil(n / QUANT_BLOCK) (works on SymInts too)."""
    return (n + QUANT_BLOCK - 1) // QUANT_BLOCK


# K/V statistics programs cover spans of this many tokens (a multiple of 32) in chunks (`stats_span`), reduced across
# rows once at the end: 65 us against 130 for programs of one 64-token tile (three reductions each) at
# B4-H16-N4096-D128 bf16, 2.1 against 1.0 TB/s (H100, session 19; 256 tokens: 78 us). FATTN_FP8_STATS_TOKENS=n
# overrides it (0: one 64-token tile per program).
_STATS_TOKENS = env_int("FATTN_FP8_STATS_TOKENS", 512, "tokens per K/V statistics program; 0: one 64-token tile")


# FATTN_FP8_Q_PREQUANT=1: full-precision Q is quantized per row by a kernel of its own before the attention
# (`_quant_rows_kernel`, one pass over Q), which then runs with e4m3 Q, instead of inside the attention kernel
# (the same values: one scale per row either way). An experiment, off by default: at B4-H16-N4096-D128 on an
# H100 (session 19, one profile each) the attention took 678 us against 717-745 with bf16 Q, and the extra
# pass 35 us (2.9 TB/s): no clear gain. The benchmark's `fattn-fp8+quant-preq` row times it beside the default.
_Q_PREQUANT = env_flag("FATTN_FP8_Q_PREQUANT", False)


@contextlib.contextmanager
def q_prequant(enabled: bool = True) -> Iterator[None]:
    """FATTN_FP8_Q_PREQUANT on (or off) inside a `with` block (the benchmark times both in one process)."""
    global _Q_PREQUANT
    if not isinstance(enabled, bool):
        raise TypeError(f"q_prequant: enabled must be a bool, got {type(enabled).__name__}")
    previous = _Q_PREQUANT
    _Q_PREQUANT = enabled
    try:
        yield
    finally:
        _Q_PREQUANT = previous


def stats_span(d: int, element_size: int) -> tuple[int, int, int]:
    """(rows per chunk, chunks, chunks unrolled per loop step) of a K/V statistics program over _STATS_TOKENS
    tokens: 32-row chunks up to 8 KB (bf16 at D <= 128, the measured path), fewer rows for wider ones (bf16
    D 256, fp32 D >= 128), whose 32-row chunks spilled 128 bytes to 10 KB (sm_90); two chunks per step: a
    whole span unrolled spilled with Triton 3.9 (160 bytes at bf16 D 128), four with 3.5 (28), two with none
    of 3.4, 3.5, 3.6, 3.9; (one 64-token tile, 1, 1) with the spans off."""
    if not _STATS_TOKENS:
        return _quant_block(), 1, 1
    rows = max(8, min(32, 8192 // (d * element_size)))
    chunks = max(1, _STATS_TOKENS // rows)
    return rows, chunks, math.gcd(chunks, 2)


# Channels per centre program (D is 64, 128 or 256): sm_90, bf16 D 128, 32 channels take 40 registers with
# Triton 3.5 / 3.6 and 62 with 3.9, no spill; a whole head in one program took 163 with 3.6 and spilled 1.9 KB
# with 3.9. (More programs, too: B * H * D / 32.)
CENTRE_BLOCK_D = 32


def _quant_block() -> int:
    return 32 if interpreter_enabled() else 64


# --------------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------------
def _quantize_launch(x0: torch.Tensor, x1: torch.Tensor | None, center0: bool, tokens_contiguous0: bool,
                     tokens_contiguous1: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Quantize x0 (and x1, same shape, e.g. K and V) [B, H, N, D] per (batch, head), in one launch per pass.

    Returns (x0_8, descale0 [B, H], x1_8 or None, descale1 or None); x0 is centred per channel first
    when center0 (x0 - mean ~= x0_8 * descale0).
    """
    b, h, n, d = x0.shape
    count = 1 if x1 is None else 2
    x1_in = x0 if x1 is None else x1
    y0 = _alloc_fp8(x0.shape, tokens_contiguous0, x0.device)
    y1 = _alloc_fp8(x0.shape, tokens_contiguous1, x0.device) if x1 is not None else y0
    descale = empty([count, b, h], dtype=torch.float32, device=x0.device)
    results = (y0, descale[0], y1 if x1 is not None else None, descale[1] if x1 is not None else None)
    if b * h == 0:
        return results
    if n == 0:  # no tokens: nothing to quantize; a unit scale keeps descale finite
        descale.fill_(1.0)
        return results
    block = _quant_block()
    n_tiles = cdiv(n, block)
    # Statistics programs: a span of _STATS_TOKENS tokens in chunks each, or one token tile.
    stats_rows, tiles, unroll = stats_span(d, x0.element_size())
    n_parts = cdiv(n, stats_rows * tiles)
    col_max = empty([count, b * h, n_parts, d], dtype=torch.float32, device=x0.device)
    col_min = empty([count, b * h, n_parts, d], dtype=torch.float32, device=x0.device)
    col_sum = empty([count, b * h, n_parts, d], dtype=torch.float32, device=x0.device) if center0 else col_max
    mean = empty([count, b * h, d], dtype=torch.float32, device=x0.device) if center0 else descale
    # Every launch below is fixed by x0's and x1's metadata and the flags (FastLauncher.launch_planned).
    signature = call_signature(x0, x1, center0, tokens_contiguous0, tokens_contiguous1, _STATS_TOKENS)
    block_t = 8 if interpreter_enabled() else 32
    launcher(_quant_stats_kernel).launch_planned(
        signature, (x0, x1_in, col_sum, col_max, col_min),
        lambda: ((b * h, n_parts, count), (x0, x1_in, col_sum, col_max, col_min, h, n, n_parts, *x0.stride(),
                                           *x1_in.stride()),
                 dict(D=d, BLOCK_N=stats_rows, CENTER0=center0, TILES=tiles, UNROLL=unroll, num_warps=4)))
    launcher(_quant_finalize_kernel).launch_planned(
        signature, (col_sum, col_max, col_min, mean, descale),
        lambda: ((b * h, count), (col_sum, col_max, col_min, mean, descale, n, n_parts),
                 dict(D=d, BLOCK_T=block_t, CENTER0=center0, num_warps=4)))
    launcher(_quant_apply_kernel).launch_planned(
        signature, (x0, x1_in, mean, descale, y0, y1),
        lambda: ((b * h, n_tiles, count), (x0, x1_in, mean, descale, y0, y1, h, n, *x0.stride(), *x1_in.stride(),
                                           *y0.stride(), *y1.stride()),
                 dict(D=d, BLOCK_N=block, CENTER0=center0, num_warps=4)))
    return results


def _quantize_x_blocks_launch(x: torch.Tensor, tokens_contiguous: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize(x, granularity="block")`: (x8, descale [B, H, ceil(N / 64)]) in one pass (`_quant_x_blocks_kernel`)."""
    b, h, n, d = x.shape
    y = _alloc_fp8(x.shape, tokens_contiguous, x.device)
    descale = empty([b, h, n_blocks(n)], dtype=torch.float32, device=x.device)
    if y.numel() == 0:
        return y, descale
    launcher(_quant_x_blocks_kernel).launch_planned(
        call_signature(x, tokens_contiguous), (x, y, descale),
        lambda: ((b * h, cdiv(n, V_QUANT_BLOCK)), (x, y, descale, h, n, *x.stride(), *y.stride()),
                 dict(D=d, num_warps=8)))
    return y, descale


def _quantize_blocks_launch(k: torch.Tensor, v: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """K and V [B, Hkv, N, D] in one pass (`_quant_blocks_kernel`): (k8, k_descale [B, Hkv, ceil(N / 64)],
    v8 tokens-contiguous, v_descale [B, Hkv, ceil(N / 128)]). K is centred per channel on a sample's medians
    first (`_quant_centre_kernel`, 64 tokens per head); then one launch reads each token once, against three
    launches and two reads of K and V for per-head scales."""
    b, h, n, d = k.shape
    k8 = _alloc_fp8(k.shape, False, k.device)
    v8 = _alloc_fp8(k.shape, True, k.device)
    kd = empty([b, h, n_blocks(n)], dtype=torch.float32, device=k.device)
    vd = empty([b, h, cdiv(n, V_QUANT_BLOCK)], dtype=torch.float32, device=k.device)
    if b * h == 0 or n == 0:
        return k8, kd, v8, vd
    centre = empty([b * h, d], dtype=torch.float32, device=k.device)
    signature = call_signature(k, v)
    launcher(_quant_centre_kernel).launch_planned(
        signature, (k, centre), lambda: ((b * h, d // CENTRE_BLOCK_D), (k, centre, h, n, *k.stride()),
                                         dict(D=d, BLOCK_D=CENTRE_BLOCK_D, num_warps=4)))
    launcher(_quant_blocks_kernel).launch_planned(
        signature, (k, v, centre, k8, v8, kd, vd),
        lambda: ((b * h, cdiv(n, V_QUANT_BLOCK), 2),
                 (k, v, centre, k8, v8, kd, vd, h, n, *k.stride(), *v.stride(), *k8.stride(), *v8.stride()),
                 dict(D=d, num_warps=8)))
    return k8, kd, v8, vd


def _quantize_rows_launch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, N, D] -> (x8 e4m3 [B, H, N, D], descale [B, H, N] fp32), one scale per token (row)."""
    b, h, n, d = x.shape
    y = _alloc_fp8(x.shape, False, x.device)
    descale = empty([b, h, n], dtype=torch.float32, device=x.device)
    if y.numel() == 0:
        return y, descale
    block = 16 if interpreter_enabled() else 64
    launcher(_quant_rows_kernel).launch_planned(
        call_signature(x), (x, y, descale),
        lambda: ((b * h, cdiv(n, block)), (x, y, descale, h, n, *x.stride(), *y.stride()),
                 dict(D=d, BLOCK_N=block, num_warps=4)))
    return y, descale


def _alloc_fp8(shape: torch.Size | list[int], tokens_contiguous: bool, device: torch.device,
               fake: bool = False) -> torch.Tensor:
    b, h, n, d = shape
    alloc = (lambda s: torch.empty(s, dtype=FP8_DTYPE, device=device)) if fake else \
        (lambda s: empty(s, dtype=FP8_DTYPE, device=device))
    if tokens_contiguous:
        # [B, H, D, N] storage seen as [B, H, N, D]: the layout the P @ V product wants for V.
        return alloc([b, h, d, n]).transpose(2, 3)
    return alloc([b, h, n, d])


def _quantize_fake(x: torch.Tensor, tokens_contiguous: bool,
                   granularity: str = "head") -> tuple[torch.Tensor, torch.Tensor]:
    b, h, n, _ = x.shape
    shape = [b, h, n_blocks(n)] if granularity == "block" else [b, h]
    return _alloc_fp8(x.shape, tokens_contiguous, x.device, fake=True), x.new_empty(shape, dtype=torch.float32)


@fused_op("fp8_quantize", fake=_quantize_fake)
def fp8_quantize(x: torch.Tensor, tokens_contiguous: bool,
                 granularity: str = "head") -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, N, D] -> (x8 [B, H, N, D] float8_e4m3fn, descale fp32) with x ~= x8 * descale: descale
    [B, H] for granularity "head", [B, H, ceil(N / 64)] (one per 64-token block) for "block"."""
    if granularity == "block":
        return _quantize_x_blocks_launch(x, tokens_contiguous)
    x8, descale, _, _ = _quantize_launch(x, None, False, tokens_contiguous)
    return x8, descale


# --------------------------------------------------------------------------------------------
# launching autotuned kernels, or one given config (tests run every config this way)
# --------------------------------------------------------------------------------------------
_forced_configs: dict[str, triton.Config] = {}


@contextlib.contextmanager
def forced_configs(**configs: triton.Config) -> Iterator[None]:
    """Inside the block, launch `fwd`, `bwd_prep`, `dkdv`, `dq` with the given configs instead of autotuning."""
    previous = dict(_forced_configs)
    _forced_configs.update(configs)
    try:
        yield
    finally:
        _forced_configs.clear()
        _forced_configs.update(previous)


def _launch(name: str, kernel: Any, grid: Any, *args: Any, **kwargs: Any) -> None:
    config = _forced_configs.get(name)
    if config is None:
        launcher(kernel)[grid](*args, **kwargs)
    else:
        if config.pre_hook is not None:
            config.pre_hook({**dict(zip(kernel.fn.arg_names, args)), **kwargs, **config.all_kwargs()})
        launcher(kernel.fn)[grid](*args, **kwargs, **config.all_kwargs())


def _launch_planned(name: str, kernel: Any, signature: tuple | None, tensors: tuple[Any, ...],
                    build: Callable[[], tuple[Any, tuple[Any, ...], dict[str, Any]]]) -> None:
    """Launch `build()`'s (grid, args, kwargs), built once per `signature` (FastLauncher.launch_planned:
    `tensors` are the call's tensors and descriptors in parameter order); a forced config (tests) takes
    `_launch`."""
    if name in _forced_configs:
        grid, args, kwargs = build()
        _launch(name, kernel, grid, *args, **kwargs)
        return
    launcher(kernel).launch_planned(signature, tensors, build)


# FATTN_FP8_TMA: "auto" (default: TMA K/V loads on Hopper when the layout allows), "0" (never), "1" (also
# under the interpreter: tests of the TMA path).
_TMA_MODE = os.environ.get("FATTN_FP8_TMA", "").strip().lower() or "auto"
if _TMA_MODE not in ("auto", "0", "1"):
    raise ValueError(f"FATTN_FP8_TMA={os.environ['FATTN_FP8_TMA']!r}: expected auto, 0 or 1")


def _tma_descriptors(k8: torch.Tensor, v8: torch.Tensor) -> tuple[Any, Any]:
    """(K_desc, V_desc) over the 2-D views [B*Hkv*Nk, D] of K and [B*Hkv*D, Nk] of tokens-contiguous V,
    or (None, None) where the kernel must use pointer loads. TMA needs sm_90+, 16-byte aligned bases
    and row strides (Nk a multiple of 16 for V's rows) and int32 coordinates."""
    if _TMA_MODE == "0" or (_TMA_MODE != "1" and (interpreter_enabled() or not k8.is_cuda)):
        return None, None
    if k8.is_cuda and torch.cuda.get_device_capability(k8.device)[0] < 9:
        return None, None
    b, h_kv, n_k, d = k8.shape
    v_t = v8.transpose(2, 3)
    if (n_k == 0 or n_k % 16 or b * h_kv * max(n_k, d) >= 2**31 or not k8.is_contiguous()
            or not v_t.is_contiguous() or k8.data_ptr() % 16 or v8.data_ptr() % 16):
        return None, None
    # block shapes are placeholders: the config's pre-hook sets them from BLOCK_N
    k_desc = TensorDescriptor.from_tensor(k8.view(b * h_kv * n_k, d), block_shape=[16, d])
    v_desc = TensorDescriptor.from_tensor(v_t.reshape(b * h_kv * d, n_k), block_shape=[d, 16])
    return k_desc, v_desc


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
def _fwd_launch(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, q_descale: torch.Tensor,
                k_descale: torch.Tensor, v_descale: torch.Tensor, causal: bool, scale: float,
                out_dtype: torch.dtype, q_rows: bool = False) -> torch.Tensor:
    """q_rows: q8 is e4m3 with one descale per row, q_descale [B, H, Nq] (`_quantize_rows_launch`)."""
    b, h, n_q, d = q8.shape
    h_kv, n_k = k8.shape[1], k8.shape[2]
    out = empty([b, h, n_q, d], dtype=out_dtype, device=q8.device)
    if out.numel() == 0:
        return out

    k_desc, v_desc = _tma_descriptors(k8, v8)
    # Per-block descales ([B, H, ceil(N / 64)]; Q's only with e4m3 Q, else Q is quantized per row in the
    # kernel). Both flags always go in: they are part of the autotuner's key, which holds values, not names.
    # V_BLOCK_SCALES: v_descale [B, Hkv, ceil(Nk / 128)], only from the op's own quantization (granularity "block").
    block_scales = dict(Q_BLOCK_SCALES=q8.dtype == FP8_DTYPE and q_descale.dim() == 3 and not q_rows,
                        K_BLOCK_SCALES=k_descale.dim() == 3, Q_ROW_SCALES=q_rows, V_BLOCK_SCALES=v_descale.dim() == 3)
    tensors = (q8, k8, v8, q_descale, k_descale, v_descale, out, out, out, out)
    # Whether K and V go through TMA descriptors also depends on their addresses' 16-byte alignment.
    signature = call_signature(*tensors[:7], causal, scale, k8.data_ptr() % 16 == 0, v8.data_ptr() % 16 == 0, q_rows)

    def build() -> tuple:  # what the signature fixes
        def grid(meta):  # type: ignore[no-untyped-def]
            return (cdiv(n_q, meta["BLOCK_M"]), b * h)

        args = (*tensors, *q8.stride(), *k8.stride(), *v8.stride(), *out.stride(), *out.stride(),
                h, h // h_kv, n_q, n_k, scale, seq_bucket(n_q), seq_bucket(n_k))
        return grid, args, dict(HEAD_DIM=d, CAUSAL=causal, FP8=True, BWD_PREP=False, K_desc=k_desc, V_desc=v_desc,
                                KV_DESC=k_desc is not None,
                                **block_scales)

    _launch_planned("fwd", _attn_fwd_kernel, signature, tensors if k_desc is None else (*tensors, k_desc, v_desc),
                    build)
    return out


def _fwd_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_descale: Optional[torch.Tensor],
              k_descale: Optional[torch.Tensor], v_descale: Optional[torch.Tensor], causal: bool, scale: float,
              out_dtype: torch.dtype, granularity: str = "head") -> torch.Tensor:
    return q.new_empty(q.shape, dtype=out_dtype)


@fused_op("fp8_fwd", fake=_fwd_fake)
def fp8_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_descale: Optional[torch.Tensor],
            k_descale: Optional[torch.Tensor], v_descale: Optional[torch.Tensor], causal: bool, scale: float,
            out_dtype: torch.dtype, granularity: str = "head") -> torch.Tensor:
    """FP8 attention. q [B, H, Nq, D], k, v [B, Hkv, Nk, D] -> out [B, H, Nq, D] of out_dtype.

    e4m3 inputs come with descales (q_descale [B, H] or [B, H, ceil(Nq / 64)], k_descale [B, Hkv] or
    [B, Hkv, ceil(Nk / 64)], v_descale [B, Hkv]; granularity is not used); full-precision inputs are
    quantized here: K and V per (batch, head) (K centred per channel first, V written tokens-contiguous),
    or with granularity "block" in one pass, K per 64-token block (centred on a sample's channel medians) and
    V per 128-token block; Q per row inside the attention kernel.
    """
    if q.dtype == FP8_DTYPE:
        assert q_descale is not None and k_descale is not None and v_descale is not None
        return _fwd_launch(q, k, v, q_descale.float().contiguous(), k_descale.float().contiguous(),
                           v_descale.float().contiguous(), causal, scale, out_dtype)
    # Q is quantized per row, inside the attention kernel (or before it: FATTN_FP8_Q_PREQUANT); K and V
    # here, per (batch, head) (two passes: the head's amax first) or per block (one pass).
    if granularity == "block":
        k8, kd, v8, vd = _quantize_blocks_launch(k, v)
    else:
        k8, kd, v8_or_none, vd_or_none = _quantize_launch(k, v, True, False, True)
        assert v8_or_none is not None and vd_or_none is not None
        v8, vd = v8_or_none, vd_or_none
    if _Q_PREQUANT:
        q8, qd = _quantize_rows_launch(q)
        return _fwd_launch(q8, k8, v8, qd, kd, vd, causal, scale, out_dtype, q_rows=True)
    return _fwd_launch(q, k8, v8, kd, kd, vd, causal, scale, out_dtype)


# --------------------------------------------------------------------------------------------
# backward: the full-precision flash backward (straight-through over the quantization)
# --------------------------------------------------------------------------------------------
def _bwd_fake(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


@fused_op("fp8_bwd", fake=_bwd_fake)
def fp8_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of full-precision attention(q, k, v) for grad_out [B, H, Nq, D] -> (dq, dk, dv)."""
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    group = h // h_kv
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dk = empty(k.shape, dtype=k.dtype, device=k.device)
    dv = empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    grad_out = grad_out.to(q.dtype)
    lse = empty([b * h, n_q], dtype=torch.float32, device=q.device)
    delta = empty([b * h, n_q], dtype=torch.float32, device=q.device)
    # Every launch is fixed by the inputs' metadata (FastLauncher.launch_planned; dq, dk, dv, lse and delta
    # are fresh contiguous tensors of shapes that follow from the inputs').
    signature = call_signature(grad_out, q, k, v, causal, scale)
    shared = (h, group, n_q, n_k, scale, seq_bucket(n_q), seq_bucket(n_k))
    # Recompute the full-precision forward's log-sum-exp and delta = rowsum(dO * O).
    prep = (q, k, v, lse, lse, lse, lse, lse, grad_out, delta)
    _launch_planned("bwd_prep", _attn_fwd_kernel, signature, prep, lambda: (
        lambda meta: (cdiv(n_q, meta["BLOCK_M"]), b * h),
        (*prep, *q.stride(), *k.stride(), *v.stride(), 0, 0, 0, 0, *grad_out.stride(), *shared),
        dict(HEAD_DIM=d, CAUSAL=causal, FP8=False, BWD_PREP=True)))
    dkdv = (q, k, v, grad_out, lse, delta, dk, dv)
    _launch_planned("dkdv", _attn_bwd_dkdv_kernel, signature, dkdv, lambda: (
        lambda meta: (cdiv(n_k, meta["BLOCK_N"]), b * h_kv),
        (*dkdv, *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(), *shared),
        dict(HEAD_DIM=d, CAUSAL=causal)))
    dq_args = (q, k, v, grad_out, lse, delta, dq)
    _launch_planned("dq", _attn_bwd_dq_kernel, signature, dq_args, lambda: (
        lambda meta: (cdiv(n_q, meta["BLOCK_M"]), b * h),
        (*dq_args, *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *shared),
        dict(HEAD_DIM=d, CAUSAL=causal)))
    return dq, dk, dv


def _setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
    q, k, v, _, _, _, causal, scale = inputs[:8]
    ctx.n_inputs = len(inputs)
    ctx.causal = causal
    ctx.scale = scale
    ctx.fp8_inputs = q.dtype == FP8_DTYPE
    ctx.save_for_backward(q, k, v)


def _backward(ctx, grad_out):  # type: ignore[no-untyped-def]
    if ctx.fp8_inputs:
        raise RuntimeError(
            "fp8_attention: no backward for float8_e4m3fn inputs (their quantization has no gradient); "
            "pass fp16/bf16 q, k, v to train: the op quantizes them itself and its backward is the "
            "full-precision attention gradient (straight-through)"
        )
    q, k, v = ctx.saved_tensors
    dq, dk, dv = fp8_bwd(grad_out, q, k, v, ctx.causal, ctx.scale)
    return (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)


register_autograd(fp8_fwd, setup_context=_setup_context, backward=_backward)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def _descale_reasons(name: str, t: object, expected: list[int], dims: str, n: int | None = None,
                     n_name: str = "") -> list[Reason]:
    """A descale [`dims`] of shape `expected` or, given `n` (its tokens, called `n_name`), one per 64-token
    block [`dims`, ceil(n / 64)]."""
    blocks = None if n is None else [*expected, n_blocks(n)]
    what = f"descales [{dims}]" + ("" if n is None else f" or [{dims}, ceil({n_name} / {QUANT_BLOCK})]")
    if t is None:
        return [Reason(f"{name} is required when q, k, v are float8_e4m3fn (fp32 {what}, e.g. from "
                       "fattn.fp8.quantize)")]
    out = tensor_reasons(name, t, dtypes=(torch.float32,))
    if out:
        return out
    assert isinstance(t, torch.Tensor)
    shape = list(t.shape)
    if shape == expected or shape == blocks:
        return []
    if blocks is None:
        if name == "v_descale" and t.dim() == 3:
            return [Reason(f"v_descale must have shape {format_shape(expected)} (descales [{dims}]), got {shape}: "
                           "per-block V scales are not supported for float8_e4m3fn inputs (quantize v with "
                           "granularity='head'; for per-block V scales pass full-precision q, k, v with "
                           "granularity='block', and the op quantizes them itself)")]
        return shape_reasons(name, t, expected, f"({what})")
    return [Reason(f"{name} must have shape {format_shape(expected)} (descales [{dims}], per head) or "
                   f"{format_shape(blocks)} (descales [{dims}, ceil({n_name} / {QUANT_BLOCK})], one per "
                   f"{QUANT_BLOCK}-token block), got {shape}")]


def _reasons(q: object, k: object, v: object, causal: object, scale: object, q_descale: object,
             k_descale: object, v_descale: object, out_dtype: object, granularity: object = "head") -> list[Reason]:
    dtypes = (FP8_DTYPE, *FULL_PRECISION_DTYPES)
    out: list[Reason] = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        out += tensor_reasons(name, t, ndim=4, dtypes=dtypes)
    if out:
        return out
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    out += same_device_reasons(q=q, k=k, v=v, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    if not (q.dtype == k.dtype == v.dtype):
        out.append(Reason(f"q, k, v must share one dtype: got q {q.dtype}, k {k.dtype}, v {v.dtype}", TypeError))
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    out += shape_reasons("k", k, [b, None, None, d], "[B, Hkv, Nk, D] with q's B and D")
    out += shape_reasons("v", v, [b, h_kv, n_k, d], "[B, Hkv, Nk, D] like k")
    if h_kv == 0 or h % h_kv:
        out.append(Reason(f"the number of query heads H={h} must be a multiple of the KV heads Hkv={h_kv} (GQA)"))
    out += head_dim_reasons("q", d, allowed=HEAD_DIMS)
    if not isinstance(causal, bool):
        out.append(Reason(f"causal must be a bool, got {type(causal).__name__}", TypeError))
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        out.append(Reason(f"scale must be a float or None, got {type(scale).__name__}", TypeError))
    elif scale is not None and not (math.isfinite(scale) and scale > 0):
        out.append(Reason(f"scale must be a finite positive number, got {scale}"))
    if out_dtype is not None:
        if not isinstance(out_dtype, torch.dtype):
            out.append(Reason(f"out_dtype must be a torch.dtype or None, got {type(out_dtype).__name__}", TypeError))
        else:
            out += [Reason(r.message, TypeError) for r in choice_reasons("out_dtype", out_dtype, OUT_DTYPES)]
    granularity_problems = choice_reasons("granularity", granularity, GRANULARITIES)
    granularity_ok = not granularity_problems
    out += granularity_problems
    if q.dtype == FP8_DTYPE:
        out += _descale_reasons("q_descale", q_descale, [b, h], "B, H", n_q, "Nq")
        out += _descale_reasons("k_descale", k_descale, [b, h_kv], "B, Hkv", n_k, "Nk")
        out += _descale_reasons("v_descale", v_descale, [b, h_kv], "B, Hkv")
        if granularity_ok and granularity != "head":
            out.append(Reason(f"granularity={granularity!r} is for fp16/bf16/fp32 inputs (the op's own "
                              "quantization); float8_e4m3fn inputs give theirs by the descales' shapes "
                              "(leave granularity at 'head')"))
    else:
        given = [n for n, t in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale))
                 if t is not None]
        if given:
            out.append(Reason(f"{', '.join(given)} must be None for {q.dtype} inputs (the op quantizes them "
                              "itself); descales go with float8_e4m3fn q, k, v"))
    out += gpu_arch_reasons(q, minimum=(8, 9), feature="FP8 tensor-core attention (fattn.fp8)")
    return out


# Signatures (fattn.core.call_signature) of fp8_attention's arguments whose checks passed.
_CHECKED = CheckedSignatures()


def not_supported_reasons(q: object, k: object, v: object, *, causal: object = False, scale: object = None,
                          q_descale: object = None, k_descale: object = None, v_descale: object = None,
                          out_dtype: object = None, granularity: object = "head") -> list[str]:
    """Why `fp8_attention` would reject these arguments (empty when it accepts them)."""
    return [r.message for r in _reasons(q, k, v, causal, scale, q_descale, k_descale, v_descale, out_dtype,
                                        granularity)]


def fp8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    granularity: str = "head",
) -> torch.Tensor:
    """Attention softmax(q k^T * scale) v with both matrix products in FP8 (e4m3) on tensor cores.

    Args:
        q: [B, H, Nq, D] queries; k, v: [B, Hkv, Nk, D] keys and values, H a multiple of Hkv (GQA/MQA).
            Either float8_e4m3fn with descales, or fp16/bf16/fp32, which the op quantizes itself with a
            fused kernel (Q per row; K and V per batch and head, K centred per channel first, which
            leaves the softmax unchanged). D in 32, 64, 128, 256.
        causal: mask keys after the query; with Nq != Nk the diagonal is aligned to the bottom right
            (query i sees keys j <= i + Nk - Nq); a query that sees no key gets a zero output.
        scale: softmax scale, default 1/sqrt(D).
        q_descale: [B, H] fp32, k_descale, v_descale: [B, Hkv] fp32, only with e4m3 inputs:
            logits = (q8 . k8) * q_descale * k_descale * scale; out = (P . v8) * v_descale.
            q_descale may also be [B, H, ceil(Nq / 64)] and k_descale [B, Hkv, ceil(Nk / 64)], one per
            64-token block (`quantize(x, granularity="block")`): token i uses descale[..., i // 64].
            v_descale is per head only (per-block V scales: full-precision inputs with granularity "block").
        out_dtype: bf16, fp16 or fp32; default bf16 for e4m3 inputs and the input dtype otherwise.
        granularity: for fp16/bf16/fp32 inputs, how finely K and V are quantized: "head" (one scale
            per batch and head each; K centred on its channel means; two passes over K and V) or
            "block" (one pass: K centred on the channel medians of 64 tokens spread over the head, then
            one scale per 64-token block; V one scale per 128-token block: tokens of very different
            magnitudes in one head keep their precision, and the quantization reads K and V once).
            Q is quantized per row either way. e4m3 inputs take theirs from the descales' shapes
            (leave it at "head").

    Returns:
        [B, H, Nq, D] in out_dtype.

    Gradients (fp16/bf16/fp32 inputs) are those of full-precision attention, computed by a flash
    backward (straight-through over the quantization). e4m3 inputs have no backward.
    V whose tokens are contiguous (`quantize(v, tokens_contiguous=True)`) is the fastest layout.
    """
    # The checks read nothing but the signature (shapes, strides, dtypes, devices, scalars): once per signature.
    signature = call_signature(q, k, v, causal, scale, q_descale, k_descale, v_descale,
                               None if out_dtype is None else str(out_dtype), granularity)
    if signature is None or type(out_dtype) not in (type(None), torch.dtype) or signature not in _CHECKED:
        raise_if_unsupported("fp8_attention", _reasons(q, k, v, causal, scale, q_descale, k_descale, v_descale,
                                                       out_dtype, granularity))
        _CHECKED.add(signature)
    d = q.shape[-1]
    scale = float(1.0 / math.sqrt(d) if scale is None else scale)
    if out_dtype is None:
        out_dtype = torch.bfloat16 if q.dtype == FP8_DTYPE else q.dtype
    return fp8_fwd(q, k, v, q_descale, k_descale, v_descale, causal, scale, out_dtype, granularity)


def quantize(x: torch.Tensor, *, granularity: str = "head",
             tokens_contiguous: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [B, H, N, D] to float8_e4m3fn with fp32 descales per (batch, head) or per block of tokens.

    granularity "head": returns (x8 [B, H, N, D] float8_e4m3fn, descale [B, H] fp32) with
    x ~= x8.float() * descale[..., None, None] (descale = amax / 448 over the head's tokens and channels).
    granularity "block": descale [B, H, ceil(N / 64)], one per block of 64 consecutive tokens (the last
    one may be shorter), with x[..., i, :] ~= x8[..., i, :] * descale[..., i // 64] (amax over the
    block's tokens and channels / 448; an all-zero block gets 1). For q and k of `fp8_attention`; not v
    (its descale must be per head). `tokens_contiguous=True` stores x8 with the token dimension
    contiguous (a transposed view), the layout in which `fp8_attention` reads V fastest.
    """
    reasons = tensor_reasons("x", x, ndim=4, dtypes=FULL_PRECISION_DTYPES)
    reasons += choice_reasons("granularity", granularity, GRANULARITIES)
    if not reasons:
        reasons += head_dim_reasons("x", x.shape[-1], allowed=HEAD_DIMS)
        reasons += gpu_arch_reasons(x, minimum=(8, 9), feature="FP8 quantization (fattn.fp8.quantize)")
    if not isinstance(tokens_contiguous, bool):
        reasons.append(Reason(f"tokens_contiguous must be a bool, got {type(tokens_contiguous).__name__}",
                              TypeError))
    raise_if_unsupported("quantize", reasons)
    return fp8_quantize(x, tokens_contiguous, granularity)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for `torch.nn.functional.scaled_dot_product_attention` on [B, H, N, D] inputs, with
    both products in FP8 (see `fp8_attention`). `attn_mask` and `dropout_p > 0` are not supported
    (a ValueError says so); GQA (Hkv dividing H) needs `enable_gqa=True`, as in PyTorch.
    Causal with Nq != Nk aligns the diagonal bottom right (PyTorch's `is_causal` aligns it top left).
    """
    reasons: list[Reason] = []
    if attn_mask is not None:
        reasons.append(Reason("attn_mask is not supported by fattn.fp8 (use is_causal=True for a causal mask)"))
    if dropout_p != 0.0:
        reasons.append(Reason(f"dropout_p must be 0.0 (no attention dropout in fattn.fp8), got {dropout_p}"))
    if (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and query.dim() == key.dim() == 4
            and query.shape[1] != key.shape[1] and not enable_gqa):
        reasons.append(Reason(f"query has {query.shape[1]} heads and key {key.shape[1]}: pass enable_gqa=True "
                              "for grouped-query attention"))
    raise_if_unsupported("scaled_dot_product_attention", reasons)
    return fp8_attention(query, key, value, causal=is_causal, scale=scale)

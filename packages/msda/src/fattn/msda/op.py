"""Custom ops `fattn::msda_fwd` / `fattn::msda_bwd`, their autograd, and the public function."""

from __future__ import annotations

import torch
import triton.language as tl

from fattn.core import (
    CheckedSignatures,
    Reason,
    TensorCache,
    call_signature,
    choice_reasons,
    empty,
    fused_op,
    head_dim_reasons,
    raise_if_unsupported,
    register_autograd,
    same_device_reasons,
    tensor_reasons,
)
from fattn.core.launch import launcher
from fattn.core.runtime import cdiv, is_compiling, next_power_of_2, seq_bucket, sm_count
from fattn.msda.kernels import msda_bwd_kernel, msda_fwd_kernel, msda_value_grad_kernel

__all__ = ["ms_deform_attn", "msda_fwd", "msda_bwd", "not_supported_reasons", "MSDeformAttnFunction"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
PADDING_MODES = ("zeros", "border")
MAX_HEAD_DIM = 256
MAX_GRID_YZ = 65535  # CUDA's limit on grid dims 1 and 2 (heads, batch)


def _acc_dtype(value: torch.Tensor) -> tl.dtype:
    return tl.float64 if value.dtype == torch.float64 else tl.float32


def _num_slots(dev: torch.device) -> int:
    """SM count (the persistent forward's schedule); 3 under the CPU interpreter (an odd split)."""
    if dev.type == "cuda":
        return sm_count(dev.index if dev.index is not None else torch.cuda.current_device())
    return 3


def _grid(lq: int, m: int, n: int, slots: int, flat: bool = False):  # type: ignore[no-untyped-def]
    """The kernels' grid: persistent, else (query blocks, M, N), or with `flat` (the backward's order)
    (query blocks * M * N,)."""
    def grid(meta: dict) -> tuple[int, ...]:
        if meta["PERSISTENT"]:  # every (slot, program) pair must exist: each owns a share of the tiles
            return (slots * meta["PROGRAMS_PER_SLOT"],)
        if flat:
            return (cdiv(lq, meta["BLOCK_Q"]) * m * n,)
        return (cdiv(lq, meta["BLOCK_Q"]), m, n)

    return grid


_INT32_MAX = 2**31 - 1


def _needs_64bit_offsets(value: torch.Tensor, sampling_locations: torch.Tensor,
                         attention_weights: torch.Tensor, block_q: int = 128) -> bool:
    """Whether the forward must compute element offsets inside one (batch, head) slice in int64.

    Bounds, with no read of the level sizes (no device sync): a corner pixel index lies within
    [-(2W + 2), S_l + 3W + 2] (points are clamped to 2 pixels outside the map), so |pix| <= 4S + 8;
    a padded query index is below Lq + block_q."""
    s, d = value.shape[1], value.shape[3]
    lq = sampling_locations.shape[1] + block_q
    value_span = (4 * s + 8) * value.stride(1) + (d + 1) * value.stride(3)
    loc_span = lq * sampling_locations.stride(1) + sampling_locations.stride(5) + 1
    attn_span = lq * attention_weights.stride(1) + 1
    return max(value_span, loc_span, attn_span) > _INT32_MAX


def _pairs_aligned(t: torch.Tensor, dim: int) -> bool:
    """Whether `t` can be read two adjacent elements of `dim` at a time as one 2x-wide integer load
    (kernels._load_pair): 4- or 2-byte floats, `dim` of even size and unit stride, every other
    stride even and the base aligned to a pair."""
    size = t.element_size()
    return (size in (2, 4) and t.shape[dim] % 2 == 0 and t.stride(dim) == 1
            and all(st % 2 == 0 for i, st in enumerate(t.stride()) if i != dim % t.dim())
            and t.data_ptr() % (2 * size) == 0)


def _paired_loads(sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> tuple[bool, bool]:
    """The forward's PAIRED_LOC (each point's (x, y) in one load) and PAIRED_ATTN (two points' weights
    in one load). Besides shapes, strides and dtypes they depend on the base addresses, which
    call_signature does not see: msda_fwd adds those mod 16 to its launch signature."""
    return _pairs_aligned(sampling_locations, 5), _pairs_aligned(attention_weights, 4)


def _as_index(t: torch.Tensor) -> torch.Tensor:
    if t.dtype is torch.int64 and t.is_contiguous():  # the usual case, without two dispatcher calls
        return t
    return t.to(torch.int64).contiguous()


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
def _fwd_fake(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
              sampling_locations: torch.Tensor, attention_weights: torch.Tensor, padding_mode: str,
              align_corners: bool, deterministic: bool) -> torch.Tensor:
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


@fused_op("msda_fwd", fake=_fwd_fake)
def msda_fwd(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
             sampling_locations: torch.Tensor, attention_weights: torch.Tensor, padding_mode: str,
             align_corners: bool, deterministic: bool) -> torch.Tensor:
    """Forward launch. `deterministic` only matters to the backward; it rides along for autograd."""
    n, _, m, d = value.shape
    lq = sampling_locations.shape[1]
    out = empty((n, lq, m * d), dtype=value.dtype, device=value.device)
    if out.numel() == 0:
        return out
    tensors = (value, _as_index(spatial_shapes), _as_index(level_start_index), sampling_locations,
               attention_weights, out)

    def build() -> tuple:  # what the shapes, strides and flags fix: computed once per signature
        _, _, _, levels, points, _ = sampling_locations.shape
        slots = _num_slots(value.device)
        args = (*tensors, n, lq, m, d, seq_bucket(lq), slots,
                *value.stride(), *sampling_locations.stride(), *attention_weights.stride())
        paired = _paired_loads(sampling_locations, attention_weights)
        return _grid(lq, m, n, slots), args, dict(
            L=levels, P=points, ALIGN_CORNERS=align_corners, BORDER=padding_mode == "border", ACC=_acc_dtype(value),
            BLOCK_D=next_power_of_2(d), OFFSETS_64=_needs_64bit_offsets(value, sampling_locations, attention_weights),
            PAIRED_LOC=paired[0], PAIRED_ATTN=paired[1])

    # (the base addresses mod 16 fix the paired loads' alignment; the rest of _paired_loads follows from
    # the shapes and strides: decided in build, once per signature)
    signature = call_signature(value, sampling_locations, attention_weights, padding_mode, align_corners,
                               sampling_locations.data_ptr() % 16, attention_weights.data_ptr() % 16)
    launcher(msda_fwd_kernel).launch_planned(signature, tensors, build)
    return out


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
def _bwd_fake(grad_out: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
              level_start_index: torch.Tensor, sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
              padding_mode: str, align_corners: bool,
              deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape))


@fused_op("msda_bwd", fake=_bwd_fake)
def msda_bwd(grad_out: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
             level_start_index: torch.Tensor, sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
             padding_mode: str, align_corners: bool,
             deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launch: (grad_value, grad_sampling_locations, grad_attention_weights)."""
    n, s, m, d = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    dev = value.device
    grad_loc = empty(sampling_locations.shape, dtype=sampling_locations.dtype, device=dev)
    grad_attn = empty(attention_weights.shape, dtype=attention_weights.dtype, device=dev)
    if n * lq * m == 0 or s == 0:
        if grad_loc.numel():
            grad_loc.zero_()
            grad_attn.zero_()
        return torch.zeros_like(value, memory_format=torch.contiguous_format), grad_loc, grad_attn

    shapes, starts = _as_index(spatial_shapes), _as_index(level_start_index)
    acc = _acc_dtype(value)
    acc_torch = torch.float64 if value.dtype == torch.float64 else torch.float32
    n_rows = n * m * s
    # Deterministic mode: one (destination row, coefficient) pair per bilinear corner of every point.
    n_corners = n * lq * m * levels * points * 4
    index_dtype = torch.int32 if max(n_rows, n_corners) < 2**31 - 1 else torch.int64
    split = s  # rows [0, split) of the value gradient take atomics in grad_value_buf's dtype, the rest in grad_acc
    if deterministic:
        dest = empty((n_corners,), dtype=index_dtype, device=dev)
        coef = empty((n_corners,), dtype=acc_torch, device=dev)
        grad_value_buf = grad_acc = dest  # unused by the kernel in this mode
    else:
        dest = coef = None
        split = _direct_rows(value, spatial_shapes, level_start_index, lq, points)
        # Rows outside [0, split) accumulate in fp32 (fp16, or bf16 levels whose rows take many
        # contributions): all of them in an fp32 buffer cast at the end, or some in an fp32 scratch.
        grad_value_buf = torch.zeros(value.shape, dtype=value.dtype if split else acc_torch, device=dev)
        grad_acc = (torch.zeros((n, s - split, m, d), dtype=acc_torch, device=dev) if 0 < split < s
                    else grad_value_buf)
    has_scratch = 0 < split < s

    gn, gq, gc = grad_out.stride()
    tensors = (value, shapes, starts, sampling_locations, attention_weights, grad_out, grad_value_buf, grad_acc,
               grad_loc, grad_attn, dest if deterministic else grad_loc, coef if deterministic else grad_loc)

    def build() -> tuple:  # what the shapes, strides and flags fix: computed once per signature
        slots = _num_slots(dev)
        args = (*tensors, n, lq, m, d, s, split, seq_bucket(lq), slots,
                *value.stride(), *sampling_locations.stride(), *attention_weights.stride(), gn, gq, gc)
        return _grid(lq, m, n, slots, flat=True), args, dict(
            L=levels, P=points, ALIGN_CORNERS=align_corners, BORDER=padding_mode == "border", ACC=acc,
            DETERMINISTIC=deterministic, BLOCK_D=next_power_of_2(d), P_BLOCK=next_power_of_2(points),
            SPLIT=has_scratch)

    # (split follows the level sizes' values, which the shapes do not fix: part of the signature)
    signature = call_signature(grad_out, value, sampling_locations, attention_weights, padding_mode, align_corners,
                               deterministic, split)
    launcher(msda_bwd_kernel).launch_planned(signature, tensors, build)
    if not deterministic:
        if has_scratch:
            grad_value_buf[:, split:].copy_(grad_acc)
        grad_value = grad_value_buf if grad_value_buf.dtype == value.dtype else grad_value_buf.to(value.dtype)
        return grad_value, grad_loc, grad_attn

    # Turn the scatter into a gather: a stable sort groups each destination row's contributions in a
    # fixed order, then one program sums BLOCK_R rows.
    sorted_dest, order = torch.sort(dest, stable=True)
    per_source = levels * points * 4
    src = torch.div(order, per_source, rounding_mode="floor").to(index_dtype)
    coef_sorted = coef.index_select(0, order)
    row_start = torch.searchsorted(sorted_dest, torch.arange(n_rows + 1, device=dev, dtype=index_dtype))
    grad_value = empty(value.shape, dtype=value.dtype, device=dev)
    block_r = 16
    launcher(msda_value_grad_kernel)[(cdiv(n_rows, block_r),)](
        row_start, src, coef_sorted, grad_out, grad_value,
        n_rows, lq, m, d, s, gn, gq, gc,
        ACC=acc, BLOCK_R=block_r, BLOCK_D=next_power_of_2(d), num_warps=4,
    )
    return grad_value, grad_loc, grad_attn


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, padding_mode, \
        align_corners, deterministic = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    ctx.padding_mode = padding_mode
    ctx.align_corners = align_corners
    ctx.deterministic = deterministic


def _backward(ctx, grad_out):  # type: ignore[no-untyped-def]
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = msda_bwd(
        grad_out, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        ctx.padding_mode, ctx.align_corners, ctx.deterministic)
    return grad_value, None, None, grad_loc, grad_attn, None, None, None


register_autograd(msda_fwd, setup_context=_setup_context, backward=_backward)


# --------------------------------------------------------------------------------------------
# Validation and the public function
# --------------------------------------------------------------------------------------------
def _reasons(value: object, spatial_shapes: object, level_start_index: object, sampling_locations: object,
             attention_weights: object, padding_mode: object, align_corners: object,
             deterministic: object, check_values: bool) -> list[Reason]:
    out: list[Reason] = []
    out += tensor_reasons("value", value, ndim=4, dtypes=FLOAT_DTYPES)
    # Index tensors: their device is checked against value's below (one message for mixed devices).
    out += tensor_reasons("spatial_shapes", spatial_shapes, ndim=2, dtypes=INDEX_DTYPES, kernel_device=False)
    out += tensor_reasons("level_start_index", level_start_index, ndim=1, dtypes=INDEX_DTYPES, kernel_device=False)
    out += tensor_reasons("sampling_locations", sampling_locations, ndim=6, dtypes=FLOAT_DTYPES)
    out += tensor_reasons("attention_weights", attention_weights, ndim=5, dtypes=FLOAT_DTYPES)
    out += choice_reasons("padding_mode", padding_mode, PADDING_MODES)
    for name, flag in (("align_corners", align_corners), ("deterministic", deterministic)):
        if not isinstance(flag, bool):
            out.append(Reason(f"{name} must be a bool, got {type(flag).__name__} {flag!r}", TypeError))
    if out:  # the checks below read shapes that may not exist
        return out
    assert isinstance(value, torch.Tensor) and isinstance(spatial_shapes, torch.Tensor)
    assert isinstance(level_start_index, torch.Tensor) and isinstance(sampling_locations, torch.Tensor)
    assert isinstance(attention_weights, torch.Tensor)
    out += same_device_reasons(value=value, spatial_shapes=spatial_shapes, level_start_index=level_start_index,
                               sampling_locations=sampling_locations, attention_weights=attention_weights)
    n, s, m, d = value.shape
    levels = spatial_shapes.shape[0]
    if spatial_shapes.shape[1] != 2 or levels < 1:
        out.append(Reason(f"spatial_shapes must have shape [L, 2] (L >= 1 levels as (H, W)), "
                          f"got {list(spatial_shapes.shape)}"))
    if list(level_start_index.shape) != [levels]:
        out.append(Reason(f"level_start_index must have shape [L] = [{levels}] (one start per level of "
                          f"spatial_shapes), got {list(level_start_index.shape)}"))
    loc_shape = list(sampling_locations.shape)
    points = loc_shape[4]
    expected_loc = [n, None, m, levels, None, 2]
    if any(e is not None and e != a for e, a in zip(expected_loc, loc_shape)) or points < 1:
        out.append(Reason(f"sampling_locations must have shape [N, Lq, M, L, P, 2] = [{n}, *, {m}, {levels}, *, 2] "
                          f"(N, M from value, L from spatial_shapes, P >= 1), got {loc_shape}"))
    elif list(attention_weights.shape) != loc_shape[:5]:
        out.append(Reason(f"attention_weights must have shape [N, Lq, M, L, P] = {loc_shape[:5]} (from "
                          f"sampling_locations), got {list(attention_weights.shape)}"))
    out += head_dim_reasons("value", d, maximum=MAX_HEAD_DIM)
    if n > MAX_GRID_YZ or m > MAX_GRID_YZ:
        out.append(Reason(f"value: batch size and number of heads must be at most {MAX_GRID_YZ}, got N={n}, M={m}"))
    if out or not check_values:
        return out
    return _index_reasons(spatial_shapes, level_start_index, s)


# Signatures (fattn.core.call_signature) of ms_deform_attn's arguments whose shape / dtype / device
# checks passed: later calls with the same signature only check the index tensors' values.
_CHECKED = CheckedSignatures()


def _index_reasons(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, s: int) -> list[Reason]:
    """The index tensors' values checked against S, once per pair of tensors (see _CHECKED_INDEX)."""
    if _CHECKED_INDEX.get((spatial_shapes, level_start_index), s) is not None:
        return []
    out, levels = _index_value_reasons(spatial_shapes, level_start_index, s)
    if not out:
        _CHECKED_INDEX.put((spatial_shapes, level_start_index), s, levels)
    return out


# Pairs (spatial_shapes, level_start_index) whose values were checked against an S, with those values
# as ((H, W), start) per level. Deformable DETR passes the same two tensors to every layer: one host
# read per forward instead of one per layer (an in-place change or another S checks them again;
# inference tensors are checked on every call). The backward reads the level sizes from here.
_CHECKED_INDEX: TensorCache[tuple[tuple[tuple[int, int], int], ...]] = TensorCache()


def _index_value_reasons(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                         s: int) -> tuple[list[Reason], tuple[tuple[tuple[int, int], int], ...]]:
    """Checks of the index tensors' values, and the values as ((H, W), start) per level: they read two
    tiny tensors back to the host (a device sync), so they are skipped under torch.compile and for a
    pair already checked (see above)."""
    out: list[Reason] = []
    hw = spatial_shapes.detach().to("cpu", torch.int64)
    starts = level_start_index.detach().to("cpu", torch.int64)
    levels = tuple(((int(h), int(w)), int(st)) for (h, w), st in zip(hw.tolist(), starts.tolist()))
    if bool((hw <= 0).any()):
        out.append(Reason(f"spatial_shapes must hold positive (H, W) pairs, got {hw.tolist()}"))
        return out, levels
    sizes = hw[:, 0] * hw[:, 1]
    if int(sizes.sum()) != s:
        out.append(Reason(f"spatial_shapes {hw.tolist()} cover sum(H * W) = {int(sizes.sum())} positions, "
                          f"but value has S = {s} (value must be [N, S, M, D] with the levels concatenated)"))
    expected_starts = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)[:-1]])
    if not torch.equal(starts, expected_starts):
        out.append(Reason(f"level_start_index must be the running sum of H * W of spatial_shapes, "
                          f"{expected_starts.tolist()}, got {starts.tolist()}"))
    return out, levels


INDEX_VALUES_MESSAGE = ("ms_deform_attn: spatial_shapes must hold positive (H, W) pairs with sum(H * W) == S "
                        "(value's dim 1) and level_start_index their running sum (checked on the device under "
                        "torch.compile; run eagerly for the values found)")


def _assert_index_values(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, s: int) -> None:
    """Under torch.compile: the checks of `_index_value_reasons` as an asynchronous device assert (no host
    read, no graph break). On a GPU a failure stops the CUDA context before the kernels run (no
    out-of-bounds read); on the CPU it raises a RuntimeError with INDEX_VALUES_MESSAGE at once."""
    hw = spatial_shapes.to(torch.int64)
    sizes = hw[:, 0] * hw[:, 1]
    ok = (hw > 0).all() & (sizes.sum() == s) & (level_start_index.to(torch.int64) == sizes.cumsum(0) - sizes).all()
    torch._assert_async(ok, INDEX_VALUES_MESSAGE)


# A bf16 value gradient takes bf16 atomics (half the L2 bytes of fp32 ones: the backward kernel is bound
# by them) on the levels whose rows receive at most this many bilinear contributions on average
# (queries * points * 4 corners over the level's H * W rows). Rounding the running sum to bf16 at each
# of k additions leaves a relative error of about 2**-9 * sqrt(k / 2) per row (~1% at 64, against
# one bf16 rounding's 0.2%); busier levels (the coarse ones) accumulate in fp32.
BF16_DIRECT_MAX_CONTRIBUTIONS = 64


def _direct_rows(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, lq: int,
                 points: int) -> int:
    """How many leading rows of value's gradient (along S) the backward accumulates with atomics in
    value's own dtype; the rest accumulate in fp32 (an fp32 scratch, converted at the end).

    fp32 / fp64: every row. fp16: none (partial sums could overflow where fp32 ones would not). bf16:
    the levels before the first busy one (BF16_DIRECT_MAX_CONTRIBUTIONS), when the level sizes are known
    on the host (read by the forward's checks, see _CHECKED_INDEX); otherwise none."""
    s = value.shape[1]
    if value.dtype in (torch.float32, torch.float64):
        return s
    levels = _CHECKED_INDEX.get((spatial_shapes, level_start_index), s) if value.dtype == torch.bfloat16 else None
    if levels is None:  # fp16, or sizes never read on the host (torch.compile, inference tensors)
        return 0
    for (h, w), start in levels:
        if lq * points * 4 > BF16_DIRECT_MAX_CONTRIBUTIONS * h * w:
            return start
    return s


def not_supported_reasons(value: object, spatial_shapes: object, level_start_index: object,
                          sampling_locations: object, attention_weights: object, padding_mode: object = "zeros",
                          align_corners: object = False, deterministic: object = False) -> list[str]:
    """Why `ms_deform_attn` would refuse these inputs (readable strings); empty when they are fine."""
    return [r.message for r in _reasons(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights, padding_mode, align_corners, deterministic,
                                        check_values=True)]


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    padding_mode: str = "zeros",
    align_corners: bool = False,
    deterministic: bool = False,
) -> torch.Tensor:
    """Multiscale deformable attention (Deformable DETR's `MSDeformAttnFunction`).

    Args:
        value: [N, S, M, D], the L feature levels flattened row-major and concatenated along S.
            fp16, bf16, fp32 or fp64. D <= 256, any value (not only powers of two).
        spatial_shapes: [L, 2] int64/int32, (H, W) of each level; sum(H * W) == S.
        level_start_index: [L] int64/int32, offset of each level in S (0, H0*W0, ...).
        sampling_locations: [N, Lq, M, L, P, 2] (x, y) in [0, 1], (0, 0) the top-left corner of the map.
            Any floating dtype (need not match value); points may lie outside [0, 1].
        attention_weights: [N, Lq, M, L, P], used as given (not normalized here). Any floating dtype.
        padding_mode: "zeros" (samples outside read 0, as in Deformable DETR) or "border".
        align_corners: grid_sample's flag; False (the default) matches Deformable DETR.
        deterministic: the backward gives the same bits on every run (a sort-based value gradient,
            slower than the default atomics one: fp32 atomics, and for bf16 inputs bf16 ones on the
            levels whose rows take few contributions, see BF16_DIRECT_MAX_CONTRIBUTIONS).

    Returns:
        [N, Lq, M * D] in value's dtype. Gradients flow to value, sampling_locations and
        attention_weights, in their own dtypes.
    """
    signature = call_signature(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                               padding_mode, align_corners, deterministic)
    if is_compiling():
        # The host cannot read the index tensors inside a graph: check their values on the device instead.
        _assert_index_values(spatial_shapes, level_start_index, value.shape[1])
    if signature in _CHECKED:  # the same shapes, dtypes and devices passed before: only the values are new
        if not is_compiling():
            raise_if_unsupported("ms_deform_attn", _index_reasons(spatial_shapes, level_start_index, value.shape[1]))
    else:
        raise_if_unsupported("ms_deform_attn", _reasons(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, padding_mode,
            align_corners, deterministic, check_values=not is_compiling()))
        _CHECKED.add(signature)
    return msda_fwd(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                    padding_mode, align_corners, deterministic)


class MSDeformAttnFunction:
    """Drop-in for Deformable DETR's `MSDeformAttnFunction`: `MSDeformAttnFunction.apply(value,
    spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step)`.

    `im2col_step` is accepted and ignored: there is no batch-divisibility rule here.
    """

    @staticmethod
    def apply(value: torch.Tensor, value_spatial_shapes: torch.Tensor, value_level_start_index: torch.Tensor,
              sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
              im2col_step: int | None = None) -> torch.Tensor:
        return ms_deform_attn(value, value_spatial_shapes, value_level_start_index, sampling_locations,
                              attention_weights)

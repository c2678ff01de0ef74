"""Bad inputs raise TypeError/ValueError naming the argument, what was expected and what was given."""

from __future__ import annotations

import pytest
import torch

from fattn.core.testing import device
from fattn.msda import ms_deform_attn, not_supported_reasons

from .test_msda import make_inputs


def _index(values: list) -> torch.Tensor:
    """An int64 index tensor on the test device: index tensors must sit on value's device (a CPU
    index tensor beside a CUDA value is refused by test_mixed_devices; here the check under test
    must be the one that fires)."""
    return torch.tensor(values, dtype=torch.int64, device=device())


def _good() -> dict:
    return make_inputs(2, 5, 2, 4, [(3, 4), (2, 2)], 2, torch.float32)


def _expect(error: type[Exception], match: str, **changes: object) -> None:
    inputs = {**_good(), **changes}
    opts = {k: inputs.pop(k) for k in ("padding_mode", "align_corners", "deterministic") if k in inputs}
    assert not_supported_reasons(**inputs, **opts), "not_supported_reasons should report the problem"
    with pytest.raises(error, match=match):
        ms_deform_attn(**inputs, **opts)


def test_good_inputs_have_no_reasons() -> None:
    assert not_supported_reasons(**_good()) == []


def test_value_wrong_rank() -> None:
    v = _good()["value"]
    _expect(ValueError, r"value must be 4-D", value=v.flatten(2))


def test_value_wrong_dtype() -> None:
    v = _good()["value"]
    _expect(TypeError, r"value must have dtype in .*got int64", value=v.to(torch.int64))


def test_spatial_shapes_float() -> None:
    s = _good()["spatial_shapes"]
    _expect(TypeError, r"spatial_shapes must have dtype in \(int32, int64\), got float32", spatial_shapes=s.float())


def test_shapes_do_not_sum_to_S() -> None:
    s = _good()["spatial_shapes"].clone()
    s[0, 1] = 5  # 3x5 + 2x2 = 19 != 16
    _expect(ValueError, r"cover sum\(H \* W\) = 19 positions, but value has S = 16", spatial_shapes=s,
            level_start_index=_index([0, 15]))


def test_level_start_index_inconsistent() -> None:
    _expect(ValueError, r"level_start_index must be the running sum .*\[0, 12\], got \[0, 11\]",
            level_start_index=_index([0, 11]))


def test_level_start_index_wrong_length() -> None:
    _expect(ValueError, r"level_start_index must have shape \[L\] = \[2\]", level_start_index=_index([0]))


def test_spatial_shapes_wrong_columns() -> None:
    s = _index([[3, 4, 1], [2, 2, 1]])
    _expect(ValueError, r"spatial_shapes must have shape \[L, 2\] .*got \[2, 3\]", spatial_shapes=s)


def test_level_start_index_2d() -> None:
    _expect(ValueError, r"level_start_index must be 1-D, got 2-D", level_start_index=_index([[0, 12]]))


def test_sampling_locations_last_dim_not_2() -> None:
    loc = _good()["sampling_locations"]
    loc3 = torch.cat([loc, loc[..., :1]], dim=-1)
    _expect(ValueError, r"sampling_locations must have shape \[N, Lq, M, L, P, 2\] .*got \[2, 5, 2, 2, 2, 3\]",
            sampling_locations=loc3)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("name", ["sampling_locations", "attention_weights"])
def test_integer_locations_or_weights(name: str, dtype: torch.dtype) -> None:
    t = _good()[name]
    _expect(TypeError, rf"{name} must have dtype in \(.*\), got {str(dtype).removeprefix('torch.')}",
            **{name: t.to(dtype)})


def test_nonpositive_level() -> None:
    s = _index([[4, 4], [0, 3]])
    _expect(ValueError, r"spatial_shapes must hold positive", spatial_shapes=s)


def test_sampling_locations_wrong_levels() -> None:
    loc = _good()["sampling_locations"]
    _expect(ValueError, r"sampling_locations must have shape \[N, Lq, M, L, P, 2\]", sampling_locations=loc[:, :, :, :1])


def test_sampling_locations_wrong_batch() -> None:
    loc = _good()["sampling_locations"]
    _expect(ValueError, r"sampling_locations must have shape .*got \[1, ", sampling_locations=loc[:1])


def test_attention_weights_wrong_points() -> None:
    a = _good()["attention_weights"]
    _expect(ValueError, r"attention_weights must have shape \[N, Lq, M, L, P\] = \[2, 5, 2, 2, 2\]",
            attention_weights=a[..., :1])


def test_head_dim_too_large() -> None:
    inputs = make_inputs(1, 3, 1, 300, [(2, 2)], 1, torch.float32)
    with pytest.raises(ValueError, match=r"value: head dim must be between 1 and 256, got 300"):
        ms_deform_attn(**inputs)


def test_bad_padding_mode() -> None:
    _expect(ValueError, r"padding_mode must be one of 'zeros', 'border'; got 'reflection'", padding_mode="reflection")


def test_align_corners_not_bool() -> None:
    _expect(TypeError, r"align_corners must be a bool", align_corners=1)


def test_not_a_tensor() -> None:
    _expect(TypeError, r"attention_weights must be a torch.Tensor, got list", attention_weights=[1.0])


def test_wrong_device() -> None:
    # 'meta' stands in for any device the kernels cannot run on (a CPU tensor on a GPU run, ...).
    v = _good()["value"]
    _expect(ValueError, r"value", value=torch.empty(v.shape, device="meta"))


@pytest.mark.gpu
def test_mixed_devices() -> None:
    inputs = _good()
    _expect(ValueError, r"all tensors must be on one device", spatial_shapes=inputs["spatial_shapes"].cpu())


def test_several_problems_listed_together() -> None:
    inputs = _good()
    with pytest.raises(TypeError, match=r"2 problems"):
        ms_deform_attn(**{**inputs, "value": inputs["value"].int(), "padding_mode": "nope"})


def test_index_values_read_once_per_tensor_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host read of spatial_shapes / level_start_index (a device sync) happens once for a pair of
    tensors, not on every layer's call; an in-place change or another S is checked again."""
    from fattn.msda import op

    reads = []
    check = op._index_value_reasons
    monkeypatch.setattr(op, "_index_value_reasons", lambda *a: reads.append(1) or check(*a))
    inputs = _good()
    with torch.no_grad():
        ms_deform_attn(**inputs)
        ms_deform_attn(**inputs)
        assert len(reads) == 1
        ms_deform_attn(**{**inputs, "level_start_index": inputs["level_start_index"].clone()})
        assert len(reads) == 2, "another level_start_index tensor must be read again"
        inputs["spatial_shapes"][0, 1] = 5  # in place: 3x5 + 2x2 = 19 != 16
        with pytest.raises(ValueError, match=r"cover sum\(H \* W\) = 19 positions"):
            ms_deform_attn(**inputs)


def test_index_values_checked_under_inference_mode() -> None:
    """Inference tensors carry no version counter: their values are read on every call."""
    with torch.inference_mode():
        inputs = _good()
        ms_deform_attn(**inputs)
        inputs["level_start_index"][1] = 11
        with pytest.raises(ValueError, match=r"level_start_index must be the running sum"):
            ms_deform_attn(**inputs)


def test_checked_signature_still_checks_index_values() -> None:
    """A call with the shapes, dtypes and devices of an accepted one skips the metadata checks, not the
    check of the index tensors' values: new index tensors with wrong values are still refused."""
    good = _good()
    ms_deform_attn(**good)
    ms_deform_attn(**good)  # the signature is now a checked one
    bad = {**good, "level_start_index": _index([0, 11])}
    with pytest.raises(ValueError, match="level_start_index must be the running sum"):
        ms_deform_attn(**bad)
    bad = {**good, "spatial_shapes": _index([[3, 4], [1, 2]])}
    with pytest.raises(ValueError, match="cover sum"):
        ms_deform_attn(**bad)


@pytest.mark.parametrize("bad", ["shapes_sum", "nonpositive", "starts"])
def test_index_values_checked_under_compile(bad: str) -> None:
    """torch.compile(fullgraph=True) cannot read the index tensors on the host: their values are
    asserted on the device instead (a RuntimeError on the CPU; on a GPU a device-side assert, which
    would end the test process's CUDA context, so CPU only)."""
    if device().type == "cuda":
        pytest.skip("a failed device assert ends the CUDA context: checked on the CPU")
    from fattn.msda.op import INDEX_VALUES_MESSAGE

    torch._dynamo.reset()
    compiled = torch.compile(ms_deform_attn, fullgraph=True)
    inputs = make_inputs(1, 5, 2, 4, [(3, 4), (2, 1)], 2, torch.float32)
    args = [inputs[k] for k in ("value", "spatial_shapes", "level_start_index", "sampling_locations",
                                "attention_weights")]
    torch.testing.assert_close(compiled(*args), ms_deform_attn(*args), rtol=0, atol=0)
    if bad == "shapes_sum":  # (3, 4) + (2, 2) covers 16 positions, value has 14
        args[1] = torch.tensor([[3, 4], [2, 2]], dtype=args[1].dtype, device=args[1].device)
    elif bad == "nonpositive":  # (7, 2) + (0, 5) covers 14, but a level is empty
        args[1] = torch.tensor([[7, 2], [0, 5]], dtype=args[1].dtype, device=args[1].device)
    else:
        args[2] = torch.tensor([0, 13], dtype=args[2].dtype, device=args[2].device)
    with pytest.raises(RuntimeError, match="spatial_shapes must hold positive"):
        compiled(*args)
    assert "level_start_index" in INDEX_VALUES_MESSAGE

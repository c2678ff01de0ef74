"""MSDeformAttn: Deformable DETR's parameters, state-dict keys, initialization and forward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fattn.core.testing import assert_close, device, rand, randn
from fattn.msda import MSDeformAttn, ms_deform_attn_reference

from .test_msda import level_tensors

# Deformable DETR's MSDeformAttn(256, 4, 8, 4) state dict.
DETR_KEYS = {
    "sampling_offsets.weight": (256, 256), "sampling_offsets.bias": (256,),
    "attention_weights.weight": (128, 256), "attention_weights.bias": (128,),
    "value_proj.weight": (256, 256), "value_proj.bias": (256,),
    "output_proj.weight": (256, 256), "output_proj.bias": (256,),
}


def test_state_dict_keys_and_shapes_match_deformable_detr() -> None:
    m = MSDeformAttn(256, 4, 8, 4)
    sd = m.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == DETR_KEYS
    # A checkpoint saved from the original loads unchanged (strict).
    m2 = MSDeformAttn(256, 4, 8, 4)
    m2.load_state_dict({k: torch.randn(v) for k, v in DETR_KEYS.items()}, strict=True)


def test_initialization_matches_deformable_detr() -> None:
    m = MSDeformAttn(64, 2, 4, 3)
    assert float(m.sampling_offsets.weight.detach().abs().sum()) == 0.0
    bias = m.sampling_offsets.bias.view(4, 2, 3, 2)
    # Head h points along angle 2*pi*h/4, scaled so the larger coordinate is 1, times (point + 1).
    assert torch.allclose(bias[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(bias[1, 1, 2], torch.tensor([0.0, 3.0]), atol=1e-6)
    assert float(m.attention_weights.weight.detach().abs().sum()) == 0.0


def test_d_model_not_divisible_raises() -> None:
    with pytest.raises(ValueError, match="d_model must be divisible by n_heads"):
        MSDeformAttn(30, 2, 4, 2)


def _reference_forward(m: MSDeformAttn, query, ref_points, flat, shapes, starts, mask):  # type: ignore[no-untyped-def]
    """Deformable DETR's forward with the grid_sample reference, in float64."""
    m = copy.deepcopy(m).double()
    n, lq, _ = query.shape
    value = m.value_proj(flat)
    if mask is not None:
        value = value.masked_fill(mask[..., None], 0.0)
    value = value.view(n, flat.shape[1], m.n_heads, -1)
    off = m.sampling_offsets(query).view(n, lq, m.n_heads, m.n_levels, m.n_points, 2)
    w = F.softmax(m.attention_weights(query).view(n, lq, m.n_heads, -1), -1).view(n, lq, m.n_heads, m.n_levels,
                                                                                  m.n_points)
    if ref_points.shape[-1] == 2:
        norm = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
        loc = ref_points[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
    else:
        loc = ref_points[:, :, None, :, None, :2] + off / m.n_points * ref_points[:, :, None, :, None, 2:] * 0.5
    return m.output_proj(ms_deform_attn_reference(value, shapes, starts, loc, w))


@pytest.mark.parametrize("coords", [2, 4], ids=["points", "boxes"])
def test_forward_matches_reference(coords: int) -> None:
    levels = [(5, 3), (2, 4)]
    shapes, starts, S = level_tensors(levels)
    m = MSDeformAttn(24, len(levels), 2, 2).to(device())
    with torch.no_grad():  # non-trivial offsets and weights
        m.sampling_offsets.weight.normal_(0, 0.3)
        m.attention_weights.weight.normal_(0, 0.3)
    n, lq = 2, 7
    query = randn([n, lq, 24])
    flat = randn([n, S, 24])
    ref_points = rand([n, lq, len(levels), coords], low=0.1, high=0.9)
    mask = torch.zeros(n, S, dtype=torch.bool, device=device())
    mask[1, -3:] = True
    out = m(query, ref_points, flat, shapes, starts, mask)
    ref = _reference_forward(m, query.double(), ref_points.double(), flat.double(), shapes, starts, mask)
    assert out.shape == (n, lq, 24)
    assert_close("module out", out, ref, floor=1e-5)
    out.sum().backward()
    assert m.sampling_offsets.weight.grad is not None and m.value_proj.weight.grad.abs().sum() > 0


def test_bad_reference_points() -> None:
    shapes, starts, S = level_tensors([(3, 3)])
    m = MSDeformAttn(8, 1, 2, 1).to(device())
    with pytest.raises(ValueError, match="reference_points: last dim must be 2"):
        m(randn([1, 2, 8]), randn([1, 2, 1, 3]), randn([1, S, 8]), shapes, starts)

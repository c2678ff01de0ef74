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


def test_pixel_offsets_are_normalized_by_width_and_height() -> None:
    """Offsets are in pixels of each level: +1 in x moves a point by 1/W, +1 in y by 1/H (not the
    other way round). One non-square level whose values are ramps in x and in y, identity projections
    and one point per head (its softmax weight is 1): the output reads the sampled pixel coordinates."""
    h, w = 3, 7
    shapes, starts, S = level_tensors([(h, w)])
    m = MSDeformAttn(4, 1, 2, 1).to(device())  # two heads of dim 2: (x ramp, y ramp) each
    with torch.no_grad():
        for proj in (m.value_proj, m.output_proj):
            proj.weight.copy_(torch.eye(4))
            proj.bias.zero_()
        m.sampling_offsets.weight.zero_()
        m.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0]))  # head 0: +1 px in x; head 1: +1 px in y
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    ramp = torch.stack([xs, ys], -1).reshape(1, S, 2).repeat(1, 1, 2).to(device())  # [x, y, x, y] per pixel
    n, lq = 1, 9
    # Reference points whose shifted samples stay inside the map, where bilinear sampling of a ramp is exact.
    ref_points = torch.stack([rand([n, lq, 1], low=0.1, high=0.6), rand([n, lq, 1], low=0.2, high=0.5)], -1)
    with torch.no_grad():
        out = m(randn([n, lq, 4]), ref_points, ramp, shapes, starts)
    # pixel coordinates of a normalized location (align_corners=False): x * W - 0.5, y * H - 0.5
    px = ref_points[..., 0, 0] * w - 0.5
    py = ref_points[..., 0, 1] * h - 0.5
    expected = torch.stack([px + 1, py, px, py + 1], -1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)


def test_bad_reference_points() -> None:
    shapes, starts, S = level_tensors([(3, 3)])
    m = MSDeformAttn(8, 1, 2, 1).to(device())
    with pytest.raises(ValueError, match="reference_points: last dim must be 2"):
        m(randn([1, 2, 8]), randn([1, 2, 1, 3]), randn([1, S, 8]), shapes, starts)

"""The cos / sin tables are cached per angle table, and an in-place change of the angles is seen."""

from __future__ import annotations

import torch

from fattn.core.testing import device
from fattn.rope2d import axial_angles, rope2d_attention
from fattn.rope2d.reference import rope2d_attention_reference


def test_changed_angles_give_new_tables() -> None:
    torch.manual_seed(0)
    side, prefix, D = 3, 1, 16
    q, k, v = (torch.randn(1, 2, prefix + side * side, D, device=device()) for _ in range(3))
    angles = axial_angles(side, side, D, device=device())
    first = rope2d_attention(q, k, v, angles, n_prefix=prefix)
    torch.testing.assert_close(first, rope2d_attention(q, k, v, angles, n_prefix=prefix), rtol=0, atol=0)
    with torch.no_grad():
        angles.mul_(-1.5)  # in place: the cached tables are stale now
    got = rope2d_attention(q, k, v, angles, n_prefix=prefix)
    want = rope2d_attention_reference(q.double(), k.double(), v.double(), angles.double(), n_prefix=prefix)
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3)
    assert (got - first).abs().max() > 1e-3

"""SlidingWindowBlockAttention: matches projections + reference attention, trains, and caches KV."""

from __future__ import annotations

import torch

from fattn.core.testing import device, on_gpu, randn
from fattn.swba import SlidingWindowBlockAttention, swba_attention_reference

# fp32 matmuls run in TF32 on a GPU (in the kernel, not in the reference); exact under the interpreter.
TOL = 1e-2 if on_gpu() else 5e-5


def _reference_forward(m: SlidingWindowBlockAttention, x: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    q = m.q_norm(m.q_proj(x).view(b, n, m.num_heads, m.head_dim)).transpose(1, 2)
    kv = m.kv_proj(x).view(b, n, 2, m.num_kv_heads, m.head_dim)
    k = m.k_norm(kv[:, :, 0]).transpose(1, 2)
    v = kv[:, :, 1].transpose(1, 2)
    out = swba_attention_reference(q, k, v, m.frame_size, m.window)
    return m.out_proj(out.transpose(1, 2).reshape(b, n, c))


def test_module_matches_reference_and_backprops() -> None:
    m = SlidingWindowBlockAttention(32, 4, frame_size=6, window=2, num_kv_heads=2, qk_norm=True, device=device())
    x = randn([2, 27, 32], requires_grad=True)
    out = m(x)
    ref = _reference_forward(m, x)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, m.q_proj.weight, m.kv_proj.weight], g)
    ref_grads = torch.autograd.grad(ref, [x, m.q_proj.weight, m.kv_proj.weight], g)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, atol=TOL, rtol=TOL)


def test_module_kv_cache_frame_by_frame() -> None:
    """Feeding frames one at a time with the cache gives the same tokens as one full pass."""
    m = SlidingWindowBlockAttention(16, 2, frame_size=5, window=2, device=device())
    x = randn([1, 15, 16])
    with torch.no_grad():
        full = m(x)
        cache = None
        outs = []
        for f in range(3):
            out, cache = m(x[:, 5 * f: 5 * f + 5], past_kv=cache, use_cache=True)
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=TOL, rtol=TOL)
    assert cache[0].shape == (1, 2, 15, 8)


def test_module_rejects_bad_config() -> None:
    import pytest

    with pytest.raises(ValueError, match="divisible by num_heads"):
        SlidingWindowBlockAttention(30, 4, frame_size=4, window=2)
    with pytest.raises(ValueError, match="window must be >= 1"):
        SlidingWindowBlockAttention(32, 4, frame_size=4, window=0)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        SlidingWindowBlockAttention(32, 4, frame_size=4, window=1, num_kv_heads=3)
    m = SlidingWindowBlockAttention(32, 4, frame_size=4, window=1)
    with pytest.raises(ValueError, match=r"x must have shape \[B, N, 32\]"):
        m(torch.zeros(2, 5, 16))

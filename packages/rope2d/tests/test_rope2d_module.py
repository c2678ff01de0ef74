"""RoPE2dAttention: the ViT attention block, against the same block written in PyTorch."""

from __future__ import annotations

import pytest
import torch

from fattn.core.testing import assert_close, device, on_gpu
from fattn.rope2d import RoPE2dAttention, axial_angles, use_grid_size
from fattn.rope2d.reference import rope2d_attention_reference


def _reference_block(m: RoPE2dAttention, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    b, n, c = x.shape
    qkv = m.qkv(x).reshape(b, n, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = m.q_norm(qkv[0]), m.k_norm(qkv[1]), qkv[2]
    angles = axial_angles(*grid, m.head_dim, base=m.base, axis_order=m.axis_order, device=x.device).to(x.dtype)
    out = rope2d_attention_reference(q, k, v, angles, n_prefix=m.n_prefix, pairing=m.pairing, scale=m.scale)
    return m.proj(out.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("grid,n_prefix,qk_norm", [((3, 5), 1, False), ((4, 4), 5, True), ((2, 7), 0, False)])
def test_module_matches_reference_block(grid: tuple[int, int], n_prefix: int, qk_norm: bool) -> None:
    torch.manual_seed(0)
    m = RoPE2dAttention(48, num_heads=3, qkv_bias=True, qk_norm=qk_norm, n_prefix=n_prefix).to(device())
    x = torch.randn(2, n_prefix + grid[0] * grid[1], 48, device=device(), requires_grad=True)
    square = grid[0] == grid[1]
    out = m(x) if square else m(x, grid_size=grid)  # a square grid is inferred; otherwise given at call time
    m64 = RoPE2dAttention(48, num_heads=3, qkv_bias=True, qk_norm=qk_norm, n_prefix=n_prefix).to(device()).double()
    m64.load_state_dict(m.state_dict())
    x64 = x.detach().double().requires_grad_(True)
    ref = _reference_block(m64, x64, grid)
    assert_close("out", out, ref)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (gx64,) = torch.autograd.grad(ref, x64, g.double())
    assert_close("grad_x", gx, gx64)


def test_module_grid_changes_between_calls() -> None:
    m = RoPE2dAttention(32, num_heads=2, n_prefix=1).to(device())
    for grid in ((3, 4), (5, 2)):
        x = torch.randn(1, 1 + grid[0] * grid[1], 32, device=device())
        assert m(x, grid_size=grid).shape == x.shape


def test_module_errors() -> None:
    m = RoPE2dAttention(32, num_heads=2, n_prefix=1).to(device())
    x = torch.randn(1, 1 + 12, 32, device=device())
    with pytest.raises(ValueError, match="grid_size is required"):
        m(x)
    with pytest.raises(ValueError, match="N must equal n_prefix"):
        m(x, grid_size=(3, 5))
    with pytest.raises(ValueError, match="attn_mask is not supported"):
        m(x, torch.zeros(13, 13, device=device()), grid_size=(3, 4))
    with pytest.raises(ValueError, match="is_causal must be False"):
        m(x, is_causal=True, grid_size=(3, 4))
    with pytest.raises(ValueError, match="multiple of 4"):
        RoPE2dAttention(36, num_heads=6)


def test_from_timm_attention() -> None:
    """Replace a timm ViT block's attention; without RoPE angles (all zero) it must equal timm's output."""
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import Attention

    torch.manual_seed(0)
    attn = Attention(64, num_heads=4, qkv_bias=True).to(device())
    ours = RoPE2dAttention.from_timm(attn, n_prefix=1)
    x = torch.randn(2, 1 + 3 * 4, 64, device=device())
    zero = torch.zeros(12, 8, device=device())
    torch.testing.assert_close(ours(x, angles=zero), attn(x), atol=5e-3 if on_gpu() else 1e-5, rtol=2e-3)
    assert ours.qkv is attn.qkv and ours.proj is attn.proj
    del timm


class _ReferenceAttention(torch.nn.Module):
    """`_reference_block` of a RoPE2dAttention's weights on a fixed grid, callable as a timm block's attention."""

    def __init__(self, m: RoPE2dAttention, grid: tuple[int, int]) -> None:
        super().__init__()
        self.m, self.grid = m, grid

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        return _reference_block(self.m, x, self.grid)


class _Block(torch.nn.Module):
    """timm's ViT Block as far as attention sees it: x + attn(norm(x), attn_mask=None, is_causal=False) (timm
    >= 1.0.20 passes both), no grid argument."""

    def __init__(self, attn: torch.nn.Module, dim: int) -> None:
        super().__init__()
        self.norm1, self.attn = torch.nn.LayerNorm(dim), attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm1(x), attn_mask=None, is_causal=False)


def test_use_grid_size_reaches_blocks_that_pass_no_grid() -> None:
    """A model whose blocks call attention without a grid (as timm's do) runs a non-square grid inside
    `use_grid_size`, equal to the reference block on that grid; outside it the square rule applies again."""
    torch.manual_seed(0)
    grid = (3, 5)
    model = torch.nn.Sequential(*[_Block(RoPE2dAttention(32, num_heads=2, n_prefix=1), 32) for _ in range(2)])
    model = model.to(device())
    x = torch.randn(2, 1 + grid[0] * grid[1], 32, device=device())
    with use_grid_size(model, grid):
        out = model(x)
        assert all(b.attn.grid_size == grid for b in model)
    assert all(b.attn.grid_size is None for b in model)
    with pytest.raises(ValueError, match="grid_size is required"):
        model(x)
    reference = torch.nn.Sequential(*[_Block(_ReferenceAttention(b.attn, grid), 32) for b in model])
    for b_ref, b in zip(reference, model):
        b_ref.norm1 = b.norm1
    with torch.no_grad():
        ref = reference(x)
    torch.testing.assert_close(out, ref, atol=5e-3 if on_gpu() else 1e-4, rtol=2e-3 if on_gpu() else 1e-4)
    with pytest.raises(ValueError, match="two positive ints"):
        with use_grid_size(model, (3, 0)):
            pass


def test_module_in_timm_vision_transformer_non_square() -> None:
    """The README's use: RoPE2dAttention in every block of a timm VisionTransformer with dynamic image size,
    a non-square image, the grid given by `use_grid_size`; against the same model with the reference
    attention (RoPE angles on, not zero)."""
    pytest.importorskip("timm")
    import copy

    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=48, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=0,
                            dynamic_img_size=True).to(device())
    for block in vit.blocks:
        block.attn = RoPE2dAttention.from_timm(block.attn, n_prefix=vit.num_prefix_tokens)
    grid = (3, 5)  # a 48 x 80 image in 16-pixel patches
    reference = copy.deepcopy(vit)
    for block in reference.blocks:
        block.attn = _ReferenceAttention(block.attn, grid)
    image = torch.randn(2, 3, 16 * grid[0], 16 * grid[1], device=device())
    with torch.no_grad(), use_grid_size(vit, grid):
        out = vit.forward_features(image)
    with torch.no_grad():
        ref = reference.forward_features(image)
    assert out.shape == (2, vit.num_prefix_tokens + grid[0] * grid[1], 64)
    torch.testing.assert_close(out, ref, atol=5e-3 if on_gpu() else 1e-4, rtol=2e-3 if on_gpu() else 1e-4)


def test_module_compiles_fullgraph() -> None:
    from fattn.core.testing import compile_backend

    torch._dynamo.reset()
    m = RoPE2dAttention(32, num_heads=2, n_prefix=1).to(device())
    x = torch.randn(1, 1 + 3 * 4, 32, device=device(), requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend=compile_backend())
    out = compiled(x, grid_size=(3, 4))
    torch.testing.assert_close(out, m(x, grid_size=(3, 4)), atol=1e-4, rtol=1e-4)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()

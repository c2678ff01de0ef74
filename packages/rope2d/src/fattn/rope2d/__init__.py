"""fattn-rope2d: flash attention with 2D axial RoPE fused in, for ViT patch grids (Triton).

    from fattn.rope2d import rope2d_attention, axial_angles
    angles = axial_angles(14, 14, 64, device="cuda")          # [196, 32] fp32
    out = rope2d_attention(q, k, v, angles, n_prefix=1)        # q, k, v: [B, H, 1 + 196, 64]
"""

from fattn.rope2d.module import RoPE2dAttention, use_grid_size
from fattn.rope2d.op import axial_angles, not_supported_reasons, rope2d_attention

__version__ = "0.1.0.dev0"

__all__ = ["RoPE2dAttention", "axial_angles", "not_supported_reasons", "rope2d_attention", "use_grid_size",
           "__version__"]

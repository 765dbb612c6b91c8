"""The two layer pieces the vision tower (notebooks 05–07) and the text decoder (notebook 09) share,
written once: RMSNorm and the rotate-half rotary embedding."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(mean(x²) + eps) × weight``, computed in fp32 and cast back (mirrors
    ``Qwen2_5_VLRMSNorm.forward``; pass a norm module's ``weight`` and ``variance_epsilon``)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` for ``x = [x1, x2]`` split in half on the last axis: pairs (i, i + d/2) are the
    rotated planes (mirrors ``modeling_qwen2_5_vl.rotate_half``)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x·cos + rotate_half(x)·sin`` with the heads axis (dim 1 of ``x``) inserted into ``cos``/``sin``:
    the tower's (N, heads, d) with (N, d) angles, the decoder's (B, heads, L, d) with (B, L, d).
    Mirrors one tensor of ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)

"""helpers.layers: RMSNorm and the rotary embedding, equal to transformers' Qwen2.5-VL pieces."""

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLRMSNorm,
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_vision,
    rotate_half,
)

from helpers.layers import apply_rotary, rms_norm
from helpers.layers import rotate_half as ours_rotate_half


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_qwen_rmsnorm(dtype):
    generator = torch.Generator().manual_seed(0)
    norm = Qwen2_5_VLRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=generator))
    x = (torch.randn(3, 7, 64, generator=generator) * 5).to(dtype)
    torch.testing.assert_close(rms_norm(x, norm.weight, norm.variance_epsilon), norm(x), rtol=0, atol=0)


def test_rotary_equals_the_decoder_and_tower_versions():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 16, generator=generator), torch.randn(2, 2, 5, 16, generator=generator)
    angles = torch.randn(2, 5, 16, generator=generator)
    assert torch.equal(ours_rotate_half(q), rotate_half(q))
    theirs_q, theirs_k = apply_rotary_pos_emb(q, k, angles.cos(), angles.sin(), unsqueeze_dim=1)
    torch.testing.assert_close(apply_rotary(q, angles.cos(), angles.sin()), theirs_q, rtol=0, atol=0)
    torch.testing.assert_close(apply_rotary(k, angles.cos(), angles.sin()), theirs_k, rtol=0, atol=0)
    patches, tower_angles = torch.randn(9, 4, 16, generator=generator), torch.randn(9, 16, generator=generator)
    tower_q, _ = apply_rotary_pos_emb_vision(patches, patches, tower_angles.cos(), tower_angles.sin())
    torch.testing.assert_close(apply_rotary(patches, tower_angles.cos(), tower_angles.sin()), tower_q, rtol=0, atol=0)

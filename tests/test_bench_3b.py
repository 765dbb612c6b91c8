"""scripts/bench_3b.py: its model-FLOP count against torch's FlopCounterMode on one training step of a
tiny config (the matmul part; attention is counted analytically, FlopCounterMode skips masked sdpa on
the CPU), and the packed rows it trains on."""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_3b  # noqa: E402

from helpers.qwen import course_config  # noqa: E402

CONFIG = course_config(text_hidden=64, text_layers=2, text_mlp=128, vision_hidden=32, vision_depth=4, vision_mlp=64)


@pytest.fixture(scope="module")
def rows():
    return bench_3b.packed_rows(bench_3b.SHAPES["tiny"], 2)


def test_packed_rows_fill_their_budget(rows):
    budget = bench_3b.SHAPES["tiny"]["budget"]
    for row in rows:
        total = int(row["seq_lengths"].sum())
        assert 0.9 * budget <= total <= budget and row["position_ids"].shape == (4, 1, total)


@pytest.mark.parametrize("mode, low, high", [("full", 0.99, 1.0), ("lora", 1.0, 1.02)])
def test_step_flops_match_the_counted_matmuls(rows, mode, low, high):
    """Full: the counted matmuls are 0.1 % fewer (the patch embed needs no input gradient);
    LoRA: 1 % more (the adapters' own matmuls, left out of the model FLOPs)."""
    device = torch.device("cpu")
    model, optimizer = bench_3b.build(CONFIG, mode, device)
    with FlopCounterMode(display=False) as counter:
        bench_3b.step(model, optimizer, rows[0], mode, device, amp=False)
    flops = bench_3b.step_flops(CONFIG, rows[0], mode)
    matmuls = flops["total"] - flops["lm_attention"] - flops["vision_attention"]
    assert low <= counter.get_total_flops() / matmuls <= high


def test_recompute_is_the_checkpointed_forward(rows):
    """With activation checkpointing every trained block runs its forward twice: the counted matmuls
    grow by ``recompute`` (less its attention share, which FlopCounterMode does not see here)."""
    device = torch.device("cpu")
    model, optimizer = bench_3b.build(CONFIG, "full", device)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with FlopCounterMode(display=False) as counter:
        bench_3b.step(model, optimizer, rows[0], "full", device, amp=False)
    flops = bench_3b.step_flops(CONFIG, rows[0], "full", checkpointing=True)
    attention = flops["lm_attention"] + flops["vision_attention"]
    expected = flops["total"] - attention + flops["recompute"] - attention / 3
    assert 0.98 <= counter.get_total_flops() / expected <= 1.0

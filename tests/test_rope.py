"""helpers.rope (with helpers.rope_inputs) against the model's own get_rope_index and rotary embedding (notebook 08)."""

import math
import random

import numpy as np
import pytest
import torch

from helpers import rope
from helpers.qwen import course_config, qwen25vl_3b_config
from helpers.rope import (
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    decoder_positions,
    generated_positions,
    inverse_frequencies,
    merged_grid_check,
    mrope_cos_sin,
    pair_axes,
    positions_view,
    rope_index,
    synthetic_sequence,
    token_types,
    video_plan,
    vision_positions,
)
from helpers.rope_inputs import EXAMPLE_CASES, example_inputs, random_batch

SWEEP = 300


def reference(model, ids, image_grid=None, video_grid=None, seconds=None, mask=None):
    seconds = torch.tensor(seconds, dtype=torch.float) if seconds is not None else None
    return model.model.get_rope_index(ids, token_types(ids), image_grid, video_grid, seconds, mask)


def rope_args(inputs):
    """``get_rope_index``'s arguments, in its order, from a processor's outputs."""
    keys = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
    return (inputs["input_ids"], *(inputs.get(k) for k in keys), inputs["attention_mask"])


@pytest.mark.parametrize("case", EXAMPLE_CASES)
def test_rope_index_equals_model_on_processor_inputs(model, processor, case):
    inputs = example_inputs(processor, case)
    args = rope_args(inputs)
    mine = rope_index(*args)
    theirs = model.model.get_rope_index(args[0], inputs["mm_token_type_ids"], *args[1:])
    assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])
    if case == "batch of 3, left padding":
        assert (inputs["attention_mask"][:, 0] == 0).any(), "the batch case must really be padded"


def test_rope_index_random_sweep(model):
    rng = random.Random(0)
    unmasked = 0
    for _ in range(SWEEP):
        batch = random_batch(rng)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if rng.random() < 0.2:  # also without a mask: the padding becomes ordinary text
            ids, mask = ids.masked_fill(mask == 0, 1000), None
            unmasked += 1
        args = (batch["image_grid_thw"], batch["video_grid_thw"], batch["second_per_grid_ts"], mask)
        mine = rope_index(ids, *args)
        theirs = reference(model, ids, *args)
        torch.testing.assert_close(mine[0], theirs[0], rtol=0, atol=0)
        torch.testing.assert_close(mine[1], theirs[1], rtol=0, atol=0)
    assert 0 < unmasked < SWEEP


def test_vision_positions_equal_model(model):
    rng = random.Random(1)
    for _ in range(100):
        grid = torch.tensor([rng.randint(1, 4), 2 * rng.randint(1, 10), 2 * rng.randint(1, 10)])
        start, interval = rng.randint(0, 500), rng.choice([1, 0.5, 4 / 3, 2.0, 8.0])
        theirs = model.model.get_vision_position_ids(start, grid, 1, 2, interval)
        assert torch.equal(vision_positions(start, grid, 2, interval), theirs)


def test_merged_grid_rows_and_columns(processor):
    inputs = example_inputs(processor, "two images")
    positions, _ = rope_index(inputs["input_ids"], inputs["image_grid_thw"])
    expected = int(inputs["image_grid_thw"].prod(-1).sum()) // 4
    assert merged_grid_check(positions[:, 0], inputs["input_ids"][0], inputs["image_grid_thw"]) == expected
    broken = positions.clone()
    first_pad = int(torch.nonzero(inputs["input_ids"][0] == IMAGE_TOKEN_ID)[5])
    broken[1, 0, first_pad] += 1
    with pytest.raises(ValueError, match="offsets"):
        merged_grid_check(broken[:, 0], inputs["input_ids"][0], inputs["image_grid_thw"])


@pytest.mark.parametrize("config", [course_config(), qwen25vl_3b_config()], ids=["course", "3B"])
def test_mrope_cos_sin_equal_rotary_embedding(config):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    rotary = Qwen2_5_VLRotaryEmbedding(config.text_config)
    section = config.text_config.rope_parameters["mrope_section"]
    head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
    torch.testing.assert_close(inverse_frequencies(head_dim), rotary.inv_freq, rtol=0, atol=0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        positions = torch.randint(0, 5000, (3, 2, 17), generator=gen)
        cos, sin = mrope_cos_sin(positions, rotary.inv_freq, section)
        ref_cos, ref_sin = rotary(torch.zeros(1), positions)
        torch.testing.assert_close(cos, ref_cos, rtol=0, atol=0)
        torch.testing.assert_close(sin, ref_sin, rtol=0, atol=0)


def test_pair_axes_of_the_3b():
    section = qwen25vl_3b_config().text_config.rope_parameters["mrope_section"]
    assert section == [16, 24, 24]
    axes = pair_axes(section)
    assert len(axes) == 64 and (axes[:16] == 0).all() and (axes[16:40] == 1).all() and (axes[40:] == 2).all()


def test_generate_uses_rope_deltas(model, processor):
    inputs = example_inputs(processor, "batch of 3, left padding")
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"][-3:].clone()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    finally:
        hook.remove()
    positions, deltas = rope_index(
        inputs["input_ids"],
        inputs["image_grid_thw"],
        inputs["video_grid_thw"],
        inputs["second_per_grid_ts"],
        inputs["attention_mask"],
    )
    assert torch.equal(seen[0], positions)
    expected = generated_positions(inputs["attention_mask"].sum(-1), deltas, 2)
    for step, got in enumerate(seen[1:]):
        assert torch.equal(got, expected[:, step].view(1, -1, 1).expand(3, -1, 1))
    assert torch.equal(model.model.rope_deltas, deltas)


def test_widget_positions_view():
    view = positions_view()
    assert view.data["largest"] + 1 - view.data["length"] == view.data["rope_deltas"]
    ids = synthetic_sequence(view.data["image_grid"], view.data["video_grid"])
    assert ids.shape[1] == view.data["length"]
    longer = positions_view(video_seconds=20.0)
    assert longer.data["largest"] > view.data["largest"]


def test_video_plan_and_second_per_grid():
    plan = video_plan(4.0, 2.0)
    assert plan["frames"] == 8 and plan["grid_thw"][0] == 4 and plan["second_per_grid_ts"] == 1.0
    assert video_plan(0.1, 1.0)["frames"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.tensor([1, 2, 3]),), "expected \\(batch, length\\)"),
        ((torch.tensor([[IMAGE_TOKEN_ID] * 4]),), "more image runs"),
        ((torch.tensor([[IMAGE_TOKEN_ID] * 3]), torch.tensor([[1, 4, 4]])), "needs 4"),
        ((torch.tensor([[1, 2]]), None, None, None, torch.ones(1, 3)), "attention_mask has shape"),
    ],
)
def test_rope_index_bad_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        rope_index(*args)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        vision_positions(0, [1, 3, 4])
    with pytest.raises(ValueError, match="three non-negative"):
        pair_axes([16, 24])
    with pytest.raises(ValueError, match="sums to 3"):
        mrope_cos_sin(torch.zeros(3, 1, 1, dtype=torch.long), inverse_frequencies(8), [1, 1, 1])
    with pytest.raises(ValueError, match="must be > 0"):
        video_plan(0, 2)
    with pytest.raises(ValueError, match="case="):
        example_inputs(None, "three videos")


# --- Qwen's reference rule (get_rope_index_25) -------------------------------------------------


def reference_oracle(
    input_ids,
    image_grid_thw=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    attention_mask=None,
    tokens_per_second=2,
):
    """Qwen's reference rule written token by token, independently of helpers.rope: a text token takes
    the next id in all three rows; a vision block starting at ``start`` gives its k-th token
    (start + temporal id, start + merged row, start + merged column); the next id after a block is
    the block's largest id + 1. Temporal ids truncate float32 products, as torch does."""
    grids = {
        IMAGE_TOKEN_ID: iter([] if image_grid_thw is None else image_grid_thw.tolist()),
        VIDEO_TOKEN_ID: iter([] if video_grid_thw is None else video_grid_thw.tolist()),
    }
    seconds = iter([1.0] * 100 if second_per_grid_ts is None else [float(x) for x in second_per_grid_ts])
    positions = torch.zeros(3, *input_ids.shape, dtype=input_ids.dtype)
    deltas = []
    for row in range(input_ids.shape[0]):
        slots = [j for j in range(input_ids.shape[1]) if attention_mask is None or attention_mask[row, j]]
        next_id, k, ids = 0, 0, []
        while k < len(slots):
            token = int(input_ids[row, slots[k]])
            if token not in grids:
                ids.append((next_id,) * 3)
                next_id, k = next_id + 1, k + 1
                continue
            t, h, w = next(grids[token])
            h, w = h // 2, w // 2
            interval = tokens_per_second * next(seconds) if token == VIDEO_TOKEN_ID else 0.0
            block = [
                (
                    next_id + int(torch.tensor(float(n // (h * w))) * interval),
                    next_id + n % (h * w) // w,
                    next_id + n % w,
                )
                for n in range(t * h * w)
            ]
            ids += block
            next_id, k = max(max(b) for b in block) + 1, k + len(block)
        for slot, triple in zip(slots, ids):
            positions[:, row, slot] = torch.tensor(triple)
        deltas.append(max(max(triple) for triple in ids) + 1 - len(slots))
    return positions, torch.tensor(deltas).unsqueeze(1)


def test_reference_rule_on_the_docstring_example(model):
    """3 temporal patches of 2 × 2 merged tokens, interval 50 (tokens_per_second 25, 2 s per patch):
    t ids 0, 50, 100; the text after the video starts at 101 (transformers 5.24: at 2)."""
    ids = torch.tensor([[VIDEO_TOKEN_ID] * 12 + [1000] * 5])
    args = (ids, None, torch.tensor([[3, 4, 4]]), [2.0])
    positions, deltas = rope_index(*args, tokens_per_second=25, rule="reference")
    assert positions[0, 0, :12].tolist() == [0] * 4 + [50] * 4 + [100] * 4
    assert positions[1, 0, :12].tolist() == [0, 0, 1, 1] * 3 and positions[2, 0, :12].tolist() == [0, 1, 0, 1] * 3
    assert (positions[:, 0, 12:] == torch.arange(101, 106)).all() and int(deltas) == 106 - 17
    oracle = reference_oracle(*args, tokens_per_second=25)
    assert torch.equal(positions, oracle[0]) and torch.equal(deltas, oracle[1])
    vision = model.config.vision_config
    old, vision.tokens_per_second = vision.tokens_per_second, 25
    try:
        theirs = model.model.get_rope_index(ids, token_types(ids), None, torch.tensor([[3, 4, 4]]), torch.tensor([2.0]))
    finally:
        vision.tokens_per_second = old
    mine = rope_index(*args, tokens_per_second=25)
    assert torch.equal(mine[0], theirs[0]) and (theirs[0][:, 0, 12:] == torch.arange(2, 7)).all()


@pytest.mark.parametrize("case", EXAMPLE_CASES)
def test_reference_rule_on_the_notebook_cases(processor, case):
    inputs = example_inputs(processor, case)
    args = rope_args(inputs)
    ours, oracle, transformers_rule = rope_index(*args, rule="reference"), reference_oracle(*args), rope_index(*args)
    assert torch.equal(ours[0], oracle[0]) and torch.equal(ours[1], oracle[1])
    # the example video, grid (4, 8, 10) at 1 s per patch: t ids up to start + 6 while max(h, w) / 2 = 5,
    # so every row holding it resumes 2 ids later than under transformers 5.24; other rows agree
    has_video = (inputs["input_ids"] == VIDEO_TOKEN_ID).any(-1)
    assert (ours[1] - transformers_rule[1]).flatten().tolist() == [2 if v else 0 for v in has_video.tolist()]
    assert torch.equal(ours[0][:, ~has_video], transformers_rule[0][:, ~has_video])


def _rules_agree(batch) -> bool:
    """True when no video's temporal ids reach max(merged h, merged w): then both rules agree."""
    if batch["video_grid_thw"] is None:
        return True
    return all(
        int(torch.tensor(float(t - 1)) * (2 * s)) < max(h, w) // 2  # last temporal id < max(h, w)/2
        for (t, h, w), s in zip(batch["video_grid_thw"].tolist(), batch["second_per_grid_ts"])
    )


def test_reference_rule_random_sweep(model):
    rng = random.Random(5)
    agreeing = 0
    for _ in range(SWEEP):
        batch = random_batch(rng)
        args = (
            batch["input_ids"],
            batch["image_grid_thw"],
            batch["video_grid_thw"],
            batch["second_per_grid_ts"],
            batch["attention_mask"],
        )
        ours, oracle = rope_index(*args, rule="reference"), reference_oracle(*args)
        assert torch.equal(ours[0], oracle[0]) and torch.equal(ours[1], oracle[1])
        theirs = reference(model, *args)
        same = torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
        assert same == _rules_agree(batch)  # equal to transformers 5.24 exactly where the rules agree
        agreeing += same
    assert 0 < agreeing < SWEEP


def test_unknown_rule_is_rejected():
    with pytest.raises(ValueError, match="rule='qwen2': expected one of"):
        rope_index(torch.tensor([[1, 2]]), rule="qwen2")


def test_decoder_positions_need_mm_token_type_ids(model, processor):
    inputs = example_inputs(processor, "image + video")
    seen, logits = decoder_positions(model, inputs)
    positions, _ = rope_index(
        inputs["input_ids"],
        inputs["image_grid_thw"],
        inputs["video_grid_thw"],
        inputs["second_per_grid_ts"],
        inputs["attention_mask"],
    )
    assert torch.equal(seen, positions)
    without = {key: value for key, value in inputs.items() if key != "mm_token_type_ids"}
    nothing, flat_logits = decoder_positions(model, without)
    assert nothing is None  # the decoder then counts 0, 1, 2, ... in all three rows
    length = inputs["input_ids"].shape[1]
    _, counted = decoder_positions(model, {**without, "position_ids": torch.arange(length).expand(3, 1, length)})
    assert torch.equal(counted, flat_logits) and (logits - flat_logits).abs().max() > 1e-4


def _angles(frequencies, positions):
    """cos, sin (batch, length, head_dim) of the angles t·f[0] + h·f[1] + w·f[2] of each pair."""
    angles = torch.einsum("abl,aj->blj", positions.float(), frequencies)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("config", [course_config(), qwen25vl_3b_config()], ids=["course", "3B"])
def test_axis_frequencies_equal_rotary_embedding(config):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    rotary = Qwen2_5_VLRotaryEmbedding(config.text_config)
    frequencies = rope.axis_frequencies(rotary.inv_freq, pair_axes(rotary.mrope_section))
    assert torch.equal(frequencies.sum(0), rotary.inv_freq) and ((frequencies > 0).sum(0) == 1).all()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        positions = torch.randint(0, 5000, (3, 2, 17), generator=gen)
        cos, sin = _angles(frequencies, positions)
        ref_cos, ref_sin = rotary(torch.zeros(1), positions)
        torch.testing.assert_close(cos, ref_cos)
        torch.testing.assert_close(sin, ref_sin)


def test_axis_frequencies_of_the_3b_per_axis():
    """Notebook 08's numbers: over 40 ids the fastest w pair turns 40·θ^(-80/128) ≈ 0.0071 rad, the
    fastest h pair 40·θ^(-32/128) ≈ 1.265 rad; every w pair is slower than every h pair, every h
    pair slower than every t pair."""
    text = qwen25vl_3b_config().text_config
    head_dim = text.hidden_size // text.num_attention_heads
    frequencies = rope.axis_frequencies(inverse_frequencies(head_dim), pair_axes(text.rope_parameters["mrope_section"]))
    fastest = frequencies.amax(-1)
    slowest = torch.stack([row[row > 0].min() for row in frequencies])
    assert slowest[0] > fastest[1] and slowest[1] > fastest[2]
    assert math.isclose(40 * fastest[2].item(), 40 * 1e6 ** (-80 / 128), rel_tol=1e-6)
    assert math.isclose(40 * fastest[1].item(), 40 * 1e6 ** (-32 / 128), rel_tol=1e-6)
    assert round(40 * fastest[2].item(), 4) == 0.0071 and round(40 * fastest[1].item(), 3) == 1.265


def test_interleaved_pair_axes_equal_qwen3_vl():
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    for section in ([24, 20, 20], [4, 6, 6], [10, 3, 3]):
        config = Qwen3VLTextConfig(
            hidden_size=64,
            num_attention_heads=1,
            head_dim=2 * sum(section),
            num_hidden_layers=1,
            intermediate_size=32,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
        )
        rotary = Qwen3VLTextRotaryEmbedding(config)
        tags = torch.arange(3).float().view(3, 1, 1, 1).expand(3, 1, 1, sum(section)).clone()
        theirs = rotary.recomposition_frequencies(tags)[0, 0, : sum(section)].long().numpy()
        axes = rope.interleaved_pair_axes(section)
        assert (axes == theirs).all()
        frequencies = rope.axis_frequencies(rotary.inv_freq, axes)
        positions = torch.randint(0, 5000, (3, 2, 9), generator=torch.Generator().manual_seed(1))
        cos, sin = _angles(frequencies, positions)
        ref_cos, ref_sin = rotary(torch.zeros(1), positions)
        torch.testing.assert_close(cos, ref_cos)
        torch.testing.assert_close(sin, ref_sin)


def test_interleaved_layout_of_qwen3_vl_default():
    """[24, 20, 20] over 64 pairs: t h w repeated 20 times, then 4 t pairs; every axis spans the range."""
    axes = rope.interleaved_pair_axes([24, 20, 20])
    assert np.bincount(axes, minlength=3).tolist() == [24, 20, 20]
    assert axes[:60].tolist() == [0, 1, 2] * 20 and axes[60:].tolist() == [0] * 4


def test_axis_frequency_bad_inputs():
    with pytest.raises(ValueError, match="pair axes"):
        rope.axis_frequencies(torch.ones(4), [0, 1, 2])
    with pytest.raises(ValueError, match="three non-negative"):
        rope.interleaved_pair_axes([4, 4])

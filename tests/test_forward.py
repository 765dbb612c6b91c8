"""helpers.forward against the model's forward, generate and the 3B config (notebook 09)."""

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_resize

from helpers.forward import (
    budget_view,
    cache_bytes,
    forward_step_by_step,
    generate_batch,
    greedy_generate,
    image_memory,
    kv_cache_bytes_per_token,
    parameters_by_module,
    redraw_decoder_weights,
    scatter_visual,
    truncate_safely,
    visual_token_counts,
    visual_tokens,
    weight_bytes,
)
from helpers.qwen import load_model, load_processor, parameter_count, qwen25vl_3b_config
from helpers.rope_inputs import example_inputs, gradient_image

CASES = ["text only", "one image", "two images", "video", "image + video"]


@pytest.fixture(scope="module")
def wandering():
    return redraw_decoder_weights(load_model())


@pytest.fixture(scope="module")
def processor():
    return load_processor(max_pixels=64 * 28 * 28)


@pytest.fixture(scope="module")
def meta_3b():
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(qwen25vl_3b_config())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("which", ["course", "wandering"])
def test_step_by_step_logits_equal_model(model, wandering, processor, case, which):
    net = model if which == "course" else wandering
    inputs = example_inputs(processor, case)
    with torch.no_grad():
        expected = net(**inputs).logits
    got = forward_step_by_step(net, **inputs).logits
    scale = float(expected.abs().max())  # float32 rounding grows with the values (the course model's logits reach ~20)
    torch.testing.assert_close(
        got, expected, rtol=0, atol=2e-6 * max(scale, 1.0)
    )  # ~16 float32 ulps of the largest logit


@pytest.mark.parametrize("case", ["text only", "one image", "video"])
@pytest.mark.parametrize("which", ["course", "wandering"])
def test_greedy_loop_equals_generate(model, wandering, processor, case, which):
    net = model if which == "course" else wandering
    inputs = example_inputs(processor, case)
    with torch.no_grad():
        out = net.generate(
            **inputs, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    expected = out.sequences[:, inputs["input_ids"].shape[1] :]
    tokens, logits = greedy_generate(net, dict(inputs), 6)
    assert torch.equal(tokens, expected)
    torch.testing.assert_close(logits, torch.stack(out.logits, dim=1), rtol=0, atol=1e-5)
    if which == "wandering":
        assert len(set(tokens[0].tolist())) > 1, "the redrawn model should not repeat one token"


def test_greedy_loop_stops_at_eos(wandering, processor):
    inputs = example_inputs(processor, "text only")
    first, _ = greedy_generate(wandering, dict(inputs), 3)
    tokens, _ = greedy_generate(wandering, dict(inputs), 5, eos_token_id=int(first[0, 1]))
    assert tokens.shape[1] == 2


def test_kv_cache_size_matches_formula(model, processor):
    inputs = example_inputs(processor, "one image")
    steps = forward_step_by_step(model, **inputs)
    length = inputs["input_ids"].shape[1]
    assert cache_bytes(steps.cache) == length * kv_cache_bytes_per_token(model.config.text_config, torch.float32)


def test_scatter_mismatch_is_the_models_error(model, processor):
    inputs = example_inputs(processor, "one image")
    cut = {
        k: (v[:, :40] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v) for k, v in inputs.items()
    }
    with pytest.raises(ValueError, match="Image features and image tokens do not match"), torch.no_grad():
        model(**cut)
    with pytest.raises(ValueError, match="feature rows"):
        forward_step_by_step(model, **cut)
    pads, needed = visual_token_counts(cut["input_ids"], cut["image_grid_thw"])
    assert pads < needed == int(inputs["image_grid_thw"].prod()) // 4


def test_truncate_safely(processor):
    ids = example_inputs(processor, "one image")["input_ids"]
    length = ids.shape[1]
    assert torch.equal(truncate_safely(ids, length - 3), ids[:, : length - 3])
    with pytest.raises(ValueError, match="keep max_length ≥"):
        truncate_safely(ids, 40)
    with pytest.raises(ValueError, match="expected ≥ 1"):
        truncate_safely(ids, 0)


def test_left_padding_matches_one_by_one_and_right_does_not(wandering, processor):
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for q in ["Hi", "What is in this picture, in one long sentence?"]
    ]
    images = [gradient_image(112, 112, 0), gradient_image(112, 168, 2)]
    alone = [generate_batch(wandering, processor, [t], [i], "left", 4)[0] for t, i in zip(texts, images)]
    assert generate_batch(wandering, processor, texts, images, "left", 4) == alone
    assert generate_batch(wandering, processor, texts, images, "right", 4) != alone
    with pytest.raises(ValueError, match="padding_side"):
        generate_batch(wandering, processor, texts, images, "middle")


def test_3b_budget(meta_3b):
    total = parameter_count(meta_3b)
    parts = parameters_by_module(meta_3b)
    assert sum(parts.values()) == total
    assert sum(v for k, v in parts.items() if k.startswith("vision")) == parameter_count(meta_3b.model.visual)
    assert weight_bytes(total) == 2 * total
    assert kv_cache_bytes_per_token(qwen25vl_3b_config().text_config) == 2 * 36 * 2 * 128 * 2
    h, w = hf_resize(1092, 1568, factor=28, min_pixels=256 * 784, max_pixels=1280 * 784)
    assert visual_tokens(1092, 1568, min_pixels=256 * 784, max_pixels=1280 * 784) == h * w // 784
    assert image_memory(qwen25vl_3b_config(), 100)["vision_scores_eager"] == 16 * 400**2 * 2


def test_budget_widget():
    view = budget_view()
    assert view.data["tokens"] == visual_tokens(600, 512)
    assert budget_view(max_tokens=256).data["tokens"] <= 256


def test_bad_inputs(model, processor):
    inputs = example_inputs(processor, "batch of 3, left padding")
    with pytest.raises(ValueError, match="unpadded"):
        forward_step_by_step(model, **inputs)
    with pytest.raises(ValueError, match="batch of 3"):
        greedy_generate(model, dict(inputs), 2)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        greedy_generate(model, dict(inputs), 0)
    with pytest.raises(ValueError, match="dtype"):
        weight_bytes(10, torch.int8)
    with pytest.raises(ValueError, match="feature rows"):
        scatter_visual(torch.zeros(1, 3, 4), torch.tensor([[1, 2, 3]]), torch.zeros(1, 4))

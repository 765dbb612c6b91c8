"""helpers.packing and helpers.segment_attention: the packed row's positions against
``get_rope_index``, its loss and gradients against the padded batch's, attention kept inside each
conversation, the SFT loop's packing option, segment attention against the library's vision tower
and packed language model, the length statistics and the widget."""

import copy

import numpy as np
import pytest
import torch
import transformers
from support import tiny_model

from helpers import packing, segment_attention, sft
from helpers.chat import IGNORE_INDEX
from helpers.data import make_split
from helpers.qwen import course_config, load_model, load_processor

transformers.logging.set_verbosity_error()
INPUTS = ("input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw", "position_ids")


@pytest.fixture(scope="module")
def processor():
    return load_processor(min_pixels=784, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def samples():
    """Six samples of three image sizes: lengths 35 to 69 tokens."""
    mixed = make_split("train", 6, seed=1, image_size=84)
    mixed[1] = make_split("train", 1, seed=3, image_size=56, max_distractors=1, count_range=(1, 2))[0]
    mixed[2] = make_split("train", 1, seed=4, image_size=112)[0]
    return mixed


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def batches(processor, samples):
    return sft.SFTCollator(processor)(samples), packing.PackingCollator(processor)(samples)


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    count = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    loss = sft.labelled_loss(model, batch, "sum") / count
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_positions_are_get_rope_index_per_sequence(model, processor, samples, batches):
    padded, packed = batches
    lengths = padded["attention_mask"].sum(1).tolist()
    assert packed["seq_lengths"].tolist() == lengths and len(set(lengths)) > 2
    text, mrope = packed["position_ids"][0, 0], packed["position_ids"][1:, 0]
    for row, part in enumerate(torch.split(torch.arange(sum(lengths)), lengths)):
        alone = sft.SFTCollator(processor)([samples[row]])
        expected, _ = model.model.get_rope_index(
            alone["input_ids"],
            alone["mm_token_type_ids"],
            alone["image_grid_thw"],
            attention_mask=alone["attention_mask"],
        )
        assert torch.equal(mrope[:, part], expected[:, 0])
        assert torch.equal(text[part], torch.arange(len(part)))
    assert packed["cu_seq_lens"].tolist() == [0, *np.cumsum(lengths).tolist()]


def test_packed_row_holds_the_same_tokens_labels_and_pixels(batches):
    padded, packed = batches
    keep = padded["attention_mask"].bool()
    for key in ("input_ids", "labels", "mm_token_type_ids"):
        assert torch.equal(packed[key][0], padded[key][keep])
    assert torch.equal(packed["pixel_values"], padded["pixel_values"])
    assert torch.equal(packed["image_grid_thw"], padded["image_grid_thw"])
    assert "attention_mask" not in packed


def test_packed_loss_and_gradients_equal_the_padded_batch(model, batches):
    padded, packed = batches
    loss_padded, grads_padded = loss_and_grads(model, padded)
    loss_packed, grads_packed = loss_and_grads(model, packed)
    assert abs(float(loss_packed - loss_padded)) <= 1e-5
    assert grads_packed.keys() == grads_padded.keys() and len(grads_padded) > 10
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, rtol=0, atol=1e-5, msg=name)


def test_attention_stays_inside_each_sequence(model, batches):
    _, packed = batches
    changed = copy.deepcopy(packed)
    first = int(packed["seq_lengths"][0])
    text = (changed["mm_token_type_ids"][0, :first] == 0).nonzero().flatten()[3:]
    changed["input_ids"][0, text] = (changed["input_ids"][0, text] + 7) % 1000
    with torch.no_grad():
        before, after = (model(**{k: b[k] for k in INPUTS}, use_cache=False).logits[0] for b in (packed, changed))
    assert not torch.allclose(before[:first], after[:first])
    assert torch.equal(before[first:], after[first:])


def test_train_with_pack_follows_the_padded_run(processor, samples):
    data = samples * 2
    runs = [
        sft.train(
            tiny_model(),
            processor,
            data,
            steps=3,
            batch_size=4,
            lr=1e-3,
            warmup=1,
            progress=False,
            pack=pack,
            device="cpu",
        )
        for pack in (False, True)
    ]
    np.testing.assert_allclose(runs[1].history["loss"], runs[0].history["loss"], rtol=0, atol=1e-4)
    assert runs[1].history["tokens"] == runs[0].history["tokens"]
    with pytest.raises(ValueError, match="pack=True"):
        sft.train(tiny_model(), processor, data, steps=1, pack=True, average="answer", progress=False)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="lengths"):
        packing.text_positions([3, 0])
    with pytest.raises(ValueError, match="budget"):
        packing.pack_lengths([5, 12], 10)
    with pytest.raises(ValueError, match="mix"):
        packing.length_mix("nope", 4)
    item = packing.synthetic_item(np.random.default_rng(0), 40, (56, 56), 0.4)
    item["labels"][0] = item["input_ids"][0]
    with pytest.raises(ValueError, match="first token"):
        packing.pack_items([item])
    with pytest.raises(ValueError, match="image_hw"):
        packing.synthetic_item(np.random.default_rng(0), 40, (50, 56), 0.4)


def test_padding_stats_and_bins():
    stats = packing.padding_stats([2, 4, 3, 3], 2)
    assert stats == {"real": 12, "padded": 14, "padding_fraction": pytest.approx(1 / 7)}
    lengths = packing.length_mix("chat (long tail)", 50, seed=2)
    bins = packing.pack_lengths(lengths, 1500)
    assert sorted(i for b in bins for i in b) == list(range(50))
    assert all(sum(lengths[i] for i in b) <= 1500 for b in bins)


def test_synthetic_item_has_the_shape_it_was_asked():
    item = packing.synthetic_item(np.random.default_rng(0), 300, (448, 560), 0.4)
    image = 448 // 28 * (560 // 28)
    assert len(item["input_ids"]) == 300 + image
    assert int(item["mm_token_type_ids"].sum()) == image
    assert int((item["labels"] != IGNORE_INDEX).sum()) == 120
    assert item["pixel_values"].shape == (image * 4, 1176)
    packed = packing.pack_items([item, item])
    assert packed["position_ids"].shape == (4, 1, 2 * len(item["input_ids"]))


def test_layout_view_reports_the_padding():
    view = packing.layout_view("uniform", 4, 12)
    expected = packing.padding_stats(packing.length_mix("uniform", 12), 4)
    assert view.data == expected and view.figure is not None and f"{expected['padding_fraction']:.1%}" in view.text


# --- segment attention ---------------------------------------------------------------------------


def test_segment_attention_equals_per_segment_attention():
    from helpers.vision_tower import windowed_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(23, 4, 8) for _ in range(3))
    cu = torch.tensor([0, 5, 6, 16, 23])
    ours = segment_attention.segment_attention(q, k, v, cu)
    theirs = windowed_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cu).transpose(0, 1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    causal = segment_attention.segment_attention(q, k[:, :2], v[:, :2], cu, causal=True)
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist()):
        one = torch.nn.functional.scaled_dot_product_attention(
            q[lo:hi].transpose(0, 1),
            k[lo:hi, :2].repeat_interleave(2, 1).transpose(0, 1),
            v[lo:hi, :2].repeat_interleave(2, 1).transpose(0, 1),
            is_causal=True,
        )
        torch.testing.assert_close(causal[lo:hi], one.transpose(0, 1), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="cu_seqlens"):
        segment_attention.segment_attention(q, k, v, torch.tensor([0, 5, 22]))


def test_vision_tower_with_segment_attention_equals_the_library(processor, batches):
    _, packed = batches
    model = load_model(config=course_config(vision_hidden=32, vision_depth=4, vision_mlp=64), seed=1)
    visual = model.model.visual
    pixels, grid = packed["pixel_values"].clone().requires_grad_(), packed["image_grid_thw"]
    reference = visual(pixels, grid).pooler_output
    (ref_grad,) = torch.autograd.grad(reference.square().sum(), pixels)
    segment_attention.use_segment_attention(visual)
    ours = visual(pixels, grid).pooler_output
    (our_grad,) = torch.autograd.grad(ours.square().sum(), pixels)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(our_grad, ref_grad, rtol=1e-4, atol=1e-5)


def test_text_segment_attention_equals_the_packed_mask(batches):
    _, packed = batches
    model = tiny_model(seed=2)
    with torch.no_grad():
        reference = model(**{k: packed[k] for k in INPUTS}, use_cache=False).logits
        model.config.text_config._attn_implementation = segment_attention.register_text_attention()
        ours = model(**{k: packed[k] for k in INPUTS}, use_cache=False).logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_packed_row_figure_and_interleaved_times(batches):
    _, packed = batches
    figure = packing.packed_row_figure(
        packed["position_ids"], packed["seq_lengths"].tolist(), packed["mm_token_type_ids"]
    )
    left, right = figure.axes[:2]
    assert len(left.lines) == 4 + len(packed["seq_lengths"]) - 1  # four rows, one dashed line per seam
    total = int(packed["seq_lengths"].sum())
    assert right.images[0].get_array().shape == (total, total)
    calls = []
    times = packing.interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert calls == ["a", "b", "b", "a", "a", "b"] and all(len(t) == 3 for t in times.values())

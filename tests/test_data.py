"""helpers.data: the shapes task is deterministic, its answers agree with what was drawn, the
images are already at their smart_resize size, the splits are what they claim, bad settings fail."""

import numpy as np
import pytest
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from helpers import data
from helpers.chat import assistant_loss_mask
from helpers.data import COLOURS, HELD_OUT_PAIRS, SHAPES, make_split, sample_messages
from helpers.rewards import parse_answer, score


@pytest.mark.parametrize("split", data.SPLITS)
def test_deterministic_by_seed(split):
    a, b = make_split(split, 12, seed=3), make_split(split, 12, seed=3)
    assert [np.asarray(s.image).tobytes() for s in a] == [np.asarray(s.image).tobytes() for s in b]
    assert [(s.question, s.answer) for s in a] == [(s.question, s.answer) for s in b]
    c = make_split(split, 12, seed=4)
    assert [s.answer for s in a] != [s.answer for s in c] or [s.question for s in a] != [s.question for s in c]


def test_splits_never_share_an_image():
    seen = {}
    for split in data.SPLITS:
        for s in make_split(split, 200):
            key = np.asarray(s.image).tobytes()
            assert key not in seen, f"{split} image equals a {seen[key]} image"
            seen[key] = split


@pytest.mark.parametrize("size", [56, 84, 112, 224])
def test_images_are_at_their_smart_resize_size(size):
    for s in make_split("train", 20, image_size=size):
        assert s.image.size == (size, size)
        assert smart_resize(size, size, 28, 28 * 28, size * size) == (size, size)
        for item in s.shapes:
            x1, y1, x2, y2 = item["bbox"]
            assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size


def _matching(s, colour, shape):
    return [i for i in s.shapes if i["colour"] == colour and i["shape"] == shape]


def test_answers_agree_with_the_drawn_shapes():
    samples = make_split("train", 300) + make_split("ood", 100)
    assert {s.task for s in samples} == set(data.TASKS)
    for s in samples:
        words = s.question.rstrip("?").split()
        if s.task == "count":
            colour, shape = words[2], words[3][:-1]
            assert s.target == len(_matching(s, colour, shape)) == int(s.answer)
        elif s.task == "attribute":
            shape = words[-1]
            same_shape = [i for i in s.shapes if i["shape"] == shape]
            assert len(same_shape) == 1 and s.target == s.answer == same_shape[0]["colour"]
        else:
            colour, shape = words[-2], words[-1]
            (item,) = _matching(s, colour, shape)
            assert s.target == item["bbox"]
            assert parse_answer("grounding", s.answer) == s.target
        assert score(s.task, s.answer, s.target) == 1.0  # the scorer accepts every reference answer


def test_grounding_box_covers_the_shape_pixels():
    for s in [s for s in make_split("test", 120) if s.task == "grounding"]:
        x1, y1, x2, y2 = s.target
        colour = np.array(COLOURS[s.question.rstrip("?").split()[-2]])
        pixels = np.asarray(s.image).astype(int)
        hit = np.argwhere((np.abs(pixels - colour).sum(-1) == 0))
        inside = hit[(hit[:, 1] >= x1) & (hit[:, 1] < x2) & (hit[:, 0] >= y1) & (hit[:, 0] < y2)]
        assert len(inside) > 0.2 * (x2 - x1) * (y2 - y1)
        assert inside[:, 1].min() - x1 <= 1 and x2 - 1 - inside[:, 1].max() <= 1  # box is tight in x
        assert inside[:, 0].max() - (y2 - 1) >= -1                                 # and at the bottom


def test_ood_is_out_of_distribution():
    train = make_split("train", 400)
    ood = make_split("ood", 200)
    train_counts = {s.target for s in train if s.task == "count"}
    ood_counts = {s.target for s in ood if s.task == "count"}
    assert train_counts == {1, 2, 3, 4} and ood_counts == {5, 6}
    asked = lambda s: (s.answer, s.question.rstrip("?").split()[-1]) if s.task == "attribute" else tuple(s.question.rstrip("?").split()[-2:])
    for s in train:
        if s.task != "count":
            assert asked(s) not in HELD_OUT_PAIRS
        assert not any((i["colour"], i["shape"]) in HELD_OUT_PAIRS for i in s.shapes)
    assert all(asked(s) in HELD_OUT_PAIRS for s in ood if s.task != "count")


def test_variety_of_shapes_colours_sizes_positions():
    samples = make_split("train", 200)
    items = [i for s in samples for i in s.shapes]
    assert {i["shape"] for i in items} == set(SHAPES)
    assert len({i["colour"] for i in items}) >= 4
    sides = {i["bbox"][2] - i["bbox"][0] for i in items}
    assert len(sides) >= 8 and len({tuple(i["bbox"][:2]) for i in items}) > 100


def test_answer_texts_and_messages():
    for s in make_split("val", 60):
        if s.task == "grounding":
            assert s.answer.startswith('[{"bbox_2d": [') and s.answer.endswith('"}]')
        messages = sample_messages(s)
        assert messages[-1] == {"role": "assistant", "content": [{"type": "text", "text": s.answer}]}
        assert len(sample_messages(s, with_answer=False)) == 1


def test_answer_mask_covers_exactly_the_answer():
    from helpers.qwen import load_processor

    processor = load_processor(min_pixels=784, max_pixels=112 * 112)
    for s in make_split("train", 12):
        text = processor.apply_chat_template(sample_messages(s), tokenize=False)
        ids = processor(text=[text], images=[s.image], return_tensors="pt")["input_ids"][0]
        labelled = ids[assistant_loss_mask(ids).bool()]
        assert processor.decode(labelled) == s.answer + "<|im_end|>"


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=0), r"n=0: expected an integer ≥ 1"),
    (dict(split="dev"), r"split='dev'"),
    (dict(colours=("red", "teal")), r"unknown \['teal'\]"),
    (dict(colours=("red",)), r"at least 2"),
    (dict(count_range=(0, 3)), r"count_range=\(0, 3\): expected 1 ≤ low ≤ high ≤ 9"),
    (dict(count_range=(1, 12)), r"≤ 9"),
    (dict(ood_count_range=(4, 6)), r"must start above"),
    (dict(image_size=100), r"image_size=100: expected a multiple of 28"),
    (dict(tasks=("caption",)), r"subset of"),
    (dict(max_distractors=9), r"max_distractors=9"),
    (dict(shape_size=(0.3, 0.2)), r"shape_size"),
])
def test_bad_settings_raise(kwargs, match):
    args = {"split": "train", "n": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_split(**args)


def test_unknown_option_and_bad_sample():
    with pytest.raises(TypeError, match="unknown data options"):
        make_split("train", 2, colour="red")
    with pytest.raises(TypeError, match="expected helpers.data.Sample"):
        sample_messages({"image": None})

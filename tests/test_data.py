"""helpers.data: the shapes task is deterministic, its answers agree with what was drawn, the
images are already at their smart_resize size, the splits are what they claim, bad settings fail."""

import numpy as np
import pytest
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from helpers import data
from helpers.data import COLOURS, HELD_OUT_PAIRS, SHAPES, make_split, sample_messages
from helpers.rewards import parse_answer, score


@pytest.mark.parametrize("split", data.SPLITS)
def test_deterministic_by_seed(split):
    a, b = make_split(split, 12, seed=3), make_split(split, 12, seed=3)
    assert [np.asarray(s.image).tobytes() for s in a] == [np.asarray(s.image).tobytes() for s in b]
    assert [(s.question, s.answer) for s in a] == [(s.question, s.answer) for s in b]
    c = make_split(split, 12, seed=4)
    assert [s.answer for s in a] != [s.answer for s in c] or [s.question for s in a] != [s.question for s in c]


def test_splits_are_separate_streams_and_ood_images_are_never_training_images():
    """On a 4 × 4 grid a one-shape image has only 16 × 13 layouts, so train and test can repeat an
    image (the test split measures the task); the ood split, drawn from held-out pairs, never does."""
    train = {np.asarray(s.image).tobytes() for s in make_split("train", 300, max_distractors=0)}
    test = make_split("test", 300, max_distractors=0)
    ood = make_split("ood", 300, max_distractors=0)
    assert not any(np.asarray(s.image).tobytes() in train for s in ood)
    assert [s.question for s in test[:20]] != [s.question for s in make_split("val", 20, max_distractors=0)]


@pytest.mark.parametrize("size", [56, 84, 112, 224])
def test_images_are_at_their_smart_resize_size(size):
    for s in make_split("train", 20, image_size=size, max_distractors=1):
        assert s.image.size == (size, size)
        assert smart_resize(size, size, 28, 28 * 28, size * size) == (size, size)
        for item in s.shapes:
            x1, y1, x2, y2 = item["bbox"]
            row, column = item["cell"]
            assert column * 28 <= x1 < x2 <= (column + 1) * 28 and row * 28 <= y1 < y2 <= (row + 1) * 28
        assert len({i["cell"] for i in s.shapes}) == len(s.shapes)  # one shape per merged-token cell


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
        hit = np.argwhere(np.abs(pixels - colour).sum(-1) == 0)
        inside = hit[(hit[:, 1] >= x1) & (hit[:, 1] < x2) & (hit[:, 0] >= y1) & (hit[:, 0] < y2)]
        assert len(inside) > 0.2 * (x2 - x1) * (y2 - y1)
        assert inside[:, 1].min() - x1 <= 1 and x2 - 1 - inside[:, 1].max() <= 1  # box is tight in x
        assert inside[:, 0].max() - (y2 - 1) >= -1  # and at the bottom


def test_ood_asks_only_held_out_pairs_with_the_training_answers():
    train = make_split("train", 400)
    ood = make_split("ood", 200)

    def pair(s):
        words = s.question.rstrip("?").split()
        if s.task == "attribute":
            return s.answer, words[-1]
        return (words[-2], words[-1]) if s.task == "grounding" else (words[2], words[3][:-1])

    for s in train:
        assert not any((i["colour"], i["shape"]) in HELD_OUT_PAIRS for i in s.shapes)
    assert all(pair(s) in HELD_OUT_PAIRS for s in ood)
    for task in data.TASKS:  # the same answer vocabulary: every ood answer is one training gives
        assert {str(s.target) for s in ood if s.task == task} <= {str(s.target) for s in train if s.task == task}


def test_tasks_are_balanced_and_cells_all_used():
    samples = make_split("train", 600)
    shares = [sum(s.task == t for s in samples) / len(samples) for t in data.TASKS]
    assert shares == [1 / 3] * 3  # equal shares are exact: the tasks take turns by index
    assert {i["cell"] for s in samples for i in s.shapes} == {(r, c) for r in range(4) for c in range(4)}
    assert {i["shape"] for s in samples for i in s.shapes} == set(SHAPES)


def test_position_cue_tints_the_background_by_x_and_y():
    plain = np.asarray(data.draw_shapes(112, [], position_cue=0.0)).astype(int)
    tinted = np.asarray(data.draw_shapes(112, [], position_cue=1.0)).astype(int)
    assert (plain == data.BACKGROUND).all()
    assert tinted[0, 0].tolist() == list(data.BACKGROUND)
    assert (
        tinted[0, -1, 0] == data.BACKGROUND[0] - data.CUE_LEVELS
        and tinted[-1, 0, 2] == data.BACKGROUND[2] - data.CUE_LEVELS
    )
    assert (np.diff(tinted[0, :, 0]) <= 0).all() and (tinted[:, 0, 0] == tinted[0, 0, 0]).all()


def test_answer_texts_and_messages():
    for s in make_split("val", 60):
        if s.task == "grounding":
            assert s.answer.startswith('[{"bbox_2d": [') and s.answer.endswith('"}]')
        messages = sample_messages(s)
        assert messages[-1] == {"role": "assistant", "content": [{"type": "text", "text": s.answer}]}
        assert len(sample_messages(s, with_answer=False)) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=0), r"n=0: expected an integer ≥ 1"),
        (dict(split="dev"), r"split='dev'"),
        (dict(colours=("red", "teal")), r"unknown \['teal'\]"),
        (dict(colours=("red",)), r"at least 2"),
        (dict(count_range=(0, 3)), r"count_range=\(0, 3\): expected 1 ≤ low ≤ high ≤ 16"),
        (dict(count_range=(1, 17)), r"≤ 16 \(a 112-px image has 16 cells of 28 px\)"),
        (dict(image_size=100), r"image_size=100: expected a multiple of 28"),
        (dict(tasks=("caption",)), r"subset of"),
        (dict(max_distractors=14), r"max_distractors=14: expected 0 ≤ d ≤ 13"),
        (dict(shape_size=(22, 20)), r"shape_size=\(22, 20\): expected integers 8 ≤ low ≤ high ≤ 26"),
        (dict(shape_size=(0.3, 0.4)), r"shape_size"),
        (dict(position_cue=2), r"position_cue=2: expected a number in \[0, 1\]"),
        (dict(seed=-1), r"seed=-1: expected an integer ≥ 0"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    args = {"split": "train", "n": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_split(**args)


def test_unknown_option_and_bad_sample():
    with pytest.raises(TypeError, match="unknown data options"):
        make_split("train", 2, colour="red")
    with pytest.raises(TypeError, match="expected helpers.data.Sample"):
        sample_messages({"image": None})

"""Tests of helpers.rewards: the parser, scores and hostile completions (IoU: tests/test_boxes.py)."""

import json

import pytest
import torch

from helpers.rewards import (
    accuracy_reward,
    format_reward,
    iou_reward,
    parse_answer,
    score,
    task_reward,
    think_format_reward,
)

BOX = [10, 20, 110, 70]
BOX_JSON = json.dumps([{"bbox_2d": BOX, "label": "blue square"}], separators=(",", ":"))

# ------------------------------------------------------------------ the taught formats parse


@pytest.mark.parametrize(
    "task, text, expected",
    [
        ("count", "3", 3),
        ("count", " 3\n", 3),
        ("count", "3.", 3),
        ("count", "0", 0),
        ("count", "12", 12),
        ("count", "007", 7),
        ("attribute", "red", "red"),
        ("attribute", "Red", "red"),
        ("attribute", " green.\n", "green"),
        ("grounding", BOX_JSON, [10.0, 20.0, 110.0, 70.0]),
        ("grounding", "```json\n" + BOX_JSON + "\n```", [10.0, 20.0, 110.0, 70.0]),
        (
            "grounding",
            "```json\n" + json.dumps([{"bbox_2d": BOX, "label": "x"}], indent=2) + "\n```",
            [10.0, 20.0, 110.0, 70.0],
        ),
        ("grounding", '{"bbox_2d": [1, 2, 3, 4]}', [1.0, 2.0, 3.0, 4.0]),
        ("grounding", '[{"bbox_2d": [1.5, 2, 3, 4]}]', [1.5, 2.0, 3.0, 4.0]),
        ("grounding", '[{"bbox_2d": [5, 5, 5, 9]}]', [5.0, 5.0, 5.0, 9.0]),  # zero width: a box, IoU 0
    ],
)
def test_taught_formats_parse(task, text, expected):
    assert parse_answer(task, text) == expected


# ------------------------------------------------------------------ hostile completions → None

HOSTILE = {
    "count": [
        "",
        " ",
        "\n\t",
        "three",
        "-3",
        "+3",
        "3.0",
        "3.5",
        "1e3",
        "99999",
        str(10**40),
        "3 4",
        "3, 4",
        "There are 3 circles.",
        "3 circles",
        "Answer: 3",
        "٣",
        "０",
        "[3]",
        '{"count": 3}',
        "3..",
        ".",
        "\x00",
        "3\n4",
        "NaN",
        "inf",
    ],
    "attribute": [
        "",
        "  ",
        "red blue",
        "red, blue",
        "The colour is red.",
        "red!",
        "light-blue",
        "r3d",
        "123",
        '{"colour": "red"}',
        "a" * 50,
        "<answer>red</answer>",
        "red\nblue",
    ],
    "grounding": [
        "",
        "   ",
        "[",
        "]",
        "[]",
        "{}",
        "[{}]",
        "null",
        "3",
        '"[1,2,3,4]"',
        "[1, 2, 3, 4]",
        '[{"bbox_2d": [1, 2, 3]}]',
        '[{"bbox_2d": [1, 2, 3, 4, 5]}]',
        '[{"bbox_2d": "1,2,3,4"}]',
        '[{"bbox_2d": [1, 2, 3, "4"]}]',
        '[{"bbox_2d": [true, 2, 3, 4]}]',
        '[{"bbox_2d": null}]',
        '[{"bbox_2d": [30, 2, 10, 4]}]',  # x2 < x1
        '[{"bbox_2d": [1, 40, 3, 4]}]',  # y2 < y1
        '[{"bbox_2d": [-5, 2, 10, 4]}]',
        '[{"bbox_2d": [1, 2, 1e9, 4]}]',
        '[{"bbox_2d": [1, 2, 1e400, 4]}]',
        '[{"bbox_2d": [NaN, 2, 10, 4]}]',
        '[{"bbox_2d": [1, 2, Infinity, 4]}]',
        '[[{"bbox_2d": [1, 2, 3, 4]}]]',  # nested
        '[{"bbox_2d": [[1, 2, 3, 4]]}]',
        '{"box": {"bbox_2d": [1, 2, 3, 4]}}',
        '[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6, 7, 8]}]',  # several answers
        '[{"bbox_2d": [1, 2, 3, 4]}] [{"bbox_2d": [1, 2, 3, 4]}]',
        'The box is [{"bbox_2d": [1, 2, 3, 4]}]',
        '[{"bbox_2d": [1, 2, 3, 4]}] is the box',
        '[{"bbox_2d": [1, 2, 3, 4]',
        '[{"bbox_2d": [1, 2, 3, 4],}]',
        '```json\n[{"bbox_2d": [1, 2, 3, 4]}]',
        "[" * 100_000 + "]" * 100_000,  # deeply nested JSON: RecursionError inside json
        "[" * 5000,
    ],
}


@pytest.mark.parametrize("task, text", [(t, x) for t, texts in HOSTILE.items() for x in texts])
def test_hostile_completions_are_rejected_and_rewards_stay_in_range(task, text):
    assert parse_answer(task, text) is None
    target = {"count": 3, "attribute": "red", "grounding": [1, 2, 3, 4]}[task]
    assert score(task, text, target) == 0.0
    for reward in (accuracy_reward, iou_reward, task_reward, format_reward, think_format_reward):
        got = reward(completions=[text], task=[task], target=[target])
        assert got == [0.0], (reward.__name__, got)


def test_rewards_never_raise_on_odd_completions():
    odd_completions = [
        None,
        3,
        [],
        [{}],
        [{"content": None}],
        [{"role": "assistant", "content": [{"type": "image"}]}],
        {"content": "3"},
        b"3",
        float("nan"),
    ]
    for reward in (accuracy_reward, iou_reward, task_reward, format_reward, think_format_reward):
        for completion in odd_completions:
            assert reward(completions=[completion], task=["count"], target=[3]) == [0.0]


@pytest.mark.parametrize("reward", [accuracy_reward, iou_reward, task_reward, format_reward, think_format_reward])
def test_rewards_raise_on_malformed_calls(reward):
    """A caller's bug is not a wrong answer: unknown task, columns of different lengths, a string
    where a column is expected (tests/test_bad_inputs.py has more)."""
    with pytest.raises(ValueError, match="task='colour': expected one of count"):
        reward(completions=["3"], task=["colour"], target=[3])
    with pytest.raises(ValueError, match="task has 1 entries for 2 completions"):
        reward(completions=["3", "4"], task=["count"], target=[3, 4])
    with pytest.raises(TypeError, match="completions='3': expected a list"):
        reward(completions="3", task=["count"], target=[3])
    if reward is not think_format_reward:
        with pytest.raises(TypeError, match="task='count': expected a list with one entry per completion"):
            reward(completions=["3", "red"], task="count", target=[3, 3])


def test_reward_ranges_on_a_sweep():
    torch.manual_seed(0)
    completions, tasks, targets = [], [], []
    for _ in range(300):
        box = sorted(torch.randint(0, 200, (2,)).tolist()) + sorted(torch.randint(0, 200, (2,)).tolist())
        box = [box[0], box[2], box[1], box[3]]
        completions.append(json.dumps([{"bbox_2d": box, "label": "x"}]))
        tasks.append("grounding")
        targets.append([50, 50, 120, 150])
    for reward, allowed in ((accuracy_reward, {0.0, 1.0}), (format_reward, {0.0, 1.0})):
        assert set(reward(completions=completions, task=tasks, target=targets)) <= allowed
    for reward in (iou_reward, task_reward):
        values = reward(completions=completions, task=tasks, target=targets)
        assert all(0.0 <= v <= 1.0 for v in values) and max(values) > 0.0


# ------------------------------------------------------------------ scores


def test_score_exact_match_and_iou():
    assert score("count", "3", 3) == 1.0 and score("count", "4", 3) == 0.0
    assert score("count", "3", "3") == 1.0  # target given as its answer string
    assert score("attribute", "Red", "red") == 1.0 and score("attribute", "blue", "red") == 0.0
    assert score("grounding", BOX_JSON, BOX) == 1.0
    assert score("grounding", BOX_JSON, BOX_JSON) == 1.0
    half = json.dumps([{"bbox_2d": [10, 20, 60, 70]}])
    assert score("grounding", half, BOX) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "task, target",
    [
        ("colour", 3),
        ("count", -1),
        ("count", "three"),
        ("count", True),
        ("grounding", [1, 2, 3]),
        ("grounding", "nope"),
        ("attribute", 5),
        ("grounding", [1, 2, float("nan"), 4]),
    ],
)
def test_score_rejects_bad_task_or_target(task, target):
    with pytest.raises(ValueError, match="task=|target="):
        score(task, "3", target)


def test_parse_answer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="task='colour'"):
        parse_answer("colour", "red")
    with pytest.raises(TypeError, match="expected a string"):
        parse_answer("count", 3)


def test_accuracy_reward_thresholds_iou_and_iou_reward_ignores_other_tasks():
    near = json.dumps([{"bbox_2d": [10, 20, 60, 70]}])  # IoU 0.5 → a hit
    far = json.dumps([{"bbox_2d": [10, 20, 59, 70]}])  # IoU 0.49 → a miss
    assert accuracy_reward(completions=[near, far], task=["grounding"] * 2, target=[BOX] * 2) == [1.0, 0.0]
    assert iou_reward(completions=["3"], task=["count"], target=[3]) == [0.0]
    assert task_reward(completions=["3"], task=["count"], target=[3]) == [1.0]


def test_conversational_completions_are_read():
    chat = [
        [{"role": "assistant", "content": "3"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "4"}]}],
    ]
    assert accuracy_reward(completions=chat, task=["count"] * 2, target=[3, 3]) == [1.0, 0.0]
    assert format_reward(prompts=None, completions=chat, task=["count"] * 2, target=[3, 3], trainer_state=None) == [
        1.0,
        1.0,
    ]


def test_think_format_reward():
    assert think_format_reward(
        completions=["<think>two plus one</think><answer>3</answer>", "3"], task=["count"] * 2
    ) == [1.0, 0.0]

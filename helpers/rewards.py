"""Verifiable rewards for the course's visual tasks (taught in notebooks/11_grpo.ipynb, also used
by helpers.sft / notebooks/10_sft.ipynb to evaluate).

The three tasks of ``helpers.data`` and the answer format the SFT data teaches:

=========== ==================================================== ==========================
task        answer the model should write                        what is scored
=========== ==================================================== ==========================
count       ``3``                                                exact match (0 or 1)
attribute   ``red``                                              exact match (0 or 1)
grounding   ``[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]``  IoU with the true box
=========== ==================================================== ==========================

Box coordinates are absolute pixels of the image *after* ``smart_resize`` (Qwen2.5-VL's
convention; Qwen2-VL used 0–1000). A grounding answer may come inside a ```` ```json ```` fence.

The parser is deliberately strict: it accepts exactly the taught format (surrounding whitespace, a
trailing full stop for count/attribute and letter case for colours are forgiven) and returns
``None`` for anything else, including text around the answer and several answers. "The format
reward" is therefore simply "the parser accepted the completion": a policy cannot earn accuracy
from a sentence that happens to contain the right number.

Reward functions follow TRL's ``GRPOTrainer`` calling convention
``reward(prompts=..., completions=..., **dataset_columns) -> list[float]`` (``task`` and
``target`` columns), accept plain strings or conversational completions, and never raise because
of a completion: one they cannot read scores 0. A malformed call (columns of different lengths, an
unknown task, a string where a column is expected, a bad target) is the caller's bug and raises.
"""

from __future__ import annotations

import math
import re
from typing import Any

from helpers.boxes import iou, parse_grounding
from helpers.data import TASKS  # the three tasks of the course data, defined there

#: Largest count the parser accepts (more digits than this is not an answer to "how many").
MAX_COUNT_DIGITS = 4
#: Largest coordinate (pixels) the parser accepts; Qwen2.5-VL's largest image side is far below.
MAX_COORDINATE = 100_000
#: IoU at or above which a box counts as "correct" for ``accuracy_reward`` (the usual detection bar).
IOU_HIT = 0.5

_COUNT = re.compile(rf"[0-9]{{1,{MAX_COUNT_DIGITS}}}")
_WORD = re.compile(r"[a-z]{1,20}")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task={task!r}: expected one of {', '.join(TASKS)}")


def _strip_full_stop(text: str) -> str:
    text = text.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def _parse_box(box: Any) -> list[float] | None:
    """Four finite numbers with 0 ≤ x1 ≤ x2, 0 ≤ y1 ≤ y2 (≤ MAX_COORDINATE), as floats; else None."""
    if not isinstance(box, list) or len(box) != 4:
        return None
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in box):
        return None
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) and 0 <= v <= MAX_COORDINATE for v in (x1, y1, x2, y2)):
        return None
    if x2 < x1 or y2 < y1:
        return None
    return [x1, y1, x2, y2]


def _parse_grounding(text: str) -> list[float] | None:
    try:
        objects = parse_grounding(text)
    except ValueError:
        return None
    if len(objects) != 1:
        return None  # empty, or several boxes
    return _parse_box(objects[0].get("bbox_2d"))


def parse_answer(task: str, text: str) -> int | str | list[float] | None:
    """The answer in ``text`` if it is in the taught format for ``task``, else None.

    count → ``int`` (digits only, at most ``MAX_COUNT_DIGITS``; no sign, no words);
    attribute → the lower-cased colour word (one word of letters);
    grounding → ``[x1, y1, x2, y2]`` floats (one box, ``x1 ≤ x2``, ``y1 ≤ y2``, finite, ≥ 0).
    Raises ValueError for an unknown task and TypeError when ``text`` is not a string.
    """
    _check_task(task)
    if not isinstance(text, str):
        raise TypeError(f"text={text!r}: expected a string (the completion)")
    if task == "count":
        body = _strip_full_stop(text)
        return int(body) if _COUNT.fullmatch(body) else None
    if task == "attribute":
        body = _strip_full_stop(text).lower()
        return body if _WORD.fullmatch(body) else None
    return _parse_grounding(text)


def _target_value(task: str, target: Any) -> int | str | list[float]:
    """The ground truth as a value: accepts the value itself or the answer string of the data."""
    if isinstance(target, str):
        parsed = parse_answer(task, target)
        if parsed is None:
            raise ValueError(f"target={target!r} is not a valid {task} answer")
        return parsed
    if task == "count" and isinstance(target, int) and not isinstance(target, bool) and target >= 0:
        return target
    if task == "grounding":
        try:
            box = [float(v) for v in target]
        except (TypeError, ValueError):
            box = []
        if len(box) == 4 and all(math.isfinite(v) for v in box):
            return box
    raise ValueError(
        f"target={target!r}: expected for task {task!r} "
        + {"count": "an int ≥ 0", "attribute": "a colour word", "grounding": "4 numbers [x1, y1, x2, y2]"}[task]
        + " or its answer string"
    )


def score(task: str, completion: str, target: Any) -> float:
    """How right ``completion`` is: exact match (1.0/0.0) for count and attribute, IoU for grounding.

    ``target`` is the ground truth (``Sample.target``: int, colour word, box) or its answer string.
    A completion the parser rejects scores 0.0. Raises ValueError for an unknown task or a bad
    target (a bug in the caller), never because of the completion.
    """
    _check_task(task)
    truth = _target_value(task, target)
    answer = parse_answer(task, completion) if isinstance(completion, str) else None
    if answer is None:
        return 0.0
    if task == "grounding":
        return iou(answer, truth)
    if task == "attribute":
        return float(answer == str(truth).lower())
    return float(answer == truth)


# ---------------------------------------------------------------------------------------------
# Reward functions (TRL GRPOTrainer convention: one float per completion, never raising)
# ---------------------------------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or TRL's conversational form (a list of messages whose
    last one is the assistant's, its content a string or a list of ``{"type": "text"}`` parts).
    Anything unreadable gives ``""``.
    """
    if isinstance(completion, str):
        return completion
    try:
        content = completion[-1]["content"]
        if isinstance(content, str):
            return content
        return "".join(part["text"] for part in content if part.get("type") == "text")
    except Exception:  # noqa: BLE001 - a reward never raises
        return ""


def _check_columns(completions, task, target, needs: tuple[str, ...]) -> int:
    """The number of completions, after checking the columns a reward receives (TRL passes each
    dataset column as a list, one entry per completion): a malformed call is the caller's bug and
    raises; only the completions' text is never a reason to raise."""
    if not isinstance(completions, (list, tuple)):
        raise TypeError(f"completions={completions!r:.80}: expected a list, one completion per row")
    count = len(completions)
    for name, column in (("task", task), ("target", target)):
        if column is None and name not in needs:
            continue
        if not isinstance(column, (list, tuple)):
            raise TypeError(
                f"{name}={column!r:.80}: expected a list with one entry per completion "
                f"({count}), e.g. {name}=[...] * {count}"
            )
        if len(column) != count:
            raise ValueError(
                f"{name} has {len(column)} entries for {count} completions: each column needs one entry per completion"
            )
    for i in range(count if task is not None else 0):
        _check_task(task[i])
        if target is not None and "target" in needs:
            _target_value(task[i], target[i])
    return count


def _per_completion(fn, completions, task, target, needs=("task", "target")) -> list[float]:
    """``fn(task[i], text_i, target[i])`` for each completion, 0.0 wherever the completion makes it
    fail; malformed columns raise (``_check_columns``)."""
    count = _check_columns(completions, task, target, needs)
    rewards = []
    for i in range(count):
        try:
            value = float(
                fn(
                    task[i] if task is not None else None,
                    completion_text(completions[i]),
                    target[i] if target is not None else None,
                )
            )
            rewards.append(value if math.isfinite(value) else 0.0)
        except Exception:  # noqa: BLE001 - a reward never raises: unreadable → 0
            rewards.append(0.0)
    return rewards


def accuracy_reward(completions, task, target, **kwargs) -> list[float]:
    """1.0 when the answer is right, else 0.0: exact match for count and attribute, and for
    grounding a box with IoU ≥ ``IOU_HIT`` (0.5). Range {0, 1}."""

    def hit(t, text, y):
        value = score(t, text, y)
        return float(value >= IOU_HIT) if t == "grounding" else value

    return _per_completion(hit, completions, task, target)


def iou_reward(completions, task, target, **kwargs) -> list[float]:
    """IoU of the predicted box with the true one on grounding rows, 0.0 on other tasks' rows.
    Range [0, 1]."""
    return _per_completion(lambda t, text, y: score(t, text, y) if t == "grounding" else 0.0, completions, task, target)


def task_reward(completions, task, target, **kwargs) -> list[float]:
    """The graded score GRPO trains on: ``score`` (exact match for count/attribute, IoU for
    grounding). Range [0, 1]."""
    return _per_completion(score, completions, task, target)


def format_reward(completions, task, target=None, **kwargs) -> list[float]:
    """1.0 when the parser accepts the completion as an answer to its task, else 0.0. Range {0, 1}."""
    return _per_completion(
        lambda t, text, y: float(parse_answer(t, text) is not None), completions, task, target, needs=("task",)
    )


_R1_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)


def think_format_reward(completions, task=None, target=None, **kwargs) -> list[float]:
    """1.0 for R1-style ``<think>…</think><answer>…</answer>``, else 0.0. Range {0, 1}.

    Our SFT data never shows these tags, so after SFT this reward is 0 on every completion
    (QUESTIONS.md trap #16) — notebook 11 uses it to reproduce the trap.
    """
    return _per_completion(
        lambda t, text, y: float(_R1_FORMAT.fullmatch(text) is not None), completions, task, target, needs=()
    )


#: reward name → function (TRL's convention: ``f(completions, **columns) -> list[float]``), the ones
#: ``helpers.grpo`` sums with ``GRPOSettings.reward_weights`` and hands to TRL's ``GRPOTrainer``.
REWARD_FUNCTIONS = {"task": task_reward, "format": format_reward}

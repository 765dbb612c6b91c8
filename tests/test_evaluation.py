"""helpers.evaluation: image-blind baselines, the significance tests, and the score table."""

import math

import pytest

from helpers import evaluation
from helpers.data import make_split
from helpers.rewards import iou


def test_binomial_p_value_is_the_exact_tail():
    for hits, n, p0 in ((0, 5, 0.3), (7, 10, 0.5), (30, 40, 0.26), (100, 100, 0.9)):
        tail = sum(math.comb(n, k) * p0**k * (1 - p0) ** (n - k) for k in range(hits, n + 1))
        assert evaluation.binomial_p_value(hits, n, p0) == pytest.approx(tail, rel=1e-9)
    assert evaluation.binomial_p_value(0, 10, 0.4) == pytest.approx(1.0)
    assert evaluation.binomial_p_value(300, 300, 0.34) < 1e-100  # log-space: no underflow to 0 / 0


def test_wilson_interval_known_values():
    low, high = evaluation.wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = evaluation.wilson_interval(50, 100)
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)


def test_sign_test_drops_ties():
    assert evaluation.sign_test_p_value([1, 1, 0.5], [0, 0, 0.5]) == pytest.approx(0.25)
    assert evaluation.sign_test_p_value([0.3, 0.3], [0.3, 0.3]) == 1.0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: evaluation.binomial_p_value(5, 3, 0.5), r"hits=5, n=3"),
        (lambda: evaluation.binomial_p_value(1, 3, 1.5), r"p0=1.5"),
        (lambda: evaluation.wilson_interval(-1, 3), r"hits=-1"),
        (lambda: evaluation.sign_test_p_value([1], [1, 2]), r"1 scores but 2 baseline"),
        (lambda: evaluation.best_constant_box([]), r"targets is empty"),
        (lambda: evaluation.score_answers(make_split("val", 2), ["1"]), r"2 samples but 1 answers"),
    ],
)
def test_bad_calls_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_best_constant_box_beats_every_target_box_and_whole_image():
    targets = [s.target for s in make_split("test", 200) if s.task == "grounding"]
    box, score = evaluation.best_constant_box(targets)
    mean = lambda b: sum(iou(b, t) for t in targets) / len(targets)  # noqa: E731
    assert score == pytest.approx(mean(box))
    assert all(score >= mean(t) - 1e-12 for t in targets) and score >= mean([0, 0, 112, 112])


def test_blind_baselines_are_the_majority_answer():
    samples = make_split("test", 120)
    base = evaluation.blind_baselines(samples)
    colours = [s.target for s in samples if s.task == "attribute"]
    assert base["attribute"]["score"] == max(colours.count(c) for c in set(colours)) / len(colours)
    assert set(base) == {s.task for s in samples}
    perfect = evaluation.score_answers(samples, [s.answer for s in samples])
    rows = evaluation.score_table(perfect, base)
    assert all(r["score"] == 1.0 and r["p"] < 1e-6 for r in rows)
    assert {r["task"]: r["n"] for r in rows} == {t: sum(s.task == t for s in samples) for t in base}

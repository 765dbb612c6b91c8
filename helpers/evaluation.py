"""Scoring a model on the shapes task, the one evaluator of SFT (notebook 10) and GRPO (notebook 11).

- ``generate_answers``: greedy answers from ``model.generate`` on left-padded prompt batches built
  by the SFT collator, so the model gets exactly the inputs it was trained with (``mm_token_type_ids``
  included: without it transformers 5.24 falls back to 1-D positions, trap #18).
- ``evaluate``: per task, each answer scored by ``helpers.rewards.score`` (exact match for count and
  colour, IoU for boxes) and by ``format_reward`` (is it in the taught format at all).
- ``blind_baselines``: what a model that never looks at the image can score on the same questions:
  the commonest answer of each task (count, colour) and the best constant box (grounding).
- ``binomial_p_value``, ``wilson_interval``, ``sign_test_p_value``: is a score more than luck?
- ``score_table``: scores beside their baselines, with n, interval and p-value, as notebooks print them.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence

import torch

from helpers import rewards
from helpers.tokenizer import SPECIAL_TOKENS

#: Longest answer (in tokens) each task can need; a grounding answer is about 30 tokens.
MAX_NEW_TOKENS = {"count": 4, "attribute": 4, "grounding": 40}
PAD_ID = SPECIAL_TOKENS["<|endoftext|>"]


def unwrap(model):
    """The ``Qwen2_5_VLForConditionalGeneration`` inside DDP / PEFT wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


@torch.no_grad()
def generate_answers(
    model,
    processor,
    samples: Sequence,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    bf16: bool | None = None,
) -> list[str]:
    """Greedy answers (``model.generate``, left padding, stop at ``<|im_end|>``), in sample order."""
    from helpers.sft import SFTCollator

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected an integer ≥ 1")
    base = unwrap(model).eval()
    device = next(base.parameters()).device
    bf16 = device.type == "cuda" if bf16 is None else bf16
    collator = SFTCollator(processor, with_answer=False, side="left")
    answers = []
    for lo in range(0, len(samples), batch_size):
        chunk = samples[lo : lo + batch_size]
        batch = collator(chunk)
        batch.pop("labels")
        new = max_new_tokens or max(MAX_NEW_TOKENS[s.task] for s in chunk)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = base.generate(
                **{k: v.to(device) for k, v in batch.items()},
                max_new_tokens=new,
                do_sample=False,
                eos_token_id=SPECIAL_TOKENS["<|im_end|>"],
                pad_token_id=PAD_ID,
            )
        answers += processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


def score_answers(samples: Sequence, answers: Sequence[str]) -> dict:
    """``{task: {"score", "n", "scores", "format", "predictions"}}`` for answers already generated."""
    if len(samples) != len(answers):
        raise ValueError(f"{len(samples)} samples but {len(answers)} answers: expected one answer per sample")
    result = {}
    for task in dict.fromkeys(s.task for s in samples):
        rows = [(s, a) for s, a in zip(samples, answers) if s.task == task]
        scores = [float(rewards.score(task, a, s.target)) for s, a in rows]
        formats = rewards.format_reward([a for _, a in rows], task=[task] * len(rows))
        result[task] = {
            "score": sum(scores) / len(scores),
            "n": len(rows),
            "scores": scores,
            "format": sum(formats) / len(formats),
            "predictions": [a for _, a in rows],
        }
    return result


def evaluate(model, processor, samples: Sequence, batch_size: int = 32) -> dict:
    """Greedy answers to ``samples``, scored per task (see ``score_answers``).

    Each task is generated on its own (a count needs 4 new tokens, a box 40), so the result does not
    depend on how tasks are mixed in ``samples``."""
    if not samples:
        raise ValueError("samples is empty: expected at least one helpers.data.Sample")
    answers: dict[int, str] = {}
    for task in dict.fromkeys(s.task for s in samples):
        rows = [i for i, s in enumerate(samples) if s.task == task]
        for i, a in zip(rows, generate_answers(model, processor, [samples[i] for i in rows], batch_size)):
            answers[i] = a
    return score_answers(samples, [answers[i] for i in range(len(samples))])


def summary(result: dict) -> dict:
    """``{task: score}`` plus ``"score"`` (mean over every question) and ``"format"`` (share parsable)."""
    n = sum(r["n"] for r in result.values())
    return {
        **{task: r["score"] for task, r in result.items()},
        "score": sum(r["score"] * r["n"] for r in result.values()) / n,
        "format": sum(r["format"] * r["n"] for r in result.values()) / n,
    }


# ---------------------------------------------------------------------------------------------
# Image-blind baselines
# ---------------------------------------------------------------------------------------------


def best_constant_box(targets: Sequence[Sequence[float]]) -> tuple[list[float], float]:
    """The box that, answered to every question, has the highest mean IoU with ``targets``.

    Searched over every box whose sides are coordinates the targets use (x1 and x2 from the targets'
    x values, y1 and y2 from their y values): the optimum of mean IoU lies on such a box for the
    grid-aligned targets of ``helpers.data``, and it is a strong image-blind answer for any data."""
    if not targets:
        raise ValueError("targets is empty: expected at least one box")
    xs = sorted({float(v) for b in targets for v in (b[0], b[2])})
    ys = sorted({float(v) for b in targets for v in (b[1], b[3])})
    best, best_score = None, -1.0
    for (x1, x2), (y1, y2) in itertools.product(itertools.combinations(xs, 2), itertools.combinations(ys, 2)):
        box = [x1, y1, x2, y2]
        mean = sum(rewards.iou(box, t) for t in targets) / len(targets)
        if mean > best_score:
            best, best_score = box, mean
    return best, best_score


def blind_baselines(samples: Sequence) -> dict:
    """Per task, the best a model can score without looking at the image: ``{"answer", "score", "scores"}``.

    count and attribute: the commonest target among these questions, answered to all of them
    (an upper bound on any constant answer, since it is chosen on the evaluation set itself);
    grounding: ``best_constant_box`` of the targets."""
    out = {}
    for task in dict.fromkeys(s.task for s in samples):
        targets = [s.target for s in samples if s.task == task]
        if task == "grounding":
            box, _ = best_constant_box(targets)
            scores = [rewards.iou(box, t) for t in targets]
            answer = box
        else:
            answer = Counter(targets).most_common(1)[0][0]
            scores = [float(t == answer) for t in targets]
        out[task] = {"answer": answer, "score": sum(scores) / len(scores), "scores": scores}
    return out


# ---------------------------------------------------------------------------------------------
# Significance
# ---------------------------------------------------------------------------------------------


def binomial_p_value(hits: int, n: int, p0: float) -> float:
    """One-sided exact binomial test: P(X ≥ hits) for X ~ Binomial(n, p0) (``scipy.stats.binomtest``
    with ``alternative="greater"``)."""
    if not (isinstance(n, int) and isinstance(hits, int) and 0 <= hits <= n and n >= 1):
        raise ValueError(f"hits={hits!r}, n={n!r}: expected integers with 0 ≤ hits ≤ n, n ≥ 1")
    if not 0 <= p0 <= 1:
        raise ValueError(f"p0={p0!r}: expected a probability in [0, 1]")
    if p0 in (0.0, 1.0):
        return float(hits == 0) if p0 == 0 else 1.0
    logs = [
        math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p0) + (n - k) * math.log1p(-p0)
        for k in range(hits, n + 1)
    ]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % for z = 1.96), as ``statsmodels``'
    ``proportion_confint(method="wilson")``."""
    if not (isinstance(n, int) and isinstance(hits, int) and 0 <= hits <= n and n >= 1):
        raise ValueError(f"hits={hits!r}, n={n!r}: expected integers with 0 ≤ hits ≤ n, n ≥ 1")
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test_p_value(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """One-sided paired sign test that ``scores`` beat ``baseline`` question by question (ties dropped):
    the test used for IoU, which is not a proportion."""
    if len(scores) != len(baseline):
        raise ValueError(f"{len(scores)} scores but {len(baseline)} baseline scores: expected pairs")
    wins = sum(a > b for a, b in zip(scores, baseline))
    losses = sum(a < b for a, b in zip(scores, baseline))
    return binomial_p_value(wins, wins + losses, 0.5) if wins + losses else 1.0


def score_table(result: dict, baselines: dict) -> list[dict]:
    """One row per task: n, score, image-blind baseline, a 95 % interval and the one-sided p-value of
    "better than the baseline" (exact binomial for accuracies, sign test for IoU)."""
    rows = []
    for task, r in result.items():
        base = baselines[task]
        if task == "grounding":
            low, high = float("nan"), float("nan")
            p_value = sign_test_p_value(r["scores"], base["scores"])
        else:
            hits = round(sum(r["scores"]))
            low, high = wilson_interval(hits, r["n"])
            p_value = binomial_p_value(hits, r["n"], base["score"])
        rows.append(
            {
                "task": task,
                "n": r["n"],
                "score": r["score"],
                "blind": base["score"],
                "low": low,
                "high": high,
                "p": p_value,
            }
        )
    return rows

"""The course's training task: coloured shapes whose answers can be checked exactly (taught in
notebooks/10_sft.ipynb, reused by notebooks/11_grpo.ipynb through helpers.grpo).

Every image is drawn from a seed: circles, squares and triangles in a few colours, of varying
sizes and positions, on a light background. Each sample asks one question of one of three kinds:

- ``count``:     "How many red circles are there?"   → ``"3"``
- ``attribute``: "What colour is the triangle?"      → ``"red"``
- ``grounding``: "Where is the blue square?"         → ``'[{"bbox_2d": [x1, y1, x2, y2], "label": "blue square"}]'``

Grounding answers use Qwen2.5-VL's format: absolute pixel coordinates of the image *as the model
sees it* (after ``smart_resize``). Our images are drawn at a side that is a multiple of 28, so
``smart_resize`` leaves them unchanged and the drawn coordinates are already the right ones.

Splits: ``train`` / ``val`` / ``test`` come from the same distribution (disjoint random streams);
``ood`` is out of distribution in two ways at once: count questions ask for more objects than any
training image holds, and attribute / grounding questions are about colour–shape pairs that never
appear together in train/val/test (``HELD_OUT_PAIRS``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from helpers.chat import format_data

SHAPES = ("circle", "square", "triangle")
#: Colour name → RGB. Well apart in RGB so one 14-pixel patch tells them apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (235, 190, 20),
    "purple": (140, 60, 170),
}
TASKS = ("count", "attribute", "grounding")
SPLITS = ("train", "val", "test", "ood")
BACKGROUND = (245, 245, 240)
#: Colour–shape pairs that only the ``ood`` split shows (for attribute and grounding questions).
HELD_OUT_PAIRS = (("red", "triangle"), ("blue", "circle"))

DEFAULTS = dict(
    image_size=112,          # pixels per side; a multiple of 28 so smart_resize keeps it
    tasks=TASKS,
    task_weights=None,       # None → equal
    count_range=(1, 4),      # train/val/test counts
    ood_count_range=(5, 6),  # ood counts
    max_distractors=2,       # other shapes besides the asked-about ones
    shape_size=(0.16, 0.26),  # side of a shape as a fraction of the image side
    colours=tuple(COLOURS),
)


@dataclass
class Sample:
    """One training/evaluation example.

    ``target`` is what a scorer compares against: an ``int`` count, a colour word, or a bbox
    ``[x1, y1, x2, y2]`` in absolute pixels of ``image`` (which is already at its model size).
    """

    image: Image.Image
    task: str
    question: str
    answer: str
    target: int | str | list[int]
    shapes: list[dict] = field(default_factory=list)  # every drawn shape: shape, colour, bbox
    split: str = "train"
    index: int = 0
    seed: int = 0


def grounding_answer(bbox: list[int], label: str) -> str:
    """Qwen2.5-VL's grounding answer: compact JSON ``[{"bbox_2d": [...], "label": ...}]``."""
    return json.dumps([{"bbox_2d": [int(v) for v in bbox], "label": label}], separators=(", ", ": "))


def _check_options(split: str, n: int, options: dict) -> dict:
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown data options {sorted(unknown)}; accepted: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **options}
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n={n!r}: expected an integer ≥ 1 (number of images)")
    size = opts["image_size"]
    if not isinstance(size, int) or size < 56 or size % 28:
        raise ValueError(f"image_size={size!r}: expected a multiple of 28 that is ≥ 56 (smart_resize keeps it)")
    bad = [c for c in opts["colours"] if c not in COLOURS]
    if bad or len(opts["colours"]) < 2:
        raise ValueError(f"colours={tuple(opts['colours'])!r}: unknown {bad}; accepted: at least 2 of {tuple(COLOURS)}")
    bad = [t for t in opts["tasks"] if t not in TASKS]
    if bad or not opts["tasks"]:
        raise ValueError(f"tasks={tuple(opts['tasks'])!r}: expected a non-empty subset of {TASKS}")
    if opts["task_weights"] is not None:
        w = opts["task_weights"]
        if len(w) != len(opts["tasks"]) or min(w) < 0 or sum(w) <= 0:
            raise ValueError(f"task_weights={w!r}: expected {len(opts['tasks'])} non-negative weights with a positive sum")
    low_size, high_size = opts["shape_size"]
    if not 0.05 <= low_size <= high_size <= 0.5:
        raise ValueError(f"shape_size={opts['shape_size']!r}: expected 0.05 ≤ low ≤ high ≤ 0.5 (fraction of the side)")
    capacity = _capacity(size, high_size)
    for key in ("count_range", "ood_count_range"):
        low, high = opts[key]
        if not (isinstance(low, int) and isinstance(high, int)) or not 1 <= low <= high <= capacity:
            raise ValueError(
                f"{key}={opts[key]!r}: expected 1 ≤ low ≤ high ≤ {capacity} (shapes of up to "
                f"{high_size:.2f}·{size} px fit at most {capacity} times in a {size}-px image)"
            )
    if opts["ood_count_range"][0] <= opts["count_range"][1]:
        raise ValueError(f"ood_count_range={opts['ood_count_range']!r} must start above count_range={opts['count_range']!r}")
    d = opts["max_distractors"]
    if not isinstance(d, int) or d < 0 or opts["ood_count_range"][1] + d > capacity:
        raise ValueError(f"max_distractors={d!r}: expected 0 ≤ d ≤ {capacity - opts['ood_count_range'][1]} "
                         f"(ood_count_range top + distractors ≤ {capacity} shapes per image)")
    return opts


def _capacity(size: int, high: float) -> int:
    """How many of the largest shapes we promise to place without overlap (a conservative grid)."""
    cell = int(np.ceil(high * size)) + 2
    return (size // cell) ** 2


def _place(rng, size: int, n: int, size_range) -> list[list[int]]:
    """``n`` non-overlapping square boxes, by rejection sampling; a grid fallback always fits."""
    boxes: list[list[int]] = []
    for _ in range(n):
        for _attempt in range(200):
            side = int(rng.integers(round(size_range[0] * size), round(size_range[1] * size) + 1))
            x, y = (int(v) for v in rng.integers(1, size - side - 1, size=2))
            box = [x, y, x + side, y + side]
            if all(box[2] + 2 <= b[0] or b[2] + 2 <= box[0] or box[3] + 2 <= b[1] or b[3] + 2 <= box[1] for b in boxes):
                boxes.append(box)
                break
        else:
            return _grid_place(rng, size, n, size_range)
    return boxes


def _grid_place(rng, size: int, n: int, size_range) -> list[list[int]]:
    cell = int(np.ceil(size_range[1] * size)) + 2
    per_row = size // cell
    cells = rng.permutation(per_row * per_row)[:n]
    side = round(size_range[1] * size)
    return [[int(c % per_row) * cell + 1, int(c // per_row) * cell + 1,
             int(c % per_row) * cell + 1 + side, int(c // per_row) * cell + 1 + side] for c in cells]


def draw_shapes(size: int, shapes: list[dict]) -> Image.Image:
    """An RGB image of side ``size`` with each ``{"shape", "colour", "bbox"}`` drawn in its box."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for item in shapes:
        x1, y1, x2, y2 = item["bbox"]
        fill = COLOURS[item["colour"]]
        if item["shape"] == "circle":
            pen.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
        elif item["shape"] == "square":
            pen.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
        else:
            pen.polygon([((x1 + x2 - 1) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)
    return image


def _pairs(opts: dict, split: str) -> list[tuple[str, str]]:
    everything = [(c, s) for c in opts["colours"] for s in SHAPES]
    held = [p for p in everything if p in HELD_OUT_PAIRS]
    seen = [p for p in everything if p not in HELD_OUT_PAIRS]
    return (held or seen) if split == "ood" else seen


def _make_one(rng, task: str, split: str, opts: dict) -> tuple[str, str, object, list[dict]]:
    size = opts["image_size"]
    seen = _pairs(opts, "train")
    if task == "count":
        colour, shape = seen[rng.integers(len(seen))]  # asked pairs are never held out for counting
        low, high = opts["ood_count_range"] if split == "ood" else opts["count_range"]
        k = int(rng.integers(low, high + 1))
        others = [p for p in seen if p != (colour, shape)]
        asked = [(colour, shape)] * k
        question = f"How many {colour} {shape}s are there?"
    else:
        pairs = _pairs(opts, split)
        colour, shape = pairs[rng.integers(len(pairs))]
        if task == "attribute":  # the only one of its shape: other shapes only
            others = [p for p in seen if p[1] != shape]
            question = f"What colour is the {shape}?"
        else:                    # the only one of its colour-and-shape
            others = [p for p in seen if p != (colour, shape)]
            question = f"Where is the {colour} {shape}?"
        asked = [(colour, shape)]
    n_other = int(rng.integers(0, opts["max_distractors"] + 1))
    distractors = [others[i] for i in rng.integers(len(others), size=n_other)]
    kinds = asked + distractors
    order = rng.permutation(len(kinds))
    boxes = _place(rng, size, len(kinds), opts["shape_size"])
    shapes = [{"colour": kinds[i][0], "shape": kinds[i][1], "bbox": box} for i, box in zip(order, boxes)]
    if task == "count":
        return question, str(len(asked)), len(asked), shapes
    target_item = next(s for s in shapes if (s["colour"], s["shape"]) == (colour, shape))
    if task == "attribute":
        return question, colour, colour, shapes
    bbox = list(target_item["bbox"])
    return question, grounding_answer(bbox, f"{colour} {shape}"), bbox, shapes


def make_sample(split: str, index: int, seed: int = 0, **options) -> Sample:
    """Sample ``index`` of ``split``: the same (split, index, seed, options) always gives the same sample."""
    opts = _check_options(split, 1, options)
    return _sample(split, index, seed, opts)


def _sample(split: str, index: int, seed: int, opts: dict) -> Sample:
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    weights = np.asarray(opts["task_weights"] or [1.0] * len(opts["tasks"]), dtype=float)
    task = opts["tasks"][rng.choice(len(opts["tasks"]), p=weights / weights.sum())]
    question, answer, target, shapes = _make_one(rng, task, split, opts)
    return Sample(draw_shapes(opts["image_size"], shapes), task, question, answer, target, shapes, split, index, seed)


def make_split(split: str, n: int, seed: int = 0, **options) -> list[Sample]:
    """``n`` samples of ``split`` ("train", "val", "test" or "ood"), deterministic by ``seed``.

    Options (see ``DEFAULTS``): image_size, tasks, task_weights, count_range, ood_count_range,
    max_distractors, shape_size, colours. Each split draws from its own random stream, so the
    splits never share an image.
    """
    opts = _check_options(split, n, options)
    return [_sample(split, i, seed, opts) for i in range(n)]


def sample_messages(sample: Sample, with_answer: bool = True, system: str | None = None) -> list[dict]:
    """The conversation of ``sample`` via ``helpers.chat.format_data`` (answer included for SFT)."""
    if not isinstance(sample, Sample):
        raise TypeError(f"sample is a {type(sample).__name__}: expected helpers.data.Sample")
    return format_data(sample.image, sample.question, sample.answer if with_answer else None, system=system)

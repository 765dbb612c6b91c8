"""The course's training task: coloured shapes whose answers can be checked exactly (taught in
notebooks/10_sft.ipynb, reused by notebooks/11_grpo.ipynb).

Every image is drawn from a seed on a grid of 28-pixel cells, one cell per *merged* vision token
(2×2 patches of 14 px, notebook 04), one shape centred in each occupied cell. Each sample asks one
question of one of three kinds, drawn in equal shares by default:

- ``count``:     "How many red circles are there?"   → ``"3"``
- ``attribute``: "What colour is the triangle?"      → ``"red"``
- ``grounding``: "Where is the blue square?"         → ``'[{"bbox_2d": [x1, y1, x2, y2], "label": "blue square"}]'``

Grounding answers use Qwen2.5-VL's format: absolute pixel coordinates of the image *as the model
sees it* (after ``smart_resize``). Our images are drawn at a side that is a multiple of 28, so
``smart_resize`` leaves them unchanged and the drawn coordinates are already the right ones.

Why a grid, and why a tinted background (both measured in notebook 10): a shape that straddles
merged tokens is split across several of them, and a small model then learns neither to count nor
to locate it; one shape per merged token makes "which token" the whole question. Locating needs
more: rotary positions (in the vision tower and in M-RoPE) enter attention *scores*, never the
values an answer token reads, so a tiny model trained for minutes cannot tell a shape in the left
column from one in the right. ``position_cue`` tints the background faintly by x (red channel) and
y (blue channel), so the pixels under each shape say where it is; a pretrained checkpoint has
learnt position from billions of images and needs no such help.

Splits: ``train`` / ``val`` / ``test`` come from the same distribution (disjoint random streams).
``ood`` asks only about colour–shape pairs that never appear in train/val/test images
(``HELD_OUT_PAIRS``), with the same answer vocabulary (counts, colour words, grid boxes): it
measures whether colour and shape were learnt apart, not whether the model can say an unseen token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from helpers.boxes import compact_grounding_answer
from helpers.chat import format_data
from helpers.constants import FACTOR

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
#: One cell per merged vision token: patch 14 × spatial merge 2 (Qwen2.5-VL's ``image_factor``).
CELL = FACTOR
#: Background at the top-left corner; ``position_cue`` darkens red to the right and blue downwards.
BACKGROUND = (250, 246, 250)
#: Largest tint (in 0–255 levels, at the far edge) for ``position_cue=1``.
CUE_LEVELS = 180
#: Colour–shape pairs that only the ``ood`` split shows.
HELD_OUT_PAIRS = (("red", "triangle"), ("blue", "circle"))

DEFAULTS = dict(
    image_size=112,  # pixels per side, a multiple of 28: a 4 × 4 grid of cells
    tasks=TASKS,
    task_weights=None,  # None → equal shares, exactly (tasks take turns by index)
    count_range=(1, 3),  # how many shapes of the asked kind a count question shows (every split)
    max_distractors=2,  # other shapes besides the asked-about ones
    shape_size=(20, 20),  # side of a shape in pixels, centred in its 28-px cell
    position_cue=1.0,  # strength of the background tint by x and y (0 = plain background)
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
    shapes: list[dict] = field(default_factory=list)  # every drawn shape: shape, colour, bbox, cell
    split: str = "train"
    index: int = 0
    seed: int = 0


def grid_cells(image_size: int) -> int:
    """Cells per side of an image: one per merged vision token (``image_size // 28``)."""
    return image_size // CELL


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_options(split: str, n: int, options: dict) -> dict:
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown data options {sorted(unknown)}; accepted: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **options}
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    if not _is_int(n) or n < 1:
        raise ValueError(f"n={n!r}: expected an integer ≥ 1 (number of images)")
    size = opts["image_size"]
    if not _is_int(size) or size < 2 * CELL or size % CELL:
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
            raise ValueError(
                f"task_weights={w!r}: expected {len(opts['tasks'])} non-negative weights with a positive sum"
            )
    low_size, high_size = opts["shape_size"]
    if not (_is_int(low_size) and _is_int(high_size)) or not 8 <= low_size <= high_size <= CELL - 2:
        raise ValueError(
            f"shape_size={opts['shape_size']!r}: expected integers 8 ≤ low ≤ high ≤ {CELL - 2} "
            f"(pixels; a shape sits inside its {CELL}-px cell)"
        )
    cue = opts["position_cue"]
    if isinstance(cue, bool) or not isinstance(cue, (int, float)) or not 0 <= cue <= 1:
        raise ValueError(f"position_cue={cue!r}: expected a number in [0, 1] (0 = plain background)")
    capacity = grid_cells(size) ** 2
    low, high = opts["count_range"]
    if not (_is_int(low) and _is_int(high)) or not 1 <= low <= high <= capacity:
        raise ValueError(
            f"count_range={opts['count_range']!r}: expected 1 ≤ low ≤ high ≤ {capacity} "
            f"(a {size}-px image has {capacity} cells of {CELL} px)"
        )
    d = opts["max_distractors"]
    if not _is_int(d) or d < 0 or high + d > capacity:
        raise ValueError(
            f"max_distractors={d!r}: expected 0 ≤ d ≤ {capacity - high} "
            f"(count_range top + distractors ≤ {capacity} cells)"
        )
    return opts


def _background(size: int, cue: float) -> np.ndarray:
    """(size, size, 3) uint8: ``BACKGROUND`` with each 28-px cell's red lowered by its column and its
    blue by its row (a step per cell, up to ``CUE_LEVELS · cue`` at the far cells)."""
    cells = grid_cells(size)
    steps = np.repeat(np.arange(cells) / max(1, cells - 1), CELL) * CUE_LEVELS * cue
    image = np.empty((size, size, 3), dtype=np.float64)
    image[..., 0] = BACKGROUND[0] - steps[None, :]
    image[..., 1] = BACKGROUND[1]
    image[..., 2] = BACKGROUND[2] - steps[:, None]
    return np.rint(image).astype(np.uint8)


def cell_box(cell: tuple[int, int], side: int) -> list[int]:
    """The ``[x1, y1, x2, y2]`` of a ``side``-px shape centred in grid cell ``(row, column)``."""
    row, column = cell
    offset = (CELL - side) // 2
    x1, y1 = column * CELL + offset, row * CELL + offset
    return [x1, y1, x1 + side, y1 + side]


def draw_shapes(size: int, shapes: list[dict], position_cue: float = 0.0) -> Image.Image:
    """An RGB image of side ``size`` with each ``{"shape", "colour", "bbox"}`` drawn in its box."""
    image = Image.fromarray(_background(size, position_cue))
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
    seen = _pairs(opts, "train")
    colour, shape = _pairs(opts, split)[rng.integers(len(_pairs(opts, split)))]
    if task == "count":
        low, high = opts["count_range"]
        asked = [(colour, shape)] * int(rng.integers(low, high + 1))
        others = [p for p in seen if p != (colour, shape)]
        question = f"How many {colour} {shape}s are there?"
    elif task == "attribute":  # the only one of its shape: distractors are other shapes
        asked, others = [(colour, shape)], [p for p in seen if p[1] != shape]
        question = f"What colour is the {shape}?"
    else:  # the only one of its colour-and-shape
        asked, others = [(colour, shape)], [p for p in seen if p != (colour, shape)]
        question = f"Where is the {colour} {shape}?"
    n_other = int(rng.integers(0, opts["max_distractors"] + 1))
    kinds = asked + [others[i] for i in rng.integers(len(others), size=n_other)]
    per_side = grid_cells(opts["image_size"])
    cells = rng.permutation(per_side * per_side)[: len(kinds)]
    low, high = opts["shape_size"]
    shapes = []
    for (c, s), cell in zip(kinds, cells):
        where = (int(cell) // per_side, int(cell) % per_side)
        shapes.append(
            {"colour": c, "shape": s, "cell": where, "bbox": cell_box(where, int(rng.integers(low, high + 1)))}
        )
    if task == "count":
        return question, str(len(asked)), len(asked), shapes
    if task == "attribute":
        return question, colour, colour, shapes
    bbox = list(shapes[0]["bbox"])
    return question, compact_grounding_answer(bbox, f"{colour} {shape}"), bbox, shapes


def make_sample(split: str, index: int, seed: int = 0, **options) -> Sample:
    """Sample ``index`` of ``split``: the same (split, index, seed, options) always gives the same sample."""
    opts = _check_options(split, 1, options)
    if not _is_int(index) or index < 0 or not _is_int(seed) or seed < 0:
        raise ValueError(f"index={index!r}, seed={seed!r}: expected integers ≥ 0")
    return _sample(split, index, seed, opts)


def _sample(split: str, index: int, seed: int, opts: dict) -> Sample:
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    if opts["task_weights"] is None:  # equal shares, exactly: the tasks take turns by index
        task = opts["tasks"][index % len(opts["tasks"])]
    else:
        weights = np.asarray(opts["task_weights"], dtype=float)
        task = opts["tasks"][rng.choice(len(opts["tasks"]), p=weights / weights.sum())]
    question, answer, target, shapes = _make_one(rng, task, split, opts)
    image = draw_shapes(opts["image_size"], shapes, opts["position_cue"])
    return Sample(image, task, question, answer, target, shapes, split, index, seed)


def make_split(split: str, n: int, seed: int = 0, **options) -> list[Sample]:
    """``n`` samples of ``split`` ("train", "val", "test" or "ood"), deterministic by ``seed``.

    Options (see ``DEFAULTS``): image_size, tasks, task_weights, count_range, max_distractors,
    shape_size, position_cue, colours. Each split draws from its own random stream, so the splits
    never share an image.
    """
    opts = _check_options(split, n, options)
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed={seed!r}: expected an integer ≥ 0")
    return [_sample(split, i, seed, opts) for i in range(n)]


class ShapesStream(torch.utils.data.Dataset):
    """``make_sample(split, i, seed, **options)`` as a Dataset: samples drawn on demand (DataLoader
    workers draw them in parallel on a GPU machine)."""

    def __init__(self, split: str, n: int, seed: int = 0, **options):
        make_sample(split, 0, seed, **options)  # validates the options now
        self.split, self.n, self.seed, self.options = split, n, seed, options

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return make_sample(self.split, int(i), self.seed, **self.options)


def sample_messages(sample: Sample, with_answer: bool = True, system: str | None = None) -> list[dict]:
    """The conversation of ``sample`` via ``helpers.chat.format_data`` (answer included for SFT)."""
    if not isinstance(sample, Sample):
        raise TypeError(f"sample is a {type(sample).__name__}: expected helpers.data.Sample")
    return format_data(sample.image, sample.question, sample.answer if with_answer else None, system=system)

"""Boxes: one coordinate convention, one IoU, the grounding answers and their one parser
(notebook 02 teaches the coordinates; 01 the answer Qwen writes; 10 and 11 train and score it).

Conventions, everywhere in the course:

- a box is ``(x1, y1, x2, y2)`` in pixels, x to the right, y down;
- an image size is ``(height, width)``: the order ``smart_resize`` returns and an
  ``image_grid_thw`` row holds (``PIL.Image.size`` is ``(width, height)``: swap it first);
- Qwen2.5-VL reads and writes boxes in pixels of the *resized* image it saw (Qwen2-VL used a
  0–1000 grid: ``box_to_thousandths``).

Two grounding answers are taught, both lists of ``{"bbox_2d": [...], "label": ...}``:
``fenced_grounding_answer`` is the released model's (a ```` ```json ```` fence, one object per
line, several objects); ``compact_grounding_answer`` is the course task's (one object on one line,
what notebook 10 trains the course model to write). ``parse_grounding`` reads both.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from numbers import Integral, Real

import numpy as np

# ---------------------------------------------------------------------------------------------
# Original pixels ↔ resized pixels
# ---------------------------------------------------------------------------------------------


def _check_size(name: str, size) -> tuple[int, int]:
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise TypeError(f"{name}={size!r}: expected (height, width)")
    for index, side in enumerate(("height", "width")):
        value = size[index]
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise ValueError(f"{name}[{index}] ({side})={value!r}: expected an integer ≥ 1 (pixels)")
    return int(size[0]), int(size[1])


def _check_box(box, size: tuple[int, int]) -> tuple[float, float, float, float]:
    if not isinstance(box, (tuple, list, np.ndarray)) or len(box) != 4:
        raise TypeError(f"box={box!r}: expected (x1, y1, x2, y2)")
    if not all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        raise TypeError(f"box={box!r}: expected four finite numbers")
    x1, y1, x2, y2 = (float(v) for v in box)
    height, width = size
    if not (0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height):
        raise ValueError(
            f"box={tuple(box)}: expected 0 ≤ x1 ≤ x2 ≤ {width} and 0 ≤ y1 ≤ y2 ≤ {height} "
            f"(pixels of an image of height {height}, width {width})"
        )
    return x1, y1, x2, y2


def map_box(box, from_size, to_size) -> tuple[float, float, float, float]:
    """Box (x1, y1, x2, y2) in pixels of an image of ``from_size`` = (height, width), expressed in
    pixels of the same image resized to ``to_size`` = (height, width): x scales by the width ratio,
    y by the height ratio. Exact floats: ``map_box(map_box(b, a, c), c, a) ≈ b``. The box must lie
    inside ``from_size`` (ValueError naming it otherwise).
    """
    from_size, to_size = _check_size("from_size", from_size), _check_size("to_size", to_size)
    x1, y1, x2, y2 = _check_box(box, from_size)
    sx, sy = to_size[1] / from_size[1], to_size[0] / from_size[0]
    return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


def box_to_resized(box, original_size, resized_size) -> list[int]:
    """A ground-truth box in original pixels → integer pixels of the resized image, the
    coordinates Qwen2.5-VL reads and writes in ``bbox_2d`` (round to nearest). Sizes (height, width)."""
    return [int(round(v)) for v in map_box(box, original_size, resized_size)]


def box_to_original(box, resized_size, original_size) -> list[float]:
    """A ``bbox_2d`` the model wrote (pixels of the resized image) → pixels of the original.
    Sizes (height, width)."""
    return list(map_box(box, resized_size, original_size))


def box_to_thousandths(box, size) -> list[int]:
    """Qwen2-VL's convention, for comparison: coordinates scaled to 0–1000 of the image of ``size``
    = (height, width)."""
    return box_to_resized(box, size, (1000, 1000))


# ---------------------------------------------------------------------------------------------
# Intersection over union
# ---------------------------------------------------------------------------------------------


def iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes in the same coordinates, in [0, 1].

    Mirrors ``torchvision.ops.box_iou`` for valid boxes. A box with ``x2 < x1`` or ``y2 < y1`` is
    empty (area 0), so its IoU with anything is 0; two empty boxes also give 0 (no 0/0).
    Raises ValueError unless each box is 4 finite numbers.
    """
    boxes = []
    for name, box in (("box_a", box_a), ("box_b", box_b)):
        try:
            values = [float(v) for v in box]
        except (TypeError, ValueError):
            raise ValueError(f"{name}={box!r}: expected 4 numbers [x1, y1, x2, y2]") from None
        if len(values) != 4 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"{name}={box!r}: expected 4 finite numbers [x1, y1, x2, y2]")
        boxes.append(values)
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = boxes
    area_a = max(ax2 - ax1, 0.0) * max(ay2 - ay1, 0.0)
    area_b = max(bx2 - bx1, 0.0) * max(by2 - by1, 0.0)
    inter = max(min(ax2, bx2) - max(ax1, bx1), 0.0) * max(min(ay2, by2) - max(ay1, by1), 0.0)
    union = area_a + area_b - inter
    if area_a == 0.0 or area_b == 0.0 or union <= 0.0:
        return 0.0
    return min(max(inter / union, 0.0), 1.0)


# ---------------------------------------------------------------------------------------------
# Grounding answers: Qwen2.5-VL's bbox_2d JSON, two layouts, one parser
# ---------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```", re.DOTALL)


def _check_pixel_box(box) -> list[int]:
    if len(box) != 4 or any(isinstance(v, bool) or not isinstance(v, Integral) or v < 0 for v in box):
        raise ValueError(f"box={box!r}: expected four integers ≥ 0 (pixels of the resized image)")
    return [int(v) for v in box]


def fenced_grounding_answer(objects: Sequence[tuple[Sequence[int], str]]) -> str:
    """The released Qwen2.5-VL's grounding answer: a ```` ```json ```` fence around a list of
    ``{"bbox_2d": [x1, y1, x2, y2], "label": …}``, one object per line (notebook 01)."""
    if not objects:
        raise ValueError("objects=[]: expected at least one (box, label) pair")
    lines = ["\t" + json.dumps({"bbox_2d": _check_pixel_box(box), "label": label}) for box, label in objects]
    return "```json\n[\n" + ",\n".join(lines) + "\n]\n```"


def compact_grounding_answer(bbox: Sequence[int], label: str) -> str:
    """The course task's grounding answer: one object on one line, no fence,
    ``[{"bbox_2d": [x1, y1, x2, y2], "label": "red circle"}]`` (notebook 10 trains it)."""
    return json.dumps([{"bbox_2d": _check_pixel_box(bbox), "label": label}], separators=(", ", ": "))


def parse_grounding(text: str) -> list[dict]:
    """The objects of a grounding answer in either layout: the JSON list (or one bare object),
    optionally inside a ```` ```json ```` fence, with nothing else around it. ValueError if the text
    is not such an answer (text before or after the JSON, not JSON, not objects)."""
    if not isinstance(text, str):
        raise TypeError(f"text={text!r}: expected a string")
    body = text.strip()
    fenced = _FENCE.fullmatch(body)
    if fenced:
        body = fenced.group(1).strip()
    if not body.startswith(("[", "{")):
        raise ValueError(f"not a grounding answer (text before the JSON): {text[:80]!r}")
    try:
        value = json.loads(body)  # raises on text after the JSON, too
    except (ValueError, RecursionError) as error:
        raise ValueError(f"not a grounding answer ({type(error).__name__}): {text[:80]!r}") from None
    objects = [value] if isinstance(value, dict) else value
    if not isinstance(objects, list) or not all(isinstance(o, dict) for o in objects):
        raise ValueError(f"not a grounding answer (expected a list of objects): {text[:80]!r}")
    return objects

"""helpers.boxes (notebooks 01, 02, 10, 11): one size convention, IoU against torchvision, the two
grounding layouts and their one parser."""

import json

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from helpers import boxes
from helpers.boxes import (
    box_to_original,
    box_to_resized,
    box_to_thousandths,
    compact_grounding_answer,
    fenced_grounding_answer,
    iou,
    map_box,
    parse_grounding,
)
from helpers.constants import MIN_PIXELS, TOKEN_PIXELS
from helpers.rewards import parse_answer, score
from helpers.vision import smart_resize

BOX = [10, 20, 110, 70]

# ------------------------------------------------------------------ original ↔ resized pixels


def test_box_round_trip_sweep():
    rng = np.random.default_rng(0)
    for _ in range(2_000):
        h, w = (int(v) for v in rng.integers(20, 5000, size=2))
        if max(h, w) / min(h, w) > 200:
            continue
        resized = smart_resize(h, w, 28, MIN_PIXELS, int(rng.integers(4, 16384)) * TOKEN_PIXELS)
        xs, ys = np.sort(rng.uniform(0, w, 2)), np.sort(rng.uniform(0, h, 2))
        box = (xs[0], ys[0], xs[1], ys[1])
        back = map_box(map_box(box, (h, w), resized), resized, (h, w))
        np.testing.assert_allclose(back, box, rtol=0, atol=1e-9 * max(h, w))
        # Integer targets lose at most half a resized pixel, i.e. half a scale step in the original.
        approx = box_to_original(box_to_resized(box, (h, w), resized), resized, (h, w))
        tolerance = 0.5 * max(w / resized[1], h / resized[0]) + 1e-9
        assert np.max(np.abs(np.array(approx) - box)) <= tolerance


def test_sizes_are_height_then_width_like_smart_resize():
    """A wide image: the box's x scales by the width ratio, y by the height ratio, with the sizes
    in the order ``smart_resize`` returns them (and an ``image_grid_thw`` row holds them)."""
    original = (512, 1200)  # (H, W)
    resized = smart_resize(*original, 28, MIN_PIXELS, 256 * TOKEN_PIXELS)
    assert resized[1] > resized[0]
    whole = box_to_resized((0, 0, original[1], original[0]), original, resized)
    assert whole == [0, 0, resized[1], resized[0]]
    with pytest.raises(ValueError, match="x2 ≤ 512"):  # sizes given as (W, H): the box no longer fits
        map_box((0, 0, 1200, 512), original[::-1], resized)


def test_box_known_values():
    assert box_to_resized((100, 50, 300, 250), (1000, 1000), (500, 2000)) == [200, 25, 600, 125]
    assert box_to_thousandths((150, 128, 300, 256), (512, 600)) == [250, 250, 500, 500]


@pytest.mark.parametrize(
    "box, size, message",
    [
        ((10, 10, 5, 20), (100, 100), "0 ≤ x1 ≤ x2 ≤ 100"),
        ((-1, 0, 5, 5), (100, 100), "0 ≤ x1"),
        ((0, 0, 5, 101), (100, 100), "y2 ≤ 100"),
    ],
)
def test_bad_boxes_raise(box, size, message):
    with pytest.raises(ValueError, match=message):
        map_box(box, size, (56, 56))


def test_bad_box_types_and_sizes():
    with pytest.raises(TypeError, match="expected \\(x1, y1, x2, y2\\)"):
        map_box((1, 2, 3), (10, 10), (28, 28))
    with pytest.raises(TypeError, match="four finite numbers"):
        map_box((0, 0, float("nan"), 1), (10, 10), (28, 28))
    with pytest.raises(ValueError, match="to_size\\[0\\] \\(height\\)=0"):
        map_box((0, 0, 1, 1), (10, 10), (0, 28))
    with pytest.raises(ValueError, match="from_size\\[1\\] \\(width\\)=2.5"):
        map_box((0, 0, 1, 1), (10, 2.5), (28, 28))
    with pytest.raises(TypeError, match="expected \\(height, width\\)"):
        map_box((0, 0, 1, 1), 10, (28, 28))


def test_the_mixed_coordinates_trap():
    # The true box in resized pixels of a 336×448 (H × W) image; the model answers in Qwen2-VL's 0–1000 grid.
    truth = [112.0, 84.0, 224.0, 168.0]
    in_1000 = list(map_box(truth, (336, 448), (1000, 1000)))
    assert in_1000 == pytest.approx([250.0, 250.0, 500.0, 500.0])
    assert score("grounding", json.dumps([{"bbox_2d": in_1000}]), truth) == 0.0  # IoU 0 although the box is right
    fixed = json.dumps([{"bbox_2d": list(map_box(in_1000, (1000, 1000), (336, 448)))}])
    assert score("grounding", fixed, truth) == pytest.approx(1.0)


# ------------------------------------------------------------------ IoU against torchvision


def test_iou_matches_torchvision_on_a_sweep():
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(500, 2, 2, generator=generator) * 300  # (N, 2 points, xy)
    pairs = torch.cat([corners.min(1).values, corners.max(1).values], dim=1)  # (N, 4) valid boxes
    pairs[::7] = pairs[1::7][: len(pairs[::7])]  # some identical pairs below
    a, b = pairs[:250], pairs[250:]
    ours = torch.tensor([iou(x.tolist(), y.tolist()) for x, y in zip(a, b)], dtype=torch.float64)
    theirs = box_iou(a.double(), b.double()).diagonal()
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    nested = torch.tensor([iou([0, 0, 100, 100], [0, 0, s, s]) for s in range(1, 101)], dtype=torch.float64)
    torch.testing.assert_close(nested, torch.arange(1, 101, dtype=torch.float64) ** 2 / 100**2)


def test_iou_edge_cases():
    assert iou(BOX, BOX) == 1.0
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0  # disjoint
    assert iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges
    assert iou([30, 0, 10, 10], [0, 0, 40, 10]) == 0.0  # x2 < x1: an empty box
    assert iou([5, 5, 5, 5], [5, 5, 5, 5]) == 0.0  # two empty boxes: 0, not 0/0
    for bad in ([1, 2, 3], [1, 2, 3, 4, 5], [1, 2, "x", 4], None, [1, 2, float("inf"), 4], 7):
        with pytest.raises(ValueError, match="box_a=.*expected 4"):
            iou(bad, BOX)
    with pytest.raises(ValueError, match="box_b="):
        iou(BOX, [1, 2, float("nan"), 4])


# ------------------------------------------------------------------ grounding answers


def test_both_layouts_parse_to_the_same_objects():
    fenced = fenced_grounding_answer([([10, 20, 30, 40], "face"), ([0, 0, 5, 5], "cap")])
    assert fenced.startswith("```json\n[\n\t{") and fenced.endswith("\n]\n```")
    assert parse_grounding(fenced) == [
        {"bbox_2d": [10, 20, 30, 40], "label": "face"},
        {"bbox_2d": [0, 0, 5, 5], "label": "cap"},
    ]
    compact = compact_grounding_answer(np.array([1, 2, 3, 4]), "red circle")
    assert "\n" not in compact and "```" not in compact
    assert parse_grounding(compact) == [{"bbox_2d": [1, 2, 3, 4], "label": "red circle"}]
    assert parse_grounding(json.dumps({"bbox_2d": [1, 2, 3, 4]})) == [{"bbox_2d": [1, 2, 3, 4]}]
    # the reward reads exactly one object of either layout
    assert parse_answer("grounding", compact) == [1.0, 2.0, 3.0, 4.0]
    assert parse_answer("grounding", fenced_grounding_answer([([1, 2, 3, 4], "x")])) == [1.0, 2.0, 3.0, 4.0]
    assert parse_answer("grounding", fenced) is None  # two objects


@pytest.mark.parametrize(
    "text",
    [
        "the face is at the top",
        'Answer: [{"bbox_2d": [1, 2, 3, 4]}]',
        '[{"bbox_2d": [1, 2, 3, 4]}] done',
        "[[1, 2, 3, 4]]",
        "[",
        "```json\n7\n```",
    ],
)
def test_parse_grounding_rejects_text_that_is_not_an_answer(text):
    with pytest.raises(ValueError, match="not a grounding answer"):
        parse_grounding(text)


def test_bad_grounding_objects():
    with pytest.raises(ValueError, match="four integers"):
        fenced_grounding_answer([([1.5, 2, 3, 4], "x")])
    with pytest.raises(ValueError, match="at least one"):
        fenced_grounding_answer([])
    with pytest.raises(ValueError, match="four integers"):
        compact_grounding_answer([1, 2, -3, 4], "x")
    with pytest.raises(TypeError, match="expected a string"):
        parse_grounding(None)
    assert boxes.parse_grounding("  []  ") == []

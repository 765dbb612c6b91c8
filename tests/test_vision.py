"""helpers.vision (notebook 02): smart_resize against both libraries, the double resize, the box widget
(the box mapping itself: tests/test_boxes.py)."""

import math

import numpy as np
import pytest
from PIL import Image
from qwen_vl_utils import fetch_image
from qwen_vl_utils import smart_resize as utils_resize
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_resize

from helpers import vision
from helpers.qwen import load_processor
from helpers.vision import compare_with_libraries, double_resize, random_resize_cases, resize_plan, smart_resize
from helpers.widgets import REGISTRY


@pytest.fixture(scope="module")
def sweep():
    return compare_with_libraries(random_resize_cases(12_000, seed=0))


def test_property_sweep_against_both_libraries(sweep):
    counts = sweep["counts"]
    compared = counts["agree"] + counts["disagree"]
    assert compared >= 10_000, counts
    # The libraries really differ on a few percent of the sweep, and qwen-vl-utils returns zero sides.
    assert 0.01 < counts["disagree"] / compared < 0.10, counts
    assert counts["utils_zero_side"] > 0, counts
    for row in sweep["disagreements"]:
        assert row["ours"] == row["transformers"] != row["qwen_vl_utils"]
        height, width, factor = row["case"][:3]
        # They only differ where a side rounds to 0 (transformers) or is clamped to one factor.
        assert min(height, width) < factor / 2 or min(row["transformers"]) == factor, row
    for row in sweep["rejections"]:  # random cases are only rejected for the ratio, by both libraries
        h, w = row["case"][:2]
        assert max(h, w) / min(h, w) > 200 and row["qwen_vl_utils"] == row["transformers"] == "ValueError"


def test_other_seed_and_default_limits():
    result = compare_with_libraries(
        [case[:3] + (vision.MIN_PIXELS, vision.MAX_PIXELS) for case in random_resize_cases(2_000, seed=1)]
    )
    assert result["counts"]["cases"] > 2_000
    for h, w in [(512, 600), (1092, 1568), (4000, 3000), (10, 10), (28, 5600)]:
        assert smart_resize(h, w) == hf_resize(h, w, 28, vision.MIN_PIXELS, vision.MAX_PIXELS)


def test_each_branch_keeps_its_promise():
    """Round: area within [min, max]. Scale down: area ≤ max unless a side was clamped to one factor.
    Scale up: area ≥ min (it may exceed max when the budget is narrow: ceil on both sides)."""
    seen = set()
    for h, w, f, low, high in random_resize_cases(3_000, seed=2):
        if max(h, w) / min(h, w) > 200:
            continue
        plan = resize_plan(h, w, f, low, high)
        rh, rw = plan.resized
        seen.add(plan.branch)
        assert rh % f == 0 and rw % f == 0 and rh >= f and rw >= f
        if plan.branch == "round":
            assert low <= rh * rw <= high and plan.resized == plan.rounded
        elif plan.branch == "scale down":
            assert rh * rw <= high or min(rh, rw) == f
        else:
            assert rh * rw >= low
    assert seen == {"round", "scale down", "scale up"}


def test_design_worked_examples():
    assert smart_resize(1000, 500, 28, min_pixels=3136, max_pixels=200704) == (616, 308)
    plan = resize_plan(1000, 500, 28, 3136, 200704)
    assert plan.branch == "scale down" and plan.rounded == (1008, 504)
    plan = resize_plan(1092, 1568, 28, 256 * 28 * 28, 1280 * 28 * 28)
    assert plan.resized == (812, 1176) and plan.branch == "scale down" and plan.tokens == 29 * 42
    assert resize_plan(512, 600).branch == "round" and resize_plan(512, 600).resized == (504, 588)
    small = resize_plan(50, 40, 28, 256 * 784, 1280 * 784)
    assert small.branch == "scale up" and small.tokens >= 256


def test_processor_uses_the_same_size():
    processor = load_processor(min_pixels=256 * 784, max_pixels=1280 * 784)
    for h, w in [(1092, 1568), (100, 3000), (700, 90), (512, 600)]:
        image = Image.new("RGB", (w, h), (120, 30, 200))
        grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
        assert [grid[1] * 14, grid[2] * 14] == list(smart_resize(h, w, 28, 256 * 784, 1280 * 784))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=0, width=10), "height=0"),
        (dict(height=10, width=-5), "width=-5"),
        (dict(height=10, width=10, factor=0), "factor=0"),
        (dict(height=10, width=10, min_pixels=0), "min_pixels=0"),
        (dict(height=10, width=10, min_pixels=5000, max_pixels=4000), "min_pixels=5000 is larger than max_pixels=4000"),
        (dict(height=1, width=201), "aspect ratio 201 is above 200"),
        (dict(height=10_000, width=28), "aspect ratio 357.143 is above 200"),
        (dict(height=28, width=5601), "aspect ratio 200.036 is above 200"),
    ],
)
def test_bad_sizes_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        smart_resize(**kwargs)


@pytest.mark.parametrize(
    "kwargs", [dict(height=10.5, width=10), dict(height=True, width=10), dict(height="5", width=10)]
)
def test_non_integer_sizes_raise_type_error(kwargs):
    with pytest.raises(TypeError, match="expected an integer"):
        smart_resize(**kwargs)


def test_libraries_do_not_all_reject_what_we_reject():
    """Documents why ours checks: transformers accepts min > max and a zero min_pixels silently."""
    assert hf_resize(280, 280, 28, 5000, 4000) == (56, 56)  # below min_pixels, no complaint
    with pytest.raises(AssertionError):
        utils_resize(280, 280, 28, 5000, 4000)
    assert hf_resize(10, 1000, 28, 0, 4000 * 784) == (0, 1008)
    with pytest.raises(ZeroDivisionError):
        hf_resize(0, 10)


def test_double_resize_matches_fetch_image_then_processor():
    processor = load_processor(min_pixels=256 * 784, max_pixels=1280 * 784)
    for h, w in [(1092, 1568), (3000, 4000), (300, 200)]:
        image = Image.new("RGB", (w, h), (10, 200, 90))
        fetched = fetch_image({"image": image})  # qwen-vl-utils defaults: 4…16,384 tokens
        expected = double_resize(h, w, (vision.MIN_PIXELS, vision.MAX_PIXELS), (256 * 784, 1280 * 784))
        assert fetched.size[::-1] == expected["fetched"]
        grid = processor.image_processor(images=[fetched], return_tensors="pt")["image_grid_thw"][0].tolist()
        assert (grid[1] * 14, grid[2] * 14) == expected["processed"]
    assert double_resize(1092, 1568, (3136, 12845056), (256 * 784, 1280 * 784))["resized_twice"]


def test_open_image_rejects_unreadable_files(tmp_path):
    bad = tmp_path / "not_an_image.jpg"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not_an_image.jpg.*cannot be read as an image"):
        vision.open_image(bad)
    with pytest.raises(ValueError, match="missing.png"):
        vision.open_image(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="expected a PIL image or a path"):
        vision.open_image(42)
    assert vision.course_photo().size == (512, 600)  # PIL: (W, H)


def test_resize_view_numbers_and_rejection():
    view = vision.resize_view(height=1092, width=1568, min_tokens=256, max_tokens=1280)
    assert view.data["resized"] == (812, 1176) and view.data["tokens"] == 1218
    assert view.data["branch"] == "scale down"
    assert view.data["distortion"] == pytest.approx((1176 / 812) / (1568 / 1092) - 1)
    assert "rejected" in vision.resize_view(min_tokens=2000, max_tokens=1000).html
    assert "aspect ratio" in vision.resize_view(height=10, width=3000).data["error"]


def test_box_view_numbers():
    view = vision.box_view(x=0, y=0, box_width=512, box_height=600, max_tokens=256)
    assert view.data["bbox_2d"] == [0, 0, *view.data["resized"][::-1]]
    small, photo = vision.box_view(max_tokens=16), vision.box_view(max_tokens=vision.PHOTO_TOKENS)
    assert small.data["iou"] < 0.1 and 0.8 < photo.data["iou"] < 1  # unconverted: wrong, less so near 1:1
    assert photo.data["resized"] == vision.box_view(max_tokens=2048).data["resized"] == (588, 504)
    assert vision.box_view(max_tokens=vision.PHOTO_TOKENS - 1).data["resized"] != (588, 504)
    assert small.data["resized"] == (112, 84) and small.data["unconverted"] == [84, 112, 84, 112]  # clipped: empty
    view = vision.box_view(x=700, y=0, box_width=50, box_height=50)  # clamped into the photo
    assert view.data["original_box"][0] == 512


def test_figures_render_and_both_widgets_are_registered():
    # that every registered widget renders: tests/test_plots_widgets.py, for all notebooks at once
    assert len([entry for entry in REGISTRY.values() if entry.notebook == "02_smart_resize"]) == 2
    figure, grid = vision.heatmap_figure(np.arange(28, 400, 28), np.arange(28, 400, 28))
    assert grid.shape == (14, 14) and np.nanmax(grid) == 14 * 14
    vision.staircase_figure(np.arange(20, 200))


def test_token_grid_marks_rejected_ratios():
    grid = vision.token_grid([1, 100], [1, 300])
    assert math.isnan(grid[0, 1]) and grid[1, 1] == vision.visual_tokens(100, 300)


def test_processed_size_is_the_size_after_fetch_image_and_processor():
    """Box targets come from image_grid_thw · 14; a direct smart_resize can miss the double resize."""
    processor = load_processor(min_pixels=256 * 784, max_pixels=1280 * 784)
    image = Image.new("RGB", (3930, 5148), (10, 200, 90))  # (W, H): 5148×3930
    grid = processor.image_processor(images=[fetch_image({"image": image})], return_tensors="pt")["image_grid_thw"]
    assert vision.processed_size(grid) == vision.processed_size(grid[0]) == (1148, 868)
    assert smart_resize(5148, 3930, 28, 256 * 784, 1280 * 784) == (1120, 868)
    for bad in ([[1, 2, 3], [1, 2, 3]], [1, 0, 4], [1, 2]):
        with pytest.raises(ValueError, match="expected one \\(t, h, w\\) row"):
            vision.processed_size(bad)

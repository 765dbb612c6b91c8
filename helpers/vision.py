"""Image sizes, visual tokens and box coordinates (taught in notebooks/02_smart_resize.ipynb).

Qwen2.5-VL cuts an image into 14×14 patches and merges each 2×2 block of patches into one visual
token, so both sides of the image it sees must be multiples of 28 (``factor``). ``smart_resize``
picks that size: round each side to 28, then, if the area is outside ``[min_pixels, max_pixels]``,
scale both sides by one factor into the range. The image is then resized to it, and every box the
model reads or writes is in pixels of that *resized* image.

Two reference implementations exist and they are not the same function:

- ``transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize``: what the processor runs;
- ``qwen_vl_utils.vision_process.smart_resize``: what ``fetch_image`` runs before the processor.

Ours equals the transformers one wherever it returns a valid size, and raises ``ValueError`` (naming
the value and the accepted range) where either library rejects the input or would return nonsense.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from numbers import Integral

import numpy as np

from helpers.boxes import box_to_resized, box_to_thousandths, iou
from helpers.constants import FACTOR, MAX_PIXELS, MAX_RATIO, MIN_PIXELS, PATCH_SIZE, TOKEN_PIXELS
from helpers.plots import COLOURS, STYLE, new_figure
from helpers.widgets import View, register_widget

# ---------------------------------------------------------------------------------------------
# smart_resize
# ---------------------------------------------------------------------------------------------


def _check_int(name: str, value, low: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name}={value!r}: expected an integer ≥ {low} ({what})")
    if value < low:
        raise ValueError(f"{name}={value!r}: expected an integer ≥ {low} ({what})")
    return int(value)


@dataclass(frozen=True)
class ResizePlan:
    """Every step of one ``smart_resize`` call (what the notebook walks through)."""

    height: int
    width: int
    factor: int
    min_pixels: int
    max_pixels: int
    rounded: tuple[int, int]  # each side rounded to the nearest multiple of factor
    branch: str  # "round", "scale down" or "scale up"
    beta: float  # the scale divisor (down) or multiplier (up); 1.0 on the round branch
    resized: tuple[int, int]  # (height, width) the image is resized to

    @property
    def tokens(self) -> int:
        """Visual tokens after the 2×2 merge: (H/28)·(W/28) for factor 28."""
        return (self.resized[0] // self.factor) * (self.resized[1] // self.factor)

    @property
    def distortion(self) -> float:
        """Relative change of the aspect ratio W/H caused by the resize (0.05 = 5 % wider)."""
        return (self.resized[1] / self.resized[0]) / (self.width / self.height) - 1.0


def resize_plan(
    height: int, width: int, factor: int = FACTOR, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> ResizePlan:
    """``smart_resize`` with its intermediate steps. Mirrors transformers'
    ``qwen2_vl.image_processing_qwen2_vl.smart_resize`` (same float operations, same results),
    with the input checks neither library makes in full.
    """
    height = _check_int("height", height, 1, "image height in pixels")
    width = _check_int("width", width, 1, "image width in pixels")
    factor = _check_int("factor", factor, 1, "side of one visual token in pixels")
    min_pixels = _check_int("min_pixels", min_pixels, 1, "smallest image area in pixels")
    max_pixels = _check_int("max_pixels", max_pixels, 1, "largest image area in pixels")
    if min_pixels > max_pixels:
        raise ValueError(
            f"min_pixels={min_pixels} is larger than max_pixels={max_pixels}; need min_pixels ≤ max_pixels"
        )
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise ValueError(
            f"height={height}, width={width}: aspect ratio {ratio:.6g} is above {MAX_RATIO}; "
            f"accepted: longest side / shortest side ≤ {MAX_RATIO}"
        )
    rounded = (round(height / factor) * factor, round(width / factor) * factor)
    h_bar, w_bar = rounded
    if h_bar * w_bar > max_pixels:
        # Too big: divide both sides by beta so the area is max_pixels, then floor to the factor
        # (never below one factor: a thin side would otherwise become 0).
        branch, beta = "scale down", math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        # Too small (or a side rounded to 0): multiply both sides by beta, then ceil to the factor.
        branch, beta = "scale up", math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    else:
        branch, beta = "round", 1.0
    return ResizePlan(height, width, factor, min_pixels, max_pixels, rounded, branch, beta, (h_bar, w_bar))


def smart_resize(
    height: int, width: int, factor: int = FACTOR, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """(height, width) of the image the model sees: both multiples of ``factor``, area brought into
    ``[min_pixels, max_pixels]`` (up to the rounding), aspect ratio kept as well as it can be.

    Mirrors transformers' ``qwen2_vl.image_processing_qwen2_vl.smart_resize`` (what the processor
    runs) and ``qwen_vl_utils.smart_resize`` where the two agree. Defaults are the real checkpoint's
    limits (4 to 16,384 visual tokens). Raises ValueError for sizes < 1, min_pixels > max_pixels or
    an aspect ratio above 200.
    """
    return resize_plan(height, width, factor, min_pixels, max_pixels).resized


def visual_tokens(
    height: int, width: int, factor: int = FACTOR, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> int:
    """Number of visual tokens (``<|image_pad|>``s) an image of this size becomes."""
    return resize_plan(height, width, factor, min_pixels, max_pixels).tokens


def double_resize(
    height: int, width: int, first: tuple[int, int], second: tuple[int, int], factor: int = FACTOR
) -> dict:
    """The image side of the double resize: ``fetch_image`` resizes with ``first`` = (min_pixels,
    max_pixels), then the processor resizes that result again with its own ``second`` limits.

    Returns the size after each step, the size one resize with ``second`` would give, and whether
    the second step changed the image again.
    """
    fetched = smart_resize(height, width, factor, *first)
    processed = smart_resize(*fetched, factor, *second)
    direct = smart_resize(height, width, factor, *second)
    return {
        "original": (height, width),
        "fetched": fetched,
        "processed": processed,
        "direct": direct,
        "resized_twice": processed != fetched,
        "differs_from_direct": processed != direct,
    }


def processed_size(image_grid_thw, patch_size: int = PATCH_SIZE) -> tuple[int, int]:
    """(height, width) the processor finally resized one image to, read from its
    ``image_grid_thw`` row (t, h, w): ``(h·patch_size, w·patch_size)``, the inverse of
    ``Qwen2VLImageProcessor``'s ``grid_h = resized_height // patch_size``. Box targets must be in
    pixels of this size: after ``fetch_image`` it can differ from a direct ``smart_resize``.
    """
    row = np.asarray(image_grid_thw).reshape(-1)
    if row.shape != (3,) or (row < 1).any():
        raise ValueError(
            f"image_grid_thw={np.asarray(image_grid_thw).tolist()}: expected one (t, h, w) row "
            f"of positive integers (one image)"
        )
    return int(row[1]) * patch_size, int(row[2]) * patch_size


def tokens_to_pixels(tokens: int, factor: int = FACTOR) -> int:
    """A budget in visual tokens as a pixel area (what ``min_pixels`` / ``max_pixels`` take)."""
    return _check_int("tokens", tokens, 1, "visual tokens") * factor * factor


def random_resize_cases(count: int = 12_000, seed: int = 0, thin_share: float = 0.2) -> list[tuple]:
    """Seeded (height, width, factor, min_pixels, max_pixels) cases for the property test: sides
    log-uniform in 1…20,000 (so some ratios exceed 200), a ``thin_share`` of images with a short
    side of 1…56 px, budgets of 1…2,048 and up to 16,384 tokens, factor 28 (a tenth at 14 or 32),
    plus fixed extremes (sides around one factor, ratio exactly 200 and just above, min = max).
    """
    _check_int("seed", seed, 0, "the generator's seed")
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        factor = int(rng.choice([28] * 18 + [14, 32]))
        if rng.random() < thin_share:
            short = int(rng.integers(1, 57))
            long = int(min(short * 200, max(short, round(short * np.exp(rng.uniform(0, np.log(200)))))))
            height, width = (short, long) if rng.random() < 0.5 else (long, short)
        else:
            height, width = (int(np.exp(rng.uniform(0, np.log(20_000)))) for _ in range(2))
        low = int(rng.integers(1, 2049))
        high = int(rng.integers(low, 16385))
        cases.append((height, width, factor, low * factor * factor, high * factor * factor))
    sides = (1, 2, 13, 14, 15, 27, 28, 29, 41, 42, 43, 55, 56, 57, 999, 1000, 20_000, 50_000)
    budgets = ((4, 16384), (256, 1280), (1, 1), (4, 4), (16384, 16384), (1280, 1280))
    cases += [(h, w, FACTOR, lo * TOKEN_PIXELS, hi * TOKEN_PIXELS) for h in sides for w in sides for lo, hi in budgets]
    cases += [
        (s, MAX_RATIO * s, FACTOR, lo * TOKEN_PIXELS, hi * TOKEN_PIXELS)
        for s in (1, 5, 13, 14, 28, 100)
        for lo, hi in budgets
    ]
    cases += [(201 * s, s, FACTOR, MIN_PIXELS, MAX_PIXELS) for s in (1, 7, 28)]
    return cases


def _outcome(function, case):
    """A library's answer to one case: a (height, width) tuple, or the exception's class name."""
    try:
        return tuple(function(*case))
    except (AssertionError, ValueError, ZeroDivisionError) as error:
        return type(error).__name__


def compare_with_libraries(cases) -> dict:
    """Run ours, ``qwen_vl_utils.smart_resize`` and transformers' ``smart_resize`` on every case.

    Returns counts (``cases``, ``agree``: all three equal, ``disagree``: the libraries differ,
    ``utils_zero_side``: qwen-vl-utils returned a side of 0, ``rejected``: ours raised) and the
    disagreeing and rejected cases with each function's answer. Raises AssertionError at the first
    case where ours does not follow the rule (equal to both where they agree, to transformers where
    they differ, an error where both libraries fail to give a size).
    """
    from qwen_vl_utils import smart_resize as utils_resize
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_resize

    counts = {"cases": 0, "agree": 0, "disagree": 0, "utils_zero_side": 0, "rejected": 0}
    disagreements, rejections = [], []
    for case in cases:
        counts["cases"] += 1
        ours, utils, hf = _outcome(smart_resize, case), _outcome(utils_resize, case), _outcome(hf_resize, case)
        row = {"case": case, "ours": ours, "qwen_vl_utils": utils, "transformers": hf}
        if isinstance(ours, str):
            counts["rejected"] += 1
            rejections.append(row)
            assert isinstance(utils, str) or isinstance(hf, str), f"ours rejected a case both libraries accept: {row}"
            continue
        assert not isinstance(hf, str) and ours == hf, f"ours differs from transformers: {row}"
        if utils == hf:
            counts["agree"] += 1
        else:
            counts["disagree"] += 1
            counts["utils_zero_side"] += int(not isinstance(utils, str) and 0 in utils)
            disagreements.append(row)
    return {"counts": counts, "disagreements": disagreements, "rejections": rejections}


# ---------------------------------------------------------------------------------------------
# The course photo
# ---------------------------------------------------------------------------------------------


def open_image(source):
    """An RGB PIL image from a PIL image or a file path; ValueError naming the file if it cannot be
    read as an image (what ``qwen_vl_utils.fetch_image`` would fail on later, less clearly)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if not isinstance(source, (str, bytes)) and not hasattr(source, "__fspath__"):
        raise TypeError(f"image={source!r}: expected a PIL image or a path to an image file")
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (FileNotFoundError, IsADirectoryError, UnidentifiedImageError, OSError) as error:
        raise ValueError(
            f"image file {str(source)!r} cannot be read as an image "
            f"({type(error).__name__}); accepted: a PNG/JPEG/… file or a PIL image"
        ) from None


@functools.lru_cache(maxsize=1)
def course_photo():
    """matplotlib's sample photo ``grace_hopper.jpg`` (600×512, H×W: a portrait) as an RGB PIL image."""
    import matplotlib.cbook
    from PIL import Image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle, Image.open(handle) as image:
        return image.convert("RGB")


@functools.lru_cache(maxsize=1)
def _photo_thumbnail() -> np.ndarray:
    return np.asarray(course_photo().resize((128, 150)))  # PIL sizes are (W, H)


#: A box around Grace Hopper's face in the original photo (x1, y1, x2, y2), pixels.
FACE_BOX = (165, 135, 365, 340)

# ---------------------------------------------------------------------------------------------
# Figures and widgets of notebook 02
# ---------------------------------------------------------------------------------------------


def _two_panels():
    """A 7.2×3.0 figure with two image panels and a fixed layout (constrained layout would take
    most of a widget's 150 ms budget)."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(7.2, 3.0))
        axes = figure.subplots(1, 2)
        figure.subplots_adjust(left=0.07, right=0.99, bottom=0.12, top=0.9, wspace=0.25)
    return figure, axes


def _draw_grid(axis, height: int, width: int, step: int) -> None:
    axis.vlines(np.arange(0, width + 1, step), 0, height, colors="white", linewidths=0.5, alpha=0.8)
    axis.hlines(np.arange(0, height + 1, step), 0, width, colors="white", linewidths=0.5, alpha=0.8)


def resize_figure(plan: ResizePlan):
    """The photo as an image of plan.height × plan.width (left) and as resized (right), the right
    one with the 28-px grid: one cell = one visual token. Shown from a thumbnail with an extent in
    pixels, so the figure costs the same at any size."""
    figure, (left, right) = _two_panels()
    thumb = _photo_thumbnail()
    for axis, (h, w), title in (
        (left, (plan.height, plan.width), f"original {plan.height}×{plan.width}"),
        (right, plan.resized, f"resized {plan.resized[0]}×{plan.resized[1]}"),
    ):
        _show_image(axis, thumb, h, w, title)
    rows, cols = plan.resized[0] // plan.factor, plan.resized[1] // plan.factor
    step = plan.factor * max(1, math.ceil(max(rows, cols) / 64))  # at most ~64 lines per side
    _draw_grid(right, *plan.resized, step)
    if step != plan.factor:
        right.set_xlabel(f"grid every {step // plan.factor} tokens")
    return figure


_RESIZE_DEFAULTS = {"height": 600, "width": 512, "min_tokens": 4, "max_tokens": 1280}


@register_widget(
    "02_smart_resize",
    _RESIZE_DEFAULTS,
    [
        {"height": 30, "width": 3000},
        {"height": 4000, "width": 3000, "max_tokens": 16384},
        {"height": 60, "width": 80, "min_tokens": 256},
        {"min_tokens": 2000, "max_tokens": 1000},
    ],
)
def resize_view(height: int = 600, width: int = 512, min_tokens: int = 4, max_tokens: int = 1280) -> View:
    """Widget of 02: an original size and a token budget → resized size, tokens, branch, distortion."""
    try:
        plan = resize_plan(height, width, FACTOR, tokens_to_pixels(min_tokens), tokens_to_pixels(max_tokens))
    except ValueError as error:
        return View(html=f"<b>rejected:</b> {error}", data={"error": str(error)})
    h, w = plan.resized
    html = (
        f"<b>{height}×{width}</b> → branch <b>{plan.branch}</b> → <b>{h}×{w}</b> "
        f"= {h // FACTOR}×{w // FACTOR} = <b>{plan.tokens}</b> visual tokens "
        f"(budget {min_tokens}…{max_tokens}); aspect distortion {100 * plan.distortion:+.2f} %"
    )
    data = {"resized": plan.resized, "tokens": plan.tokens, "branch": plan.branch, "distortion": plan.distortion}
    return View(html=html, figure=resize_figure(plan), data=data)


def staircase_figure(sides=None, budgets=((4, 16384), (256, 1280)), aspect: float = 0.75):
    """Visual tokens against the original width of images of shape (aspect·W) × W, for token
    budgets (min, max); the dashed line is H·W/784, the count without rounding or limits."""
    sides = np.arange(20, 4001) if sides is None else np.asarray(sides)
    figure, (full, zoom) = new_figure(2, 1, width=8.0, height=3.2)
    for (low, high), colour in zip(budgets, (COLOURS["image"], COLOURS["loss"])):
        tokens = [
            visual_tokens(max(1, round(aspect * w)), int(w), FACTOR, low * TOKEN_PIXELS, high * TOKEN_PIXELS)
            for w in sides
        ]
        for axis in (full, zoom):
            axis.plot(sides, tokens, color=colour, lw=1.2, label=f"{low}…{high} tokens")
    naive = np.maximum(1, np.round(aspect * sides)) * sides / TOKEN_PIXELS
    for axis in (full, zoom):
        axis.plot(sides, naive, color=COLOURS["pad"], lw=0.8, ls="--", label="H·W/784")
        axis.set_xlabel("original width W (height = 0.75·W)")
    full.set_yscale("log")
    full.set_ylabel("visual tokens")
    full.set_title("whole range: flat at the budget's ends")
    zoom.set_xlim(20, 300)
    zoom.set_ylim(0, 90)
    zoom.set_title("small images: steps of 28 px")
    zoom.legend(loc="upper left")
    return figure


def token_grid(heights, widths, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Visual tokens for every (H, W) pair of the two axes (NaN where the ratio is above 200)."""
    out = np.full((len(heights), len(widths)), np.nan)
    for i, h in enumerate(heights):
        for j, w in enumerate(widths):
            if max(h, w) / min(h, w) <= MAX_RATIO:
                out[i, j] = visual_tokens(int(h), int(w), FACTOR, min_pixels, max_pixels)
    return out


def heatmap_figure(heights, widths, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS):
    """Heat map of visual tokens over (H, W), log colour scale."""
    from matplotlib.colors import LogNorm

    grid = token_grid(heights, widths, min_pixels, max_pixels)
    figure, axis = new_figure(1, 1, width=5.0, height=3.8)
    mesh = axis.pcolormesh(
        widths,
        heights,
        grid,
        norm=LogNorm(vmin=np.nanmin(grid), vmax=np.nanmax(grid)),
        cmap="viridis",
        shading="nearest",
    )
    figure.colorbar(mesh, ax=axis, label="visual tokens")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("original width W (log)")
    axis.set_ylabel("original height H (log)")
    axis.set_title(f"tokens, budget {min_pixels // TOKEN_PIXELS}…{max_pixels // TOKEN_PIXELS}")
    axis.grid(False)
    return figure, grid


def _show_image(axis, thumb, height: int, width: int, title: str) -> None:
    """``thumb`` stretched over an axis of ``height`` × ``width`` pixels (y down), ticks at the edges."""
    axis.imshow(thumb, extent=(0, width, height, 0), aspect="equal", interpolation="nearest")
    axis.set(xlim=(0, width), ylim=(height, 0), xticks=[0, width], yticks=[0, height], title=title)
    axis.grid(False)


def _box_patch(axis, box, colour, linestyle="-"):
    from matplotlib.patches import Rectangle

    x1, y1, x2, y2 = box
    axis.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, lw=2, linestyle=linestyle))


_BOX_DEFAULTS = {
    "x": FACE_BOX[0],
    "y": FACE_BOX[1],
    "box_width": FACE_BOX[2] - FACE_BOX[0],
    "box_height": FACE_BOX[3] - FACE_BOX[1],
    "max_tokens": 64,
}
#: Above this budget the 600×512 photo is only rounded (588×504): the budget no longer changes it.
PHOTO_TOKENS = 378


@register_widget(
    "02_smart_resize",
    _BOX_DEFAULTS,
    [
        {"x": 0, "y": 0, "box_width": 512, "box_height": 600},
        {"max_tokens": 16},
        {"x": 500, "box_width": 100},
        {"max_tokens": PHOTO_TOKENS},
    ],
)
def box_view(x: int = 165, y: int = 135, box_width: int = 200, box_height: int = 205, max_tokens: int = 64) -> View:
    """Widget of 02: a box on the original photo (left) → on the resized image (right) the right
    ``bbox_2d`` target (converted, solid) and the original numbers used unconverted (dashed), with
    their IoU; Qwen2-VL's 0–1000 form in the text for comparison."""
    original = course_photo().size[::-1]  # PIL gives (W, H); (H, W) = (600, 512)
    resized = smart_resize(*original, FACTOR, MIN_PIXELS, tokens_to_pixels(max_tokens))
    x, y = min(max(0, x), original[1]), min(max(0, y), original[0])
    box = (x, y, min(original[1], x + max(0, box_width)), min(original[0], y + max(0, box_height)))
    target = box_to_resized(box, original, resized)
    unconverted = [min(v, resized[1 - i % 2]) for i, v in enumerate(box)]  # x clipped to W, y to H
    overlap = iou(target, unconverted)
    figure, (left, right) = _two_panels()
    thumb = _photo_thumbnail()
    for axis, (h, w), title in (
        (left, original, f"original {original[0]}×{original[1]}"),
        (right, resized, f"resized {resized[0]}×{resized[1]}"),
    ):
        _show_image(axis, thumb, h, w, title)
    _box_patch(left, box, COLOURS["loss"])
    _box_patch(right, target, COLOURS["loss"])
    _box_patch(right, unconverted, COLOURS["accent"], linestyle="--")
    html = (
        f'original box {list(box)} → <code>{{"bbox_2d": {target}}}</code> in the resized '
        f"{resized[0]}×{resized[1]} image (max {max_tokens} tokens; solid). The original numbers used "
        f"unconverted (dashed) overlap it with IoU {overlap:.2f}. Qwen2-VL 0–1000 form: "
        f"{box_to_thousandths(box, original)}"
    )
    return View(
        html=html,
        figure=figure,
        data={"original_box": box, "bbox_2d": target, "resized": resized, "unconverted": unconverted, "iou": overlap},
    )

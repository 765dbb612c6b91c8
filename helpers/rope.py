"""M-RoPE: the 3-D (t, h, w) position ids of the language model (taught in notebooks/08_mrope.ipynb).

Qwen2.5-VL gives every token of the decoder three position ids instead of one:

- a text token gets the same number in all three rows, one more than the token before it;
- a visual token (one ``<|image_pad|>`` / ``<|video_pad|>`` = one 2×2 merged patch) gets
  ``start + (temporal index × interval, merged row, merged column)``, where ``start`` is the
  position after the text before it and, for videos, ``interval = tokens_per_second ×
  second_per_grid_ts`` (seconds between two temporal patches), truncated to an integer;
- the text after a picture continues at ``start + max(merged rows, merged columns)`` (transformers
  ≥ 5.3) or at the picture's largest id + 1 (Qwen's reference, which the released checkpoints were
  trained with; the two differ only after a video whose temporal ids run past that), so the
  largest position id is usually far below the sequence length: ``rope_deltas = max id + 1 −
  length`` is what ``generate`` adds to plain counting for every new token.

``rope_index`` mirrors ``Qwen2_5_VLModel.get_rope_index`` (transformers 5.24) and is tested
against it; with ``rule="reference"`` it mirrors Qwen's ``get_rope_index_25`` instead.
``mrope_cos_sin`` mirrors ``Qwen2_5_VLRotaryEmbedding``: the head dimension's rotary pairs are split
by ``mrope_section`` into a t part, an h part and a w part. The model computes any of this only when
``mm_token_type_ids`` reaches it (``decoder_positions`` shows what the decoder gets).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from helpers.constants import FACTOR, MAX_PIXELS, MIN_PIXELS
from helpers.plots import COLOURS, new_figure
from helpers.tokenizer import SPECIAL_TOKENS
from helpers.vision import smart_resize
from helpers.widgets import View, register_widget

IMAGE_TOKEN_ID = SPECIAL_TOKENS["<|image_pad|>"]
VIDEO_TOKEN_ID = SPECIAL_TOKENS["<|video_pad|>"]
VISION_START_ID = SPECIAL_TOKENS["<|vision_start|>"]
VISION_END_ID = SPECIAL_TOKENS["<|vision_end|>"]

#: ``mm_token_type_ids`` values, as the processor writes them.
TEXT, IMAGE, VIDEO = 0, 1, 2
AXES = ("t", "h", "w")
#: Where the text after an image or video resumes (``rope_index(rule=...)``).
#: "transformers": ``get_rope_index`` of transformers ≥ 5.3 (the pinned 5.24), ``start + max(h, w) // merge``;
#: "reference": Qwen's ``get_rope_index_25`` (QwenLM qwen-vl-finetune ``rope2d.py``, also transformers
#: ≤ 5.2), the block's largest id + 1: what the released Qwen2.5-VL checkpoints were trained with.
RULES = ("transformers", "reference")


# ---------------------------------------------------------------------------------------------
# Position ids
# ---------------------------------------------------------------------------------------------


def token_types(
    input_ids: torch.Tensor, image_token_id: int = IMAGE_TOKEN_ID, video_token_id: int = VIDEO_TOKEN_ID
) -> torch.Tensor:
    """0 for text, 1 for ``<|image_pad|>``, 2 for ``<|video_pad|>``: the processor's ``mm_token_type_ids``."""
    types = torch.zeros_like(input_ids, dtype=torch.int)
    types[input_ids == image_token_id] = IMAGE
    types[input_ids == video_token_id] = VIDEO
    return types


def vision_positions(start: int, grid_thw, spatial_merge_size: int = 2, time_interval: float = 1.0) -> torch.Tensor:
    """(3, t·h·w/merge²) position ids of one image or video placed at ``start``.

    Mirrors ``Qwen2_5_VLModel.get_vision_position_ids``: merged grid (t, h/2, w/2) in raster order
    (t slowest, w fastest); temporal ids are ``int(index × time_interval)``.
    """
    t, h, w = (int(v) for v in grid_thw)
    if h % spatial_merge_size or w % spatial_merge_size:
        raise ValueError(
            f"grid_thw={list(grid_thw)}: h and w must be multiples of spatial_merge_size={spatial_merge_size}"
        )
    h, w = h // spatial_merge_size, w // spatial_merge_size
    t_ids = (torch.arange(t) * time_interval).long()  # truncation toward 0, as .long() does
    grid_t = t_ids.view(t, 1, 1).expand(t, h, w)
    grid_h = torch.arange(h).view(1, h, 1).expand(t, h, w)
    grid_w = torch.arange(w).view(1, 1, w).expand(t, h, w)
    return torch.stack([grid_t, grid_h, grid_w]).reshape(3, -1) + start


def _runs(types: list[int]) -> list[tuple[int, int]]:
    """(type, length) of each run of equal values."""
    runs: list[tuple[int, int]] = []
    for value in types:
        if runs and runs[-1][0] == value:
            runs[-1] = (value, runs[-1][1] + 1)
        else:
            runs.append((value, 1))
    return runs


def rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts=None,
    attention_mask: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    spatial_merge_size: int = 2,
    tokens_per_second: float = 2,
    rule: str = "transformers",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids (3, batch, length), rope_deltas (batch, 1)) for a batch of token ids.

    Mirrors ``Qwen2_5_VLModel.get_rope_index`` (transformers 5.24): same arguments (the model's
    ``mm_token_type_ids`` is derived from the pad token ids when not given; the two config numbers
    are arguments here), same result. Images and videos are consumed in order across the whole
    batch; padding (``attention_mask == 0``) gets position 0 and is not counted; a missing
    ``second_per_grid_ts`` means 1 s per temporal patch, as in the model.

    ``rule`` (one of ``RULES``, default "transformers", what the pinned model computes) says where the
    text after an image or video resumes; "reference" mirrors Qwen's ``get_rope_index_25``. Images
    give the same ids under both rules.
    """
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}: expected one of {RULES}")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected (batch, length)")
    if mm_token_type_ids is None:
        mm_token_type_ids = token_types(input_ids)
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {tuple(input_ids.shape)}")
    grids = {
        IMAGE: list(image_grid_thw) if image_grid_thw is not None else [],
        VIDEO: list(video_grid_thw) if video_grid_thw is not None else [],
    }
    seconds = [float(s) for s in second_per_grid_ts] if second_per_grid_ts is not None else [1.0] * len(grids[VIDEO])
    if not all(math.isfinite(s) and s >= 0 for s in seconds):
        raise ValueError(f"second_per_grid_ts={seconds}: expected finite seconds ≥ 0, one per video")
    used = {IMAGE: 0, VIDEO: 0}
    position_ids = torch.zeros(3, *input_ids.shape, dtype=input_ids.dtype)
    deltas = []
    for row in range(input_ids.shape[0]):
        keep = (
            attention_mask[row].bool()
            if attention_mask is not None
            else torch.ones(input_ids.shape[1], dtype=torch.bool)
        )
        pieces, position = [], 0
        for kind, length in _runs(mm_token_type_ids[row][keep].tolist()):
            if kind == TEXT:
                pieces.append(torch.arange(position, position + length).expand(3, length))
                position += length
                continue
            if used[kind] >= len(grids[kind]):
                name = "image_grid_thw" if kind == IMAGE else "video_grid_thw"
                raise ValueError(
                    f"row {row} has more {'image' if kind == IMAGE else 'video'} runs than {name} "
                    f"has rows ({len(grids[kind])})"
                )
            grid = grids[kind][used[kind]]
            interval = tokens_per_second * seconds[used[kind]] if kind == VIDEO else 1
            used[kind] += 1
            block = vision_positions(position, grid, spatial_merge_size, interval)
            if block.shape[1] != length:
                raise ValueError(
                    f"row {row}: a run of {length} pad tokens, but grid {list(map(int, grid))} needs "
                    f"{block.shape[1]} (= t·h·w / {spatial_merge_size**2})"
                )
            pieces.append(block)
            if rule == "transformers":
                position += max(int(grid[1]), int(grid[2])) // spatial_merge_size
            else:
                position = int(block.max()) + 1
        positions = torch.cat(pieces, dim=1)
        position_ids[:, row, keep] = positions.to(position_ids.dtype)
        deltas.append(int(positions.max()) + 1 - int(keep.sum()))
    return position_ids, torch.tensor(deltas).unsqueeze(1)


def decoder_positions(model, inputs: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(position_ids the decoder received, logits) of one ``model(**inputs)`` pass, read with a hook.

    ``Qwen2_5_VLModel.forward`` hands its language model the 3-D M-RoPE ids only when
    ``mm_token_type_ids`` is among the inputs (transformers 5.24 ``compute_3d_position_ids``); without
    it the decoder gets None and counts 0, 1, 2, … in all three rows, image tokens included (trap 18).
    """
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("position_ids")), with_kwargs=True
    )
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        hook.remove()
    return seen[0], logits


def generated_positions(real_lengths, rope_deltas: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """(batch, new_tokens) position id of each generated token: ``length + k + rope_deltas``.

    ``real_lengths`` counts each prompt's non-padding tokens (``attention_mask.sum(-1)``). A new
    token is text, so its three ids are equal: one more than the prompt's largest id, then +1 per
    token. Mirrors what ``generate`` feeds the model after the prompt.
    """
    lengths = torch.as_tensor(real_lengths).reshape(-1, 1)
    return lengths + torch.arange(new_tokens).unsqueeze(0) + rope_deltas


def merged_grid_check(
    position_ids: torch.Tensor, input_ids: torch.Tensor, image_grid_thw, spatial_merge_size: int = 2
) -> int:
    """Trap 2: each image token's (h, w) ids minus the image's start must be its merged (row, col).

    ``position_ids`` (3, length) and ``input_ids`` (length,) of one sequence; returns how many
    image tokens were checked; raises ValueError at the first token that is off.
    """
    pads = torch.nonzero(input_ids == IMAGE_TOKEN_ID).flatten().tolist()
    checked, cursor = 0, 0
    for grid in image_grid_thw:
        t, h, w = (int(v) for v in grid)
        count = t * (h // spatial_merge_size) * (w // spatial_merge_size)
        slots = pads[cursor : cursor + count]
        cursor += count
        start = int(position_ids[0, slots[0]])
        for k, slot in enumerate(slots):
            row, col = divmod(k % ((h // spatial_merge_size) * (w // spatial_merge_size)), w // spatial_merge_size)
            got = (int(position_ids[1, slot]) - start, int(position_ids[2, slot]) - start)
            if got != (row, col):
                raise ValueError(f"image token {k} of grid {[t, h, w]} has (h, w) offsets {got}; expected {(row, col)}")
            checked += 1
    return checked


# ---------------------------------------------------------------------------------------------
# The head dimension: mrope_section
# ---------------------------------------------------------------------------------------------


def pair_axes(mrope_section) -> np.ndarray:
    """Which axis (0 t, 1 h, 2 w) drives each rotary pair of a head: ``mrope_section`` [16, 24, 24]
    → pairs 0–15 t, 16–39 h, 40–63 w (the head's 128 channels are 64 pairs, used twice by
    ``rotate_half``). Mirrors ``Qwen2_5_VLRotaryEmbedding.recomposition_frequencies``."""
    if any(int(s) < 0 for s in mrope_section) or len(mrope_section) != 3:
        raise ValueError(f"mrope_section={list(mrope_section)}: expected three non-negative sizes (t, h, w)")
    return np.repeat(np.arange(3), [int(s) for s in mrope_section])


def inverse_frequencies(head_dim: int, theta: float = 1e6) -> torch.Tensor:
    """RoPE's ``1 / theta^(2i / head_dim)`` for the head_dim/2 pairs (fp32), as the model computes them."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


def mrope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (batch, length, head_dim) for 3-D ``position_ids`` (3, batch, length).

    Pair j rotates by ``position[axis(j)] × inv_freq[j]``, axis from ``pair_axes``; the two halves of
    the head share the angles. Mirrors ``Qwen2_5_VLRotaryEmbedding.forward``.
    """
    axes = torch.as_tensor(pair_axes(mrope_section))
    if len(axes) != inv_freq.numel():
        raise ValueError(
            f"mrope_section={list(mrope_section)} sums to {len(axes)}; the head has {inv_freq.numel()} pairs"
        )
    chosen = position_ids[axes].float()  # (pairs, batch, length): each pair's own axis
    angles = chosen.permute(1, 2, 0) * inv_freq  # (batch, length, pairs)
    angles = torch.cat([angles, angles], dim=-1)  # (batch, length, head_dim)
    return angles.cos(), angles.sin()


def interleaved_pair_axes(mrope_section) -> np.ndarray:
    """Qwen3-VL's layout, for comparison: which axis (0 t, 1 h, 2 w) drives each rotary pair when
    M-RoPE is interleaved. Pair j goes to h when j % 3 == 1 and j < 3·mrope_section[1], to w when
    j % 3 == 2 and j < 3·mrope_section[2], to t otherwise ([24, 20, 20] → t h w t h w … t t t t; a
    section whose 3·size exceeds the pairs gets fewer pairs than it names, as in the library).
    Mirrors ``Qwen3VLTextRotaryEmbedding.recomposition_frequencies`` (transformers 5.24)."""
    if any(int(s) < 0 for s in mrope_section) or len(mrope_section) != 3:
        raise ValueError(f"mrope_section={list(mrope_section)}: expected three non-negative sizes (t, h, w)")
    axes = np.zeros(sum(int(s) for s in mrope_section), dtype=int)
    for axis in (1, 2):
        axes[axis : 3 * int(mrope_section[axis]) : 3] = axis
    return axes


def axis_frequencies(inv_freq: torch.Tensor, axes) -> torch.Tensor:
    """(3, pairs): the angle in radians by which each rotary pair of a head turns when the t, h or w
    id grows by one. Row a holds ``inv_freq[j]`` for the pairs j that axis a drives (``axes[j] == a``,
    from ``pair_axes`` or ``interleaved_pair_axes``) and 0 for the others, so a token at ids
    (t, h, w) rotates pair j by ``t·f[0, j] + h·f[1, j] + w·f[2, j]``: the angles of
    ``Qwen2_5_VLRotaryEmbedding.forward`` (``Qwen3VLTextRotaryEmbedding.forward`` for the
    interleaved layout)."""
    axes = torch.as_tensor(np.asarray(axes))
    if axes.shape != inv_freq.shape:
        raise ValueError(f"{len(axes)} pair axes for {inv_freq.numel()} frequencies")
    rows = torch.arange(3).view(3, 1)
    return torch.where(axes.view(1, -1) == rows, inv_freq.float().view(1, -1), torch.zeros(()))


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def plot_positions(position_ids: torch.Tensor, types: torch.Tensor, ax=None, title: str | None = None):
    """The three rows (t, h, w) of one sequence's position ids along the sequence, visual runs shaded."""
    if ax is None:
        figure, ax = new_figure(width=7.5, height=3.0)
    else:
        figure = ax.figure
    x = np.arange(position_ids.shape[-1])
    types = np.asarray(types)
    for kind, colour, label in ((IMAGE, COLOURS["image"], "image tokens"), (VIDEO, COLOURS["video"], "video tokens")):
        inside = types == kind
        if inside.any():
            ax.fill_between(
                x,
                0,
                1,
                where=inside,
                transform=ax.get_xaxis_transform(),
                color=colour,
                alpha=0.12,
                step="mid",
                label=label,
                linewidth=0,
            )
    for row, (name, colour, style) in enumerate(
        zip(AXES, (COLOURS["loss"], COLOURS["text"], COLOURS["image"]), ("-", "--", ":"))
    ):
        ax.plot(
            x,
            np.asarray(position_ids[row]),
            style,
            color=colour,
            label=f"{name} id",
            linewidth=1.2,
            drawstyle="steps-mid",
        )
    ax.plot(x, x, color=COLOURS["pad"], linewidth=0.8, alpha=0.6, label="1-D RoPE (index)")
    ax.set_xlabel("token index")
    ax.set_ylabel("position id")
    ax.legend(loc="upper left", ncol=3, fontsize=8)
    if title:
        ax.set_title(title)
    return figure


def plot_pair_axes(sections: dict[str, list[int]]):
    """One bar per model: the rotary pairs of one head coloured by the axis that drives them."""
    figure, ax = new_figure(width=7.5, height=0.9 + 0.45 * len(sections))
    colours = (COLOURS["loss"], COLOURS["text"], COLOURS["image"])
    for row, (_name, section) in enumerate(sections.items()):
        left = 0
        total = sum(section)
        for axis, size in enumerate(section):
            ax.barh(
                row,
                size / total,
                left=left / total,
                color=colours[axis],
                edgecolor="white",
                label=f"{AXES[axis]} pairs" if row == 0 else None,
            )
            ax.text(
                (left + size / 2) / total,
                row,
                f"{AXES[axis]}: {size}",
                ha="center",
                va="center",
                color="white",
                fontsize=9,
            )
            left += size
    ax.set_yticks(range(len(sections)), list(sections))
    ax.set_xlabel("fraction of a head's rotary pairs (low index = fast rotation)")
    ax.set_xlim(0, 1)
    ax.grid(False)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=3)
    return figure


def plot_axis_frequencies(layouts: dict[str, torch.Tensor], span: int | None = None):
    """One panel per layout: each rotary pair's frequency (rad per id, log scale) coloured by the
    axis that drives it; ``layouts`` maps a title to ``axis_frequencies``' (3, pairs) tensor. With
    ``span`` a second y-axis reads the angle turned over ``span`` ids."""
    figure, axs = new_figure(ncols=len(layouts), width=7.5, height=3.0, sharey=True)
    axs = np.atleast_1d(axs)
    colours = (COLOURS["loss"], COLOURS["text"], COLOURS["image"])
    for ax, (title, frequencies) in zip(axs, layouts.items()):
        pairs = np.arange(frequencies.shape[1])
        for axis in range(3):
            used = np.asarray(frequencies[axis] > 0)
            ax.scatter(
                pairs[used], np.asarray(frequencies[axis])[used], s=10, color=colours[axis], label=f"{AXES[axis]} pairs"
            )
        ax.set_yscale("log")
        ax.set_xlabel("rotary pair j of a head")
        ax.set_title(title, fontsize=10)
    axs[0].set_ylabel("rad per id step")
    axs[0].legend(loc="lower left", fontsize=8)
    if span:
        right = axs[-1].secondary_yaxis("right", functions=(lambda f: f * span, lambda a: a / span))
        right.set_ylabel(f"rad over {span} ids")
    return figure


# ---------------------------------------------------------------------------------------------
# Widget: image size, video seconds and fps → positions
# ---------------------------------------------------------------------------------------------

#: Image and video pixel limits used by the widget (the image bound is the checkpoint's default
#: max; video frames as qwen-vl-utils' default per-frame bound at small sizes).
WIDGET_VIDEO_SIZE = (336, 448)  # H, W of each video frame (already a multiple of 28)


def _resized(height: int, width: int, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The processor's resize target (``helpers.vision.smart_resize``, equal to transformers')."""
    return smart_resize(height, width, FACTOR, min_pixels, max_pixels)


def video_plan(seconds: float, fps: float, frame_size=WIDGET_VIDEO_SIZE) -> dict:
    """Frames sampled from ``seconds`` of video at ``fps``: rounded to an even count (≥ 2, two frames
    per temporal patch), grid (frames/2, H/14, W/14), ``second_per_grid_ts`` = 2 / fps.
    Simplified from qwen-vl-utils' ``smart_nframes`` (no min/max frame bounds)."""
    if seconds <= 0 or fps <= 0:
        raise ValueError(f"seconds={seconds}, fps={fps}: both must be > 0")
    frames = max(2, 2 * round(seconds * fps / 2))
    grid = (frames // 2, frame_size[0] // 14, frame_size[1] // 14)
    return {"frames": frames, "grid_thw": grid, "second_per_grid_ts": 2 / fps}


def synthetic_sequence(
    image_grid=None, video_grid=None, text_before: int = 14, text_between: int = 4, text_after: int = 10
) -> torch.Tensor:
    """(1, length) token ids shaped like a chat: text, [image block], text, [video block], text.

    Text tokens are a placeholder id (they only need to be text); each block is
    ``<|vision_start|>`` + pads (t·h·w/4) + ``<|vision_end|>``. Used where running the processor
    would be too slow (the widget).
    """
    filler = 1000
    ids = [filler] * text_before
    for grid, pad in ((image_grid, IMAGE_TOKEN_ID), (video_grid, VIDEO_TOKEN_ID)):
        if grid is None:
            continue
        t, h, w = grid
        ids += [VISION_START_ID] + [pad] * (t * h * w // 4) + [VISION_END_ID] + [filler] * text_between
    ids += [filler] * text_after
    return torch.tensor([ids])


_positions_view_defaults = {"image_height": 600, "image_width": 512, "video_seconds": 4.0, "fps": 2.0}


@register_widget(
    "08_mrope",
    _positions_view_defaults,
    [
        {"image_height": 1400, "image_width": 2000},
        {"video_seconds": 20.0, "fps": 4.0},
        {"image_height": 56, "image_width": 56, "video_seconds": 0.5, "fps": 1.0},
    ],
)
def positions_view(
    image_height: int = 600, image_width: int = 512, video_seconds: float = 4.0, fps: float = 2.0
) -> View:
    """Positions of a chat with one image (resized as the processor does) and one video sampled at
    ``fps`` (frames of ``WIDGET_VIDEO_SIZE``): the (t, h, w) rows plot and the largest position id."""
    height, width = _resized(int(image_height), int(image_width))
    image_grid = (1, height // 14, width // 14)
    video = video_plan(float(video_seconds), float(fps))
    ids = synthetic_sequence(image_grid, video["grid_thw"])
    positions, deltas = rope_index(
        ids, torch.tensor([image_grid]), torch.tensor([video["grid_thw"]]), [video["second_per_grid_ts"]]
    )
    largest = int(positions.max())
    figure = plot_positions(
        positions[:, 0], token_types(ids)[0], title=f"{ids.shape[1]} tokens, largest position id {largest}"
    )
    text = (
        f"image {image_height}×{image_width} → resized {height}×{width}, grid {image_grid}, "
        f"{math.prod(image_grid) // 4} tokens\n"
        f"video {video_seconds:g} s at {fps:g} fps → {video['frames']} frames, grid {video['grid_thw']}, "
        f"{math.prod(video['grid_thw']) // 4} tokens, temporal step {2 * video['second_per_grid_ts']:g} "
        f"(tokens_per_second 2 × {video['second_per_grid_ts']:g} s)\n"
        f"sequence length {ids.shape[1]}, largest position id {largest}, rope_deltas {int(deltas)}"
    )
    return View(
        text=text,
        figure=figure,
        data={
            "largest": largest,
            "length": ids.shape[1],
            "rope_deltas": int(deltas),
            "image_grid": image_grid,
            "video_grid": video["grid_thw"],
        },
    )

"""Figures and widgets of the vision tower lessons (notebooks 05, 06 and 07): the window map, the
attention cost curve, the layer strip, the position order, and one widget per notebook. The
tower itself is ``helpers.vision_tower``."""

from __future__ import annotations

import numpy as np
import torch

from helpers.constants import MAX_PIXELS, MERGE_SIZE, MIN_PIXELS, PATCH_SIZE, TOKEN_PIXELS
from helpers.plots import COLOURS, new_figure
from helpers.vision import smart_resize
from helpers.vision_tower import (
    _check_positive_int,
    attention_cost,
    full_attention_seqlens,
    patch_embed_cost,
    temporal_pairs,
    vision_position_ids,
    window_index,
    window_map,
    window_sizes,
)
from helpers.widgets import View, register_widget

# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def _fixed_layout(figure, axes, **margins) -> None:
    """Switch a ``new_figure`` to a fixed layout (constrained layout costs tens of ms per render)."""
    figure.set_layout_engine("none")
    first = axes[0] if isinstance(axes, (list, tuple, np.ndarray)) else axes
    first.get_gridspec().update(**margins)


def _window_colours(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """RGBA per cell: a distinct colour per window id, grey for padding (-1)."""
    rng = np.random.default_rng(seed)
    palette = np.concatenate(
        [rng.uniform(0.15, 0.95, (max(int(ids.max()) + 1, 1), 3)), np.ones((max(int(ids.max()) + 1, 1), 1))], axis=1
    )
    rgba = palette[np.clip(ids, 0, None)]
    rgba[ids < 0] = (0.6, 0.6, 0.6, 1.0)
    return rgba


def draw_window_map(
    ax, ids: np.ndarray, merge_pixels: int = 28, image=None, alpha: float = 0.45, label_windows: bool = True
) -> None:
    """Draw one frame's window map (padded merged grid, -1 = padding) over an optional image."""
    ph, pw = ids.shape
    extent = (0, pw * merge_pixels, ph * merge_pixels, 0)
    if image is not None:
        ax.imshow(np.asarray(image), extent=(0, image.shape[1], image.shape[0], 0))
    rgba = _window_colours(ids)
    rgba[..., 3] = np.where(ids < 0, 0.85, alpha if image is not None else 1.0)
    ax.imshow(rgba, extent=extent)
    from matplotlib.patches import Rectangle

    inside_h, inside_w = int((ids[:, 0] >= 0).sum()), int((ids[0] >= 0).sum())
    for xy, w, h in (
        ((inside_w * merge_pixels, 0), (pw - inside_w) * merge_pixels, ph * merge_pixels),
        ((0, inside_h * merge_pixels), inside_w * merge_pixels, (ph - inside_h) * merge_pixels),
    ):
        if w > 0 and h > 0:
            ax.add_patch(Rectangle(xy, w, h, fill=False, hatch="///", edgecolor="white", lw=0))
    if label_windows and ids.max() < 120:
        rows, cols = np.indices(ids.shape)
        counts = np.bincount(ids[ids >= 0])
        centre_r = np.bincount(ids[ids >= 0], weights=rows[ids >= 0]) / counts
        centre_c = np.bincount(ids[ids >= 0], weights=cols[ids >= 0]) / counts
        for wid, (r, c) in enumerate(zip(centre_r, centre_c)):
            ax.text((c + 0.5) * merge_pixels, (r + 0.5) * merge_pixels, str(wid), ha="center", va="center", fontsize=6)
    ax.set_xlim(0, pw * merge_pixels)
    ax.set_ylim(ph * merge_pixels, 0)
    ax.grid(False)


def window_counts_text(cu_window: torch.Tensor, spatial_merge_size: int = 2) -> str:
    """'70 × 64, 7 × 32, …' : how many windows hold how many patch rows."""
    sizes, counts = torch.unique(window_sizes(cu_window), return_counts=True)
    return ", ".join(f"{c} of {s}" for s, c in sorted(zip(sizes.tolist(), counts.tolist()), reverse=True))


def cost_figure(curve: dict, full_layers: int = 4, window_layers: int = 28):
    """Attention FLOPs and score-matrix memory per layer, window vs full, as patches grow."""
    figure, (left, right) = new_figure(2, 1, width=8.5, height=3.2)
    n = curve["patches"]
    left.plot(n, curve["full_flops"] / 1e9, color=COLOURS["loss"], label="full layer")
    left.plot(n, curve["window_flops"] / 1e9, color=COLOURS["image"], label="window layer")
    mix = (full_layers * curve["full_flops"] + window_layers * curve["window_flops"]) / (full_layers + window_layers)
    left.plot(
        n,
        mix / 1e9,
        color=COLOURS["text"],
        ls="--",
        label=f"tower average ({full_layers} full / {window_layers} window)",
    )
    left.set(xlabel="patches per image", ylabel="attention GFLOPs per layer", title="Q·Kᵀ and P·V FLOPs")
    left.legend(fontsize=7)
    right.plot(n, curve["full_bytes"] / 2**20, color=COLOURS["loss"], label="full layer")
    right.plot(n, curve["window_bytes"] / 2**20, color=COLOURS["image"], label="window layer")
    right.set(xlabel="patches per image", ylabel="MiB (bf16, all heads)", title="score matrices if materialised")
    right.set_yscale("log")
    right.legend(fontsize=7)
    return figure


def layer_strip_figure(depth: int, full_blocks, title: str):
    """One cell per vision block, coloured by attention kind."""
    figure, ax = new_figure(1, 1, width=8.5, height=0.9)
    colours = [COLOURS["loss"] if i in full_blocks else COLOURS["image"] for i in range(depth)]
    ax.bar(range(depth), np.ones(depth), color=colours, width=0.9)
    for i in full_blocks:
        ax.text(i, 0.5, str(i), ha="center", va="center", color="white", fontsize=8)
    ax.set(xlim=(-0.6, depth - 0.4), yticks=[], title=title, xlabel="block (orange = full attention, green = window)")
    ax.grid(False)
    return figure


def position_order_figure(grid_h: int, grid_w: int, spatial_merge_size: int = 2, show_raster: bool = True):
    """Left: each patch labelled with its row index in ``pixel_values`` (merge-block order), the
    2×2 merge blocks outlined. Right: the h and w position ids along the sequence."""
    ids = vision_position_ids([[1, grid_h, grid_w]], spatial_merge_size)
    figure, (left, right) = new_figure(2, 1, width=7.0, height=2.8)
    _fixed_layout(figure, [left], left=0.07, right=0.98, bottom=0.16, top=0.9, wspace=0.3)
    order = np.empty((grid_h, grid_w), dtype=int)
    order[ids[:, 0].numpy(), ids[:, 1].numpy()] = np.arange(len(ids))
    left.imshow(order // spatial_merge_size**2 % 8, cmap="Pastel2")
    if grid_h * grid_w <= 96:
        for (r, c), k in np.ndenumerate(order):
            left.text(c, r, str(k), ha="center", va="center", fontsize=6)
    left.hlines(np.arange(0, grid_h + 1, spatial_merge_size) - 0.5, -0.5, grid_w - 0.5, color="black", lw=0.8)
    left.vlines(np.arange(0, grid_w + 1, spatial_merge_size) - 0.5, -0.5, grid_h - 0.5, color="black", lw=0.8)
    left.set(title="row of pixel_values at each patch", xlabel="w (patch column)", ylabel="h (patch row)")
    left.grid(False)
    right.step(np.arange(len(ids)), ids[:, 0], where="mid", color=COLOURS["text"], label="h id")
    right.step(np.arange(len(ids)), ids[:, 1], where="mid", color=COLOURS["loss"], label="w id")
    right.set(
        xlabel="row of pixel_values (sequence index)",
        ylabel="position id",
        title="vision RoPE ids in merge-block order",
    )
    right.legend(fontsize=7, loc="upper left")
    return figure


# ---------------------------------------------------------------------------------------------
# Widgets
# ---------------------------------------------------------------------------------------------


def _resized_grid(
    height: int,
    width: int,
    patch_size: int = PATCH_SIZE,
    merge: int = MERGE_SIZE,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
):
    rh, rw = smart_resize(height, width, patch_size * merge, min_pixels, max_pixels)
    return rh, rw, rh // patch_size, rw // patch_size


@register_widget(
    "05_patch_embed",
    {"height": 1092, "width": 1568, "frames": 1, "hidden": 1280},
    [{"height": 224, "width": 224, "frames": 5, "hidden": 64}, {"frames": 8, "hidden": 64}],
)
def patch_embed_view(
    height: int = 1092,
    width: int = 1568,
    frames: int = 1,
    hidden: int = 1280,
    min_pixels: int = 256 * TOKEN_PIXELS,
    max_pixels: int = 1280 * TOKEN_PIXELS,
) -> View:
    """Image size, frame count and width → patch rows, embed output, parameters, FLOPs, and which
    frame feeds each temporal slot."""
    _check_positive_int("hidden", hidden)
    rh, rw, gh, gw = _resized_grid(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
    pairs = temporal_pairs(frames)
    n = len(pairs) * gh * gw
    cost = patch_embed_cost(n, hidden)
    text = (
        f"resized {rh}×{rw} → grid (t, h, w) = ({len(pairs)}, {gh}, {gw})\n"
        f"pixel_values ({n}, {cost['row']}) @ weight ({cost['row']}, {hidden}) → ({n}, {hidden})\n"
        f"parameters {cost['params']:,}   FLOPs {cost['flops'] / 1e9:.2f} G\n"
        f"temporal pairs: {pairs}"
    )
    figure, ax = new_figure(1, 1, width=6.0, height=1.4)
    _fixed_layout(figure, ax, left=0.02, right=0.98, bottom=0.02, top=0.82)
    for slot, frame in enumerate(f for pair in pairs for f in pair):
        repeated = slot >= frames
        ax.add_patch(
            matplotlib_rectangle(
                (slot, 0), 0.9, 0.9, COLOURS["pad"] if repeated else COLOURS["video"], "//" if repeated else None
            )
        )
        ax.text(slot + 0.45, 0.45, str(frame), ha="center", va="center", color="white", fontsize=8)
    for p in range(len(pairs)):
        ax.plot([2 * p, 2 * p + 1.9], [-0.15, -0.15], color="black", lw=2)
        ax.text(2 * p + 0.95, -0.45, f"t={p}", ha="center", fontsize=7)
    ax.set(
        xlim=(-0.2, max(2 * len(pairs), 2) + 0.2),
        ylim=(-0.7, 1.0),
        yticks=[],
        xticks=[],
        title="frame fed to each temporal slot (grey = repeated to fill the pair)",
    )
    ax.grid(False)
    return View(text=text, figure=figure, data={"grid_thw": (len(pairs), gh, gw), "rows": n, **cost, "pairs": pairs})


def matplotlib_rectangle(xy, w, h, colour, hatch):
    from matplotlib.patches import Rectangle

    return Rectangle(xy, w, h, facecolor=colour, hatch=hatch, edgecolor="white")


@register_widget(
    "06_window_attention",
    {"height": 1092, "width": 1568, "window_size": 112},
    [{"height": 512, "width": 600, "window_size": 56}, {"height": 2000, "width": 300, "window_size": 224}],
)
def window_view(
    height: int = 1092,
    width: int = 1568,
    window_size: int = 112,
    min_pixels: int = 256 * TOKEN_PIXELS,
    max_pixels: int = 1280 * TOKEN_PIXELS,
) -> View:
    """Image size and window size → the window map of the resized image and the window counts."""
    rh, rw, gh, gw = _resized_grid(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
    ids = window_map([[1, gh, gw]], 2, window_size, 14)[0]
    _, cu = window_index([[1, gh, gw]], 2, window_size, 14)
    full = full_attention_seqlens([[1, gh, gw]])
    costs = {"window": attention_cost(cu, 1280, 16), "full": attention_cost(full, 1280, 16)}
    ratio = costs["full"]["flops"] / costs["window"]["flops"]
    text = (
        f"resized {rh}×{rw} → grid (1, {gh}, {gw}) → merged {gh // 2}×{gw // 2} → padded "
        f"{ids.shape[0]}×{ids.shape[1]}\n{len(cu) - 1} windows: {window_counts_text(cu)} (patch rows each)\n"
        f"full attention costs {ratio:.1f}× the FLOPs of window attention at this size (3B widths)"
    )
    figure, ax = new_figure(1, 1, width=4.6, height=3.3)
    _fixed_layout(figure, ax, left=0.12, right=0.97, bottom=0.08, top=0.92)
    draw_window_map(ax, ids, label_windows=len(cu) <= 40)
    ax.set(title=f"{len(cu) - 1} windows of ≤ {(window_size // 14) ** 2} patches (grey = padding)")
    return View(
        text=text,
        figure=figure,
        data={"grid": (gh, gw), "windows": len(cu) - 1, "cu_window_seqlens": cu, "flops_ratio": ratio},
    )


@register_widget(
    "07_vision_rope_merger", {"grid_h": 6, "grid_w": 8}, [{"grid_h": 2, "grid_w": 2}, {"grid_h": 12, "grid_w": 16}]
)
def position_view(grid_h: int = 6, grid_w: int = 8) -> View:
    """A patch grid → each patch's row in ``pixel_values`` and the h/w ids of the vision RoPE."""
    ids = vision_position_ids([[1, grid_h, grid_w]], 2)
    first = ", ".join(f"({h},{w})" for h, w in ids[:8].tolist())
    text = (
        f"{grid_h * grid_w} patches → {grid_h * grid_w // 4} merged tokens; first 8 (h, w) ids: {first}\n"
        f"rows 4k..4k+3 always form one 2×2 block: that is what the merger concatenates"
    )
    return View(text=text, figure=position_order_figure(grid_h, grid_w), data={"position_ids": ids})

"""Patchify: from resized, normalised frames to the rows of ``pixel_values``, and back
(taught in notebooks/04_patchify.ipynb).

``patchify`` mirrors the reshape/transpose in ``Qwen2VLImageProcessor.patchify`` and
``Qwen2VLVideoProcessor.patchify`` (transformers 5.24): a (T, C, H, W) float array becomes
``(grid_t·grid_h·grid_w, C·temporal_patch_size·patch_size²)`` rows, one per 14×14×2 patch, in
merge-block order (the four patches of each 2×2 merge block are consecutive rows).
``unpatchify`` inverts it. ``processor_frames`` gives the exact float frames the processor
patchifies, so the two can be compared bit for bit. ``token_view`` is notebook 04's widget.
"""

from __future__ import annotations

import numpy as np
import torch

from helpers.constants import MAX_PIXELS, MIN_PIXELS
from helpers.plots import COLOURS, new_figure
from helpers.widgets import View, register_widget


def _check_sizes(patch_size, temporal_patch_size, merge_size) -> None:
    for name, value in (
        ("patch_size", patch_size),
        ("temporal_patch_size", temporal_patch_size),
        ("merge_size", merge_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected an integer ≥ 1")


def patchify(frames, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2):
    """(T, C, H, W) frames → (flatten_patches, (grid_t, grid_h, grid_w)).

    Mirrors ``Qwen2VLVideoProcessor.patchify`` (and ``Qwen2VLImageProcessor.patchify`` for T = 1):
    a frame count that is not a multiple of ``temporal_patch_size`` is padded by repeating the last
    frame (a still image becomes two identical frames). Rows are ordered (t, block row, block col,
    row in block, col in block); each row is (C, t-in-patch, 14, 14) flattened. Accepts a torch
    tensor or a numpy array and returns the same kind.
    """
    _check_sizes(patch_size, temporal_patch_size, merge_size)
    is_numpy = isinstance(frames, np.ndarray)
    x = torch.from_numpy(frames) if is_numpy else frames
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(getattr(frames, "shape", ())) or type(frames).__name__
        raise ValueError(f"frames of shape {shape}: expected a 4-D float array (T, C, H, W)")
    t, c, h, w = x.shape
    factor = patch_size * merge_size
    if t < 1 or c < 1 or h < factor or w < factor or h % factor or w % factor:
        raise ValueError(
            f"frames of shape (T={t}, C={c}, H={h}, W={w}): need T ≥ 1, C ≥ 1 and H, W positive multiples of "
            f"patch_size·merge_size = {factor} (resize with smart_resize first)"
        )
    if pad := -t % temporal_patch_size:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])  # repeat the last frame
    grid_t, grid_h, grid_w = x.shape[0] // temporal_patch_size, h // patch_size, w // patch_size
    m, p = merge_size, patch_size
    x = x.reshape(grid_t, temporal_patch_size, c, grid_h // m, m, p, grid_w // m, m, p)
    #            0       1                    2  3           4  5  6           7  8
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, block row, block col, row in block, col in block, C, T, 14, 14)
    flat = x.reshape(grid_t * grid_h * grid_w, c * temporal_patch_size * p * p)
    return (flat.numpy() if is_numpy else flat), (grid_t, grid_h, grid_w)


def unpatchify(flatten_patches, grid_thw, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2):
    """The inverse of ``patchify``: rows → (grid_t·temporal_patch_size, C, H, W) frames.

    A still image comes back as its two identical temporal copies.
    """
    _check_sizes(patch_size, temporal_patch_size, merge_size)
    is_numpy = isinstance(flatten_patches, np.ndarray)
    x = torch.from_numpy(flatten_patches) if is_numpy else flatten_patches
    grid_t, grid_h, grid_w = (int(v) for v in (grid_thw.tolist() if hasattr(grid_thw, "tolist") else grid_thw))
    if min(grid_t, grid_h, grid_w) < 1 or grid_h % merge_size or grid_w % merge_size:
        raise ValueError(
            f"grid_thw=({grid_t}, {grid_h}, {grid_w}): need all ≥ 1 and grid_h, grid_w multiples of "
            f"merge_size={merge_size}"
        )
    per_channel = temporal_patch_size * patch_size * patch_size
    rows = grid_t * grid_h * grid_w
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[0] != rows or x.shape[1] % per_channel:
        shape = tuple(getattr(flatten_patches, "shape", ()))
        raise ValueError(
            f"flatten_patches of shape {shape}: expected ({rows}, C·{per_channel}) for grid_thw="
            f"({grid_t}, {grid_h}, {grid_w}), i.e. grid_t·grid_h·grid_w rows of C·T·14·14 values"
        )
    c, m, p = x.shape[1] // per_channel, merge_size, patch_size
    x = x.reshape(grid_t, grid_h // m, grid_w // m, m, m, c, temporal_patch_size, p, p)
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)  # (t, T, C, block row, row in block, 14, block col, col in block, 14)
    frames = x.reshape(grid_t * temporal_patch_size, c, grid_h * p, grid_w * p)
    return frames.numpy() if is_numpy else frames


def processor_resized(images, image_processor) -> torch.Tensor:
    """The frames a Qwen2-VL image or video processor resizes before normalising: its own
    ``resize`` (smart_resize within its ``size`` limits, bicubic), still in the input's dtype
    (uint8 for a PIL image). ``images``: one PIL image (→ (1, C, H, W)), or a video as a
    float/uint8 tensor (T, C, H, W) (→ (T, C, H, W)).
    """
    import torchvision.transforms.v2.functional as tvF

    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"video of shape {tuple(images.shape)}: expected (T, C, H, W)")
        x = images[None]  # (1, T, C, H, W): the video processor resizes batches of videos
    else:
        x = tvF.pil_to_tensor(images.convert("RGB"))[None]  # (1, C, H, W) uint8
    proc = image_processor
    kwargs = {"temporal_factor": proc.temporal_patch_size} if isinstance(images, torch.Tensor) else {}
    x = proc.resize(x, size=proc.size, resample=proc.resample, factor=proc.patch_size * proc.merge_size, **kwargs)
    return x[0] if isinstance(images, torch.Tensor) else x


def processor_frames(images, image_processor) -> torch.Tensor:
    """The float (T, C, H, W) frames a Qwen2-VL image or video processor hands to its ``patchify``:
    resized (``processor_resized``) and rescaled + normalised by its ``rescale_and_normalize`` —
    the processor's own methods, so patchify(result) can equal its ``pixel_values`` bit for bit.

    ``images``: one PIL image, or a video as a float/uint8 tensor (T, C, H, W).
    """
    proc = image_processor
    x = processor_resized(images, proc)
    x = proc.rescale_and_normalize(x, True, proc.rescale_factor, True, proc.image_mean, proc.image_std)
    return x


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def row_index_grid(grid_h: int, grid_w: int, merge_size: int = 2) -> np.ndarray:
    """(grid_h, grid_w) map: the ``pixel_values`` row that holds the patch at each grid position."""
    _check_sizes(14, 2, merge_size)
    for name, value in (("grid_h", grid_h), ("grid_w", grid_w)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % merge_size:
            raise ValueError(f"{name}={value!r}: expected a positive multiple of merge_size={merge_size}")
    index = np.arange(grid_h * grid_w).reshape(grid_h // merge_size, grid_w // merge_size, merge_size, merge_size)
    return index.transpose(0, 2, 1, 3).reshape(grid_h, grid_w)  # (block row, row in block, block col, col in block)


def token_location(index: int, grid_thw, merge_size: int = 2) -> dict:
    """Where row ``index`` of ``pixel_values`` sits: temporal slice, patch row/col, merge block, LLM token."""
    grid_t, grid_h, grid_w = (int(v) for v in grid_thw)
    if not 0 <= index < grid_t * grid_h * grid_w:
        raise ValueError(f"index={index}: expected a row in [0, {grid_t * grid_h * grid_w - 1}]")
    t, rest = divmod(index, grid_h * grid_w)
    block, inner = divmod(rest, merge_size * merge_size)
    block_row, block_col = divmod(block, grid_w // merge_size)
    row_in, col_in = divmod(inner, merge_size)
    return dict(
        t=t,
        row=block_row * merge_size + row_in,
        col=block_col * merge_size + col_in,
        block_row=block_row,
        block_col=block_col,
        llm_token=index // merge_size**2,
    )


def order_figure(grid_h: int = 8, grid_w: int = 12, merge_size: int = 2, width: float = 8.0):
    """Left: raster order (what one might expect). Right: the real row order, each 2×2 merge block
    holding four consecutive rows; arrows follow the first blocks."""
    figure, axes = new_figure(2, 1, width=width, height=width * grid_h / grid_w / 2 + 0.6)
    raster = np.arange(grid_h * grid_w).reshape(grid_h, grid_w)
    for ax, order, title in (
        (axes[0], raster, "raster order (not used)"),
        (axes[1], row_index_grid(grid_h, grid_w, merge_size), "pixel_values row order"),
    ):
        ax.imshow(order, cmap="viridis")
        for (r, c), v in np.ndenumerate(order):
            ax.text(
                c, r, str(v), ha="center", va="center", fontsize=6, color="white" if v < order.size / 2 else "black"
            )
        ax.set_xticks(np.arange(-0.5, grid_w, merge_size), [])
        ax.set_yticks(np.arange(-0.5, grid_h, merge_size), [])
        ax.grid(True, color="white", lw=1.5, alpha=1)
        ax.set_title(title)
        path = np.array([[r, c] for v in range(min(16, order.size)) for r, c in [np.argwhere(order == v)[0]]])
        ax.plot(path[:, 1], path[:, 0], color=COLOURS["loss"], lw=1.2)
    return figure


def row_figure(row, channels=("R", "G", "B"), temporal_patch_size: int = 2, patch_size: int = 14, width: float = 6.0):
    """One ``pixel_values`` row unfolded as (C=3, T=2, 14, 14): six small normalised images."""
    block = np.asarray(row).reshape(len(channels), temporal_patch_size, patch_size, patch_size)
    figure, axes = new_figure(len(channels), temporal_patch_size, width=width, height=width * 2 / 3 + 0.3)
    low, high = float(block.min()), float(block.max())
    for ci, name in enumerate(channels):
        for ti in range(temporal_patch_size):
            ax = axes[ti, ci]
            ax.imshow(block[ci, ti], cmap="gray", vmin=low, vmax=high)
            ax.set(xticks=[], yticks=[], title=f"C={name}, T={ti}")
            ax.grid(False)
    return figure


def denormalise(frames, image_processor) -> np.ndarray:
    """(C, H, W) normalised frame → (H, W, 3) floats in [0, 1] for display."""
    mean = np.asarray(image_processor.image_mean)[:, None, None]
    std = np.asarray(image_processor.image_std)[:, None, None]
    return np.clip(np.asarray(frames) * std + mean, 0, 1).transpose(1, 2, 0)


# ---------------------------------------------------------------------------------------------
# The widget of notebook 04
# ---------------------------------------------------------------------------------------------

_PHOTO: dict = {}


def _photo() -> dict:
    """The real photo through the checkpoint-default image processor, patchified once (cached)."""
    if not _PHOTO:
        import matplotlib.cbook
        from PIL import Image
        from transformers import Qwen2VLImageProcessor

        processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as image:
            frames = processor_frames(image, processor)
        rows, grid = patchify(frames)
        _PHOTO.update(
            processor=processor, frames=frames, rows=rows.numpy(), grid=grid, picture=denormalise(frames[0], processor)
        )
    return _PHOTO


def token_view(index: int = 0) -> View:
    """Widget: a ``pixel_values`` row index → its 14×14 patch and 28×28 merge block on the photo,
    and the row itself shown back as a (3, 14, 14) image (its two temporal copies are equal)."""
    photo = _photo()
    grid = photo["grid"]
    try:
        where = token_location(index, grid)
    except ValueError as error:
        return View(text=f"not accepted: {error}", data={"error": str(error)})
    from matplotlib.patches import Rectangle

    figure, (left, middle, right) = new_figure(3, 1, width=7.0, height=3.0, gridspec_kw={"width_ratios": [1.5, 1, 1]})
    figure.set_layout_engine("none")  # a fixed layout: constrained layout costs ~40 ms per update
    left.get_gridspec().update(left=0.01, right=0.99, top=0.88, bottom=0.03, wspace=0.12)
    b, top, col = 28, where["block_row"] * 28, where["block_col"] * 28
    left.imshow(photo["picture"])
    left.add_patch(Rectangle((col - 0.5, top - 0.5), b, b, fill=False, ec=COLOURS["highlight"], lw=2.5))
    left.set_title(f"row {index} on the photo (H×W {grid[1] * 14}×{grid[2] * 14})")
    middle.imshow(photo["picture"][top : top + b, col : col + b])  # the 28×28 merge block = one LLM token
    middle.add_patch(
        Rectangle(
            (where["col"] * 14 - col - 0.5, where["row"] * 14 - top - 0.5), 14, 14, fill=False, ec=COLOURS["loss"], lw=3
        )
    )
    middle.set_title(f"LLM token {where['llm_token']}: 2×2")
    patch = photo["rows"][index].reshape(3, 2, 14, 14)[:, 0]  # (C, 14, 14) of temporal copy 0
    right.imshow(denormalise(patch, photo["processor"]))
    right.set_title(f"row {index}: 14×14")
    for ax in (left, middle, right):
        ax.set(xticks=[], yticks=[])
        ax.grid(False)
    text = (
        f"grid (t, h, w) = {grid}; row {index} → patch row {where['row']}, col {where['col']}; merge block "
        f"({where['block_row']}, {where['block_col']}) = LLM token {where['llm_token']} "
        f"(rows {where['llm_token'] * 4}–{where['llm_token'] * 4 + 3})"
    )
    return View(text=text, figure=figure, data=where)


register_widget("04_patchify", dict(index=0), [{"index": 1}, {"index": 777}, {"index": 10**6}])(token_view)

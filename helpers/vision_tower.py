"""The Qwen2.5-VL vision tower, written out explicitly (taught in notebooks 05, 06 and 07).

- 05_patch_embed: ``conv3d_to_linear_weight`` / ``patch_embed_as_matmul`` (the Conv3d with
  kernel = stride is one matrix multiply over the 1176-long patch rows), ``patch_embed_cost``,
  ``still_image_kernel`` (what a still image's repeated frame does to the kernel).
- 06_window_attention: ``window_index`` (mirrors ``transformers.vision_utils.get_vision_window_index``),
  ``full_attention_seqlens`` (mirrors ``get_vision_cu_seqlens``), ``window_map``, ``window_sizes``,
  ``attention_cost``, ``block_mask``, ``masked_attention`` / ``windowed_attention``.
- 07_vision_rope_merger: ``vision_position_ids`` (mirrors ``get_vision_position_ids``),
  ``rotary_inv_freq`` / ``rotary_cos_sin`` (mirror ``Qwen2_5_VLVisionRotaryEmbedding``),
  ``patch_merger`` (mirrors ``Qwen2_5_VLPatchMerger``) and ``vision_tower_forward``, the whole
  ``Qwen2_5_VisionTransformerPretrainedModel.forward`` from the model's own weights.

Every function here is cross-checked against its transformers twin in tests/test_vision_tower.py; the
figures and widgets of notebooks 05–07 are in ``helpers.vision_tower_plots``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from helpers.layers import apply_rotary, rms_norm

# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _as_grid(grid_thw, spatial_merge_size: int = 1) -> torch.Tensor:
    """``grid_thw`` as a (n, 3) int64 tensor, checked: positive, h and w divisible by the merge."""
    if isinstance(grid_thw, torch.Tensor):
        if grid_thw.is_floating_point() or grid_thw.dtype == torch.bool:
            raise TypeError(f"grid_thw has dtype {grid_thw.dtype}; expected an integer tensor")
        grid = grid_thw.to(torch.int64).cpu()
    else:
        grid = torch.as_tensor(np.asarray(grid_thw))
        if grid.is_floating_point() or grid.dtype == torch.bool:
            raise TypeError(f"grid_thw={grid_thw!r}: expected integers (t, h, w)")
        grid = grid.to(torch.int64)
    if grid.ndim == 1:
        grid = grid[None]
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise ValueError(f"grid_thw has shape {tuple(grid.shape)}; expected (n ≥ 1, 3) rows of (t, h, w)")
    if (grid < 1).any():
        raise ValueError(f"grid_thw={grid.tolist()}: every t, h, w must be ≥ 1")
    if spatial_merge_size > 1 and ((grid[:, 1:] % spatial_merge_size) != 0).any():
        raise ValueError(
            f"grid_thw={grid.tolist()}: h and w must be multiples of spatial_merge_size={spatial_merge_size}"
        )
    return grid


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}={value!r}: expected an int ≥ 1")
    if value < 1:
        raise ValueError(f"{name}={value}: expected an int ≥ 1")
    return int(value)


def _merger_window(spatial_merge_size: int, window_size: int, patch_size: int) -> int:
    """The window side in merged tokens: 112 // 2 // 14 = 4 in Qwen2.5-VL."""
    for name, value in (
        ("spatial_merge_size", spatial_merge_size),
        ("window_size", window_size),
        ("patch_size", patch_size),
    ):
        _check_positive_int(name, value)
    unit = spatial_merge_size * patch_size
    if window_size % unit:
        raise ValueError(f"window_size={window_size}: expected a multiple of spatial_merge_size·patch_size = {unit}")
    return window_size // unit


# ---------------------------------------------------------------------------------------------
# 05 · the patch embedding
# ---------------------------------------------------------------------------------------------


def conv3d_to_linear_weight(conv_weight: torch.Tensor) -> torch.Tensor:
    """A Conv3d weight (hidden, C, T, P, P) as a Linear weight (hidden, C·T·P·P).

    The rows of ``pixel_values`` are laid out (C, T, P, P), exactly as ``Qwen2_5_VisionPatchEmbed``
    views them, so the flattening order of the kernel must be the same.
    """
    if conv_weight.ndim != 5:
        raise ValueError(f"conv_weight has shape {tuple(conv_weight.shape)}; expected 5 dims (hidden, C, T, P, P)")
    return conv_weight.reshape(conv_weight.shape[0], -1)


def patch_embed_as_matmul(pixel_values: torch.Tensor, conv_weight: torch.Tensor) -> torch.Tensor:
    """``Qwen2_5_VisionPatchEmbed.forward`` as one matrix multiply: (N, 1176) @ (1176, hidden)."""
    weight = conv3d_to_linear_weight(conv_weight)
    if pixel_values.ndim != 2 or pixel_values.shape[1] != weight.shape[1]:
        raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected (N, {weight.shape[1]})")
    return pixel_values.to(weight.dtype) @ weight.T


def patch_embed_cost(
    num_patches: int, hidden: int, in_channels: int = 3, temporal_patch_size: int = 2, patch_size: int = 14
) -> dict:
    """Parameters and FLOPs (2 per multiply-add) of the patch embedding for ``num_patches`` rows."""
    _check_positive_int("num_patches", num_patches)
    _check_positive_int("hidden", hidden)
    row = in_channels * temporal_patch_size * patch_size * patch_size
    return {"row": row, "params": hidden * row, "flops": 2 * num_patches * row * hidden}


def still_image_kernel(conv_weight: torch.Tensor) -> torch.Tensor:
    """The 2D kernel (hidden, C, P, P) a still image really sees: both temporal slices summed.

    A still image is repeated to fill ``temporal_patch_size`` = 2, so both temporal slices of the
    kernel multiply the same pixels.
    """
    return conv_weight.sum(dim=2)


def temporal_pairs(num_frames: int, temporal_patch_size: int = 2) -> list[tuple[int, ...]]:
    """Which frame feeds each temporal slot: frames are padded by repeating the last one.

    Mirrors the padding in ``Qwen2VLImageProcessor`` / ``Qwen2VLVideoProcessor`` (a still image is
    one frame → pair (0, 0)).
    """
    _check_positive_int("num_frames", num_frames)
    _check_positive_int("temporal_patch_size", temporal_patch_size)
    padded = -(-num_frames // temporal_patch_size) * temporal_patch_size
    frames = [min(i, num_frames - 1) for i in range(padded)]
    return [tuple(frames[i : i + temporal_patch_size]) for i in range(0, padded, temporal_patch_size)]


# ---------------------------------------------------------------------------------------------
# 06 · windows
# ---------------------------------------------------------------------------------------------


def window_index(grid_thw, spatial_merge_size: int, window_size: int, patch_size: int):
    """The window permutation of merged tokens and the window boundaries, in patch rows.

    Mirrors ``transformers.vision_utils.get_vision_window_index`` (the model's window index):
    windows are cut on the *merged* grid, ``window_size // spatial_merge_size // patch_size``
    merged tokens on a side (4 in Qwen2.5-VL); each frame is cut on its own; windows are visited
    row by row, and inside a window its merged tokens row by row. Returns ``(window_index,
    cu_window_seqlens)``: ``window_index[k]`` is the merged token placed k-th, and
    ``cu_window_seqlens`` (int32) the cumulative window lengths counted in patches (4 per merged
    token), starting at 0.
    """
    side = _merger_window(spatial_merge_size, window_size, patch_size)
    grid = _as_grid(grid_thw, spatial_merge_size)
    unit = spatial_merge_size**2
    orders, lengths, offset = [], [], 0
    for t, h, w in grid.tolist():
        mh, mw = h // spatial_merge_size, w // spatial_merge_size
        tt, rr, cc = torch.meshgrid(torch.arange(t), torch.arange(mh), torch.arange(mw), indexing="ij")
        # The model pads the merged grid up to the next multiple of `side` plus one: with
        # `side - mh % side` extra rows, a whole empty row of windows when mh divides. Empty windows
        # have length 0 and vanish from the boundaries, so only the column count matters here.
        windows_per_row = mw // side + 1
        key = (tt * (mh // side + 1) + rr // side) * windows_per_row + cc // side  # (t, mh, mw) window id
        key = key.reshape(-1)
        order = torch.argsort(key, stable=True)  # merged tokens are already row-major inside a window
        orders.append(order + offset)
        lengths.append(torch.unique_consecutive(key[order], return_counts=True)[1])
        offset += t * mh * mw
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cat(lengths).cumsum(0) * unit])
    return torch.cat(orders), cu.to(torch.int32)


def full_attention_seqlens(grid_thw) -> torch.Tensor:
    """Boundaries of the full-attention layers: one segment per temporal patch (h·w patches each).

    Mirrors ``transformers.vision_utils.get_vision_cu_seqlens`` (``merge_temporal=False``): a
    "full" layer attends across a whole frame (pair), never across frames or images.
    """
    grid = _as_grid(grid_thw)
    lengths = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0])
    return torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)


def window_sizes(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The length of each segment from cumulative boundaries."""
    return (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)


def window_map(grid_thw, spatial_merge_size: int = 2, window_size: int = 112, patch_size: int = 14) -> np.ndarray:
    """The window id of every merged token of ONE image/video, on the padded merged grid.

    Returns an int array (t, padded_h, padded_w) where padding cells (outside the image, inside its
    last windows) hold -1. Ids count windows in the order the model visits them.
    """
    grid = _as_grid(grid_thw, spatial_merge_size)
    if grid.shape[0] != 1:
        raise ValueError(f"grid_thw has {grid.shape[0]} rows; window_map draws one image or video")
    side = _merger_window(spatial_merge_size, window_size, patch_size)
    order, cu = window_index(grid, spatial_merge_size, window_size, patch_size)
    unit = spatial_merge_size**2
    ids_in_order = torch.repeat_interleave(torch.arange(len(cu) - 1), window_sizes(cu) // unit)
    ids = torch.empty_like(ids_in_order)
    ids[order] = ids_in_order
    t, h, w = grid[0].tolist()
    mh, mw = h // spatial_merge_size, w // spatial_merge_size
    ph, pw = -(-mh // side) * side, -(-mw // side) * side
    out = np.full((t, ph, pw), -1, dtype=np.int64)
    out[:, :mh, :mw] = ids.reshape(t, mh, mw).numpy()
    return out


def block_mask(cu_seqlens: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """Boolean (N, N) mask: True where query and key fall in the same segment (block diagonal)."""
    sizes = window_sizes(cu_seqlens)
    segment = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    if length is not None and length != len(segment):
        raise ValueError(f"cu_seqlens covers {len(segment)} rows, expected length={length}")
    return segment[:, None] == segment[None, :]


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Attention over the whole sequence with a boolean mask (heads, N, d) → (heads, N, d).

    Every one of the N² scores is computed, then the masked ones are thrown away.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def windowed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Attention inside each segment of ``cu_seqlens`` only, one small attention per window.

    What the model does without flash attention (``torch.split`` over ``cu_seqlens``); flash
    attention's varlen kernel does the same in one call.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sizes = window_sizes(cu_seqlens).tolist()
    outs = [
        torch.softmax((qi @ ki.transpose(-1, -2)) * scale, dim=-1) @ vi
        for qi, ki, vi in zip(q.split(sizes, -2), k.split(sizes, -2), v.split(sizes, -2))
    ]
    return torch.cat(outs, dim=-2)


def attention_cost(cu_seqlens: torch.Tensor, hidden: int, num_heads: int, bytes_per_score: int = 2) -> dict:
    """FLOPs and score-matrix bytes of one attention layer over the segments of ``cu_seqlens``.

    FLOPs count Q·Kᵀ and P·V only (2 · 2 · n² · hidden per segment of n tokens; projections
    are the same for window and full layers). Bytes: every head's n × n score matrix, all segments.
    """
    sizes = window_sizes(cu_seqlens)
    squares = int((sizes**2).sum())
    return {
        "flops": 4 * squares * hidden,
        "score_bytes": num_heads * squares * bytes_per_score,
        "segments": len(sizes),
        "largest": int(sizes.max()),
    }


def attention_costs_for_grid(
    grid_thw,
    hidden: int,
    num_heads: int,
    spatial_merge_size: int = 2,
    window_size: int = 112,
    patch_size: int = 14,
    bytes_per_score: int = 2,
) -> dict:
    """``attention_cost`` of a window layer and of a full layer for the same images."""
    _, cu_window = window_index(grid_thw, spatial_merge_size, window_size, patch_size)
    return {
        "window": attention_cost(cu_window, hidden, num_heads, bytes_per_score),
        "full": attention_cost(full_attention_seqlens(grid_thw), hidden, num_heads, bytes_per_score),
    }


def tower_flops(grid_thw, vision_config, windows: bool = True) -> dict:
    """FLOPs of one forward of the whole vision tower (``Qwen2_5_VisionTransformerPretrainedModel``)
    by part, counted as ``torch.utils.flop_counter.FlopCounterMode`` counts them: 2 per multiply-add
    of every matmul (patch embed, each block's QKV/output projections and gated MLP, Q·Kᵀ and P·V,
    the merger's two layers). ``windows=False``: as if every block attended fully.
    """
    cfg = vision_config
    grid = _as_grid(grid_thw)
    n = int(grid.prod(-1).sum())
    d, merge = cfg.hidden_size, cfg.spatial_merge_size
    costs = attention_costs_for_grid(grid, d, cfg.num_heads, merge, cfg.window_size, cfg.patch_size)
    full_blocks = len(cfg.fullatt_block_indexes) if windows else cfg.depth
    wide = d * merge**2  # the merger's input: 4 rows side by side
    parts = {
        "patch_embed": patch_embed_cost(n, d, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size)["flops"],
        "block_linear": cfg.depth * 2 * n * (4 * d * d + 3 * d * cfg.intermediate_size),
        "attention": full_blocks * costs["full"]["flops"] + (cfg.depth - full_blocks) * costs["window"]["flops"],
        "merger": 2 * (n // merge**2) * (wide * wide + wide * cfg.out_hidden_size),
    }
    return {**parts, "total": sum(parts.values())}


def cost_curve(max_patches: int = 16384, hidden: int = 1280, num_heads: int = 16, steps: int = 24) -> dict:
    """Attention cost of a window and a full layer for square-ish images up to ``max_patches``.

    Image grids are (1, 2k, 2k) and (1, 2k, 2k+2) for growing k; returns arrays for plotting.
    """
    sides = sorted({2 * max(1, int(round(s))) for s in np.linspace(2, math.sqrt(max_patches) / 2, steps)})
    rows = {"patches": [], "window_flops": [], "full_flops": [], "window_bytes": [], "full_bytes": []}
    for side in sides:
        costs = attention_costs_for_grid([[1, side, side]], hidden, num_heads)
        rows["patches"].append(side * side)
        for kind in ("window", "full"):
            rows[f"{kind}_flops"].append(costs[kind]["flops"])
            rows[f"{kind}_bytes"].append(costs[kind]["score_bytes"])
    return {k: np.array(v, dtype=np.float64) for k, v in rows.items()}


# ---------------------------------------------------------------------------------------------
# 07 · rotary positions, the merger, the whole tower
# ---------------------------------------------------------------------------------------------


def vision_position_ids(grid_thw, spatial_merge_size: int) -> torch.Tensor:
    """(h, w) patch coordinates of every patch row, in merge-block order, shape (N, 2).

    Mirrors ``transformers.vision_utils.get_vision_position_ids`` (what the model's vision rotary
    embedding rotates by): within each 2×2 merge block the four patches are consecutive, blocks go
    row by row, and every temporal patch of a video repeats the same (h, w) ids.
    """
    _check_positive_int("spatial_merge_size", spatial_merge_size)
    grid = _as_grid(grid_thw, spatial_merge_size)
    m = spatial_merge_size
    pieces = []
    for t, h, w in grid.tolist():
        k = torch.arange(h * w)  # position in the sequence of one frame
        in_col, in_row = k % m, (k // m) % m
        block = k // (m * m)
        block_row, block_col = block // (w // m), block % (w // m)
        hw = torch.stack([block_row * m + in_row, block_col * m + in_col], dim=-1)
        pieces.append(hw.repeat(t, 1))
    return torch.cat(pieces)


def rotary_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """The vision RoPE's head_dim/4 inverse frequencies, shared by the h and the w axis.

    Mirrors ``Qwen2_5_VLVisionRotaryEmbedding.compute_axial_rope_parameters``.
    """
    _check_positive_int("head_dim", head_dim)
    if head_dim % 4:
        raise ValueError(f"head_dim={head_dim}: expected a multiple of 4 (half for h, half for w, in pairs)")
    spatial = head_dim // 2
    return 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float32) / spatial))


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float = 10000.0):
    """cos, sin of shape (N, head_dim): angles [h·f, w·f, h·f, w·f] for the rotate-half pairing.

    Mirrors ``Qwen2_5_VLVisionRotaryEmbedding.forward``: dimension i is paired with i + head_dim/2,
    so the first quarter of the pairs turns with the row id h and the second quarter with w.
    """
    inv_freq = rotary_inv_freq(head_dim, theta)
    angles_h = position_ids[:, 0:1].float() * inv_freq  # (N, head_dim/4)
    angles_w = position_ids[:, 1:2].float() * inv_freq  # (N, head_dim/4)
    angles = torch.cat([angles_h, angles_w, angles_h, angles_w], dim=-1)  # (N, head_dim)
    return angles.cos(), angles.sin()


def patch_merger(x: torch.Tensor, merger, spatial_merge_size: int = 2) -> torch.Tensor:
    """The 2×2 merger: RMSNorm, then each 4 consecutive rows side by side → MLP → text width.

    Mirrors ``Qwen2_5_VLPatchMerger.forward`` with the weights of ``merger``:
    (N, hidden) → (N/4, 4·hidden) → Linear → GELU → Linear → (N/4, out_hidden).
    """
    unit = spatial_merge_size**2
    if x.shape[0] % unit:
        raise ValueError(f"{x.shape[0]} rows is not a multiple of spatial_merge_size² = {unit}")
    grouped = rms_norm(x, merger.ln_q.weight, merger.ln_q.variance_epsilon).reshape(-1, unit * x.shape[1])
    first, last = merger.mlp[0], merger.mlp[2]
    return F.linear(F.gelu(F.linear(grouped, first.weight, first.bias)), last.weight, last.bias)


def permute_rows(x: torch.Tensor, order: torch.Tensor, spatial_merge_size: int = 2) -> torch.Tensor:
    """Reorder rows in groups of spatial_merge_size² (merged tokens) by ``order``."""
    unit = spatial_merge_size**2
    return x.reshape(-1, unit, *x.shape[1:])[order].reshape(x.shape)


def vision_block(
    x: torch.Tensor, block, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """One ``Qwen2_5_VLVisionBlock`` from its weights, with an explicit boolean attention mask."""
    n, dim = x.shape
    h = rms_norm(x, block.norm1.weight, block.norm1.variance_epsilon)
    qkv = F.linear(h, block.attn.qkv.weight, block.attn.qkv.bias).reshape(n, 3, num_heads, dim // num_heads)
    q, k, v = qkv.unbind(1)  # each (N, heads, head_dim)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    out = masked_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask)  # (heads, N, d)
    x = x + F.linear(out.transpose(0, 1).reshape(n, dim), block.attn.proj.weight, block.attn.proj.bias)
    h = rms_norm(x, block.norm2.weight, block.norm2.variance_epsilon)
    mlp = block.mlp
    gated = F.silu(F.linear(h, mlp.gate_proj.weight, mlp.gate_proj.bias)) * F.linear(
        h, mlp.up_proj.weight, mlp.up_proj.bias
    )
    return x + F.linear(gated, mlp.down_proj.weight, mlp.down_proj.bias)


@torch.no_grad()
def vision_tower_forward(visual, pixel_values: torch.Tensor, grid_thw, return_steps: bool = False):
    """``model.model.visual(pixel_values, grid_thw).pooler_output`` re-implemented step by step.

    patch embed (one matmul) → window permutation → 2D rotary → blocks with explicit window / full
    masks → merger → inverse permutation. Uses ``visual``'s weights and config only. With
    ``return_steps`` also returns a dict of the intermediate tensors.
    """
    cfg = visual.config
    if cfg.hidden_act != "silu":
        raise ValueError(f"hidden_act={cfg.hidden_act!r}: this re-implementation writes the MLP with silu")
    grid = _as_grid(grid_thw, cfg.spatial_merge_size)
    x = patch_embed_as_matmul(pixel_values, visual.patch_embed.proj.weight)  # (N, hidden)
    order, cu_window = window_index(grid, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
    x = permute_rows(x, order, cfg.spatial_merge_size)
    positions = permute_rows(vision_position_ids(grid, cfg.spatial_merge_size), order, cfg.spatial_merge_size)
    cos, sin = rotary_cos_sin(positions, cfg.hidden_size // cfg.num_heads, cfg.rope_parameters["rope_theta"])
    # Full layers attend within each temporal patch; the permutation keeps frames contiguous.
    masks = {"window": block_mask(cu_window, len(x)), "full": block_mask(full_attention_seqlens(grid), len(x))}
    for number, block in enumerate(visual.blocks):
        kind = "full" if number in cfg.fullatt_block_indexes else "window"
        x = vision_block(x, block, cos, sin, masks[kind], cfg.num_heads)
    merged = patch_merger(x, visual.merger, cfg.spatial_merge_size)
    out = merged[torch.argsort(order)]
    if return_steps:
        return out, {
            "window_index": order,
            "cu_window_seqlens": cu_window,
            "positions": positions,
            "masks": masks,
            "last_hidden": x,
        }
    return out

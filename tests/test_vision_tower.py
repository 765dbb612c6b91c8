"""helpers.vision_tower against transformers' Qwen2.5-VL vision code, on sweeps."""

import numpy as np
import pytest
import torch
import transformers
from matplotlib import cbook
from PIL import Image
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionPatchEmbed,
    Qwen2_5_VLPatchMerger,
    Qwen2_5_VLVisionRotaryEmbedding,
)
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from helpers import vision_tower as vt
from helpers import vision_tower_plots as vtp
from helpers.qwen import course_config, load_model, qwen25vl_3b_config
from helpers.widgets import REGISTRY

transformers.logging.set_verbosity_error()

SWEEP = 600


def random_grids(count, seed=0):
    """``count`` random grid_thw lists: 1–3 items, images (t = 1) and videos (t up to 4)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        items = rng.integers(1, 4)
        yield torch.tensor(
            [
                [int(rng.choice([1, 1, 2, 3, 4])), 2 * int(rng.integers(1, 45)), 2 * int(rng.integers(1, 45))]
                for _ in range(items)
            ]
        )


@pytest.fixture(scope="module")
def photo():
    return Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")


def video_frames(count, height=84, width=112, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)])


# --------------------------------------------------------------------------------------- 05


@pytest.mark.parametrize("hidden", [64, 1280])
def test_patch_embed_is_one_matmul(hidden, processor, photo):
    torch.manual_seed(hidden)
    embed = Qwen2_5_VisionPatchEmbed(14, 2, 3, hidden)
    for image in (photo, photo.resize((300, 200)), photo.crop((0, 0, 100, 480))):
        rows = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            expected = embed(rows)
        got = vt.patch_embed_as_matmul(rows, embed.proj.weight)
        assert got.shape == (rows.shape[0], hidden)
        assert (got - expected).abs().max().item() <= 1e-5


def test_patch_embed_course_model_and_seed_shapes(model):
    grid = (1, 58, 84)
    rows = torch.randn(58 * 84, 1176)
    embed = model.model.visual.patch_embed
    with torch.no_grad():
        expected = embed(rows)
    torch.testing.assert_close(vt.patch_embed_as_matmul(rows, embed.proj.weight), expected, atol=1e-5, rtol=0)
    cost = vt.patch_embed_cost(int(np.prod(grid)), 1280)
    assert cost == {"row": 1176, "params": 1280 * 1176, "flops": 2 * 4872 * 1176 * 1280}
    with torch.device("meta"):
        meta = transformers.Qwen2_5_VLForConditionalGeneration(qwen25vl_3b_config())
    assert meta.model.visual.patch_embed.proj.weight.numel() == cost["params"]


def test_still_image_kernel_is_a_2d_conv(processor, photo):
    torch.manual_seed(0)
    embed = Qwen2_5_VisionPatchEmbed(14, 2, 3, 32)
    rows = processor.image_processor(images=[photo], return_tensors="pt")["pixel_values"]
    frames = rows.reshape(-1, 3, 2, 14, 14)
    assert torch.equal(frames[:, :, 0], frames[:, :, 1])  # the still frame is repeated
    kernel = vt.still_image_kernel(embed.proj.weight)  # (32, 3, 14, 14)
    got = F_conv2d(frames[:, :, 0], kernel)
    with torch.no_grad():
        torch.testing.assert_close(got, embed(rows), atol=1e-5, rtol=0)


def F_conv2d(patches, kernel):
    return torch.nn.functional.conv2d(patches, kernel, stride=14).reshape(len(patches), -1)


@pytest.mark.parametrize("frames", range(1, 8))
def test_temporal_pairs_match_the_video_processor(frames, processor):
    out = processor.video_processor(videos=[video_frames(frames)], return_tensors="pt")
    pairs = vt.temporal_pairs(frames)
    assert out["video_grid_thw"][0, 0].item() == len(pairs)
    assert pairs[-1][-1] == frames - 1 and sum(len(p) for p in pairs) == 2 * len(pairs)


# --------------------------------------------------------------------------------------- 06


def test_window_index_matches_transformers_on_a_sweep():
    checked = 0
    for number, grid in enumerate(random_grids(SWEEP)):
        window = [28, 56, 112, 112, 224][number % 5]
        expected = get_vision_window_index(grid, spatial_merge_size=2, window_size=window, patch_size=14)
        got = vt.window_index(grid, 2, window, 14)
        assert torch.equal(got[0], expected[0]), (grid.tolist(), window)
        assert torch.equal(got[1], expected[1]) and got[1].dtype == expected[1].dtype, (grid.tolist(), window)
        checked += 1
    assert checked >= 500


def test_window_index_seed_example():
    order, cu = vt.window_index([[1, 58, 84]], 2, 112, 14)
    sizes = vt.window_sizes(cu)
    assert len(sizes) == 88 and int(cu[-1]) == 4872
    assert {s: int((sizes == s).sum()) for s in (64, 32, 16, 8)} == {64: 70, 32: 7, 16: 10, 8: 1}
    assert vt.window_map([[1, 58, 84]])[0].shape == (32, 44)
    assert sorted(order.tolist()) == list(range(29 * 42))


def test_full_attention_seqlens_match_transformers():
    for grid in random_grids(200, seed=1):
        assert torch.equal(vt.full_attention_seqlens(grid), get_vision_cu_seqlens(grid))


def test_window_map_agrees_with_the_permutation():
    for grid in random_grids(50, seed=2):
        first = grid[:1]
        ids = vt.window_map(first)
        t, h, w = first[0].tolist()
        inside = ids[:, : h // 2, : w // 2]
        assert (inside >= 0).all() and (ids[:, h // 2 :, :] == -1).all() and (ids[:, :, w // 2 :] == -1).all()
        _, cu = vt.window_index(first, 2, 112, 14)
        assert np.bincount(inside.ravel()).tolist() == (vt.window_sizes(cu) // 4).tolist()


def test_masked_and_windowed_attention_agree():
    torch.manual_seed(0)
    for grid in ([[1, 30, 44]], [[2, 20, 28], [1, 8, 8]]):
        _, cu = vt.window_index(grid, 2, 112, 14)
        n = int(cu[-1])
        q, k, v = torch.randn(3, 4, n, 16).unbind(0)
        masked = vt.masked_attention(q, k, v, vt.block_mask(cu, n))
        torch.testing.assert_close(vt.windowed_attention(q, k, v, cu), masked, atol=1e-5, rtol=0)


def test_attention_cost_counts_the_mask():
    for grid in ([[1, 58, 84]], [[3, 12, 20], [1, 30, 4]]):
        costs = vt.attention_costs_for_grid(grid, hidden=1280, num_heads=16)
        _, cu = vt.window_index(grid, 2, 112, 14)
        assert costs["window"]["flops"] == 4 * 1280 * int(vt.block_mask(cu).sum())
        full = vt.block_mask(vt.full_attention_seqlens(grid))
        assert costs["full"]["score_bytes"] == 16 * 2 * int(full.sum())
    curve = vt.cost_curve(16384, steps=6)
    assert curve["patches"].max() <= 16384 and (curve["full_flops"] >= curve["window_flops"]).all()


# --------------------------------------------------------------------------------------- 07


@pytest.mark.parametrize("grid", [[[1, 16, 20]], [[2, 8, 12]], [[1, 8, 8], [1, 12, 16]], [[1, 58, 84]]])
def test_tower_flops_equal_the_flop_counter(grid):
    """Every matmul of the course tower's forward, as torch's FlopCounterMode counts them (eager
    attention: the counter does not see CPU SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = load_model()
    model.set_attn_implementation("eager")
    grid = torch.tensor(grid)
    rows = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.model.visual(rows, grid)
    ours = vt.tower_flops(grid, model.model.visual.config)
    assert ours["total"] == counter.get_total_flops()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert ours["patch_embed"] == counts["aten.convolution"] and ours["attention"] == counts["aten.bmm"]
    assert vt.tower_flops(grid, model.model.visual.config, windows=False)["attention"] >= ours["attention"]


def test_tower_flops_3b_seed_image():
    cfg = qwen25vl_3b_config().vision_config
    windows, full = vt.tower_flops([[1, 58, 84]], cfg), vt.tower_flops([[1, 58, 84]], cfg, windows=False)
    assert windows["patch_embed"] == 2 * 4872 * 1176 * 1280
    assert 0.05 < windows["attention"] / windows["total"] < 0.10 and 0.30 < 1 - windows["total"] / full["total"] < 0.36


def test_vision_position_ids_match_transformers():
    checked = 0
    for grid in random_grids(SWEEP, seed=3):
        assert torch.equal(vt.vision_position_ids(grid, 2), get_vision_position_ids(grid, 2)), grid.tolist()
        checked += 1
    assert checked >= 500


@pytest.mark.parametrize("config", [course_config().vision_config, qwen25vl_3b_config().vision_config])
def test_rotary_cos_sin_match_the_model(config):
    rotary = Qwen2_5_VLVisionRotaryEmbedding(config)
    head_dim = config.hidden_size // config.num_heads
    torch.testing.assert_close(vt.rotary_inv_freq(head_dim, config.rope_parameters["rope_theta"]), rotary.inv_freq)
    for grid in random_grids(5, seed=4):
        ids = vt.vision_position_ids(grid, 2)
        expected = rotary(torch.zeros(1), ids)
        got = vt.rotary_cos_sin(ids, head_dim, config.rope_parameters["rope_theta"])
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("hidden,out", [(64, 128), (1280, 2048)])
def test_patch_merger_matches_the_model(hidden, out):
    torch.manual_seed(0)
    merger = Qwen2_5_VLPatchMerger(dim=out, context_dim=hidden, spatial_merge_size=2)
    x = torch.randn(64, hidden)
    with torch.no_grad():
        expected = merger(x)
    assert expected.shape == (16, out) and merger.mlp[0].weight.shape == (4 * hidden, 4 * hidden)
    torch.testing.assert_close(vt.patch_merger(x, merger), expected, atol=1e-5, rtol=0)


def _tower_max_diff(visual, rows, grid):
    with torch.no_grad():
        expected = visual(rows, grid).pooler_output
    got = vt.vision_tower_forward(visual, rows, grid)
    assert got.shape == expected.shape
    return (got - expected).abs().max().item()


def test_vision_tower_matches_the_model_image_video_and_batch(model, processor, photo):
    visual = model.model.visual
    image = processor.image_processor(images=[photo.resize((256, 300))], return_tensors="pt")
    video = processor.video_processor(videos=[video_frames(5)], return_tensors="pt")
    both_rows = torch.cat([image["pixel_values"], video["pixel_values_videos"]])
    both_grid = torch.cat([image["image_grid_thw"], video["video_grid_thw"]])
    for rows, grid in (
        (image["pixel_values"], image["image_grid_thw"]),
        (video["pixel_values_videos"], video["video_grid_thw"]),
        (both_rows, both_grid),
    ):
        assert _tower_max_diff(visual, rows, grid) <= 1e-5


def test_vision_tower_other_shapes_sweep():
    config = course_config(
        vision_hidden=48, vision_depth=5, vision_heads=3, vision_mlp=96, fullatt_block_indexes=(0, 4)
    )
    visual = load_model(config=config, seed=3).model.visual
    for grid in random_grids(4, seed=5):
        grid = torch.minimum(grid, torch.tensor([2, 16, 20]))
        rows = torch.randn(int(grid.prod(-1).sum()), 1176)
        assert _tower_max_diff(visual, rows, grid) <= 1e-5, grid.tolist()


# --------------------------------------------------------------------------------------- widgets


def test_widgets_registered_and_compute():
    names = {r.notebook for r in REGISTRY.values() if r.update.__module__ == "helpers.vision_tower_plots"}
    assert names == {"05_patch_embed", "06_window_attention", "07_vision_rope_merger"}
    for entry in REGISTRY.values():
        if entry.update.__module__ != "helpers.vision_tower_plots":
            continue
        for variation in [{}] + entry.variations:
            view = entry.update(**{**entry.defaults, **variation})
            assert view.figure is not None and view.text
    assert vtp.patch_embed_view().data["rows"] == 4872
    assert vtp.patch_embed_view(frames=5).data["pairs"] == [(0, 1), (2, 3), (4, 4)]
    assert vtp.window_view().data["windows"] == 88
    assert vtp.position_view(grid_h=2, grid_w=4).data["position_ids"].tolist() == [
        [0, 0],
        [0, 1],
        [1, 0],
        [1, 1],
        [0, 2],
        [0, 3],
        [1, 2],
        [1, 3],
    ]


# --------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "call,error,words",
    [
        (lambda: vt.window_index([[1, 57, 84]], 2, 112, 14), ValueError, "multiples of spatial_merge_size"),
        (lambda: vt.window_index([[0, 58, 84]], 2, 112, 14), ValueError, "≥ 1"),
        (lambda: vt.window_index([[1.0, 58, 84]], 2, 112, 14), TypeError, "integers"),
        (lambda: vt.window_index(torch.tensor([[1.0, 58, 84]]), 2, 112, 14), TypeError, "dtype"),
        (lambda: vt.window_index([[1, 58]], 2, 112, 14), ValueError, "(n ≥ 1, 3)"),
        (lambda: vt.window_index([[1, 58, 84]], 2, 100, 14), ValueError, "multiple of"),
        (lambda: vt.window_index([[1, 58, 84]], 0, 112, 14), ValueError, "≥ 1"),
        (lambda: vt.vision_position_ids([[1, 58, 84]], 2.0), TypeError, "int"),
        (lambda: vt.vision_position_ids([[1, 3, 84]], 2), ValueError, "multiples"),
        (lambda: vt.window_map([[1, 4, 4], [1, 4, 4]]), ValueError, "one image"),
        (lambda: vt.conv3d_to_linear_weight(torch.zeros(4, 3, 14, 14)), ValueError, "5 dims"),
        (lambda: vt.patch_embed_as_matmul(torch.zeros(4, 588), torch.zeros(8, 3, 2, 14, 14)), ValueError, "(N, 1176)"),
        (lambda: vt.temporal_pairs(0), ValueError, "≥ 1"),
        (lambda: vt.rotary_inv_freq(18), ValueError, "multiple of 4"),
        (lambda: vt.patch_merger(torch.zeros(6, 64), None), ValueError, "multiple of"),
        (lambda: vt.block_mask(torch.tensor([0, 4, 8]), 9), ValueError, "length=9"),
    ],
)
def test_bad_inputs_raise(call, error, words):
    with pytest.raises(error, match=None) as info:
        call()
    assert words in str(info.value)

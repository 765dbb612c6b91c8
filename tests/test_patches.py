"""helpers.patches against the Qwen2-VL image and video processors (transformers 5.24), bit for bit."""

import itertools

import matplotlib.cbook
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

import helpers.patches as hp


@pytest.fixture(scope="module")
def photo():
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as image:
        return image.convert("RGB")


def _images(photo):
    rng = np.random.default_rng(0)
    noise = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    return {
        "photo": (photo, {}),
        "1092x1568": (photo.resize((1568, 1092)), {"min_pixels": 256 * 28 * 28, "max_pixels": 1280 * 28 * 28}),
        "tall 900x100": (photo.resize((100, 900)), {}),
        "wide 60x1500": (photo.resize((1500, 60)), {}),
        "noise 333x517": (noise(333, 517), {"max_pixels": 300 * 28 * 28}),
    }


@pytest.mark.parametrize("name", ["photo", "1092x1568", "tall 900x100", "wide 60x1500", "noise 333x517"])
def test_patchify_equals_the_processor_pixel_values(photo, name):
    from helpers.qwen import load_processor

    image, limits = _images(photo)[name]
    processor = load_processor(**limits)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = processor(text=[text], images=[image], return_tensors="pt")
    frames = hp.processor_frames(image, processor.image_processor)  # (1, 3, H, W)
    rows, grid = hp.patchify(frames)
    assert torch.equal(rows, out["pixel_values"])
    assert [list(grid)] == out["image_grid_thw"].tolist()
    assert torch.equal(hp.unpatchify(rows, grid), frames.expand(2, -1, -1, -1))
    if name == "1092x1568":
        assert frames.shape[-2:] == (812, 1176) and grid == (1, 58, 84) and rows.shape == (4872, 1176)


@pytest.mark.parametrize("name", ["photo", "noise 333x517"])
def test_normalisation_by_hand(photo, name):
    """(x/255 − mean)/std within float32 rounding; the processor's fused (x − 255·mean)/(255·std) bit for bit."""
    from helpers.qwen import load_processor

    image, limits = _images(photo)[name]
    ip = load_processor(**limits).image_processor
    pixels = hp.processor_resized(image, ip)
    frames = hp.processor_frames(image, ip)
    mean, std = torch.tensor(ip.image_mean)[:, None, None], torch.tensor(ip.image_std)[:, None, None]
    assert pixels.dtype == torch.uint8 and pixels.shape == frames.shape
    assert torch.equal((pixels.float() - mean * 255) / (std * 255), frames)
    torch.testing.assert_close(
        ((pixels / 255) - mean) / std, frames, rtol=0, atol=4 * torch.finfo(torch.float32).eps * 3
    )


@pytest.mark.parametrize("nframes", [2, 5, 8])
def test_patchify_equals_the_video_processor(nframes):
    import helpers.video as hv

    video, _, _ = hv.read_video(hv.synthetic_video(**hv.WIDGET_CLIP), nframes=8)
    video = video[:nframes]
    processor = Qwen2VLVideoProcessor()
    out = processor(videos=[video], do_sample_frames=False, cap_pixels_per_frame=True, return_tensors="pt")
    frames = hp.processor_frames(video, processor)
    rows, grid = hp.patchify(frames)
    assert torch.equal(rows, out["pixel_values_videos"])
    assert [list(grid)] == out["video_grid_thw"].tolist()
    back = hp.unpatchify(rows, grid)
    assert torch.equal(back[:nframes], frames)
    assert all(torch.equal(back[i], frames[-1]) for i in range(nframes, back.shape[0]))  # the padding frame


SIZES = list(itertools.product([1, 2, 3, 4], [28, 56, 84], [28, 112], [(14, 2, 2), (14, 1, 2), (7, 2, 3), (16, 2, 2)]))


@pytest.mark.parametrize("t, h, w, sizes", SIZES)
def test_patchify_matches_the_processors_own_patchify_on_a_sweep(t, h, w, sizes):
    patch, temporal, merge = sizes
    h, w = h // 28 * patch * merge, w // 28 * patch * merge  # multiples of patch·merge
    frames = torch.randn(t, 3, h, w, generator=torch.Generator().manual_seed(t * 1000 + h + w))
    rows, grid = hp.patchify(frames, patch, temporal, merge)
    video_rows, *video_grid = Qwen2VLVideoProcessor().patchify(frames[None], patch, merge, temporal)
    assert torch.equal(rows, video_rows[0]) and list(grid) == video_grid
    if t == 1:
        image_rows, gh, gw = Qwen2VLImageProcessor().patchify(frames, patch, merge, temporal)
        assert torch.equal(rows, image_rows[0]) and grid == (1, gh, gw)
    back = hp.unpatchify(rows, grid, patch, temporal, merge)
    assert torch.equal(back[:t], frames)
    numpy_rows, numpy_grid = hp.patchify(frames.numpy(), patch, temporal, merge)
    assert isinstance(numpy_rows, np.ndarray) and np.array_equal(numpy_rows, rows.numpy()) and numpy_grid == grid
    assert np.array_equal(hp.unpatchify(numpy_rows, grid, patch, temporal, merge), back.numpy())


def test_merge_blocks_are_consecutive_rows():
    grid_h, grid_w = 6, 8
    # Frames whose pixels hold their own patch row / column: each patchified row then says where it came from.
    rows_of = torch.arange(grid_h * 14).div(14, rounding_mode="floor").float()[:, None].expand(-1, grid_w * 14)
    cols_of = torch.arange(grid_w * 14).div(14, rounding_mode="floor").float()[None, :].expand(grid_h * 14, -1)
    frames = torch.stack([rows_of, cols_of, torch.zeros_like(rows_of)])[None]  # (1, 3, H, W)
    flat, grid = hp.patchify(frames)
    per_row = flat.reshape(-1, 3, 2 * 14 * 14)[:, :2, 0]  # (rows, (patch row, patch col))
    order = hp.row_index_grid(grid_h, grid_w)
    for index, (r, c) in enumerate(per_row.long().tolist()):
        assert order[r, c] == index
        where = hp.token_location(index, grid)
        assert (where["row"], where["col"]) == (r, c) and where["llm_token"] == index // 4
    for token in range(grid_h * grid_w // 4):  # the four rows of one LLM token form one 2×2 block
        cells = per_row[4 * token : 4 * token + 4].long()
        assert cells[:, 0].max() - cells[:, 0].min() == 1 and cells[:, 1].max() - cells[:, 1].min() == 1


def test_token_view():
    view = hp.token_view(777)
    assert view.data == hp.token_location(777, hp._photo()["grid"]) and view.figure is not None
    assert "index=5000" in hp.token_view(5000).data["error"]


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, message",
    [
        ((3, 56, 56), r"frames of shape \(3, 56, 56\): expected a 4-D float array \(T, C, H, W\)"),
        ((1, 3, 50, 56), r"H=50, W=56\): need .* multiples of patch_size·merge_size = 28"),
        ((1, 3, 56, 14), r"W=14\): need .* multiples of patch_size·merge_size = 28"),
        ((0, 3, 56, 56), r"T=0"),
    ],
)
def test_patchify_rejects_bad_shapes(shape, message):
    with pytest.raises(ValueError, match=message):
        hp.patchify(torch.zeros(shape))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"patch_size": 0}, r"patch_size=0: expected an integer ≥ 1"),
        ({"temporal_patch_size": -2}, r"temporal_patch_size=-2"),
        ({"merge_size": 2.0}, r"merge_size=2.0"),
    ],
)
def test_patchify_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hp.patchify(torch.zeros(2, 3, 56, 56), **kwargs)


@pytest.mark.parametrize(
    "rows, grid, message",
    [
        ((15, 1176), (1, 4, 4), r"flatten_patches of shape \(15, 1176\): expected \(16, C·392\)"),
        ((16, 1000), (1, 4, 4), r"shape \(16, 1000\)"),
        ((16, 1176), (1, 4, 3), r"grid_thw=\(1, 4, 3\): need .* multiples of merge_size=2"),
        ((16, 1176), (0, 4, 4), r"grid_thw=\(0, 4, 4\)"),
    ],
)
def test_unpatchify_rejects_mismatches(rows, grid, message):
    with pytest.raises(ValueError, match=message):
        hp.unpatchify(torch.zeros(rows), grid)


def test_token_location_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"index=-1: expected a row in \[0, 15\]"):
        hp.token_location(-1, (1, 4, 4))

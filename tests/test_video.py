"""helpers.video against qwen-vl-utils 0.0.14 and the transformers video processor."""

import math
import random

import numpy as np
import pytest
import torch
from qwen_vl_utils import vision_process as qvu

import helpers.video as hv  # sets FORCE_QWENVL_VIDEO_READER before qwen-vl-utils is imported

SMART_NFRAMES_CASES = 20_000
FRAME_RANGE_CASES = 5_000


@pytest.fixture(scope="module")
def clip():
    return hv.synthetic_video(**hv.WIDGET_CLIP)


def _library_or_error(function, *args):
    try:
        return function(*args)
    except ValueError:
        return "ValueError"


def _random_ele(rng: random.Random) -> dict:
    if rng.random() < 0.3:
        return {"nframes": rng.choice([rng.randint(1, 400), rng.uniform(1, 400)])}
    ele = {}
    if rng.random() < 0.8:
        ele["fps"] = rng.choice([rng.uniform(0.05, 60), float(rng.randint(1, 30))])
    low = rng.randint(1, 64)
    if rng.random() < 0.6:
        ele["min_frames"] = low
    if rng.random() < 0.6:
        ele["max_frames"] = rng.randint(low, 1000)
    return ele


def decoded_video_inputs(processor, text, frames, metadata):
    """The processor on frames we decoded ourselves: no sampling by the video processor, pixels capped per frame."""
    return processor(text=[text], videos=[frames], video_metadata=[metadata], do_sample_frames=False,
                     cap_pixels_per_frame=True, return_tensors="pt")  # fmt: skip


def test_smart_nframes_matches_qwen_vl_utils_on_random_cases():
    rng = random.Random(0)
    raised = 0
    for _ in range(SMART_NFRAMES_CASES):
        ele = _random_ele(rng)
        total = rng.randint(1, 3000)
        video_fps = rng.choice([rng.uniform(1, 120), 24.0, 25.0, 29.97, 30.0, 60.0])
        expected = _library_or_error(qvu.smart_nframes, ele, total, video_fps)
        got = _library_or_error(hv.smart_nframes, ele, total, video_fps)
        assert got == expected, (ele, total, video_fps)
        raised += expected == "ValueError"
    print(f"smart_nframes: {SMART_NFRAMES_CASES} random cases equal, {raised} of them rejected by both")
    assert 0 < raised < SMART_NFRAMES_CASES // 2


def test_design_examples():
    assert hv.smart_nframes({"nframes": 24}, 100, 30) == 24
    assert hv.smart_nframes({"fps": 10, "min_frames": 16, "max_frames": 32}, 100, 30) == 32
    assert hv.FRAME_FACTOR == qvu.FRAME_FACTOR == 2 != hv.SEED_TEXT_FRAME_FACTOR


def test_frame_range_matches_qwen_vl_utils_on_random_cases():
    rng = random.Random(1)
    for _ in range(FRAME_RANGE_CASES):
        total, video_fps = rng.randint(2, 2000), rng.choice([rng.uniform(1, 60), 30.0])
        duration = total / video_fps
        ele = {}
        if rng.random() < 0.7:
            ele["video_start"] = rng.uniform(-1, duration * 1.1)
        if rng.random() < 0.7:
            ele["video_end"] = rng.uniform(-1, duration * 1.1)
        expected = _library_or_error(qvu.calculate_video_frame_range, ele, total, video_fps)
        assert _library_or_error(hv.frame_range, ele, total, video_fps) == expected, (ele, total, video_fps)


SAMPLINGS = [
    {"fps": 2.0},
    {"fps": 0.5},
    {"fps": 7.3},
    {"nframes": 24},
    {"nframes": 7},
    {"fps": 2.0, "video_start": 2.0, "video_end": 4.5},
    {"fps": 10.0, "video_start": 1.01, "max_frames": 16},
    {"fps": 1.0, "min_frames": 16},
    {"video_end": 3.0},
]


@pytest.mark.parametrize("ele", SAMPLINGS, ids=str)
def test_sampled_frames_are_what_fetch_video_reads(clip, ele):
    frames, metadata, sample_fps = hv.read_video(clip, **ele)
    indices, our_fps = hv.sampled_frames(ele, 300, 30.0)
    assert indices == metadata["frames_indices"]
    assert our_fps == pytest.approx(sample_fps, rel=1e-12)
    assert frames.shape[0] == len(indices)
    assert tuple(frames.shape[2:]) == hv.fetch_video_frame_size(len(indices), 240, 320)


@pytest.mark.parametrize(
    "limits",
    [
        {},
        {"min_pixels": 64 * 28 * 28},
        {"total_pixels": 20 * 28 * 28 * 40},
        {"max_pixels": 150 * 28 * 28, "min_pixels": 16 * 28 * 28},
    ],
    ids=str,
)
def test_frame_size_follows_fetch_video_budget(clip, limits):
    frames, _, _ = hv.read_video(clip, fps=2.0, **limits)
    assert tuple(frames.shape[2:]) == hv.fetch_video_frame_size(frames.shape[0], 240, 320, **limits)


def test_processor_video_outputs(clip, processor):
    frames, metadata, sample_fps = hv.read_video(clip, fps=2.0)
    messages = [
        {"role": "user", "content": [{"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "What moves?"}]}
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = decoded_video_inputs(processor, text, frames, metadata)
    grid = hv.video_grid(*frames.shape[:1], *frames.shape[2:])
    assert out["video_grid_thw"].tolist() == [[grid["grid_t"], grid["grid_h"], grid["grid_w"]]]
    assert out["pixel_values_videos"].shape == (grid["patches"], 3 * 2 * 14 * 14)
    assert int((out["input_ids"] == processor.video_token_id).sum()) == grid["tokens"]
    torch.testing.assert_close(out["second_per_grid_ts"], torch.tensor([2 / sample_fps]))
    # Without the metadata the processor does not know the sampled fps and assumes 24 (trap 10).
    bare = processor(
        text=[text], videos=[frames], do_sample_frames=False, cap_pixels_per_frame=True, return_tensors="pt"
    )
    torch.testing.assert_close(bare["second_per_grid_ts"], torch.tensor([2 / 24]))


def test_process_vision_info_paths_and_second_per_grid_ts(clip, processor):
    """Trap 20: the metadata path gives the sampled interval; the older fps paths fail or are ignored."""
    from qwen_vl_utils import process_vision_info

    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": str(clip), "fps": 2.0},
                {"type": "text", "text": "Where does it go?"},
            ],
        }
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = hv.processor_vision_inputs(messages)
    assert inputs["images"] is None and inputs["do_sample_frames"] is False and len(inputs["video_metadata"]) == 1
    out = processor(text=[text], **inputs, cap_pixels_per_frame=True, return_tensors="pt")
    frames, metadata, sample_fps = hv.read_video(clip, fps=2.0)
    direct = decoded_video_inputs(processor, text, frames, metadata)
    for key in ("input_ids", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        assert torch.equal(out[key], direct[key]), key
    torch.testing.assert_close(out["second_per_grid_ts"], torch.tensor([2 / sample_fps]))

    _, videos, kwargs = process_vision_info(messages, return_video_kwargs=True)
    assert kwargs == {"do_sample_frames": False, "fps": [2.0]}
    from huggingface_hub.errors import StrictDataclassFieldValidationError

    with pytest.raises(StrictDataclassFieldValidationError, match="Field 'fps'"):  # a list: rejected by 5.24
        processor(text=[text], videos=videos, **kwargs, cap_pixels_per_frame=True, return_tensors="pt")
    ignored = processor(
        text=[text], videos=videos, do_sample_frames=False, fps=2.0, cap_pixels_per_frame=True, return_tensors="pt"
    )
    torch.testing.assert_close(ignored["second_per_grid_ts"], torch.tensor([2 / 24]))  # fps=2.0 had no effect


def test_odd_frame_count_is_padded_to_a_temporal_pair(processor):
    for nframes in (1, 3, 5, 8):
        video = torch.randint(0, 256, (nframes, 3, 280, 392), dtype=torch.uint8)
        out = processor.video_processor(
            videos=[video], do_sample_frames=False, cap_pixels_per_frame=True, return_tensors="pt"
        )
        assert (
            out["video_grid_thw"].tolist()[0][0] == hv.video_grid(nframes, 280, 392)["grid_t"] == math.ceil(nframes / 2)
        )


def test_synthetic_video_shows_its_frame_numbers(clip):
    total, fps = hv.check_video_file(clip)
    assert (total, fps) == (300, 30.0)
    thumbs = hv.thumbnails(str(clip))
    assert thumbs.shape[0] == 300 and thumbs.dtype == np.uint8

    # The disc moves left to right: its orange pixels' mean column grows.
    def disc_column(frame):
        orange = (frame[..., 0] > 180) & (frame[..., 2] < 120)
        return np.nonzero(orange)[1].mean()

    assert disc_column(thumbs[0]) < disc_column(thumbs[150]) < disc_column(thumbs[299])


def test_timeline_view_numbers():
    view = hv.timeline_view(fps=2.0, min_frames=4, max_frames=64, start=2.0, end=8.0)
    indices, sample_fps = hv.sampled_frames(
        {"fps": 2.0, "min_frames": 4, "max_frames": 64, "video_start": 2.0, "video_end": 8.0}, 300, 30.0
    )
    assert view.data["indices"] == indices and view.data["second_per_grid_t"] == pytest.approx(2 / sample_fps)
    assert view.data["tokens"] == len(indices) // 2 * 140
    assert view.figure is not None
    bad = hv.timeline_view(start=6.0, end=3.0)
    assert "video_start=6.0" in bad.data["error"] and bad.figure is None


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ele, message",
    [
        ({"fps": 0}, r"fps=0: expected a positive number"),
        ({"fps": -2.0}, r"fps=-2.0: expected a positive number"),
        ({"fps": float("nan")}, r"fps=nan"),
        ({"fps": 2, "nframes": 8}, r"both fps=2 and nframes=8"),
        ({"nframes": 0}, r"nframes=0: expected a positive number"),
        ({"nframes": 1}, r"nframes=0 .* outside the accepted range \[2, 100\]"),
        ({"nframes": 500}, r"nframes=500 .* outside the accepted range \[2, 100\]"),
        ({"min_frames": 40, "max_frames": 8}, r"min_frames=40 > max_frames=8"),
        ({"max_frames": -1}, r"max_frames=-1: expected a positive number"),
    ],
)
def test_smart_nframes_rejects_bad_values(ele, message):
    with pytest.raises(ValueError, match=message):
        hv.smart_nframes(ele, 100, 30)


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 30), r"total_frames=0: expected a positive integer"),
        ((100, 0), r"video_fps=0: expected a positive number"),
        ((100, -30.0), r"video_fps=-30.0"),
    ],
)
def test_smart_nframes_rejects_bad_video(args, message):
    with pytest.raises(ValueError, match=message):
        hv.smart_nframes({"fps": 2}, *args)


@pytest.mark.parametrize(
    "ele, message",
    [
        (
            {"video_start": 5.0, "video_end": 5.0},
            r"video_start=5.0 ≥ video_end=5.0: need start < end, both in \[0, 10\] s",
        ),
        ({"video_start": 8, "video_end": 2}, r"video_start=8 ≥ video_end=2"),
        ({"video_start": 20.0}, r"frames 300..299: need at least two frames"),
        ({"video_end": -1.0}, r"frames 0..0"),
        ({"video_start": "1s"}, r"video_start='1s': expected a time in seconds in \[0, 10\]"),
    ],
)
def test_frame_range_rejects_bad_ranges(ele, message):
    with pytest.raises(ValueError, match=message):
        hv.frame_range(ele, 300, 30.0)


def test_unreadable_video_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"video file 'missing.mp4' does not exist"):
        hv.read_video(tmp_path / "missing.mp4")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 100)
    with pytest.raises(ValueError, match=r"video file 'garbage.mp4' could not be decoded"):
        hv.read_video(garbage)


def test_read_video_rejects_bad_sampling_before_decoding(clip):
    with pytest.raises(ValueError, match=r"fps=0"):
        hv.read_video(clip, fps=0)
    with pytest.raises(ValueError, match=r"video_start=4 ≥ video_end=1"):
        hv.read_video(clip, video_start=4, video_end=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seconds": 0}, r"seconds=0: expected a positive number"),
        ({"fps": 0}, r"fps=0: expected a positive integer"),
        ({"fps": 2.5}, r"fps=2.5: expected a positive integer"),
        ({"width": 321}, r"width=321: expected an even number ≥ 16"),
        ({"height": -240}, r"height=-240: expected a positive integer"),
        ({"seconds": 0.01, "fps": 30}, r"gives 0 frames of 320×240; the synthetic clip has 2 to 3600 frames"),
        ({"seconds": 1e6}, r"seconds=1000000.0 at fps=30 gives 30000000 frames"),
    ],
)
def test_synthetic_video_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hv.synthetic_video(**kwargs)


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 280, 392), r"nframes=0: expected a positive integer"),
        ((4, 281, 392), r"height=281, width=392: both must be multiples of 28"),
        ((4, 280, 0), r"width=0: expected a positive integer"),
    ],
)
def test_video_grid_rejects_bad_sizes(args, message):
    with pytest.raises(ValueError, match=message):
        hv.video_grid(*args)


@pytest.mark.parametrize(
    "grid_t, second_per_grid_t", [(10, 1.0), (20, 0.5), (40, 0.25), (7, 2 / 24), (12, 2 / 29.97), (5, 0.0)]
)
def test_temporal_positions_match_the_model(grid_t, second_per_grid_t):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    ids = Qwen2_5_VLModel.get_vision_position_ids(
        None, 0, torch.tensor([grid_t, 2, 2]), 1, 2, time_interval=2 * second_per_grid_t
    )
    assert hv.temporal_positions(grid_t, second_per_grid_t) == ids[0].tolist()


def test_temporal_positions_reject_bad_values():
    with pytest.raises(ValueError, match=r"second_per_grid_t=-1.0: expected seconds ≥ 0"):
        hv.temporal_positions(4, -1.0)
    with pytest.raises(ValueError, match=r"grid_t=0: expected a positive integer"):
        hv.temporal_positions(0, 1.0)

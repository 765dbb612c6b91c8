"""Video frames: the synthetic course clip, frame sampling, and temporal patches
(taught in notebooks/03_video_frames.ipynb).

- ``synthetic_video(...)`` draws a moving disc with the frame number on it and encodes it with
  H.264 (PyAV) into ``helpers.cache.cache_dir() / "videos"``, keyed by its parameters.
- ``smart_nframes`` and ``frame_range`` mirror ``qwen_vl_utils.vision_process.smart_nframes`` and
  ``calculate_video_frame_range``; ``sampled_frames`` gives the frame indices ``fetch_video`` reads.
- ``read_video`` calls ``qwen_vl_utils.fetch_video`` with the decord backend: torchvision 0.29 has
  no ``torchvision.io.read_video`` any more, so qwen-vl-utils' torchvision backend fails.
- ``processor_vision_inputs`` runs ``process_vision_info`` the way that gives the processor the real
  sampled interval (``second_per_grid_ts``) on transformers 5.24 (trap 20).
- ``timeline_view`` is the update function of notebook 03's widget.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path

# qwen-vl-utils reads this variable once, when it is imported: set it before anything imports it.
os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")

import numpy as np  # noqa: E402

from helpers.constants import FACTOR, TOKEN_PIXELS  # noqa: E402
from helpers.plots import COLOURS, new_figure  # noqa: E402
from helpers.widgets import View, register_widget  # noqa: E402

#: Frames are sampled in multiples of FRAME_FACTOR = temporal_patch_size = 2 (qwen-vl-utils 0.0.14).
FRAME_FACTOR = 2
#: What the text the course grew from says (wrong: see notebook 03).
SEED_TEXT_FRAME_FACTOR = 8
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
#: Per-frame pixel bounds of qwen-vl-utils' fetch_video, in 28×28 units (VIDEO_MIN/MAX_TOKEN_NUM).
VIDEO_MIN_UNITS = 128
VIDEO_MAX_UNITS = 768
#: The backend this module uses, and why (notebook 03 §2).
VIDEO_BACKEND = "decord"
BACKEND_REASON = (
    "torchvision 0.29 removed torchvision.io.read_video, which qwen-vl-utils' torchvision backend "
    "calls; torchcodec needs system FFmpeg libraries; decord 0.6.0's wheel bundles FFmpeg"
)


def _use_decord() -> None:
    """Make qwen-vl-utils use decord even when it was imported before this module set the variable."""
    from qwen_vl_utils import vision_process

    if vision_process.FORCE_QWENVL_VIDEO_READER != VIDEO_BACKEND:
        vision_process.FORCE_QWENVL_VIDEO_READER = VIDEO_BACKEND
        vision_process.get_video_reader_backend.cache_clear()


# ---------------------------------------------------------------------------------------------
# The synthetic clip
# ---------------------------------------------------------------------------------------------


def _check_positive(name: str, value, integer: bool = False) -> None:
    kind = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0 or not math.isfinite(value):
        what = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name}={value!r}: expected {what} (> 0)")


def draw_frame(index: int, total: int, width: int, height: int) -> np.ndarray:
    """Frame ``index`` of the synthetic clip as uint8 (height, width, 3): a disc moving left to
    right (and bouncing up and down), with the frame number written large in the corner."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (24, 32, 64))
    draw = ImageDraw.Draw(image)
    radius = max(4, height // 8)
    progress = index / max(total - 1, 1)
    x = radius + progress * (width - 2 * radius)
    y = height / 2 + 0.3 * height * math.sin(2 * math.pi * 2 * progress)
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(240, 140, 40))
    draw.text((6, 4), f"{index:03d}", fill=(255, 255, 255), font_size=max(10, height // 6))
    return np.asarray(image)


def synthetic_video(seconds: float = 10.0, fps: int = 30, width: int = 320, height: int = 240) -> Path:
    """The course clip as an H.264 .mp4 (PyAV), made once and cached by its parameters.

    Frame ``i`` shows the number ``i``, so every sampled frame says which source frame it is.
    """
    _check_positive("seconds", seconds)
    _check_positive("fps", fps, integer=True)
    for name, value in (("width", width), ("height", height)):
        _check_positive(name, value, integer=True)
        if value % 2 or value < 16:
            raise ValueError(f"{name}={value}: expected an even number ≥ 16 (H.264 with yuv420p)")
    total = round(seconds * fps)
    if not FRAME_FACTOR <= total <= MAX_CLIP_FRAMES or width * height > MAX_CLIP_PIXELS:
        raise ValueError(
            f"seconds={seconds} at fps={fps} gives {total} frames of {width}×{height}; the synthetic "
            f"clip has {FRAME_FACTOR} to {MAX_CLIP_FRAMES} frames of at most {MAX_CLIP_PIXELS} pixels"
        )
    from helpers import cache

    path = cache.cache_dir() / "videos" / f"moving-disc-{total}f-{fps}fps-{width}x{height}.mp4"
    if _clip_frames(path) == total:
        return path
    (cache.writable_cache_dir() / "videos").mkdir(exist_ok=True)
    with cache.locked(path):
        if _clip_frames(path) == total:  # another process wrote it while we waited
            return path
        if path.exists():
            cache.log_rebuild(f"videos/{path.name} is truncated or unreadable")
        for debris in path.parent.glob(f"{path.stem}.tmp*.mp4"):  # what a killed write left
            debris.unlink(missing_ok=True)
        staging = path.with_name(f"{path.stem}.tmp{os.getpid()}.mp4")
        try:
            _write_clip(staging, total, fps, width, height)
            staging.replace(path)
        finally:
            staging.unlink(missing_ok=True)
    return path


#: Bounds of ``synthetic_video``: 2 minutes at 30 fps, 1280×720 (larger clips take minutes to draw).
MAX_CLIP_FRAMES = 3600
MAX_CLIP_PIXELS = 1280 * 720


def _clip_frames(path: Path) -> int | None:
    """Frames in a cached clip as decord reads them; None when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        import decord

        return len(decord.VideoReader(str(path)))
    except Exception:  # noqa: BLE001  (truncated or foreign file: rebuilt)
        return None


def _write_clip(staging: Path, total: int, fps: int, width: int, height: int) -> None:
    """Encode the clip's frames as H.264 into ``staging`` (PyAV)."""
    import av

    with av.open(str(staging), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(total):
            frame = av.VideoFrame.from_ndarray(draw_frame(index, total, width, height), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush the encoder


# ---------------------------------------------------------------------------------------------
# How many frames, which frames
# ---------------------------------------------------------------------------------------------


def _round_to(x: float, factor: int) -> int:
    return round(x / factor) * factor


def _ceil_to(x: float, factor: int) -> int:
    return math.ceil(x / factor) * factor


def _floor_to(x: float, factor: int) -> int:
    return math.floor(x / factor) * factor


def smart_nframes(ele: dict, total_frames: int, video_fps: float) -> int:
    """How many frames the model sees. Mirrors ``qwen_vl_utils.vision_process.smart_nframes``.

    Either ``ele["nframes"]`` (rounded to a multiple of FRAME_FACTOR = 2) or ``ele["fps"]``
    (default 2): duration × fps, clamped into [min_frames, max_frames] (default 4 and
    min(768, total_frames), rounded inwards to multiples of 2) and to total_frames, then floored
    to a multiple of 2. The result must lie in [2, total_frames].
    """
    _check_positive("total_frames", total_frames, integer=True)
    _check_positive("video_fps", video_fps)
    if "fps" in ele and "nframes" in ele:
        raise ValueError(f"got both fps={ele['fps']!r} and nframes={ele['nframes']!r}: give one of them")
    if "nframes" in ele:
        _check_positive("nframes", ele["nframes"])
        nframes = _round_to(ele["nframes"], FRAME_FACTOR)
    else:
        fps = ele.get("fps", FPS)
        _check_positive("fps", fps)
        for key in ("min_frames", "max_frames"):
            if key in ele:
                _check_positive(key, ele[key])
        if ele.get("min_frames", 0) > ele.get("max_frames", math.inf):
            raise ValueError(f"min_frames={ele['min_frames']} > max_frames={ele['max_frames']}; need min ≤ max")
        min_frames = _ceil_to(ele.get("min_frames", FPS_MIN_FRAMES), FRAME_FACTOR)
        max_frames = _floor_to(ele.get("max_frames", min(FPS_MAX_FRAMES, total_frames)), FRAME_FACTOR)
        wanted = total_frames / video_fps * fps
        nframes = _floor_to(min(max(wanted, min_frames), max_frames, total_frames), FRAME_FACTOR)
    if not FRAME_FACTOR <= nframes <= total_frames:
        raise ValueError(
            f"nframes={nframes} (from {ele}) is outside the accepted range [{FRAME_FACTOR}, {total_frames}] "
            f"(a multiple of {FRAME_FACTOR}, at most the {total_frames} frames available)"
        )
    return nframes


def frame_range(ele: dict, total_frames: int, video_fps: float) -> tuple[int, int, int]:
    """(first, last, count) source frames inside ``video_start`` … ``video_end`` (seconds).

    Mirrors ``qwen_vl_utils.vision_process.calculate_video_frame_range``: times are clamped to
    [0, duration]; the first frame is ceil(start·fps), the last floor(end·fps) (at most the last
    frame); first must come before last.
    """
    _check_positive("total_frames", total_frames, integer=True)
    _check_positive("video_fps", video_fps)
    start, end = ele.get("video_start"), ele.get("video_end")
    duration = total_frames / video_fps
    for name, value in (("video_start", start), ("video_end", end)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        ):
            raise ValueError(f"{name}={value!r}: expected a time in seconds in [0, {duration:g}]")
    if start is None and end is None:
        return 0, total_frames - 1, total_frames
    if start is not None and end is not None and start >= end:
        raise ValueError(f"video_start={start} ≥ video_end={end}: need start < end, both in [0, {duration:g}] s")
    first = math.ceil(max(0.0, min(start, duration)) * video_fps) if start is not None else 0
    last = (
        min(math.floor(max(0.0, min(end, duration)) * video_fps), total_frames - 1)
        if end is not None
        else total_frames - 1
    )
    if first >= last:
        raise ValueError(
            f"video_start={start}, video_end={end} select frames {first}..{last}: need at least two frames "
            f"(start < end, both in [0, {duration:g}] s, {total_frames} frames at {video_fps:g} fps)"
        )
    return first, last, last - first + 1


def sampled_frames(ele: dict, total_frames: int, video_fps: float) -> tuple[list[int], float]:
    """The source frame indices ``fetch_video`` (decord/torchcodec backends) reads, and the sampled fps.

    Indices: ``linspace(first, last, nframes)`` rounded; sampled fps = nframes / frames in range ×
    video_fps (what ``second_per_grid_ts`` = temporal_patch_size / sampled fps is built from).
    """
    first, last, count = frame_range(ele, total_frames, video_fps)
    nframes = smart_nframes(ele, count, video_fps)
    import torch  # torch.round (half to even) is what qwen-vl-utils uses: numpy would agree, math.round not always

    indices = torch.linspace(first, last, nframes).round().long().tolist()
    return indices, nframes / count * video_fps


def video_grid(
    nframes: int, height: int, width: int, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2
) -> dict:
    """Grid and LLM token count of ``nframes`` frames already resized to height × width.

    grid_t = ceil(nframes / 2) (an odd count is padded by repeating the last frame), grid_h =
    height/14, grid_w = width/14; tokens = grid_t·grid_h·grid_w / merge_size².
    """
    factor = patch_size * merge_size
    for name, value in (("nframes", nframes), ("height", height), ("width", width)):
        _check_positive(name, value, integer=True)
    if height % factor or width % factor:
        raise ValueError(f"height={height}, width={width}: both must be multiples of {factor} (resize first)")
    grid_t = -(-nframes // temporal_patch_size)
    grid_h, grid_w = height // patch_size, width // patch_size
    return dict(
        grid_t=grid_t,
        grid_h=grid_h,
        grid_w=grid_w,
        patches=grid_t * grid_h * grid_w,
        tokens=grid_t * grid_h * grid_w // merge_size**2,
        tokens_per_grid_t=grid_h * grid_w // merge_size**2,
    )


def fetch_video_frame_size(
    nframes: int,
    height: int,
    width: int,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    total_pixels: float | None = None,
    model_seq_len: int = 128000,
) -> tuple[int, int]:
    """The (height, width) ``qwen_vl_utils.fetch_video`` resizes ``nframes`` decoded frames to.

    Mirrors its budget: per frame at least ``min_pixels`` (128·28² by default) and at most
    ``max_pixels`` (768·28²), and also at most an even share of a whole-video budget
    (``total_pixels``, default 90 % of ``model_seq_len`` tokens' worth of 28² pixels): a pair of
    frames (one temporal patch) may use total_pixels / (nframes / 2) pixels per frame; that cap is
    floored at 1.05 × min_pixels. Then its ``smart_resize`` with factor 28.
    """
    from qwen_vl_utils import smart_resize

    for name, value in (("nframes", nframes), ("height", height), ("width", width)):
        _check_positive(name, value, integer=True)
    min_pixels = VIDEO_MIN_UNITS * TOKEN_PIXELS if min_pixels is None else min_pixels
    total_pixels = model_seq_len * TOKEN_PIXELS * 0.9 if total_pixels is None else total_pixels
    cap = max(min(VIDEO_MAX_UNITS * TOKEN_PIXELS, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    cap = cap if max_pixels is None else min(max_pixels, cap)
    return smart_resize(height, width, factor=FACTOR, min_pixels=min_pixels, max_pixels=cap)


def temporal_positions(grid_t: int, second_per_grid_t: float, tokens_per_second: int = 2) -> list[int]:
    """Temporal M-RoPE ids of a video's temporal patches: floor(k · second_per_grid_t · tokens_per_second).

    Mirrors the temporal line of ``Qwen2_5_VLModel.get_vision_position_ids`` (``time_interval`` =
    tokens_per_second × second_per_grid_t, then ``.long()``): ids advance by 2 per second of video.
    """
    _check_positive("grid_t", grid_t, integer=True)
    if isinstance(second_per_grid_t, bool) or not isinstance(second_per_grid_t, (int, float)) or second_per_grid_t < 0:
        raise ValueError(f"second_per_grid_t={second_per_grid_t!r}: expected seconds ≥ 0")
    import torch

    return (torch.arange(grid_t) * (tokens_per_second * second_per_grid_t)).long().tolist()


# ---------------------------------------------------------------------------------------------
# Reading a video through qwen-vl-utils
# ---------------------------------------------------------------------------------------------


def check_video_file(path: str | os.PathLike) -> tuple[int, float]:
    """(total frames, fps) of a readable video file; a clear error otherwise.

    qwen-vl-utils would catch decord's error and retry with its torchvision backend, which fails on
    torchvision 0.29 with an unrelated AttributeError: we check first.
    """
    import decord

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file {path.name!r} does not exist; pass the path of a readable video file")
    try:
        reader = decord.VideoReader(str(path))
    except Exception as error:  # decord raises its own DECORDError
        raise ValueError(
            f"video file {path.name!r} could not be decoded ({type(error).__name__}); "
            "expected a video decord can read (e.g. H.264 .mp4)"
        ) from None
    return len(reader), float(reader.get_avg_fps())


def read_video(path: str | os.PathLike, **ele):
    """``qwen_vl_utils.fetch_video({"video": path, **ele}, return_video_sample_fps=True,
    return_video_metadata=True)`` with the decord backend, after checking the file.

    Returns (frames float (T, 3, H, W) resized by qwen-vl-utils, metadata dict, sampled fps).
    """
    total, fps = check_video_file(path)
    sampled_frames(ele, total, fps)  # validates fps, nframes, start/end with our messages
    _use_decord()
    from qwen_vl_utils import fetch_video

    (frames, metadata), sample_fps = fetch_video(
        {"video": str(path), **ele}, return_video_sample_fps=True, return_video_metadata=True
    )
    return frames, metadata, sample_fps


def processor_vision_inputs(messages) -> dict:
    """The processor's image and video arguments for a conversation, by the path that gives the real
    ``second_per_grid_ts`` on transformers 5.24: ``qwen_vl_utils.process_vision_info(messages,
    return_video_kwargs=True, return_video_metadata=True)``, each video's (frames, metadata) pair split
    into ``videos`` and ``video_metadata`` (the split qwen-vl-utils documents for this flag).

    Returns ``{"images", "do_sample_frames": False}`` plus ``videos`` and ``video_metadata`` when the
    conversation has videos: pass it as ``processor(text=..., **inputs)``.
    """
    _use_decord()
    from qwen_vl_utils import process_vision_info

    images, videos, video_kwargs = process_vision_info(messages, return_video_kwargs=True, return_video_metadata=True)
    inputs = {"images": images, **video_kwargs}
    if videos:
        frames, metadata = zip(*videos)
        inputs.update(videos=list(frames), video_metadata=list(metadata))
    return inputs


@lru_cache(maxsize=4)
def thumbnails(path: str, width: int = 80) -> np.ndarray:
    """Every frame of a clip, decoded once with decord and shrunk about ``width`` px wide by
    averaging k×k pixel blocks: uint8 (N, h, w, 3)."""
    import decord

    total, _ = check_video_file(path)
    frames = decord.VideoReader(str(path)).get_batch(list(range(total))).asnumpy()  # (N, H, W, 3)
    n, h, w, c = frames.shape
    k = max(1, w // width)
    blocks = frames[:, : h // k * k, : w // k * k].reshape(n, h // k, k, w // k, k, c)
    return blocks.mean(axis=(2, 4)).round().astype(np.uint8)  # (N, H/k, W/k, 3)


# ---------------------------------------------------------------------------------------------
# The widget of notebook 03
# ---------------------------------------------------------------------------------------------

#: The clip the widget samples.
WIDGET_CLIP = dict(seconds=10.0, fps=30, width=320, height=240)
MAX_THUMBNAILS = 8


def timeline_view(
    fps: float = 2.0,
    min_frames: int = 4,
    max_frames: int = 64,
    start: float = 0.0,
    end: float = 10.0,
    tokens_per_second: int = 2,
) -> View:
    """Widget: sampling settings → which source frames are read, how they pair into temporal
    patches, the seconds per temporal patch, and the video token count."""
    path = synthetic_video(**WIDGET_CLIP)
    total, video_fps = WIDGET_CLIP["fps"] * WIDGET_CLIP["seconds"], WIDGET_CLIP["fps"]
    ele = {"fps": fps, "min_frames": min_frames, "max_frames": max_frames, "video_start": start, "video_end": end}
    try:
        indices, sample_fps = sampled_frames(ele, int(total), video_fps)
    except ValueError as error:
        return View(text=f"not accepted: {error}", data={"error": str(error)})
    size = fetch_video_frame_size(len(indices), WIDGET_CLIP["height"], WIDGET_CLIP["width"])
    grid = video_grid(len(indices), *size)
    second_per_grid_t = 2 / sample_fps
    data = dict(
        indices=indices,
        nframes=len(indices),
        sample_fps=sample_fps,
        second_per_grid_t=second_per_grid_t,
        temporal_position_step=second_per_grid_t * tokens_per_second,
        **grid,
    )
    figure = timeline_figure(indices, int(total), video_fps, thumbnails(str(path)), (start, end))
    text = (
        f"{len(indices)} frames sampled at {sample_fps:.3g} fps → grid_t = {grid['grid_t']}, "
        f"second_per_grid_t = {second_per_grid_t:.3g} s, temporal position step = "
        f"{data['temporal_position_step']:.3g}\n"
        f"video tokens = {grid['grid_t']} × {grid['grid_h']}·{grid['grid_w']}/4 = {grid['tokens']}"
    )
    return View(text=text, figure=figure, data=data)


def timeline_figure(
    indices: list[int],
    total: int,
    video_fps: float,
    thumbs: np.ndarray,
    window: tuple[float, float] | None = None,
    width: float = 7.5,
):
    """Top: the source timeline with the sampled frames, coloured by temporal patch (pairs).
    Bottom: thumbnails of (at most 8 of) the sampled frames, labelled with their source index."""
    figure, (top, bottom) = new_figure(1, 2, width=width, height=2.8, gridspec_kw={"height_ratios": [1, 2.2]})
    figure.set_layout_engine("none")  # a fixed layout: constrained layout costs ~40 ms per update
    top.get_gridspec().update(left=0.03, right=0.98, top=0.9, bottom=0.14, hspace=0.9)
    seconds = np.asarray(indices) / video_fps
    pair = np.arange(len(indices)) // 2
    colours = np.where(pair % 2 == 0, COLOURS["video"], COLOURS["accent"])
    if window is not None:
        top.axvspan(*window, color=COLOURS["highlight"], alpha=0.35, lw=0)
    top.vlines(seconds, 0, 1, colors=colours, lw=1.5)
    top.set(
        xlim=(0, total / video_fps),
        ylim=(0, 1),
        yticks=[],
        xlabel="time in the source video (s)",
        title=f"{len(indices)} of {total} frames, paired into {-(-len(indices) // 2)} temporal patches",
    )
    top.grid(False)
    shown = (
        indices
        if len(indices) <= MAX_THUMBNAILS
        else [indices[i] for i in np.linspace(0, len(indices) - 1, MAX_THUMBNAILS).round().astype(int)]
    )
    strip = np.concatenate([np.pad(thumbs[i], ((0, 0), (0, 3), (0, 0)), constant_values=255) for i in shown], axis=1)
    bottom.imshow(strip)
    step = thumbs.shape[2] + 3
    bottom.set_xticks([step * k + thumbs.shape[2] / 2 for k in range(len(shown))], [str(i) for i in shown])
    bottom.set(
        yticks=[],
        xlabel="source frame index of the thumbnails"
        + ("" if len(shown) == len(indices) else f" ({len(shown)} of {len(indices)} shown)"),
    )
    bottom.grid(False)
    return figure


register_widget(
    "03_video_frames",
    dict(fps=2.0, min_frames=4, max_frames=64, start=0.0, end=10.0),
    [{"fps": 0.5}, {"fps": 8.0, "max_frames": 128}, {"start": 2.0, "end": 4.0}, {"start": 5.0, "end": 5.0}],
)(timeline_view)

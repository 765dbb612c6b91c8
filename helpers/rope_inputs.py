"""Inputs to try ``helpers.rope`` on (notebooks 08 and 09, tests/test_rope.py): the six example
cases through the real processor, random padded batches for sweeps, and a hand-written cached
decode loop (trap 9)."""

from __future__ import annotations

import math

import numpy as np
import torch

from helpers.constants import TOKEN_PIXELS
from helpers.rope import IMAGE, IMAGE_TOKEN_ID, VIDEO, VIDEO_TOKEN_ID, VISION_END_ID, VISION_START_ID
from helpers.tokenizer import SPECIAL_TOKENS

EXAMPLE_CASES = ("text only", "one image", "two images", "video", "image + video", "batch of 3, left padding")


def gradient_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A small synthetic RGB image (uint8, H×W×3): smooth colour ramps plus a seeded offset."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    channels = [(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), np.full_like(x, rng.integers(0, 256))]
    return np.stack(channels, axis=-1).astype(np.uint8)


def moving_square_video(frames: int = 8, height: int = 112, width: int = 140) -> list[np.ndarray]:
    """A video as a list of frames made in code: a white square moving left to right on grey."""
    video = []
    for index in range(frames):
        frame = np.full((height, width, 3), 80, np.uint8)
        left = index * (width - 28) // max(frames - 1, 1)
        frame[height // 2 - 14 : height // 2 + 14, left : left + 28] = 255
        video.append(frame)
    return video


def _chat(processor, parts: list[str], question: str) -> str:
    content = [{"type": kind} for kind in parts] + [{"type": "text", "text": question}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


#: Per-frame pixel bounds (shortest_edge = min, longest_edge = max) for the example video: its
#: 112×140 frames stay at their size (4×5 merged tokens per temporal patch) instead of being
#: upscaled to the video processor's default minimum of 128 tokens per frame.
EXAMPLE_VIDEO_SIZE = {"shortest_edge": 16 * TOKEN_PIXELS, "longest_edge": 64 * TOKEN_PIXELS}


def example_inputs(processor, case: str, photo=None, video_fps: float = 2.0):
    """Processor outputs (pt tensors) for one of ``EXAMPLE_CASES``.

    ``photo`` is the real image (a PIL image or array; default: a 512×600 synthetic one); the second
    image is a small synthetic one; the video is ``moving_square_video()`` sampled at ``video_fps``
    (passed as metadata, so ``second_per_grid_ts = 2 / video_fps``) with ``EXAMPLE_VIDEO_SIZE``
    bounds. The batch case pads on the left.
    """
    if case not in EXAMPLE_CASES:
        raise ValueError(f"case={case!r}: expected one of {EXAMPLE_CASES}")
    photo = gradient_image(512, 600) if photo is None else photo
    small = gradient_image(112, 168, seed=1)
    video = moving_square_video()
    metadata = [{"fps": video_fps, "total_num_frames": len(video)}]
    rows = {
        "text only": (["Count the colours of a rainbow."], None, None),
        "one image": ([_chat(processor, ["image"], "Describe this image.")], [photo], None),
        "two images": ([_chat(processor, ["image", "image"], "Which one is brighter?")], [photo, small], None),
        "video": ([_chat(processor, ["video"], "Where does the square go?")], None, [video]),
        "image + video": ([_chat(processor, ["image", "video"], "Same colours?")], [small], [video]),
    }
    if case == "text only":
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": rows[case][0][0]}], add_generation_prompt=True, tokenize=False
            )
        ]
        images = videos = None
    elif case == "batch of 3, left padding":
        texts = [_chat(processor, [], "Hi!"), rows["one image"][0][0], rows["image + video"][0][0]]
        images, videos = [photo, small], [video]
    else:
        texts, images, videos = rows[case]
    kwargs = (
        {
            "videos": videos,
            "video_metadata": metadata,
            "cap_pixels_per_frame": False,
            "videos_kwargs": {"size": EXAMPLE_VIDEO_SIZE},
        }
        if videos
        else {}
    )
    old_side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "left"
    try:
        return processor(text=texts, images=images, padding=True, return_tensors="pt", **kwargs)
    finally:
        processor.tokenizer.padding_side = old_side


def cached_decode_logits(model, inputs: dict, new_tokens: int) -> torch.Tensor:
    """(batch, new_tokens, vocab) logits of a hand-written greedy loop that calls the model itself
    with a ``DynamicCache`` and no ``position_ids``, as many eval scripts do. The model then fills
    in the positions of each new token from ``model.model.rope_deltas`` (trap 9)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.text_config)
    logits = []
    with torch.no_grad():
        out = model(**inputs, cache=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        for _ in range(new_tokens - 1):
            token = logits[-1].argmax(-1, keepdim=True)  # (batch, 1)
            logits.append(model(input_ids=token, cache=out.cache, use_cache=True).logits[:, -1])
    return torch.stack(logits, dim=1)


def random_batch(rng) -> dict:
    """A random padded batch for sweeps: 1–3 rows, each of text runs and 0–3 images or videos with
    random grids (h, w up to 16 patches, videos up to 5 temporal patches), random
    ``second_per_grid_ts`` (0.1–5 s, common values favoured), left padding. ``rng``: random.Random."""
    rows = []
    for _ in range(rng.randint(1, 3)):
        ids, images, videos, seconds = [], [], [], []
        for _ in range(rng.randint(0, 3)):
            ids += [rng.randint(0, 151000) for _ in range(rng.randint(1, 6))]
            kind = rng.choice([IMAGE, VIDEO])
            grid = [1 if kind == IMAGE else rng.randint(1, 5), 2 * rng.randint(1, 8), 2 * rng.randint(1, 8)]
            pad = IMAGE_TOKEN_ID if kind == IMAGE else VIDEO_TOKEN_ID
            ids += [VISION_START_ID] + [pad] * (math.prod(grid) // 4) + [VISION_END_ID]
            (images if kind == IMAGE else videos).append(grid)
            if kind == VIDEO:
                seconds.append(rng.choice([0.25, 0.5, 2 / 3, 1.0, 2.0, 4.0, round(rng.uniform(0.1, 5), 3)]))
        ids += [rng.randint(0, 151000) for _ in range(rng.randint(1, 6))]
        rows.append((ids, images, videos, seconds))
    length = max(len(r[0]) for r in rows) + rng.randint(0, 3)
    input_ids = torch.full((len(rows), length), SPECIAL_TOKENS["<|endoftext|>"])
    mask = torch.zeros_like(input_ids)
    for index, (ids, *_rest) in enumerate(rows):
        input_ids[index, length - len(ids) :] = torch.tensor(ids)
        mask[index, length - len(ids) :] = 1
    images = [g for r in rows for g in r[1]]
    videos = [g for r in rows for g in r[2]]
    seconds = [s for r in rows for s in r[3]]
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "image_grid_thw": torch.tensor(images) if images else None,
        "video_grid_thw": torch.tensor(videos) if videos else None,
        "second_per_grid_ts": seconds or None,
    }

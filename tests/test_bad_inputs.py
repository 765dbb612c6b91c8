"""Bad inputs a reader can type, across the public helpers (issue 15): each one gets a clear error
of the right type whose message names the bad value, never a library traceback, a hang or a
silently wrong answer. One row per input: (id, call, error type, regex the message must match).
``call`` takes a context with the course processor, built once for the module."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import (
    boxes,
    cache,
    chat,
    checkpoints,
    data,
    evaluation,
    forward,
    grpo,
    optim,
    patches,
    qwen,
    rewards,
    rope,
    sft,
    tokenizer,
    video,
    vision,
    vision_tower,
)

ADV = dict(logps=torch.zeros(4, 3), old_logps=torch.zeros(4, 3), ref_logps=None, mask=torch.ones(4, 3))
IDS = torch.tensor([[1, 2, 3]])


def user(content):
    return [{"role": "user", "content": content}]


def template(messages):
    return lambda c: c.processor.apply_chat_template(messages, tokenize=False)


CASES = [
    # smart_resize and friends (notebook 02)
    ("resize h=0", lambda c: vision.smart_resize(0, 500), ValueError, r"height=0"),
    ("resize w<0", lambda c: vision.smart_resize(500, -5), ValueError, r"width=-5"),
    ("resize h float", lambda c: vision.smart_resize(10.5, 500), TypeError, r"height=10\.5"),
    ("resize h str", lambda c: vision.smart_resize("600", 500), TypeError, r"height='600'"),
    ("resize factor 0", lambda c: vision.smart_resize(600, 500, factor=0), ValueError, r"factor=0"),
    (
        "resize min>max",
        lambda c: vision.smart_resize(600, 500, min_pixels=10**6, max_pixels=10**5),
        ValueError,
        r"min_pixels=1000000",
    ),
    ("resize ratio 300", lambda c: vision.smart_resize(10, 3000), ValueError, r"300"),
    ("visual_tokens max 0", lambda c: vision.visual_tokens(600, 500, max_pixels=0), ValueError, r"max_pixels=0"),
    ("tokens_to_pixels 0", lambda c: vision.tokens_to_pixels(0), ValueError, r"tokens=0"),
    ("random cases seed<0", lambda c: vision.random_resize_cases(3, seed=-1), ValueError, r"seed=-1"),
    # boxes
    ("iou 3 numbers", lambda c: boxes.iou([1, 2, 3], [0, 0, 1, 1]), ValueError, r"\[1, 2, 3\]"),
    ("iou nan", lambda c: boxes.iou([0, 0, math.nan, 1], [0, 0, 1, 1]), ValueError, r"nan"),
    (
        "map_box size 0",
        lambda c: boxes.map_box([0, 0, 1, 1], (0, 10), (10, 10)),
        ValueError,
        r"from_size\[0\] \(height\)=0",
    ),
    # video frames (notebook 03)
    ("nframes fps 0", lambda c: video.smart_nframes({"fps": 0}, 100, 30), ValueError, r"fps=0"),
    ("nframes 0", lambda c: video.smart_nframes({"nframes": 0}, 100, 30), ValueError, r"nframes=0"),
    ("nframes and fps", lambda c: video.smart_nframes({"nframes": 4, "fps": 2}, 100, 30), ValueError, r"nframes"),
    ("nframes total 0", lambda c: video.smart_nframes({"fps": 2}, 0, 30), ValueError, r"total_frames=0"),
    ("nframes video_fps nan", lambda c: video.smart_nframes({"fps": 2}, 100, math.nan), ValueError, r"video_fps=nan"),
    (
        "frame range start>end",
        lambda c: video.frame_range({"video_start": 5, "video_end": 1}, 100, 30),
        ValueError,
        r"video_start=5",
    ),
    (
        "nframes min>max",
        lambda c: video.smart_nframes({"fps": 2, "min_frames": 10, "max_frames": 4}, 100, 30),
        ValueError,
        r"min_frames=10",
    ),
    ("clip 1e6 s", lambda c: video.synthetic_video(seconds=1e6), ValueError, r"seconds=1000000\.0"),
    ("clip seconds nan", lambda c: video.synthetic_video(seconds=math.nan), ValueError, r"seconds=nan"),
    ("clip fps 2.5", lambda c: video.synthetic_video(fps=2.5), ValueError, r"fps=2\.5"),
    ("clip width odd", lambda c: video.synthetic_video(width=321), ValueError, r"width=321"),
    ("clip 8k", lambda c: video.synthetic_video(seconds=1, width=7680, height=4320), ValueError, r"7680×4320"),
    ("temporal grid_t 0", lambda c: video.temporal_positions(0, 1.0), ValueError, r"grid_t=0"),
    ("temporal spg <0", lambda c: video.temporal_positions(2, -1.0), ValueError, r"second_per_grid_t=-1\.0"),
    (
        "video file missing",
        lambda c: video.check_video_file("no-such-clip.mp4"),
        FileNotFoundError,
        r"no-such-clip\.mp4",
    ),
    # patches (notebook 04)
    ("patchify 3-D", lambda c: patches.patchify(torch.zeros(3, 28, 28)), ValueError, r"\(3, 28, 28\)"),
    ("patchify 27 px", lambda c: patches.patchify(torch.zeros(1, 3, 27, 28)), ValueError, r"27"),
    (
        "patchify patch 0",
        lambda c: patches.patchify(torch.zeros(1, 3, 28, 28), patch_size=0),
        ValueError,
        r"patch_size=0",
    ),
    ("unpatchify grid", lambda c: patches.unpatchify(torch.zeros(4, 1176), (1, 4, 4)), ValueError, r"\(1, 4, 4\)"),
    ("token_location -1", lambda c: patches.token_location(-1, (1, 4, 4)), ValueError, r"index=-1"),
    ("token_location 16", lambda c: patches.token_location(16, (1, 4, 4)), ValueError, r"index=16"),
    ("row grid odd", lambda c: patches.row_index_grid(3, 4), ValueError, r"grid_h=3"),
    # vision tower (notebooks 05-07)
    ("temporal_pairs 0", lambda c: vision_tower.temporal_pairs(0), ValueError, r"num_frames=0"),
    ("window grid 0", lambda c: vision_tower.window_index([[1, 0, 4]], 2, 112, 14), ValueError, r"\[1, 0, 4\]"),
    ("window size 0", lambda c: vision_tower.window_index([[1, 4, 4]], 2, 0, 14), ValueError, r"window_size=0"),
    (
        "window size str",
        lambda c: vision_tower.window_index([[1, 4, 4]], 2, "112", 14),
        TypeError,
        r"window_size='112'",
    ),
    ("patch_embed_cost -1", lambda c: vision_tower.patch_embed_cost(-1, 1280), ValueError, r"num_patches=-1"),
    ("rotary head 3", lambda c: vision_tower.rotary_inv_freq(3), ValueError, r"head_dim=3"),
    (
        "vision pos merge 0",
        lambda c: vision_tower.vision_position_ids([[1, 4, 4]], 0),
        ValueError,
        r"spatial_merge_size=0",
    ),
    # M-RoPE (notebook 08)
    ("rope 1-D ids", lambda c: rope.rope_index(torch.tensor([1, 2, 3])), ValueError, r"shape \(3,\)"),
    ("rope mask shape", lambda c: rope.rope_index(IDS, attention_mask=torch.ones(1, 4)), ValueError, r"\(1, 4\)"),
    (
        "rope spg nan",
        lambda c: rope.rope_index(IDS, second_per_grid_ts=[math.nan]),
        ValueError,
        r"second_per_grid_ts=\[nan\]",
    ),
    (
        "rope spg <0",
        lambda c: rope.rope_index(IDS, second_per_grid_ts=[-0.5]),
        ValueError,
        r"second_per_grid_ts=\[-0\.5\]",
    ),
    ("rope rule", lambda c: rope.rope_index(IDS, rule="mine"), ValueError, r"rule='mine'"),
    # the offline kit (notebook 00)
    ("dtype int", lambda c: qwen.load_model(dtype=torch.int64), ValueError, r"dtype=torch\.int64"),
    ("dtype name", lambda c: qwen.load_model(dtype="float17"), ValueError, r"dtype='float17'"),
    ("model seed<0", lambda c: qwen.load_model(seed=-1), ValueError, r"seed=-1"),
    ("model dir missing", lambda c: qwen.load_model("no-such-folder"), FileNotFoundError, r"no-such-folder"),
    ("processor dir missing", lambda c: qwen.load_processor("no-such-folder"), FileNotFoundError, r"no-such-folder"),
    ("processor min 10", lambda c: qwen.load_processor(min_pixels=10), ValueError, r"min_pixels=10"),
    (
        "processor min>max",
        lambda c: qwen.load_processor(min_pixels=5000, max_pixels=4000),
        ValueError,
        r"min_pixels=5000",
    ),
    ("processor kwarg", lambda c: qwen.load_processor(max_frames=4), TypeError, r"max_frames"),
    (
        "image limits past the checkpoint's maximum",
        lambda c: qwen.load_processor(min_pixels=13 * 10**6),
        ValueError,
        r"image limits 13000000 … 12845056 pixels",
    ),
    (
        "video limits",
        lambda c: qwen.load_processor(video_min_pixels=10**6, video_max_pixels=10**5),
        ValueError,
        r"video_min_pixels=1000000",
    ),
    (
        "config odd head",
        lambda c: qwen.course_config(text_hidden=12, text_heads=4, text_kv_heads=2),
        ValueError,
        r"12/4 = 3",
    ),
    ("config vision head 6", lambda c: qwen.course_config(vision_hidden=24, vision_heads=4), ValueError, r"24/4 = 6"),
    ("config heads 0", lambda c: qwen.course_config(text_heads=0), ValueError, r"text_heads=0"),
    ("config kv 3", lambda c: qwen.course_config(text_kv_heads=3), ValueError, r"text_kv_heads=3"),
    ("config fullatt 9", lambda c: qwen.course_config(fullatt_block_indexes=(9,)), ValueError, r"\(9,\)"),
    ("logit scale 0", lambda c: qwen.init_logit_scale(None, 0), ValueError, r"scale=0"),
    (
        "vocabulary missing",
        lambda c: tokenizer.build_tokenizer("no-such.tiktoken"),
        FileNotFoundError,
        r"no-such\.tiktoken",
    ),
    # the chat template and messages (notebook 01)
    ("content None", template(user(None)), Exception, r"content=None"),
    ("content dict", template(user({"text": "hi"})), Exception, r"content=\{'text': 'hi'\}"),
    ("text part no text", template(user([{"type": "text"}])), Exception, r"\{'type': 'text'\} has no string"),
    ("text part int", template(user([{"type": "text", "text": 3}])), Exception, r"'text': 3"),
    ("part type audio", template(user([{"type": "audio"}])), Exception, r"type audio"),
    ("role robot", template([{"role": "robot", "content": "hi"}]), Exception, r"role robot"),
    ("check_messages empty", lambda c: chat.check_messages([]), TypeError, r"messages=\[\]"),
    ("check_messages role", lambda c: chat.check_messages([{"role": "bot", "content": "x"}]), ValueError, r"'bot'"),
    ("check_messages part", lambda c: chat.check_messages(user([{"type": "audio"}])), ValueError, r"'audio'"),
    ("token_kind -1", lambda c: chat.token_kind(-1), ValueError, r"token_id=-1"),
    # the shapes data (notebook 10)
    ("split nope", lambda c: data.make_sample("nope", 0), ValueError, r"'nope'"),
    ("sample index<0", lambda c: data.make_sample("train", -1), ValueError, r"index=-1"),
    ("sample seed<0", lambda c: data.make_sample("train", 0, seed=-2), ValueError, r"seed=-2"),
    ("split n 0", lambda c: data.make_split("train", 0), ValueError, r"n=0"),
    ("stream seed<0", lambda c: data.ShapesStream("train", 4, -1), ValueError, r"seed=-1"),
    ("data option", lambda c: data.make_sample("train", 0, colour="red"), (TypeError, ValueError), r"colour"),
    ("batch step<0", lambda c: sft.batch_indices(8, 2, -1), ValueError, r"step=-1"),
    ("batch seed<0", lambda c: sft.batch_indices(8, 2, 0, seed=-3), ValueError, r"seed=-3"),
    ("batch size 0", lambda c: sft.batch_indices(8, 0, 0), ValueError, r"batch_size=0"),
    ("lr step<0", lambda c: optim.lr_factor(-1, 10, 0), ValueError, r"step=-1"),
    ("lr floor 2", lambda c: optim.lr_factor(1, 10, 0, floor=2.0), ValueError, r"floor=2\.0"),
    # rewards (notebook 11): a malformed call raises, a completion never does
    (
        "reward lengths",
        lambda c: rewards.task_reward(["3", "4"], ["count"], [3]),
        ValueError,
        r"task has 1 entries for 2",
    ),
    (
        "reward target len",
        lambda c: rewards.task_reward(["3", "4"], ["count"] * 2, [3]),
        ValueError,
        r"target has 1 entries for 2",
    ),
    ("reward task colour", lambda c: rewards.task_reward(["3"], ["colour"], [3]), ValueError, r"task='colour'"),
    ("reward task str", lambda c: rewards.format_reward(["3", "red"], task="count"), TypeError, r"task='count'"),
    ("reward completions str", lambda c: rewards.accuracy_reward("3", ["count"], [3]), TypeError, r"completions='3'"),
    ("reward target str col", lambda c: rewards.iou_reward(["3"], ["count"], "3"), TypeError, r"target='3'"),
    ("reward target bad", lambda c: rewards.task_reward(["3"], ["count"], ["three"]), ValueError, r"'three'"),
    ("reward target box", lambda c: rewards.task_reward(["x"], ["grounding"], [[1, 2]]), ValueError, r"\[1, 2\]"),
    ("score task", lambda c: rewards.score("size", "3", 3), ValueError, r"task='size'"),
    ("parse text int", lambda c: rewards.parse_answer("count", 3), TypeError, r"text=3"),
    ("adv length 1", lambda c: grpo.grpo_loss(advantages=torch.ones(1), **ADV), ValueError, r"\(1,\)"),
    ("adv 2-D", lambda c: grpo.grpo_loss(advantages=torch.ones(4, 1), **ADV), ValueError, r"\(4, 1\)"),
    (
        "loss mask shape",
        lambda c: grpo.grpo_loss(advantages=torch.ones(4), **{**ADV, "mask": torch.ones(4, 2)}),
        ValueError,
        r"mask of shape \(4, 2\)",
    ),
    (
        "loss type",
        lambda c: grpo.grpo_loss(advantages=torch.ones(4), loss_type="ppo", **ADV),
        ValueError,
        r"loss_type='ppo'",
    ),
    ("loss beta<0", lambda c: grpo.grpo_loss(advantages=torch.ones(4), beta=-0.1, **ADV), ValueError, r"beta=-0\.1"),
    ("loss beta no ref", lambda c: grpo.grpo_loss(advantages=torch.ones(4), beta=0.1, **ADV), ValueError, r"beta=0\.1"),
    # evaluation statistics, widgets' update functions, checkpoints and the cache
    ("binomial hits>n", lambda c: evaluation.binomial_p_value(5, 3, 0.5), ValueError, r"hits=5, n=3"),
    ("binomial p0", lambda c: evaluation.binomial_p_value(1, 3, 1.5), ValueError, r"p0=1\.5"),
    ("sign test pairs", lambda c: evaluation.sign_test_p_value([1, 0], [1]), ValueError, r"2 scores but 1"),
    ("best box none", lambda c: evaluation.best_constant_box([]), ValueError, r"targets is empty"),
    ("wilson n 0", lambda c: evaluation.wilson_interval(0, 0), ValueError, r"n=0"),
    ("budget images 0", lambda c: forward.budget_view(images=0), ValueError, r"images=0"),
    ("budget images <0", lambda c: forward.budget_view(images=-1), ValueError, r"images=-1"),
    ("budget height 0", lambda c: forward.budget_view(height=0), ValueError, r"height=0"),
    ("checkpoint missing", lambda c: checkpoints.load_checkpoint(c.tmp / "none"), FileNotFoundError, r"none"),
    ("checkpoint empty", lambda c: checkpoints.load_checkpoint(c.empty), FileNotFoundError, r"no config\.json"),
    ("checkpoint step 0", lambda c: checkpoints.profile_checkpoint_dir("cpu", step=0), ValueError, r"step=0"),
    (
        "optimizer missing",
        lambda c: checkpoints.restore_optimizer(None, c.empty),
        FileNotFoundError,
        r"optimizer\.safetensors",
    ),
    (
        "cache is a file",
        lambda c: c.with_cache(c.file, cache.writable_cache_dir),
        NotADirectoryError,
        r"QWENVL_CACHE='.*not-a-folder'",
    ),
    (
        "cache under a file",
        lambda c: c.with_cache(c.file / "sub", cache.writable_cache_dir),
        PermissionError,
        r"QWENVL_CACHE='.*not-a-folder/sub'",
    ),
    (
        "tokenizer cache file",
        lambda c: c.with_cache(c.file, tokenizer.build_tokenizer),
        NotADirectoryError,
        r"QWENVL_CACHE='.*not-a-folder'.* is a file",
    ),
    (
        "clip cache file",
        lambda c: c.with_cache(c.file, video.synthetic_video),
        NotADirectoryError,
        r"QWENVL_CACHE='.*not-a-folder'",
    ),
]


@pytest.fixture(scope="module")
def context(processor, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-inputs")
    (tmp / "empty").mkdir()
    (tmp / "not-a-folder").write_text("a file, not a folder")

    def with_cache(path, call):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("QWENVL_CACHE", str(path))
            return call()

    return SimpleNamespace(
        processor=processor, tmp=tmp, empty=tmp / "empty", file=tmp / "not-a-folder", with_cache=with_cache
    )


def test_there_are_at_least_80_distinct_bad_inputs():
    assert len({name for name, *_ in CASES}) == len(CASES) >= 80


@pytest.mark.parametrize("call, error, message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_gets_a_clear_error(context, call, error, message):
    with pytest.raises(error, match=message) as raised:
        call(context)
    # our message, not a library's: raised in helpers/ or by our chat template
    assert "helpers" in raised.traceback[-1].path.parts or "TemplateError" in type(raised.value).__name__


@pytest.mark.parametrize(
    "view, kwargs, message",
    [
        ("sft_plots.batch_view", {"row": -1}, r"row=-1"),
        ("sft_plots.batch_view", {"row": 0, "max_length": -5}, r"max_length=-5"),
        ("patches.token_view", {"index": -1}, r"index=-1"),
        ("video.timeline_view", {"fps": 0}, r"fps=0"),
    ],
)
def test_widgets_say_not_accepted(view, kwargs, message):
    """A widget's update function answers a bad slider value with a 'not accepted' view naming it."""
    import importlib

    module, name = view.split(".")
    got = getattr(importlib.import_module(f"helpers.{module}"), name)(**kwargs)
    assert got.data.get("error") and __import__("re").search(message, got.data["error"])


def test_load_model_takes_a_dtype_name():
    """``dtype="float16"`` is the correct behaviour, not a crash inside torch."""
    small = qwen.course_config(
        text_hidden=32, text_layers=1, vision_hidden=16, vision_depth=2, fullatt_block_indexes=(1,)
    )
    assert qwen.load_model(config=small, dtype="float16").dtype == torch.float16


@pytest.mark.parametrize(
    "messages, rendered",
    [
        (user([{"type": "text", "text": "hi", "image": "x.png"}]), "<|im_start|>user\nhi<|im_end|>\n"),
        (
            user([{"image": "x.png"}, {"text": "hi"}]),
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n",
        ),
    ],
)
def test_template_dispatches_a_part_on_its_type_first(processor, messages, rendered):
    assert processor.apply_chat_template(messages, tokenize=False).endswith(rendered)


def test_a_completion_never_raises():
    odd = [None, 3, "", "3" * 10_000, "\x00", [{"content": None}], {"a": 1}, b"3", math.inf, np.int64(3)]
    for reward in (rewards.accuracy_reward, rewards.iou_reward, rewards.task_reward, rewards.format_reward):
        assert reward(odd, ["count"] * len(odd), [3] * len(odd)) == [0.0] * len(odd)

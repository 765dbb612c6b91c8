"""The offline kit against a folder holding a real Qwen2.5-VL-3B-Instruct's processor files (issue 13).

``helpers.qwen.write_checkpoint_processor_files`` writes the checkpoint's configuration files with the
values recorded in helpers/qwen.py (no download) and its vocabulary converted from qwen.tiktoken;
``load_processor(folder)`` then takes the real-folder route (``AutoProcessor.from_pretrained``). The
offline processor must come out the same: tokenizer flags, templates, image and video settings, and
the outputs on an image and a video.
"""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from helpers import qwen
from helpers import tokenizer as kit

TOOL_ANSWER = '<tool_call>\n{"name": "zoom", "arguments": {"box": [10, 20, 30, 40]}}\n</tool_call>'


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return qwen.write_checkpoint_processor_files(tmp_path_factory.mktemp("Qwen2.5-VL-3B-Instruct"))


@pytest.fixture(scope="module")
def real(folder):
    return qwen.load_processor(folder)


@pytest.fixture(scope="module")
def course():
    return qwen.load_processor()


def test_recorded_template_is_the_published_one():
    digest = hashlib.sha256(json.dumps(kit.QWEN25VL_CHAT_TEMPLATE).encode()).hexdigest()
    assert digest == kit.QWEN25VL_CHAT_TEMPLATE_SHA256


def test_folder_holds_the_files_of_a_real_folder(folder):
    assert sorted(p.name for p in folder.iterdir()) == [
        "chat_template.json",
        "merges.txt",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
    ]  # no video processor file, as in the real folder
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert sum(t["special"] for t in config["added_tokens_decoder"].values()) == 14
    assert len(config["added_tokens_decoder"]) == 22 and len(config["additional_special_tokens"]) == 13


def test_classes(real, course):
    for processor in (real, course):
        assert [
            type(processor).__name__,
            type(processor.tokenizer).__name__,
            type(processor.image_processor).__name__,
            type(processor.video_processor).__name__,
        ] == ["Qwen2_5_VLProcessor", "Qwen2Tokenizer", "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor"]


def test_tokenizer_ids_and_flags(real, course):
    wanted = {name: (token_id, name not in kit.NOT_SPECIAL) for name, token_id in kit.SPECIAL_TOKENS.items()}
    for processor in (real, course):
        tokenizer = processor.tokenizer
        assert {t.content: (i, t.special) for i, t in tokenizer.added_tokens_decoder.items()} == wanted
        assert len(tokenizer) == 151665
        assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token, tokenizer.unk_token) == (
            "<|im_end|>",
            "<|endoftext|>",
            None,
            None,
        )
    assert sorted(real.tokenizer.all_special_ids) == sorted(course.tokenizer.all_special_ids)
    assert len(set(course.tokenizer.all_special_ids)) == 14
    text = "<|im_start|>user\nHi 123 <tool_call>x</tool_call><|fim_prefix|>é<|im_end|>\n"
    assert real.tokenizer(text).input_ids == course.tokenizer(text).input_ids


def test_skip_special_tokens_keeps_tool_call_tags(real, course):
    for processor in (real, course):
        ids = processor.tokenizer(TOOL_ANSWER + "<|im_end|>").input_ids
        assert processor.batch_decode([ids], skip_special_tokens=True)[0] == TOOL_ANSWER
        assert processor.batch_decode([ids])[0] == TOOL_ANSWER + "<|im_end|>"


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image", "image": "a.jpg"}, {"type": "text", "text": "What is it?"}]},
    ],
    [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": "v.mp4"},
                {"type": "image", "image": "a.jpg"},
                {"type": "text", "text": "Same?"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": TOOL_ANSWER}]},
        {"role": "tool", "content": [{"type": "text", "text": '{"ok": true}'}]},
        {"role": "assistant", "content": "Done."},
    ],
    [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "a.jpg"},
                {"type": "image", "image": "b.jpg"},
                {"type": "text", "text": "Compare."},
            ],
        }
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
@pytest.mark.parametrize("kwargs", [{}, {"add_generation_prompt": True}, {"add_vision_id": True}], ids=str)
def test_templates_render_the_same(real, course, messages, kwargs):
    assert real.chat_template == real.tokenizer.chat_template == kit.QWEN25VL_CHAT_TEMPLATE
    assert course.chat_template == course.tokenizer.chat_template == kit.CHAT_TEMPLATE
    rendered = {processor.apply_chat_template(messages, tokenize=False, **kwargs) for processor in (real, course)}
    rendered |= {
        processor.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs) for processor in (real, course)
    }
    assert len(rendered) == 1


def test_where_the_course_template_is_stricter(real, course):
    developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert "<|im_start|>developer\nBe brief.<|im_end|>" in real.apply_chat_template(developer, tokenize=False)
    with pytest.raises(Exception, match="unknown message role developer"):
        course.apply_chat_template(developer, tokenize=False)
    audio = [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, {"type": "text", "text": "Hi"}]}]
    plain = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert real.apply_chat_template(audio, tokenize=False) == real.apply_chat_template(plain, tokenize=False)
    with pytest.raises(Exception, match="unknown content part type audio"):
        course.apply_chat_template(audio, tokenize=False)


def test_image_and_video_processor_settings(real, course):
    for name in ("image_processor", "video_processor"):
        assert getattr(real, name).to_dict() == getattr(course, name).to_dict(), name
    for processor in (real.image_processor, real.video_processor):
        assert (processor.size.shortest_edge, processor.size.longest_edge) == (3136, 12845056)


def _image_and_video_inputs(processor, frames, size):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Same?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    video = np.random.default_rng(2).integers(0, 256, (frames, *size, 3), dtype=np.uint8)
    return processor(
        text=[text],
        images=[image],
        videos=[video],
        video_metadata=[{"fps": 2.0, "total_num_frames": frames}],
        do_sample_frames=False,
        cap_pixels_per_frame=True,
        return_tensors="pt",
    )


@pytest.mark.parametrize(
    "limits",
    [
        {},
        {"min_pixels": 256 * 28 * 28, "max_pixels": 1280 * 28 * 28},
        {"video_min_pixels": 16 * 28 * 28, "video_max_pixels": 64 * 28 * 28},
    ],
    ids=str,
)
@pytest.mark.filterwarnings("error::FutureWarning")  # no deprecated path (min_pixels as a call argument)
def test_same_outputs_on_an_image_and_a_video(folder, limits):
    real, course = qwen.load_processor(folder, **limits), qwen.load_processor(**limits)
    outputs = [_image_and_video_inputs(processor, 8, (224, 224)) for processor in (real, course)]
    assert (
        set(outputs[0])
        == set(outputs[1])
        == {
            "input_ids",
            "attention_mask",
            "mm_token_type_ids",
            "pixel_values",
            "image_grid_thw",
            "pixel_values_videos",
            "video_grid_thw",
            "second_per_grid_ts",
        }
    )
    for key in outputs[0]:
        assert torch.equal(torch.as_tensor(outputs[0][key]), torch.as_tensor(outputs[1][key])), key
    size = real.video_processor.size
    height, width = smart_resize(224, 224, 28, size.shortest_edge, size.longest_edge)
    assert outputs[0]["video_grid_thw"].tolist() == [[4, height // 14, width // 14]]
    if not limits:  # 8 raw frames of 224²: 224 × 224 already lies in 3,136 … 12,845,056 pixels
        assert outputs[0]["video_grid_thw"].tolist() == [[4, 16, 16]]


def test_full_hd_frames_keep_their_size_under_the_checkpoint_limits(real, course):
    # 8 frames of 1080 × 1920 → 1092 × 1932 (each side rounded to a multiple of 28): grid (4, 78, 138)
    patches = [p.video_processor.get_num_of_video_patches(8, 1080, 1920, {}) for p in (real, course)]
    assert patches == [4 * 78 * 138] * 2


def test_an_early_snapshot_gets_a_clear_error(tmp_path):
    folder = qwen.write_checkpoint_processor_files(tmp_path)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config["image_processor_type"] = qwen.EARLY_IMAGE_PROCESSOR_TYPE
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="image_processor_type='Qwen2_5_VLImageProcessor'.*'Qwen2VLImageProcessor'"):
        qwen.load_processor(folder)
    # what transformers itself says without the check
    from transformers import AutoProcessor

    with pytest.raises(ValueError, match="Unrecognized image processor"):
        AutoProcessor.from_pretrained(folder, local_files_only=True)

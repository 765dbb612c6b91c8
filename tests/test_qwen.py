"""The offline Qwen2.5-VL kit (helpers.qwen): tokenizer, chat template, processor, models."""

import socket
import time

import numpy as np
import pytest
import tiktoken
import torch
from PIL import Image
from qwen_vl_utils import process_vision_info
from transformers import Qwen2_5_VLForConditionalGeneration

from helpers import qwen
from helpers import tokenizer as kit
from helpers.netguard import NetworkBlockedError

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def processor():
    return qwen.load_processor(min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)


@pytest.fixture(scope="module")
def tokenizer(processor):
    return processor.tokenizer


def render(processor, messages, **kwargs):
    return processor.apply_chat_template(messages, tokenize=False, **kwargs)


# --- tokens ----------------------------------------------------------------------------------


def test_default_system_turn_ids(tokenizer):
    ids = tokenizer(SYSTEM).input_ids
    assert ids == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]


def test_special_token_table(tokenizer):
    expected = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|object_ref_start|>": 151646,
        "<|object_ref_end|>": 151647,
        "<|box_start|>": 151648,
        "<|box_end|>": 151649,
        "<|quad_start|>": 151650,
        "<|quad_end|>": 151651,
        "<|vision_start|>": 151652,
        "<|vision_end|>": 151653,
        "<|vision_pad|>": 151654,
        "<|image_pad|>": 151655,
        "<|video_pad|>": 151656,
        "<tool_call>": 151657,
        "</tool_call>": 151658,
        "<|fim_prefix|>": 151659,
        "<|fim_middle|>": 151660,
        "<|fim_suffix|>": 151661,
        "<|fim_pad|>": 151662,
        "<|repo_name|>": 151663,
        "<|file_sep|>": 151664,
    }
    assert kit.SPECIAL_TOKENS == expected
    for name, token_id in expected.items():
        assert tokenizer.convert_tokens_to_ids(name) == token_id
        assert tokenizer(name).input_ids == [token_id]  # never split into pieces
    assert len(tokenizer) == 151665
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    # as in the checkpoint's tokenizer_config.json: 14 special, <tool_call> … <|file_sep|> not
    flags = {token.content: token.special for token in tokenizer.added_tokens_decoder.values()}
    assert [name for name, special in flags.items() if not special] == list(kit.NOT_SPECIAL)
    assert list(kit.NOT_SPECIAL) == [name for name, i in expected.items() if 151657 <= i <= 151664]


TEXTS = [
    "Hello world! How are you?",
    "  leading spaces and\ttabs\n\nnewlines\r\n",
    "1234567890 3.14159 -42",
    "naïve café, Zürich, 北京欢迎你, こんにちは, 안녕하세요, Привет мир",
    "emoji 🤖🎉 and symbols ∑∫√ ≤ ≥",
    "I'm sure they'll say it's what we've done; DON'T SHOUT",
    "def f(x):\n    return x ** 2  # comment\n",
    '{"bbox_2d": [12, 40, 156, 210], "label": "red circle"}',
    "a" * 300,
    " ".join(["word"] * 50),
    "\u0065\u0301 composed vs \u00e9 precomposed",
]


def test_tokenizer_matches_tiktoken_on_the_same_vocabulary(tokenizer):
    """Our converted BPE must tokenize exactly like tiktoken reading the same qwen.tiktoken."""
    ranks = kit.read_tiktoken_ranks(kit.vocabulary_file())
    reference = tiktoken.Encoding(
        "qwen2.5",
        pat_str=kit.PRETOKENIZE_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=dict(kit.SPECIAL_TOKENS),
    )
    rng = np.random.default_rng(0)
    words = [w for t in TEXTS for w in t.split()]
    random_texts = [" ".join(rng.choice(words, size=12)) for _ in range(200)]
    for text in TEXTS + random_texts:
        import unicodedata

        normalised = unicodedata.normalize("NFC", text)  # the HF tokenizer normalises to NFC first
        assert tokenizer(text).input_ids == reference.encode(normalised, allowed_special="all"), text
        assert tokenizer.decode(tokenizer(text).input_ids) == normalised


def test_read_tiktoken_ranks_mirrors_tiktoken_loader():
    from tiktoken.load import load_tiktoken_bpe

    assert kit.read_tiktoken_ranks(kit.vocabulary_file()) == load_tiktoken_bpe(str(kit.vocabulary_file()))


def test_warm_load_processor_is_fast():
    qwen.load_processor()
    start = time.perf_counter()
    qwen.load_processor()
    assert time.perf_counter() - start < 3.0


# --- chat template ---------------------------------------------------------------------------

IMAGE_PART = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PART = "<|vision_start|><|video_pad|><|vision_end|>"


def test_template_text_only_default_system(processor):
    messages = [{"role": "user", "content": "Hi there"}]
    assert render(processor, messages) == SYSTEM + "<|im_start|>user\nHi there<|im_end|>\n"


def test_template_system_given(processor):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
        {"role": "user", "content": [{"type": "text", "text": "Colour of the sky?"}]},
    ]
    assert render(processor, messages, add_generation_prompt=True) == (
        "<|im_start|>system\nAnswer in one word.<|im_end|>\n"
        "<|im_start|>user\nColour of the sky?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_one_image(processor):
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": "a.jpg"}, {"type": "text", "text": "Describe this image."}],
        }
    ]
    assert render(processor, messages, add_generation_prompt=True) == (
        SYSTEM + "<|im_start|>user\n" + IMAGE_PART + "Describe this image.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_two_images(processor):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "a.jpg"},
                {"type": "image", "image": "b.jpg"},
                {"type": "text", "text": "Compare."},
            ],
        }
    ]
    assert render(processor, messages, add_generation_prompt=False) == (
        SYSTEM + "<|im_start|>user\n" + IMAGE_PART + IMAGE_PART + "Compare.<|im_end|>\n"
    )
    assert render(processor, messages, add_vision_id=True).count("Picture 2: ") == 1


def test_template_video(processor):
    messages = [
        {"role": "user", "content": [{"type": "video", "video": "v.mp4"}, {"type": "text", "text": "What happens?"}]}
    ]
    assert render(processor, messages, add_generation_prompt=True) == (
        SYSTEM + "<|im_start|>user\n" + VIDEO_PART + "What happens?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_multi_turn_with_answers(processor):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": "a.jpg"}, {"type": "text", "text": "How many?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "3"}]},
        {"role": "user", "content": [{"type": "text", "text": "And red ones?"}]},
        {"role": "assistant", "content": "1"},
    ]
    expected = (
        SYSTEM + "<|im_start|>user\n" + IMAGE_PART + "How many?<|im_end|>\n"
        "<|im_start|>assistant\n3<|im_end|>\n<|im_start|>user\nAnd red ones?<|im_end|>\n"
        "<|im_start|>assistant\n1<|im_end|>\n"
    )
    assert render(processor, messages) == expected
    assert render(processor, messages, add_generation_prompt=True) == expected + "<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "robot", "content": "x"}], "unknown message role robot"),
        ([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}], "unknown content part type audio"),
    ],
)
def test_template_rejects_unknown_roles_and_parts(processor, messages, message):
    with pytest.raises(Exception, match=message):
        render(processor, messages)


# --- the seed numbers ------------------------------------------------------------------------


def test_seed_example_1092x1568(processor):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1092, 1568, 3), dtype=np.uint8))
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe this image."}],
        }
    ]
    text = render(processor, messages, add_generation_prompt=True)
    images, videos = process_vision_info(messages)
    inputs = processor(text=[text], images=images, videos=videos, return_tensors="pt")
    assert inputs.input_ids.shape == (1, 1243)
    assert tuple(inputs.pixel_values.shape) == (4872, 1176)
    assert inputs.image_grid_thw.tolist() == [[1, 58, 84]]
    assert (inputs.input_ids == kit.SPECIAL_TOKENS["<|image_pad|>"]).sum() == 58 * 84 // 4


def test_qwen25vl_3b_parameter_count():
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(qwen.qwen25vl_3b_config())
    total, vision = qwen.parameter_count(model), qwen.parameter_count(model.model.visual)
    assert (total, vision) == (3_754_622_976, 668_684_288)
    # DESIGN quotes "3.754 B (vision 0.669 B)": the total truncated, the vision tower rounded.
    assert total // 10**6 / 1e3 == 3.754 and round(vision / 1e9, 3) == 0.669
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight


def test_course_config_keeps_the_real_geometry():
    config = qwen.course_config()
    assert config.vision_config.patch_size == 14 and config.vision_config.spatial_merge_size == 2
    assert config.vision_config.temporal_patch_size == 2 and config.vision_config.window_size == 112
    assert config.text_config.vocab_size == 151936 and config.tie_word_embeddings
    head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    assert qwen.qwen25vl_3b_config().text_config.rope_parameters["mrope_section"] == [16, 24, 24]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"text_hidden": 130}, "must divide"),
        ({"fullatt_block_indexes": (9,)}, r"must be in \[0, 3\]"),
        ({"text_heads": 0}, "text_heads=0"),
    ],
)
def test_course_config_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qwen.course_config(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_pixels": 10}, "min_pixels=10"),
        ({"min_pixels": 5000, "max_pixels": 4000}, "larger than max_pixels=4000"),
        ({"video_max_pixels": -1}, "video_max_pixels=-1"),
    ],
)
def test_load_processor_rejects_bad_limits(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qwen.load_processor(**kwargs)


def test_video_pixel_limits_take_effect():
    frames = np.random.default_rng(0).integers(0, 256, (4, 3, 280, 420), dtype=np.uint8)
    default = qwen.load_processor()
    small = qwen.load_processor(video_min_pixels=28 * 28 * 4, video_max_pixels=28 * 28 * 16)
    grids = [
        p.video_processor(videos=[frames], return_tensors="pt")["video_grid_thw"][0].tolist() for p in (default, small)
    ]
    assert grids[0] == [2, 20, 30]  # 280×420 fits the default video bounds as it is
    assert grids[1][1] * grids[1][2] <= 4 * 16  # at most 16 visual tokens per temporal patch


def test_image_limits_bound_video_frames_too():
    # from_pretrained(folder, min_pixels=…, max_pixels=…) hands them to both processors; so does ours
    both = qwen.load_processor(min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)
    for size in (both.video_processor.size, both.image_processor.size):
        assert (size.shortest_edge, size.longest_edge) == (256 * 28 * 28, 1280 * 28 * 28)
    own = qwen.load_processor(min_pixels=256 * 28 * 28, video_min_pixels=4 * 28 * 28)
    assert (own.image_processor.size.shortest_edge, own.video_processor.size.shortest_edge) == (256 * 784, 4 * 784)
    default = qwen.load_processor().video_processor.size
    assert (default.shortest_edge, default.longest_edge) == (3136, 12845056)
    with pytest.raises(ValueError, match="the minimum is larger than the maximum"):
        qwen.load_processor(max_pixels=1000 * 28 * 28, video_min_pixels=2000 * 28 * 28)


def test_course_model_is_seeded_and_tied():
    a, b = qwen.load_model(seed=3), qwen.load_model(seed=3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert a.lm_head.weight is a.model.language_model.embed_tokens.weight
    assert not torch.equal(qwen.load_model(seed=4).lm_head.weight, a.lm_head.weight)


# --- the real-checkpoint path: save, then load from the directory -----------------------------


def test_save_and_reload_gives_identical_ids_pixels_and_logits(processor, tmp_path):
    model = qwen.load_model()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded_processor = qwen.load_processor(tmp_path)
    reloaded_model = qwen.load_model(tmp_path)

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8))
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}
    ]
    batches = []
    for p in (processor, reloaded_processor):
        text = p.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        batches.append(p(text=[text], images=[image], return_tensors="pt"))
    assert torch.equal(batches[0].input_ids, batches[1].input_ids)
    assert torch.equal(batches[0].pixel_values, batches[1].pixel_values)
    assert torch.equal(batches[0].image_grid_thw, batches[1].image_grid_thw)
    with torch.no_grad():
        logits = [m(**batches[0]).logits for m in (model, reloaded_model)]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_env_variable_selects_a_checkpoint(processor, tmp_path, monkeypatch):
    processor.save_pretrained(tmp_path)
    monkeypatch.setenv("QWENVL_MODEL", str(tmp_path))
    assert qwen.load_processor().tokenizer("hello").input_ids == processor.tokenizer("hello").input_ids


def test_missing_directory_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        qwen.load_processor(missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        qwen.load_model(missing)


def test_directory_without_files_is_a_clear_error(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"missing preprocessor_config.json or processor_config.json; tokenizer.json or vocab.json",
    ):
        qwen.load_processor(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"missing weights"):
        qwen.load_model(tmp_path)


# --- offline -------------------------------------------------------------------------------


def test_network_is_blocked():
    with pytest.raises(NetworkBlockedError):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    with pytest.raises(NetworkBlockedError):
        socket.socket().connect(("1.1.1.1", 80))
    server = socket.socket()
    server.bind(("127.0.0.1", 0))  # loopback stays open (Jupyter kernels need it)
    server.listen(1)
    socket.create_connection(server.getsockname(), timeout=1).close()
    server.close()

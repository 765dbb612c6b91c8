"""The decoder side of Qwen2.5-VL step by step, greedy decoding with a KV cache, and the 3B's
memory budget (taught in notebooks/09_forward_generate.ipynb).

``forward_step_by_step`` re-does ``Qwen2_5_VLForConditionalGeneration.forward`` from the model's
own weights in plain torch: token embeddings → image/video features from the vision tower → the
masked scatter of those features into the ``<|image_pad|>`` / ``<|video_pad|>`` slots → M-RoPE
positions (``helpers.rope``) → each decoder layer (RMSNorm, grouped-query attention with M-RoPE,
SwiGLU MLP) → final norm → tied ``lm_head`` → logits. ``greedy_generate`` is a hand-written
decoding loop over the same pieces with an explicit key/value cache; both are tested against
``model(**inputs).logits`` and ``model.generate(do_sample=False)``.

The budget functions work on a model built on the meta device (no memory, real shapes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from helpers.constants import MAX_PIXELS, TOKEN_PIXELS
from helpers.layers import apply_rotary, rms_norm
from helpers.plots import COLOURS, new_figure
from helpers.qwen import parameter_count, qwen25vl_3b_config
from helpers.rope import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, mrope_cos_sin, rope_index
from helpers.vision import visual_tokens
from helpers.widgets import View, register_widget

# ---------------------------------------------------------------------------------------------
# The forward pass, one piece at a time
# ---------------------------------------------------------------------------------------------


def embed_tokens(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(batch, length, hidden): one row of the embedding table per token id (pads included)."""
    return model.model.language_model.embed_tokens.weight[input_ids]


def visual_features(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """(Σ t·h·w/4, hidden): the vision tower's merged output, one row per ``<|…_pad|>`` token.

    Calls ``model.model.visual`` (notebook 07 re-implements it); mirrors ``get_image_features``
    without splitting per image.
    """
    return model.model.visual(pixel_values.to(model.model.visual.dtype), grid_thw=grid_thw).pooler_output


def scatter_visual(
    embeds: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor, token_id: int = IMAGE_TOKEN_ID
) -> torch.Tensor:
    """Put feature row k into the k-th ``token_id`` slot (row-major over the batch).

    Mirrors ``get_placeholder_mask`` + ``inputs_embeds.masked_scatter``; raises ValueError, like the
    model's "Image features and image tokens do not match", when the counts differ.
    """
    slots = input_ids == token_id
    if int(slots.sum()) != features.shape[0]:
        raise ValueError(
            f"{int(slots.sum())} pad tokens (id {token_id}) but {features.shape[0]} feature rows; "
            "each image/video needs exactly grid_thw.prod() // 4 pads"
        )
    out = embeds.clone()
    out[slots] = features.to(out.dtype)
    return out


def attention(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: tuple | None = None):
    """Grouped-query causal self-attention of one layer; returns (output, (keys, values)) with the
    keys/values of ``past`` (the cache of earlier tokens) in front. Mirrors ``Qwen2_5_VLAttention``
    with eager attention."""
    batch, length, _ = x.shape
    d = attn.head_dim
    q = attn.q_proj(x).view(batch, length, -1, d).transpose(1, 2)  # (B, heads, L, d)
    k = attn.k_proj(x).view(batch, length, -1, d).transpose(1, 2)  # (B, kv_heads, L, d)
    v = attn.v_proj(x).view(batch, length, -1, d).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # RoPE: (B, L, d) angles per head
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, kv_heads, past + L, d)
    group = q.shape[1] // k.shape[1]  # query heads per kv head
    keys, values = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ keys.transpose(2, 3) * d**-0.5  # (B, heads, L, past + L)
    offset = keys.shape[2] - length
    causal = torch.ones(length, keys.shape[2], dtype=torch.bool).tril(diagonal=offset)
    scores = scores.masked_fill(~causal, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = (weights @ values).transpose(1, 2).reshape(batch, length, -1)  # (B, L, heads·d)
    return attn.o_proj(out), (k, v)


def decoder_layer(layer, x: torch.Tensor, cos, sin, past=None):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(·)) with SwiGLU (mirrors
    ``Qwen2_5_VLDecoderLayer``). Returns (x, (keys, values))."""
    norm1, norm2, mlp = layer.input_layernorm, layer.post_attention_layernorm, layer.mlp
    h, kv = attention(layer.self_attn, rms_norm(x, norm1.weight, norm1.variance_epsilon), cos, sin, past)
    x = x + h
    y = rms_norm(x, norm2.weight, norm2.variance_epsilon)
    return x + mlp.down_proj(F.silu(mlp.gate_proj(y)) * mlp.up_proj(y)), kv


def _rope_tables(model, position_ids):
    rotary = model.model.language_model.rotary_emb
    return mrope_cos_sin(position_ids, rotary.inv_freq, rotary.mrope_section)


def decoder(model, embeds: torch.Tensor, position_ids: torch.Tensor, cache: list | None = None):
    """All decoder layers + final norm → (hidden states, new cache list of (keys, values))."""
    cos, sin = _rope_tables(model, position_ids)
    x, new_cache = embeds, []
    for index, layer in enumerate(model.model.language_model.layers):
        x, kv = decoder_layer(layer, x, cos.to(x.dtype), sin.to(x.dtype), cache[index] if cache else None)
        new_cache.append(kv)
    norm = model.model.language_model.norm
    return rms_norm(x, norm.weight, norm.variance_epsilon), new_cache


def logits_from_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """(batch, length, vocab): hidden states times the (tied) output matrix."""
    return hidden @ model.lm_head.weight.T


@dataclass
class Steps:
    """Every intermediate of ``forward_step_by_step`` (for plots and checks)."""

    token_embeds: torch.Tensor
    image_features: torch.Tensor | None
    video_features: torch.Tensor | None
    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    rope_deltas: torch.Tensor
    hidden: torch.Tensor
    logits: torch.Tensor
    cache: list = field(default_factory=list)


def forward_step_by_step(
    model,
    input_ids,
    pixel_values=None,
    image_grid_thw=None,
    pixel_values_videos=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    attention_mask=None,
    last_only: bool = False,
    **_ignored,
) -> Steps:
    """``model(**inputs)`` re-done from the model's weights, keeping each step (mirrors
    ``Qwen2_5_VLForConditionalGeneration.forward`` without a cache). Sequences without padding only:
    a batch with padding raises ValueError. ``last_only``: logits of the last position only (what
    decoding needs; the model's ``logits_to_keep=1``)."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("forward_step_by_step handles unpadded sequences only; attention_mask has zeros")
    with torch.no_grad():
        token_embeds = embed_tokens(model, input_ids)  # (B, L, hidden)
        embeds, image_feats, video_feats = token_embeds, None, None
        if pixel_values is not None:
            image_feats = visual_features(model, pixel_values, image_grid_thw)  # (image tokens, hidden)
            embeds = scatter_visual(embeds, input_ids, image_feats, IMAGE_TOKEN_ID)
        if pixel_values_videos is not None:
            video_feats = visual_features(model, pixel_values_videos, video_grid_thw)
            embeds = scatter_visual(embeds, input_ids, video_feats, VIDEO_TOKEN_ID)
        vision = model.config.vision_config
        position_ids, deltas = rope_index(
            input_ids,
            image_grid_thw,
            video_grid_thw,
            second_per_grid_ts,
            spatial_merge_size=vision.spatial_merge_size,
            tokens_per_second=vision.tokens_per_second,
        )  # (3, B, L)
        hidden, cache = decoder(model, embeds, position_ids)
        logits = logits_from_hidden(model, hidden[:, -1:] if last_only else hidden)
    return Steps(token_embeds, image_feats, video_feats, embeds, position_ids, deltas, hidden, logits, cache)


def plot_stage_norms(steps: Steps, input_ids: torch.Tensor):
    """RMS of each token's vector at three stages: the token embeddings, after the scatter (image
    slots now hold vision features), and the final hidden state; image slots shaded."""
    figure, ax = new_figure(width=7.5, height=2.8)
    x = np.arange(input_ids.shape[1])
    image = (input_ids[0] == IMAGE_TOKEN_ID).numpy()
    ax.fill_between(
        x,
        0,
        1,
        where=image,
        transform=ax.get_xaxis_transform(),
        color=COLOURS["image"],
        alpha=0.12,
        step="mid",
        linewidth=0,
        label="<|image_pad|> slots",
    )
    for tensor, colour, label in (
        (steps.token_embeds, COLOURS["pad"], "token embeddings"),
        (steps.inputs_embeds, COLOURS["image"], "after the scatter"),
        (steps.hidden, COLOURS["text"], "final hidden (normed)"),
    ):
        ax.plot(x, tensor[0].pow(2).mean(-1).sqrt().numpy(), color=colour, linewidth=1, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("token index")
    ax.set_ylabel("RMS of the vector")
    ax.legend(fontsize=8, ncol=2, loc="center right")
    return figure


def greedy_generate(model, inputs: dict, max_new_tokens: int, eos_token_id: int | None = None):
    """(new token ids (1, n), their logits (1, n, vocab)) of greedy decoding with a hand-kept KV cache.

    Prefill: ``forward_step_by_step`` on the prompt keeps every layer's keys/values. Then per new
    token: embed it, give it position ``length + k + rope_deltas`` in all three rows, run the layers
    on that one token against the cached keys/values, take the argmax. Stops after ``eos_token_id``
    (default: the model's generation config) like ``model.generate(do_sample=False)``. Batch of one.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: expected ≥ 1")
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError(f"batch of {inputs['input_ids'].shape[0]}: greedy_generate decodes one sequence")
    eos = model.generation_config.eos_token_id if eos_token_id is None else eos_token_id
    eos = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    steps = forward_step_by_step(model, **inputs, last_only=True)
    cache, length, delta = steps.cache, inputs["input_ids"].shape[1], int(steps.rope_deltas)
    logits = [steps.logits[:, -1]]  # (1, vocab) per step
    tokens = [logits[-1].argmax(-1, keepdim=True)]  # (1, 1) per step
    with torch.no_grad():
        for k in range(1, max_new_tokens):
            if int(tokens[-1]) in eos:
                break
            position = torch.full((3, 1, 1), length + k - 1 + delta)  # (3, B, 1): text, all rows equal
            hidden, cache = decoder(model, embed_tokens(model, tokens[-1]), position, cache)
            logits.append(logits_from_hidden(model, hidden)[:, -1])
            tokens.append(logits[-1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1), torch.stack(logits, dim=1)


def redraw_decoder_weights(model, std: float = 0.1, seed: int = 1):
    """Redraw every matrix of the decoder layers from N(0, std²), in place; returns the model.

    The course model's random init (std 0.02) makes each layer a tiny nudge to the residual stream,
    so greedy decoding repeats one token forever; at std 0.1 it wanders, which makes "token for
    token" comparisons mean something. Embeddings, norms and the vision tower are left alone.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.model.language_model.layers.parameters():
            if parameter.ndim == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def cache_bytes(cache: list) -> int:
    """Bytes held by a cache list of (keys, values) per layer."""
    return sum(t.numel() * t.element_size() for kv in cache for t in kv)


# ---------------------------------------------------------------------------------------------
# Common traps
# ---------------------------------------------------------------------------------------------


def visual_token_counts(
    input_ids: torch.Tensor, grid_thw: torch.Tensor, token_id: int = IMAGE_TOKEN_ID, merge_size: int = 2
) -> tuple[int, int]:
    """(pad tokens in ``input_ids``, tokens the grids need = Σ grid_thw.prod() // merge²)."""
    return int((input_ids == token_id).sum()), int(grid_thw.prod(-1).sum()) // merge_size**2


def truncate_safely(
    input_ids: torch.Tensor, max_length: int, token_ids=(IMAGE_TOKEN_ID, VIDEO_TOKEN_ID)
) -> torch.Tensor:
    """Keep the first ``max_length`` tokens of a (1, length) sequence, unless that cuts a visual run.

    The fix for "Image features and image tokens do not match": a cut inside (or before the end of)
    the pads of an image would leave fewer pads than feature rows, so raise ValueError naming the
    shortest ``max_length`` that keeps every pad (or drop the example / lower max_pixels instead).
    """
    if max_length < 1:
        raise ValueError(f"max_length={max_length}: expected ≥ 1")
    ids = input_ids[0]
    visual = torch.isin(ids, torch.tensor(token_ids))
    if not visual[max_length:].any():
        return input_ids[:, :max_length]
    last = int(torch.nonzero(visual).max()) + 1
    raise ValueError(
        f"max_length={max_length} would cut {int(visual[max_length:].sum())} of {int(visual.sum())} "
        f"visual pad tokens; keep max_length ≥ {last + 1} (through <|vision_end|>), drop the example, "
        "or lower max_pixels"
    )


def generate_batch(model, processor, texts: list[str], images: list, padding_side: str, max_new_tokens: int = 6):
    """Greedy ``generate`` on a padded batch; returns each row's new tokens (list of lists)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}: expected 'left' or 'right'")
    processor.tokenizer.padding_side = padding_side
    try:
        batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    finally:
        processor.tokenizer.padding_side = "left"
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens)
    return [row.tolist() for row in out[:, batch["input_ids"].shape[1] :]]


# ---------------------------------------------------------------------------------------------
# The 3B budget (meta device)
# ---------------------------------------------------------------------------------------------

BYTES = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}


def parameters_by_module(model) -> dict[str, int]:
    """Parameters of each part (tied ``lm_head`` counted once, under the embeddings)."""
    vision, text = model.model.visual, model.model.language_model

    def count(module):
        return sum(p.numel() for p in module.parameters())

    parts = {
        "vision: patch embed": count(vision.patch_embed),
        "vision: blocks": count(vision.blocks),
        "vision: merger": count(vision.merger),
        "text: embeddings (= lm_head, tied)": count(text.embed_tokens),
        "text: attention": sum(count(layer.self_attn) for layer in text.layers),
        "text: MLP": sum(count(layer.mlp) for layer in text.layers),
        "text: norms": sum(
            count(layer.input_layernorm) + count(layer.post_attention_layernorm) for layer in text.layers
        )
        + count(text.norm),
    }
    if model.lm_head.weight is not text.embed_tokens.weight:
        parts["lm_head (untied)"] = count(model.lm_head)
    return parts


def weight_bytes(parameters: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes to hold ``parameters`` weights in ``dtype``."""
    if dtype not in BYTES:
        raise ValueError(f"dtype={dtype}: expected one of {list(BYTES)}")
    return parameters * BYTES[dtype]


def kv_cache_bytes_per_token(text_config, dtype: torch.dtype = torch.bfloat16) -> int:
    """Keys + values of one token in every layer: 2 × layers × kv_heads × head_dim × bytes."""
    head_dim = text_config.hidden_size // text_config.num_attention_heads
    return 2 * text_config.num_hidden_layers * text_config.num_key_value_heads * head_dim * BYTES[dtype]


def image_memory(config, tokens: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Bytes an image of ``tokens`` visual tokens adds at inference: its KV cache in the decoder, and
    the score matrix of one full-attention vision block if attention is computed eagerly
    (heads × patches² where patches = 4 × tokens). Flash/SDPA kernels avoid the latter."""
    patches = 4 * tokens
    return {
        "kv_cache": tokens * kv_cache_bytes_per_token(config.text_config, dtype),
        "vision_scores_eager": config.vision_config.num_heads * patches**2 * BYTES[dtype],
    }


def plot_memory_vs_image_size(config, weights: int, sides=None, max_pixels: int = MAX_PIXELS):
    """GiB vs a square image's side: weights, + KV cache of its tokens, + eager vision scores."""
    sides = np.asarray(sides if sides is not None else np.linspace(224, 4480, 40), dtype=int)
    tokens = np.array([visual_tokens(s, s, max_pixels=max_pixels) for s in sides])
    parts = [image_memory(config, int(t)) for t in tokens]
    gib = 2**30
    kv = np.array([p["kv_cache"] for p in parts]) / gib
    scores = np.array([p["vision_scores_eager"] for p in parts]) / gib
    figure, (left, right) = new_figure(2, 1, width=9, height=3.2)
    left.plot(sides, tokens, color=COLOURS["image"])
    left.set_xlabel("image side (px, square)")
    left.set_ylabel("visual tokens")
    left.set_title("tokens: ≈ side² / 784, capped by max_pixels")
    right.axhline(weights / gib, color=COLOURS["pad"], label="bf16 weights")
    right.plot(sides, weights / gib + kv, color=COLOURS["text"], label="+ KV cache (flash/SDPA)")
    right.plot(sides, weights / gib + kv + scores, color=COLOURS["loss"], label="+ eager full-attention scores")
    right.set_yscale("log")
    right.set_xlabel("image side (px, square)")
    right.set_ylabel("GiB (log)")
    right.set_title("3B inference memory, one image")
    right.legend(fontsize=8)
    return figure, {"sides": sides, "tokens": tokens, "kv_gib": kv, "scores_gib": scores}


_budget_defaults = {"height": 600, "width": 512, "max_tokens": 16384, "images": 1}
_BUDGET_CONFIG = None


def _three_b():
    """The 3B config and its bf16 weight bytes, built once on the meta device."""
    global _BUDGET_CONFIG
    if _BUDGET_CONFIG is None:
        from transformers import Qwen2_5_VLForConditionalGeneration

        config = qwen25vl_3b_config()
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration(config)
        _BUDGET_CONFIG = (config, weight_bytes(parameter_count(model)))
    return _BUDGET_CONFIG


@register_widget(
    "09_forward_generate",
    _budget_defaults,
    [{"height": 2000, "width": 3000}, {"max_tokens": 256, "images": 4}, {"height": 28, "width": 5000}],
)
def budget_view(height: int = 600, width: int = 512, max_tokens: int = 16384, images: int = 1) -> View:
    """The 3B's inference memory for ``images`` images of height×width with ``max_pixels = max_tokens ×
    28²`` (per image): visual tokens, KV cache, eager vision scores, against the bf16 weights."""
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ValueError(f"images={images!r}: expected an integer ≥ 1 (images in the sample)")
    config, weights = _three_b()
    tokens = visual_tokens(height, width, max_pixels=int(max_tokens) * TOKEN_PIXELS)
    memory = image_memory(config, tokens)
    mib = 2**20
    bars = {
        "bf16 weights": weights / mib,
        "KV cache": images * memory["kv_cache"] / mib,
        "eager vision scores": memory["vision_scores_eager"] / mib,
    }
    figure, ax = new_figure(width=6.0, height=2.2)
    ax.barh(list(bars), list(bars.values()), color=[COLOURS["pad"], COLOURS["text"], COLOURS["loss"]])
    ax.set_xscale("log")
    ax.set_xlabel("MiB (log)")
    for y, value in enumerate(bars.values()):
        ax.text(value, y, f" {value:,.0f}", va="center", fontsize=8)
    text = (
        f"{images} image(s) of {height}×{width}, max_pixels = {max_tokens} × 28² → {tokens} visual tokens each, "
        f"{images * tokens} in the sample\nKV cache {images * memory['kv_cache'] / mib:,.1f} MiB; one eager "
        f"full-attention vision block's scores {memory['vision_scores_eager'] / mib:,.1f} MiB (one image at a time)"
    )
    return View(text=text, figure=figure, data={"tokens": tokens, **{k: v for k, v in bars.items()}})


def megapixel_tokens() -> float:
    """Visual tokens per megapixel: 1e6 / 28² (each token covers 28×28 pixels after resize)."""
    return 1e6 / TOKEN_PIXELS

"""Packing: several conversations in one row, no padding (taught in notebooks/12_packing.ipynb).

A padded batch of B conversations is B × (longest length) tokens, and every padding token costs
as much compute as a real one. A packed batch is one row holding the conversations end to end;
three things keep each conversation's loss and gradient exactly what they were padded:

- ``packed_position_ids``: the 4-row position ids Qwen2.5-VL's text model takes in transformers
  5.24 (``Qwen2_5_VLTextModel.forward``: row 0 the plain text positions, restarting at 0 for every
  conversation, rows 1–3 the M-RoPE (t, h, w) ids of ``get_rope_index`` computed per conversation).
  Row 0 is what keeps attention inside each conversation on the CPU (sdpa / eager) path: with no
  ``attention_mask``, ``masking_utils.find_packed_sequence_indices`` starts a new sequence wherever
  row 0 does not step by 1 and the causal mask becomes block-diagonal. Flash-attention kernels take
  the same boundaries as ``cu_seqlens`` (``cu_seq_lens``), the idea notebook 06 uses for the
  vision windows.
- labels unchanged per conversation; the first token of each is never labelled (the last token of
  the previous conversation would otherwise "predict" it), so the shifted loss never crosses a seam.
- ``pixel_values`` / ``image_grid_thw`` concatenated in order, ``mm_token_type_ids`` end to end.

``PackingCollator`` does this for the course's samples (the packed twin of ``helpers.sft.SFTCollator``).
It mirrors what TRL's ``DataCollatorForLanguageModeling(padding_free=True)`` and transformers'
``DataCollatorWithFlattening`` do for text (one row, positions restarting at 0, ``cu_seq_lens``);
TRL 1.16 has no padding-free route for vision data (``SFTTrainer`` refuses ``padding_free=True``
and ``packing=True`` on a vision dataset, and ``DataCollatorForVisionLanguageModeling`` pads).

Also here: ``padding_stats`` / ``pack_lengths`` (what padding costs, first-fit-decreasing bins like
TRL's "bfd" packing), ``synthetic_item`` (an encoded conversation of given shape, for benchmarks)
and the notebook's layout picture and widget. One attention call over many segments lives in
``helpers.segment_attention``.
"""

from __future__ import annotations

import numpy as np
import torch

from helpers.chat import IGNORE_INDEX
from helpers.plots import COLOURS, new_figure
from helpers.rope import rope_index
from helpers.tokenizer import SPECIAL_TOKENS
from helpers.widgets import View, register_widget

IMAGE_PAD = SPECIAL_TOKENS["<|image_pad|>"]
ITEM_KEYS = ("input_ids", "labels", "mm_token_type_ids", "pixel_values", "image_grid_thw")


# ---------------------------------------------------------------------------------------------
# The packed row
# ---------------------------------------------------------------------------------------------


def text_positions(lengths) -> torch.Tensor:
    """0, 1, …, n₁−1, 0, 1, …, n₂−1, …: the positions TRL's padding-free collator gives a packed row
    (``DataCollatorForLanguageModeling.get_position_ids_from_packed_seq_lengths``)."""
    lengths = _check_lengths(lengths)
    return torch.cat([torch.arange(n) for n in lengths])


def cu_seqlens(lengths) -> torch.Tensor:
    """[0, n₁, n₁+n₂, …] as int32: the boundaries flash attention's varlen kernels take
    (TRL's ``cu_seq_lens_q``; the vision tower's ``cu_seqlens``)."""
    lengths = _check_lengths(lengths)
    return torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)


def _check_lengths(lengths) -> list[int]:
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths={lengths}: expected a non-empty list of integers ≥ 1")
    return lengths


def packed_position_ids(items: list[dict], spatial_merge_size: int = 2, tokens_per_second: float = 2) -> torch.Tensor:
    """(4, 1, total) position ids of the packed row: row 0 ``text_positions``, rows 1–3 each item's
    own ``get_rope_index`` (``helpers.rope.rope_index`` mirrors it), as if it were alone in its batch."""
    rows = [
        rope_index(
            it["input_ids"][None],
            it["image_grid_thw"],
            mm_token_type_ids=it["mm_token_type_ids"][None],
            spatial_merge_size=spatial_merge_size,
            tokens_per_second=tokens_per_second,
        )[0][:, 0]
        for it in items
    ]
    text = text_positions([len(it["input_ids"]) for it in items])
    return torch.cat([text[None], torch.cat(rows, dim=1)])[:, None]


def pack_items(items: list[dict], spatial_merge_size: int = 2, tokens_per_second: float = 2) -> dict:
    """Encoded items (``helpers.sft.encode_samples``) → one packed row, no ``attention_mask``.

    Keys: ``input_ids``, ``labels``, ``mm_token_type_ids`` (1, total); ``position_ids`` (4, 1, total);
    ``pixel_values`` / ``image_grid_thw`` concatenated in order; ``cu_seq_lens`` and ``seq_lengths``.
    """
    if not items:
        raise ValueError("items is empty: expected at least one encoded sample")
    for number, it in enumerate(items):
        missing = [k for k in ITEM_KEYS if k not in it]
        if missing:
            raise ValueError(f"item {number} lacks {missing}: expected the keys {ITEM_KEYS}")
        if it["labels"][0] != IGNORE_INDEX:
            raise ValueError(
                f"item {number} labels its first token: packed, the previous item's last token would "
                f"predict it; expected labels[0] == {IGNORE_INDEX}"
            )
    lengths = [len(it["input_ids"]) for it in items]
    cat = {k: torch.cat([it[k] for it in items])[None] for k in ("input_ids", "labels", "mm_token_type_ids")}
    return {
        **cat,
        "position_ids": packed_position_ids(items, spatial_merge_size, tokens_per_second),
        "pixel_values": torch.cat([it["pixel_values"] for it in items]),
        "image_grid_thw": torch.cat([it["image_grid_thw"] for it in items]),
        "cu_seq_lens": cu_seqlens(lengths),
        "seq_lengths": torch.tensor(lengths),
    }


class PackingCollator:
    """Samples → one packed row (``pack_items``): the padding-free twin of ``helpers.sft.SFTCollator``,
    with the same labels and the same checks (image tokens and answers that survive truncation)."""

    def __init__(
        self, processor, max_length: int | None = None, spatial_merge_size: int = 2, tokens_per_second: float = 2
    ):
        from helpers.sft import SFTCollator

        self.base = SFTCollator(processor, max_length)  # validates max_length
        self.merge, self.tokens_per_second = spatial_merge_size, tokens_per_second

    def __call__(self, samples) -> dict:
        from helpers.sft import check_batch, encode_samples, pad_batch

        items = encode_samples(self.base.processor, samples, True, self.base.max_length)
        check_batch(pad_batch(items), items[0]["merge"])
        return pack_items(items, self.merge, self.tokens_per_second)


def token_count(batch: dict) -> int:
    """Real (non-padding) tokens of a padded or a packed batch."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


# ---------------------------------------------------------------------------------------------
# What padding costs
# ---------------------------------------------------------------------------------------------


def padding_stats(lengths, batch_size: int) -> dict:
    """Tokens computed when ``lengths`` are padded in consecutive batches of ``batch_size``
    (each batch as wide as its longest member) against packed (exactly the real tokens)."""
    lengths = _check_lengths(lengths)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected an integer ≥ 1")
    chunks = [lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)]
    padded = sum(len(c) * max(c) for c in chunks)
    real = sum(lengths)
    return {"real": real, "padded": padded, "padding_fraction": 1 - real / padded}


def pack_lengths(lengths, budget: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``budget`` tokens, first fit in decreasing
    order (the "bfd" strategy of TRL's ``pack_dataset``, without splitting a sequence)."""
    lengths = _check_lengths(lengths)
    if max(lengths) > budget:
        raise ValueError(f"budget={budget}: smaller than the longest sequence ({max(lengths)} tokens)")
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((b for b, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            bins.append([]), room.append(budget)
            slot = len(bins) - 1
        bins[slot].append(i)
        room[slot] -= lengths[i]
    return bins


MIXES = {  # (text tokens low, high), (image side low, high) in pixels
    "chat (long tail)": ((20, 600), (56, 448)),
    "uniform": ((200, 1000), (448, 1024)),
    "course shapes": ((30, 45), (84, 112)),
}


def length_mix(mix: str, n: int, seed: int = 0, merge_pixels: int = 28) -> list[int]:
    """``n`` sequence lengths (text + image tokens) of a named mix: text log-uniform in its range,
    one square image of a side drawn in its range (rounded to ``merge_pixels``), (side/28)² tokens."""
    if mix not in MIXES:
        raise ValueError(f"mix={mix!r}: expected one of {list(MIXES)}")
    (t_lo, t_hi), (s_lo, s_hi) = MIXES[mix]
    rng = np.random.default_rng(seed)
    text = np.exp(rng.uniform(np.log(t_lo), np.log(t_hi), n)).astype(int)
    side = (rng.uniform(s_lo, s_hi, n) // merge_pixels).astype(int)
    return [int(t + s * s) for t, s in zip(text, side)]


def synthetic_item(
    rng: np.random.Generator,
    text_tokens: int,
    image_hw: tuple[int, int],
    labelled: float,
    patch_size: int = 14,
    merge: int = 2,
    temporal_patch: int = 2,
    vocab: int = 151643,
) -> dict:
    """An encoded conversation shaped like real VLM SFT (the layout of ``encode_samples``' items):
    ``<|im_start|>``, a prompt with one image of ``image_hw`` pixels (multiples of patch·merge), then
    an answer making up ``labelled`` of the text tokens, labelled, ending in ``<|im_end|>``.
    Token ids and pixels are random: for timing and memory, not for learning."""
    h, w = (int(s) // patch_size for s in image_hw)
    if h % merge or w % merge or h < merge or w < merge:
        raise ValueError(f"image_hw={image_hw}: expected sides that are positive multiples of {patch_size * merge}")
    if not 0 < labelled < 1 or text_tokens < 8:
        raise ValueError(f"labelled={labelled}, text_tokens={text_tokens}: expected 0 < labelled < 1, text_tokens ≥ 8")
    answer = min(max(1, int(text_tokens * labelled)), text_tokens - 4)
    prompt = text_tokens - answer - 3
    image = h * w // merge**2
    ids = torch.cat(
        [
            torch.tensor([SPECIAL_TOKENS["<|im_start|>"], SPECIAL_TOKENS["<|vision_start|>"]]),
            torch.full((image,), IMAGE_PAD),
            torch.tensor([SPECIAL_TOKENS["<|vision_end|>"]]),
            torch.from_numpy(rng.integers(0, vocab, prompt + answer - 1)),
            torch.tensor([SPECIAL_TOKENS["<|im_end|>"]]),
        ]
    )
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[-answer:] = ids[-answer:]
    return {
        "input_ids": ids,
        "labels": labels,
        "mm_token_type_ids": (ids == IMAGE_PAD).int(),
        "pixel_values": torch.from_numpy(
            rng.standard_normal((h * w, 3 * temporal_patch * patch_size**2), dtype=np.float32)
        ),
        "image_grid_thw": torch.tensor([[1, h, w]]),
        "merge": merge,
    }


def interleaved_times(runs: dict, repeats: int = 5) -> dict[str, list[float]]:
    """Seconds of each callable in ``runs`` over ``repeats`` rounds, the order alternating every
    round (a busy machine slows neighbours alike): compare them as per-round ratios, not as absolutes."""
    import time

    times = {name: [] for name in runs}
    for round_ in range(repeats):
        for name in list(runs) if round_ % 2 == 0 else list(runs)[::-1]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------------------------------------
# Picture and widget
# ---------------------------------------------------------------------------------------------


def layout_figure(lengths, batch_size: int, budget: int | None = None):
    """Padded batches (left: one bar per sequence, grey the padding) beside packed rows (right:
    ``pack_lengths`` bins of ``budget`` tokens, default the padded batch's token count)."""
    stats = padding_stats(lengths, batch_size)
    budget = budget or max(max(lengths), stats["padded"] // -(-len(lengths) // batch_size))
    figure, (left, right) = new_figure(ncols=2, width=10.5, height=3.6)
    width = 0
    for row, n in enumerate(lengths):
        chunk = row // batch_size
        top = max(lengths[chunk * batch_size : (chunk + 1) * batch_size])
        width = max(width, top)
        left.barh(row, n, color=COLOURS["text"], height=0.8)
        left.barh(row, top - n, left=n, color=COLOURS["pad"], height=0.8)
    left.set(
        title=f"padded, batch {batch_size}: {stats['padding_fraction']:.0%} padding", xlabel="tokens", ylabel="sequence"
    )
    left.invert_yaxis()
    for row, members in enumerate(pack_lengths(lengths, budget)):
        start = 0
        for k, i in enumerate(members):
            right.barh(
                row,
                lengths[i],
                left=start,
                color=COLOURS["text" if k % 2 == 0 else "accent"],
                edgecolor="white",
                height=0.8,
            )
            start += lengths[i]
    right.set(title=f"packed into rows of ≤ {budget} tokens", xlabel="tokens", ylabel="row")
    right.invert_yaxis()
    return figure, stats


def packed_row_figure(position_ids: torch.Tensor, seq_lengths, mm_token_type_ids: torch.Tensor | None = None):
    """Left: the four position-id rows of a packed row against the token index (text row restarting
    per conversation, image tokens shaded). Right: which keys each query may see (causal, inside
    its own conversation), the mask transformers builds from the text row."""
    figure, (left, right) = new_figure(ncols=2, width=11, height=3.6)
    rows = position_ids[:, 0]
    for row, (name, colour) in enumerate(zip(("text", "t", "h", "w"), ("special", "text", "image", "video"))):
        left.plot(rows[row].numpy(), label=name, color=COLOURS[colour], lw=1.2 if row else 2.0, alpha=0.9)
    if mm_token_type_ids is not None:
        image = mm_token_type_ids.flatten().numpy() == 1
        left.fill_between(
            np.arange(len(image)),
            0,
            rows.max().item(),
            where=image,
            color=COLOURS["image"],
            alpha=0.12,
            step="mid",
            label="image tokens",
        )
    for edge in np.cumsum(seq_lengths)[:-1]:
        left.axvline(edge - 0.5, color=COLOURS["pad"], lw=0.8, ls="--")
    left.set(title="position ids of the packed row", xlabel="token", ylabel="position id")
    left.legend(ncols=5, fontsize=7, loc="upper left")
    segment = torch.repeat_interleave(torch.arange(len(seq_lengths)), torch.as_tensor(seq_lengths))
    visible = (segment[:, None] == segment[None, :]) & torch.ones(len(segment), len(segment), dtype=torch.bool).tril()
    right.imshow(visible.numpy(), cmap="Blues", interpolation="nearest")
    right.set(title="attention: causal, inside each conversation", xlabel="key", ylabel="query")
    right.grid(False)
    return figure


@register_widget(
    "12_packing",
    {"mix": "chat (long tail)", "batch_size": 8, "n": 32},
    [{"mix": "uniform"}, {"batch_size": 2}, {"mix": "course shapes", "n": 16}],
)
def layout_view(mix: str = "chat (long tail)", batch_size: int = 8, n: int = 32) -> View:
    """Widget: a length mix and a batch size → the padded and packed layouts and the padding fraction."""
    lengths = length_mix(mix, n)
    figure, stats = layout_figure(lengths, batch_size)
    text = (
        f"{n} sequences, {stats['real']:,} real tokens; padded in batches of {batch_size}: "
        f"{stats['padded']:,} tokens computed, {stats['padding_fraction']:.1%} of them padding; packed: none"
    )
    return View(text=text, figure=figure, data=stats)

"""Conversations for training and their loss mask (taught in notebooks/01_chat_template.ipynb,
used by notebooks/10_sft.ipynb and helpers.sft).

A training example is a conversation whose last turn is the assistant's answer. Only the answer's
tokens and the ``<|im_end|>`` that closes it carry loss; everything else (system and user turns,
vision tokens, the ``<|im_start|>assistant\\n`` header, the newline after ``<|im_end|>``, padding)
is masked out.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from helpers.boxes import box_to_resized, fenced_grounding_answer
from helpers.constants import FACTOR
from helpers.plots import COLOURS, new_figure
from helpers.qwen import load_processor
from helpers.tokenizer import SPECIAL_TOKENS
from helpers.vision import FACE_BOX, course_photo, smart_resize
from helpers.widgets import View, register_widget

IM_START = SPECIAL_TOKENS["<|im_start|>"]
IM_END = SPECIAL_TOKENS["<|im_end|>"]
ASSISTANT_HEADER = (IM_START, 77091, 198)  # "<|im_start|>", "assistant", "\n"
IGNORE_INDEX = -100  # what transformers' and TRL's losses skip


def format_data(image, prompt: str, answer: str | None = None, system: str | None = None) -> list[dict]:
    """A one-image conversation in the messages format that ``apply_chat_template`` and
    ``qwen_vl_utils.process_vision_info`` read: optional system turn, the user turn (image, then
    the prompt), and, for training, the assistant's ``answer``.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt={prompt!r}: expected a non-empty string")
    if answer is not None and not isinstance(answer, str):
        raise ValueError(f"answer={answer!r}: expected a string or None")
    if image is None:
        raise ValueError("image=None: expected a PIL image, a path or a URL")
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]})
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def assistant_loss_mask(input_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """1 on every token that holds characters of an assistant answer, and on the ``<|im_end|>``
    that closes it; 0 elsewhere (same shape as ``input_ids``, 1-D or 2-D): the tokens whose
    character offsets overlap an answer, found from token ids alone, so it holds for any chat
    template producing Qwen2.5-VL's format and for left or right padding.

    The header ``<|im_start|>assistant\\n`` is found by its first two tokens only: its newline can
    merge with an answer's leading whitespace (an answer "\\nHi" gives "\\n\\n", id 271, then
    "Hi"). The token after ``assistant`` is the header's alone when it is "\\n" (id 198); any
    other token there also holds the answer's first characters, so it carries loss.
    """
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2:
        return torch.stack([assistant_loss_mask(row) for row in ids])
    if ids.dim() != 1:
        raise ValueError(f"input_ids has shape {tuple(ids.shape)}: expected 1-D or 2-D")
    mask = torch.zeros_like(ids, dtype=torch.long)
    values = ids.tolist()
    role = ASSISTANT_HEADER[:2]  # <|im_start|>, "assistant"
    position = 0
    while position < len(values):
        if tuple(values[position : position + 2]) == role:
            start = position + 2
            if start < len(values) and values[start] == ASSISTANT_HEADER[2]:
                start += 1  # the header's own newline, not merged with the answer
            end = start
            while end < len(values) and values[end] != IM_END:
                end += 1
            mask[start : min(end + 1, len(values))] = 1  # the answer and its <|im_end|> (if present)
            position = end + 1
        else:
            position += 1
    return mask


def labels_from_mask(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``input_ids`` where ``mask`` is 1, ``IGNORE_INDEX`` elsewhere (the ``labels`` of a batch)."""
    return torch.where(
        mask.bool(), torch.as_tensor(input_ids), torch.full_like(torch.as_tensor(input_ids), IGNORE_INDEX)
    )


# ---------------------------------------------------------------------------------------------
# Checking messages (what the chat template accepts)
# ---------------------------------------------------------------------------------------------

ROLES = ("system", "user", "assistant", "tool")
PART_TYPES = ("text", "image", "video")


def check_messages(messages) -> None:
    """Raise a clear error for what our chat template would reject or silently drop: a message
    that is not a dict, an unknown role, content that is neither a string nor a list of parts, a
    part of an unknown type, a text part without a string.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError(f"messages={messages!r}: expected a non-empty list of {{'role', 'content'}} dicts")
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise TypeError(f"messages[{number}]={message!r}: expected a dict with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise ValueError(f"messages[{number}] has role {message['role']!r}; accepted: {', '.join(ROLES)}")
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise TypeError(f"messages[{number}]['content']={content!r}: expected a string or a list of parts")
        for index, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in PART_TYPES:
                raise ValueError(
                    f"messages[{number}]['content'][{index}] has type {kind!r}; accepted: {', '.join(PART_TYPES)}"
                )
            if kind == "text" and not isinstance(part.get("text"), str):
                raise TypeError(f"messages[{number}]['content'][{index}]: a text part needs a string 'text'")


# ---------------------------------------------------------------------------------------------
# Token ids: vision pads, kinds, pieces
# ---------------------------------------------------------------------------------------------

IMAGE_PAD = SPECIAL_TOKENS["<|image_pad|>"]
VIDEO_PAD = SPECIAL_TOKENS["<|video_pad|>"]
FIRST_SPECIAL = min(SPECIAL_TOKENS.values())
KINDS = ("text", "special", "image", "video", "pad")  # what a token is, for colours and pictures


def token_kind(token_id: int, pad_id: int | None = None) -> str:
    """ "image" / "video" for the vision pads, "pad" for padding, "special" for other special
    tokens, "text" otherwise."""
    if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
        raise ValueError(f"token_id={token_id!r}: expected a token id, an integer ≥ 0")
    if token_id == IMAGE_PAD:
        return "image"
    if token_id == VIDEO_PAD:
        return "video"
    if pad_id is not None and token_id == pad_id:
        return "pad"
    return "special" if token_id >= FIRST_SPECIAL else "text"


def expand_vision_pads(
    input_ids: Sequence[int], image_tokens: Sequence[int] = (), video_tokens: Sequence[int] = ()
) -> list[int]:
    """Repeat the k-th ``<|image_pad|>`` ``image_tokens[k]`` times (videos likewise): what the
    processor does to the chat template's single placeholder (``Qwen2_5_VLProcessor.__call__``),
    with ``image_grid_thw.prod() // 4`` tokens per image. Raises if the counts do not match the
    placeholders, the mismatch behind "Image features and image tokens do not match".
    """
    ids = list(input_ids)
    for pad, counts, name in ((IMAGE_PAD, image_tokens, "image"), (VIDEO_PAD, video_tokens, "video")):
        found = ids.count(pad)
        if found != len(counts):
            raise ValueError(
                f"the text has {found} <|{name}_pad|> placeholder(s) for {len(counts)} {name}(s); "
                f"need one placeholder per {name}"
            )
    images, videos, out = iter(image_tokens), iter(video_tokens), []
    for token in ids:
        if token == IMAGE_PAD:
            out += [IMAGE_PAD] * next(images)
        elif token == VIDEO_PAD:
            out += [VIDEO_PAD] * next(videos)
        else:
            out.append(token)
    return out


def token_pieces(input_ids: Sequence[int], tokenizer) -> list[str]:
    """Each id decoded on its own, with spaces shown as ␣ and newlines as ↵ (a piece that is part
    of a multi-byte character decodes to �)."""
    return [tokenizer.decode([int(i)]).replace(" ", "␣").replace("\n", "↵") for i in input_ids]


def special_token_table(tokenizer) -> list[tuple[int, str]]:
    """(id, token) of every added token the tokenizer holds, in id order, read from it
    (``added_tokens_decoder``): Qwen2.5-VL's 22, of which the checkpoint marks 14 special
    (``added_tokens_decoder[id].special``); ``<tool_call>`` … ``<|file_sep|>`` are not."""
    return sorted((int(i), token.content) for i, token in tokenizer.added_tokens_decoder.items())


# ---------------------------------------------------------------------------------------------
# Pictures: token chips (HTML) and the loss-mask strip
# ---------------------------------------------------------------------------------------------

_CHIP_BACKGROUND = {"text": "#DCEBF7", "special": "#FBE3B5", "image": "#C9EDE0", "video": "#F3D9E9", "pad": "#E6E6E6"}


def token_chips_html(
    input_ids: Sequence[int], tokenizer, mask: Sequence[int] | None = None, collapse: int = 4, pad_id: int | None = None
) -> str:
    """Tokens as coloured chips (piece above, id below), coloured by kind; tokens with ``mask``
    1 (they carry loss) get a thick border in the loss colour. Runs of more than ``collapse`` equal
    vision or pad tokens are drawn as one chip "×n"."""
    import html as html_lib

    ids = [int(i) for i in input_ids]
    mask = [0] * len(ids) if mask is None else [int(m) for m in mask]
    pieces = token_pieces(ids, tokenizer)
    chips, position = [], 0
    while position < len(ids):
        token, kind = ids[position], token_kind(ids[position], pad_id)
        run = 1
        if kind in ("image", "video", "pad"):
            while position + run < len(ids) and ids[position + run] == token and mask[position + run] == mask[position]:
                run += 1
        if run <= collapse:
            run = 1
        label = html_lib.escape(pieces[position]) + (f" ×{run}" if run > 1 else "")
        border = f"2px solid {COLOURS['loss']}" if mask[position] else "1px solid #bbb"
        chips.append(
            f'<span style="display:inline-block;margin:1px;padding:0 3px;border-radius:3px;'
            f'background:{_CHIP_BACKGROUND[kind]};border:{border};font:11px monospace;text-align:center">'
            f'{label}<br><span style="font-size:9px;color:#555">{token}</span></span>'
        )
        position += run
    legend = " ".join(f'<span style="background:{c};padding:0 4px">{k}</span>' for k, c in _CHIP_BACKGROUND.items())
    return (
        f'<div style="line-height:1.1">{"".join(chips)}</div><div style="font:11px sans-serif">{legend} '
        f'<span style="border:2px solid {COLOURS["loss"]};padding:0 4px">carries loss</span></div>'
    )


def loss_mask_figure(input_ids, mask, pad_id: int | None = None, title: str = "", legend: bool = True):
    """Picture of which tokens carry loss: for each row of ``input_ids`` (1-D or 2-D), one strip of
    token kinds and below it one strip of the mask (loss colour = trained on). One image in one
    axes, so it renders fast enough for a widget (``legend=False`` there: the chips carry one)."""
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    ids = torch.as_tensor(input_ids).reshape(-1, torch.as_tensor(input_ids).shape[-1])  # (rows, tokens)
    masks = torch.as_tensor(mask).reshape(ids.shape)
    kind_rgb = {k: to_rgb(COLOURS[k]) for k in KINDS}
    loss_rgb = (to_rgb("#F2F2F2"), to_rgb(COLOURS["loss"]))
    picture, labels = [], []
    for row in range(ids.shape[0]):  # two picture rows per sequence: kinds, then mask
        picture.append([kind_rgb[token_kind(int(t), pad_id)] for t in ids[row]])
        picture.append([loss_rgb[int(m)] for m in masks[row]])
        suffix = f" {row}" if ids.shape[0] > 1 else ""
        labels += [f"token{suffix}", f"loss{suffix}"]
    figure, axis = new_figure(1, 1, width=8.0, height=0.35 * len(picture) + (1.0 if legend else 0.6))
    axis.imshow(picture, aspect="auto", interpolation="nearest")  # (2·rows, tokens, RGB)
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("token position")
    axis.grid(False)
    if legend:
        handles = [Patch(color=COLOURS[k], label=k) for k in KINDS] + [
            Patch(color=COLOURS["loss"], label="carries loss")
        ]
        figure.legend(handles=handles, loc="outside upper center", ncols=6, fontsize=8)
    if title:
        axis.set_title(title)
    return figure


# ---------------------------------------------------------------------------------------------
# Notebook 01's example conversation and widget
# ---------------------------------------------------------------------------------------------

EXAMPLE_SYSTEM = "You locate objects in pictures and answer in JSON."
EXAMPLE_QUESTION = "Where is the woman's face?"
SECOND_QUESTION = "What is she wearing on her head?"
SECOND_ANSWER = "A white-topped naval officer's cap."


@functools.lru_cache(maxsize=1)
def course_processor():
    """The offline course processor with the checkpoint's default limits (cached)."""
    return load_processor()


@functools.lru_cache(maxsize=1)
def course_clip():
    """A tiny synthetic video for the examples: 4 RGB frames of 56×84, a bright square moving."""
    import numpy as np

    frames = np.zeros((4, 56, 84, 3), dtype=np.uint8)
    for t in range(4):
        frames[t, 10:30, 10 + 15 * t : 30 + 15 * t] = (255, 200, 0)
    return frames


def example_answer() -> str:
    """The grounding answer for the course photo: its face box in pixels of the resized image."""
    original = course_photo().size[::-1]  # (H, W)
    processor = course_processor().image_processor
    resized = smart_resize(*original, FACTOR, processor.size["shortest_edge"], processor.size["longest_edge"])
    return fenced_grounding_answer([(box_to_resized(FACE_BOX, original, resized), "face")])


def example_conversation(
    user_text: str = EXAMPLE_QUESTION,
    system: bool = False,
    image: bool = True,
    video: bool = False,
    second_turn: bool = False,
    answer: bool = True,
) -> list[dict]:
    """The conversation notebook 01 plays with: optional custom system turn, a user turn with the
    course photo and/or clip and ``user_text``, the assistant's grounding answer, optionally a
    second question and answer."""
    user = (
        ([{"type": "image", "image": course_photo()}] if image else [])
        + ([{"type": "video", "video": course_clip()}] if video else [])
        + [{"type": "text", "text": user_text}]
    )
    messages = [{"role": "system", "content": [{"type": "text", "text": EXAMPLE_SYSTEM}]}] if system else []
    messages.append({"role": "user", "content": user})
    if answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": example_answer()}]})
        if second_turn:
            messages += [
                {"role": "user", "content": [{"type": "text", "text": SECOND_QUESTION}]},
                {"role": "assistant", "content": [{"type": "text", "text": SECOND_ANSWER}]},
            ]
    return messages


def vision_inputs(messages) -> tuple[list, list]:
    """The images and videos of ``messages`` in order (what ``process_vision_info`` collects)."""
    images, videos = [], []
    for message in messages:
        for part in message["content"] if not isinstance(message["content"], str) else []:
            if part["type"] == "image":
                images.append(part["image"])
            elif part["type"] == "video":
                videos.append(part["video"])
    return images, videos


def _grid_tokens(kind: str, value) -> int:
    processor = course_processor()
    if kind == "image":
        grid = processor.image_processor(images=[value], return_tensors="pt")["image_grid_thw"][0]
    else:
        grid = processor.video_processor(videos=[value], return_tensors="pt")["video_grid_thw"][0]
    return int(grid.prod()) // 4


@functools.lru_cache(maxsize=2)
def _course_media_tokens(kind: str) -> int:
    return _grid_tokens(kind, course_photo() if kind == "image" else course_clip())


def visual_token_count(kind: str, value) -> int:
    """Visual tokens of one image or video under the course processor: ``grid_thw.prod() // 4``
    (cached for the course photo and clip, which the widget uses on every update)."""
    if (kind == "image" and value is course_photo()) or (kind == "video" and value is course_clip()):
        return _course_media_tokens(kind)
    return _grid_tokens(kind, value)


def render_conversation(messages, add_generation_prompt: bool = False) -> tuple[str, list[int], torch.Tensor]:
    """(prompt text, input_ids with vision pads expanded, loss mask) of a conversation, as the
    course processor makes them: ``apply_chat_template`` → tokenizer → one pad per visual token."""
    check_messages(messages)
    processor = course_processor()
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    images, videos = vision_inputs(messages)
    ids = expand_vision_pads(
        processor.tokenizer(text)["input_ids"],
        [visual_token_count("image", i) for i in images],
        [visual_token_count("video", v) for v in videos],
    )
    return text, ids, assistant_loss_mask(ids)


def after_last_header_mask(input_ids: Sequence[int]) -> torch.Tensor:
    """A common collator rule, for comparison: train on every token after the *last*
    ``<|im_start|>assistant\\n``. With a generation prompt after the answer, nothing is left."""
    values = list(input_ids)
    mask = torch.zeros(len(values), dtype=torch.long)
    header = len(ASSISTANT_HEADER)
    starts = [p for p in range(len(values) - header + 1) if tuple(values[p : p + header]) == ASSISTANT_HEADER]
    if starts:
        mask[starts[-1] + header :] = 1
    return mask


_CONVERSATION_DEFAULTS = {
    "user_text": EXAMPLE_QUESTION,
    "system": False,
    "image": True,
    "video": False,
    "second_turn": False,
    "generation_prompt": False,
}


@register_widget(
    "01_chat_template",
    _CONVERSATION_DEFAULTS,
    [
        {"system": True, "video": True, "second_turn": True},
        {"image": False, "generation_prompt": True},
        {"user_text": "Describe this image in one sentence, please."},
    ],
)
def conversation_view(
    user_text: str = EXAMPLE_QUESTION,
    system: bool = False,
    image: bool = True,
    video: bool = False,
    second_turn: bool = False,
    generation_prompt: bool = False,
) -> View:
    """Widget of 01: a conversation's switches → its prompt, token count, coloured tokens and mask."""
    import html as html_lib

    if not user_text.strip():
        return View(html="<b>rejected:</b> the user text is empty", data={"error": "empty user text"})
    messages = example_conversation(user_text, system, image, video, second_turn)
    text, ids, mask = render_conversation(messages, add_generation_prompt=generation_prompt)
    trained = int(mask.sum())
    warning = (
        "<p style='color:#D55E00'><b>Trap:</b> this conversation already holds the answer; the "
        "generation prompt adds a dangling <code>&lt;|im_start|&gt;assistant↵</code> (3 tokens).</p>"
        if generation_prompt
        else ""
    )
    note = "" if system else " (no system message given: the template inserted the default one)"
    html = (
        f"<b>{len(ids)} tokens</b> ({ids.count(IMAGE_PAD)} image pads, {ids.count(VIDEO_PAD)} video pads), "
        f"<b>{trained}</b> carry loss{note}.{warning}"
        f"<pre style='font-size:11px;white-space:pre-wrap'>{html_lib.escape(text)}</pre>"
        + token_chips_html(ids, course_processor().tokenizer, mask)
    )
    figure = loss_mask_figure(ids, mask, legend=False)
    return View(
        html=html, figure=figure, data={"text": text, "ids": ids, "mask": mask, "tokens": len(ids), "trained": trained}
    )

"""Conversations for training and their loss mask (taught in notebooks/01_chat_template.ipynb,
used by notebooks/10_sft.ipynb and helpers.sft).

A training example is a conversation whose last turn is the assistant's answer. Only the answer's
tokens and the ``<|im_end|>`` that closes it carry loss; everything else (system and user turns,
vision tokens, the ``<|im_start|>assistant\\n`` header, the newline after ``<|im_end|>``, padding)
is masked out.
"""

from __future__ import annotations

from typing import Sequence

import torch

from helpers.qwen import SPECIAL_TOKENS

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
    """1 on each assistant answer and its closing ``<|im_end|>``, 0 elsewhere (same shape as
    ``input_ids``, 1-D or 2-D). Works on token ids alone, so it holds for any chat template
    producing Qwen2.5-VL's format and for left or right padding.
    """
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2:
        return torch.stack([assistant_loss_mask(row) for row in ids])
    if ids.dim() != 1:
        raise ValueError(f"input_ids has shape {tuple(ids.shape)}: expected 1-D or 2-D")
    mask = torch.zeros_like(ids, dtype=torch.long)
    values = ids.tolist()
    header = len(ASSISTANT_HEADER)
    position = 0
    while position < len(values):
        if tuple(values[position:position + header]) == ASSISTANT_HEADER:
            start = position + header
            end = start
            while end < len(values) and values[end] != IM_END:
                end += 1
            mask[start:min(end + 1, len(values))] = 1  # the answer and its <|im_end|> (if present)
            position = end + 1
        else:
            position += 1
    return mask


def labels_from_mask(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``input_ids`` where ``mask`` is 1, ``IGNORE_INDEX`` elsewhere (the ``labels`` of a batch)."""
    return torch.where(mask.bool(), torch.as_tensor(input_ids), torch.full_like(torch.as_tensor(input_ids), IGNORE_INDEX))

"""helpers.chat (notebook 01): messages, prompts, vision pads, the loss mask, grounding answers."""

import numpy as np
import pytest
import torch

from helpers import chat
from helpers.boxes import parse_grounding
from helpers.chat import (
    IGNORE_INDEX,
    assistant_loss_mask,
    course_processor,
    example_conversation,
    expand_vision_pads,
    format_data,
    labels_from_mask,
    render_conversation,
)
from helpers.tokenizer import SPECIAL_TOKENS
from helpers.vision import course_photo
from helpers.widgets import REGISTRY, render

SWITCHES = [
    dict(system=s, image=i, video=v, second_turn=t)
    for s in (False, True)
    for i in (False, True)
    for v in (False, True)
    for t in (False, True)
]


@pytest.fixture(scope="module")
def processor():
    return course_processor()


def test_special_token_table_read_from_tokenizer(processor):
    table = chat.special_token_table(processor.tokenizer)
    assert dict((token, i) for i, token in table) == SPECIAL_TOKENS
    assert table[0] == (151643, "<|endoftext|>") and (151655, "<|image_pad|>") in table


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "-".join(k for k, v in s.items() if v) or "plain")
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_render_conversation_equals_processor(processor, switches, generation_prompt):
    messages = example_conversation("Where is the cap?", **switches)
    text, ids, mask = render_conversation(messages, add_generation_prompt=generation_prompt)
    assert text == processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    images, videos = chat.vision_inputs(messages)
    out = processor(text=[text], images=images or None, videos=videos or None, return_tensors="pt")
    assert ids == out["input_ids"][0].tolist()
    torch.testing.assert_close(mask, assistant_loss_mask(out["input_ids"][0]))


def test_mask_covers_exactly_each_answer_and_its_im_end(processor):
    for switches in SWITCHES:
        messages = example_conversation(**switches)
        _, ids, mask = render_conversation(messages)
        answers = [m["content"][0]["text"] for m in messages if m["role"] == "assistant"]
        trained = processor.tokenizer.decode([i for i, m in zip(ids, mask) if m])
        assert trained == "".join(a + "<|im_end|>" for a in answers)
        vision = [m for i, m in zip(ids, mask) if i in (chat.IMAGE_PAD, chat.VIDEO_PAD)]
        assert not any(vision)


def test_mask_on_padded_batch_both_sides(processor):
    _, ids, _ = render_conversation(example_conversation(image=False))
    pad = SPECIAL_TOKENS["<|endoftext|>"]
    right, left = torch.tensor([ids + [pad] * 5]), torch.tensor([[pad] * 5 + ids])
    assert assistant_loss_mask(right)[0, -5:].sum() == 0 and assistant_loss_mask(left)[0, :5].sum() == 0
    assert assistant_loss_mask(right).sum() == assistant_loss_mask(left).sum() == assistant_loss_mask(ids).sum()
    labels = labels_from_mask(right, assistant_loss_mask(right))
    assert (labels == IGNORE_INDEX).sum() == right.numel() - assistant_loss_mask(right).sum()
    with pytest.raises(ValueError, match="expected 1-D or 2-D"):
        assistant_loss_mask(torch.zeros(1, 2, 3, dtype=torch.long))


def test_generation_prompt_after_answer_is_the_trap(processor):
    messages = example_conversation(image=False)
    _, good, good_mask = render_conversation(messages)
    _, bad, bad_mask = render_conversation(messages, add_generation_prompt=True)
    assert bad[: len(good)] == good and bad[len(good) :] == list(chat.ASSISTANT_HEADER)
    assert torch.equal(bad_mask[: len(good)], good_mask) and bad_mask[len(good) :].sum() == 0
    assert chat.after_last_header_mask(good).sum() == good_mask.sum() + 1  # + the final newline
    assert chat.after_last_header_mask(bad).sum() == 0  # nothing left to learn from


def test_expand_vision_pads_counts_and_errors():
    ids = [1, chat.IMAGE_PAD, 2, chat.VIDEO_PAD, chat.IMAGE_PAD]
    assert (
        expand_vision_pads(ids, [2, 3], [1])
        == [1, chat.IMAGE_PAD, chat.IMAGE_PAD, 2, chat.VIDEO_PAD] + [chat.IMAGE_PAD] * 3
    )
    with pytest.raises(ValueError, match="0 <\\|image_pad\\|> placeholder\\(s\\) for 1 image"):
        expand_vision_pads([1, 2], [5])
    with pytest.raises(ValueError, match="1 <\\|video_pad\\|> placeholder\\(s\\) for 2 video"):
        expand_vision_pads([chat.VIDEO_PAD], [], [3, 4])


def test_processor_rejects_missing_placeholder(processor):
    with pytest.raises(ValueError, match="Found total 0 <\\|image_pad\\|> tokens and 1 images"):
        processor(text=["Describe this."], images=[course_photo()])


def test_format_data_and_its_errors():
    messages = format_data("img", "Where?", "Here.", system="Be brief.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert format_data("img", "Where?")[-1]["role"] == "user"
    chat.check_messages(messages)
    for args, message in [(("img", ""), "prompt=''"), (("img", "Q", 3), "answer=3"), ((None, "Q"), "image=None")]:
        with pytest.raises(ValueError, match=message):
            format_data(*args)


@pytest.mark.parametrize(
    "messages, error, message",
    [
        ([{"role": "robot", "content": "hi"}], ValueError, "role 'robot'; accepted: system, user, assistant, tool"),
        ([{"role": "user", "content": [{"type": "audio"}]}], ValueError, "type 'audio'; accepted: text, image, video"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], TypeError, "needs a string 'text'"),
        ([{"role": "user", "content": 5}], TypeError, "expected a string or a list of parts"),
        ([{"content": "hi"}], TypeError, "expected a dict with 'role' and 'content'"),
        ([], TypeError, "non-empty list"),
    ],
)
def test_check_messages_rejects(messages, error, message):
    with pytest.raises(error, match=message):
        chat.check_messages(messages)


def test_template_itself_rejects_unknown_roles(processor):
    with pytest.raises(Exception, match="unknown message role robot"):
        processor.apply_chat_template([{"role": "robot", "content": "hi"}], tokenize=False)


def test_example_answer_is_in_resized_pixels(processor):
    box = parse_grounding(chat.example_answer())[0]["bbox_2d"]
    h, w = (v * 14 for v in processor.image_processor(images=[course_photo()])["image_grid_thw"][0][1:].tolist())
    assert box[2] <= w and box[3] <= h


def test_token_chips_and_pieces(processor):
    _, ids, mask = render_conversation(example_conversation())
    html = chat.token_chips_html(ids, processor.tokenizer, mask)
    assert f"×{ids.count(chat.IMAGE_PAD)}" in html and "151655" in html and "carries loss" in html
    assert chat.token_pieces([198, 220], processor.tokenizer) == ["↵", "␣"]
    assert [chat.token_kind(i, pad_id=151643) for i in (15, 151644, 151655, 151656, 151643)] == [
        "text",
        "special",
        "image",
        "video",
        "pad",
    ]


def test_conversation_view_and_registry():
    view = chat.conversation_view()
    assert view.data["tokens"] == len(view.data["ids"]) and view.data["trained"] == int(view.data["mask"].sum())
    assert "rejected" in chat.conversation_view(user_text="  ").html
    trap = chat.conversation_view(generation_prompt=True)
    assert trap.data["tokens"] == view.data["tokens"] + 3 and "Trap" in trap.html
    entries = [e for e in REGISTRY.values() if e.notebook == "01_chat_template"]
    assert len(entries) == 1
    for controls in [entries[0].defaults] + [{**entries[0].defaults, **v} for v in entries[0].variations]:
        html, png = render(entries[0].update(**controls))
        assert html and png


def test_loss_mask_figure_rows():
    ids = np.array([[151644, 15, 151645, 151643], [151644, 16, 17, 151645]])
    figure = chat.loss_mask_figure(ids, assistant_loss_mask(ids), pad_id=151643)
    assert len(figure.axes[0].get_yticks()) == 4


# Answers whose first characters can merge with the header's newline, and special characters.
EDGE_ANSWERS = [
    "\n\nHello",
    "\nHello",
    "\n",
    "\n\n\n",
    " Hello",
    "  Hello",
    "\tHello",
    "\r\nHello",
    " \nHello",
    "\n \nHello",
    "\t\n\tx",
    "```json\n[]\n```",
    "<box>(1,2)</box>",
    "😀 smile",
    "é",
    "'s fine",
    "42",
    "-",
    "Hello\n",
    "",
    " ",
]


def _offset_mask(text, tokenizer):
    """Reference: a token carries loss when its characters overlap an answer or its <|im_end|>
    (character offsets of the fast tokenizer; answer spans found in the prompt text)."""
    header, end_tag = "<|im_start|>assistant\n", "<|im_end|>"
    spans, cursor = [], text.find(header)
    while cursor >= 0:
        start = cursor + len(header)
        end = text.index(end_tag, start) + len(end_tag)
        spans.append((start, end))
        cursor = text.find(header, end)
    encoding = tokenizer(text, return_offsets_mapping=True)
    mask = [int(any(a < e and b > s for s, e in spans)) for a, b in encoding["offset_mapping"]]
    return encoding["input_ids"], torch.tensor(mask)


@pytest.mark.parametrize("answer", EDGE_ANSWERS, ids=repr)
def test_mask_equals_character_offsets(processor, answer):
    messages = [
        {"role": "user", "content": "Say it."},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": answer},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    ids, reference = _offset_mask(text, processor.tokenizer)
    mask = assistant_loss_mask(ids)
    torch.testing.assert_close(mask, reference)
    trained = processor.tokenizer.decode([i for i, m in zip(ids, mask) if m])
    one = answer + "<|im_end|>"
    assert trained in (one * 2, ("\n" + one) * 2)  # "\n" + …: the header's newline merged into the answer


def test_answer_starting_with_newline_carries_loss(processor):
    """The bug of issue 14: the header's "\\n" and the answer's "\\n" merge into id 271."""
    ids = processor.tokenizer("<|im_start|>assistant\n\nHello<|im_end|>")["input_ids"]
    assert ids[:3] == [chat.IM_START, 77091, 271]
    assert assistant_loss_mask(ids).tolist() == [0, 0, 1, 1, 1]


def test_ordinary_answers_keep_exactly_answer_and_im_end(processor):
    for answer in ("Hello", "A white-topped naval officer's cap.", chat.example_answer()):
        text = processor.apply_chat_template(
            [{"role": "user", "content": "Q"}, {"role": "assistant", "content": answer}], tokenize=False
        )
        ids = processor.tokenizer(text)["input_ids"]
        start = len(ids) - ids[::-1].index(chat.ASSISTANT_HEADER[0]) + 2  # after <|im_start|>assistant\n
        assert ids[start - 1] == 198
        expected = [0] * start + [1] * (ids.index(chat.IM_END, start) + 1 - start)
        expected += [0] * (len(ids) - len(expected))
        assert assistant_loss_mask(ids).tolist() == expected

"""Pictures of SFT (notebook 10): a batch coloured by token kind, the loss curve, predictions drawn
over their images, and the batch widget.
"""

from __future__ import annotations

import math

import torch

from helpers.chat import IGNORE_INDEX
from helpers.constants import TOKEN_PIXELS
from helpers.data import make_split
from helpers.plots import COLOURS, new_figure
from helpers.profiles import settings
from helpers.qwen import load_processor
from helpers.rewards import parse_answer, score
from helpers.sft import IMAGE_PAD, check_batch, encode_samples, pad_batch, truncate_item
from helpers.tokenizer import SPECIAL_TOKENS
from helpers.widgets import View, register_widget

TOKEN_KINDS = ("system / user text", "special", "vision", "answer (labelled)", "padding")


def token_kinds(batch: dict) -> torch.Tensor:
    """Per token: 0 text, 1 special, 2 vision, 3 labelled, 4 padding (what the batch picture colours)."""
    ids = batch["input_ids"]
    kind = torch.zeros_like(ids)
    kind[ids >= SPECIAL_TOKENS["<|endoftext|>"]] = 1
    kind[(ids == IMAGE_PAD) | (ids == SPECIAL_TOKENS["<|video_pad|>"])] = 2
    kind[batch["labels"] != IGNORE_INDEX] = 3
    kind[batch["attention_mask"] == 0] = 4
    return kind


def plot_batch(batch: dict, processor=None, width: float = 9.0):
    """A real batch as a picture: one row per sample, one cell per token, coloured by ``token_kinds``."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colours = [COLOURS["text"], COLOURS["special"], COLOURS["image"], COLOURS["loss"], "#dddddd"]
    kinds = token_kinds(batch)
    figure, ax = new_figure(width=width, height=0.9 + 0.28 * len(kinds))
    ax.imshow(kinds.numpy(), cmap=ListedColormap(colours), vmin=0, vmax=4, aspect="auto")
    ax.set_xlabel("token position")
    ax.set_ylabel("sample")
    ax.grid(False)
    ax.set_yticks(range(len(kinds)))
    ax.legend(
        handles=[Patch(color=c, label=k) for c, k in zip(colours, TOKEN_KINDS)],
        ncols=5,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.25 if len(kinds) > 4 else -0.45),
        fontsize=8,
    )
    return figure


def plot_training(history: dict, after: dict | None = None, title: str = "SFT", smooth: int = 10):
    """Loss per step (and its running mean) and the learning rate; final scores in the title."""
    figure, (ax, ax_lr) = new_figure(2, 1, width=9, height=3.2)
    steps, loss = history["step"], torch.tensor(history["loss"])
    ax.plot(steps, loss, color=COLOURS["loss"], alpha=0.35, lw=0.8, label="loss per step")
    if len(loss) >= smooth:
        running = loss.unfold(0, smooth, 1).mean(-1)
        ax.plot(steps[smooth - 1 :], running, color=COLOURS["loss"], label=f"mean of {smooth}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (labelled tokens)")
    ax.legend()
    ax.set_title(title)
    ax_lr.plot(steps, history["lr"], color=COLOURS["accent"])
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    if after:
        ax_lr.set_title(
            "after: "
            + "; ".join(
                f"{split} " + ", ".join(f"{t} {v:.2f}" for t, v in scores.items())
                for split, scores in after.items()
                if split != "val"
            ),
            fontsize=7,
        )
    return figure


def plot_predictions(pairs: list, ncols: int = 6, size: float = 1.6):
    """Each (sample, predicted text) as its image with the question, the answer and the prediction;
    grounding boxes drawn (reference green, prediction red dashed)."""
    from matplotlib.patches import Rectangle

    nrows = max(1, math.ceil(len(pairs) / ncols))
    import numpy as np

    figure, axes = new_figure(ncols, nrows, width=size * ncols, height=(size + 0.55) * nrows)
    axes = np.asarray(axes).reshape(-1)
    for ax in axes:
        ax.axis("off")
    for ax, (sample, text) in zip(axes, pairs):
        ax.imshow(sample.image)
        ok = float(score(sample.task, text, sample.target))
        if sample.task == "grounding":
            x1, y1, x2, y2 = sample.target
            ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, ec=COLOURS["image"], lw=1.5))
            box = parse_answer("grounding", text)
            if box is not None:
                ax.add_patch(
                    Rectangle(
                        (box[0] - 0.5, box[1] - 0.5),
                        box[2] - box[0],
                        box[3] - box[1],
                        fill=False,
                        ec=COLOURS["loss"],
                        lw=1.5,
                        ls="--",
                    )
                )
            shown = f"IoU {ok:.2f}"
        else:
            shown = f"→ {text.strip()[:12]!r} ({'✓' if ok == 1 else '✗'})"
        ax.set_title(f"{sample.question}\n[{sample.split}] {shown}", fontsize=6)
    return figure


_WIDGET_CACHE: dict = {}


def _widget_batch():
    if "items" not in _WIDGET_CACHE:
        data = settings("sft").data
        processor = load_processor(min_pixels=TOKEN_PIXELS, max_pixels=data.image_size**2)
        samples = make_split("val", 6, 0, **data)
        _WIDGET_CACHE.update(processor=processor, samples=samples, items=encode_samples(processor, samples))
    return _WIDGET_CACHE


@register_widget("10_sft", {"row": 0, "max_length": 0}, [{"row": 2, "max_length": 30}, {"row": 5, "max_length": 60}])
def batch_view(row: int = 0, max_length: int = 0) -> View:
    """One sample of a real batch, token by token, coloured by kind (labelled tokens underlined);
    ``max_length`` > 0 truncates it as a trainer would and says what broke."""
    import html as html_lib

    cache = _widget_batch()
    rows = len(cache["items"])
    if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < rows:
        return View(
            text=f"not accepted: row={row!r}: expected a row in [0, {rows - 1}]", data={"error": f"row={row!r}"}
        )
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 0:
        return View(
            text=f"not accepted: max_length={max_length!r}: expected an integer ≥ 0 (0: no truncation)",
            data={"error": f"max_length={max_length!r}"},
        )
    item = dict(cache["items"][row])
    if max_length:
        item = truncate_item(item, max_length)
    batch = pad_batch([item])
    kinds = token_kinds(batch)[0].tolist()
    colours = [COLOURS["text"], COLOURS["special"], COLOURS["image"], COLOURS["loss"], "#999999"]
    tokenizer = cache["processor"].tokenizer
    pieces = []
    for token, kind in zip(batch["input_ids"][0].tolist(), kinds):
        text = html_lib.escape(tokenizer.decode([token])).replace("\n", "↵")
        style = f"color:{colours[kind]};" + ("text-decoration:underline;font-weight:bold;" if kind == 3 else "")
        pieces.append(f"<span style='{style}'>{text}</span>")
    try:
        check_batch(batch)
        status = f"OK: {sum(k == 3 for k in kinds)} labelled tokens of {len(kinds)}"
    except ValueError as error:
        status = f"ValueError: {error}"
    sample = cache["samples"][row]
    head = f"<b>{html_lib.escape(sample.question)}</b> → {html_lib.escape(sample.answer)}<br>"
    body = "<div style='font-family:monospace;font-size:12px;line-height:1.6'>" + "".join(pieces) + "</div>"
    return View(
        html=head + body + f"<p>{html_lib.escape(status)}</p>",
        data={"tokens": len(kinds), "labelled": sum(k == 3 for k in kinds), "status": status},
    )

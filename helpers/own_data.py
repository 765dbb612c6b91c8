"""Your own data: from image files and a JSONL of conversations to checked training samples (taught in
notebooks/13_own_data.ipynb; ``python -m helpers.sft --data DIR_OR_JSONL --out DIR`` runs it).

The layout read is the one TRL's VLM trainers and Hugging Face ``datasets`` use: one JSON object per
line, ``{"messages": [...], "images": ["images/0001.jpg"]}``, where a user turn's content is a list of
parts, ``{"type": "image"}`` marking where each image of ``images`` goes (in order) and
``{"type": "text", "text": ...}`` the words. Two other common layouts are converted to it:

- qwen-vl-finetune's (QwenLM/Qwen2.5-VL) and LLaVA's: ``{"image": "a.jpg" | [...], "conversations":
  [{"from": "human", "value": "<image>\\nWhat is…"}, {"from": "gpt", "value": "…"}]}``;
- LLaMA-Factory's ShareGPT layout: ``messages`` whose contents are strings with ``<image>``
  placeholders, plus ``images``.

Others exist (TRL's prompt/completion layout, LLaMA-Factory's alpaca layout, WebDataset shards);
convert them to one of these first. A dataset is a folder with ``train.jsonl`` (and ``test.jsonl``
if it has a held-out split) or one JSONL file; image paths are relative to the JSONL's folder.

``validate`` checks every row before any training and collects every problem, one line per bad
row naming it: image file missing or unreadable, placeholder count ≠ image count (trap 7), a row
that ``max_length`` would truncate through its image tokens or answer (trap 6), boxes outside the
image or in another coordinate system (trap 1: Qwen2.5-VL's ``bbox_2d`` are pixels of the image
*after* ``smart_resize``), an empty answer. ``estimate`` adds up tokens and memory from the
processor's own numbers; ``to_samples`` gives the ``helpers.data.Sample`` s the course's collator,
loop (``helpers.sft``) and evaluator (``helpers.evaluation``) take. ``write_demo_dataset`` writes the
course's own small dataset (crops of a photo matplotlib ships, plus drawn shapes).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from helpers.boxes import compact_grounding_answer, parse_grounding
from helpers.data import COLOURS, SHAPES, Sample, draw_shapes
from helpers.vision import open_image, smart_resize

LAYOUTS = ("messages", "qwen-vl-finetune")
PLACEHOLDER = "<image>"
SPLIT_FILES = {"train": "train.jsonl", "test": "test.jsonl"}
ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------


def _parts(text: str) -> list[dict]:
    """A string with ``<image>`` placeholders → content parts, one ``{"type": "image"}`` per placeholder."""
    parts = []
    for i, piece in enumerate(text.split(PLACEHOLDER)):
        if i:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def from_qwen_vl_finetune(row: dict) -> dict:
    """qwen-vl-finetune's / LLaVA's ``{"image", "conversations": [{"from", "value"}]}`` → the
    ``messages`` + ``images`` layout. Each ``<image>`` in a ``value`` becomes an image part, in order
    (qwen-vl-finetune's ``data_processor`` replaces the same placeholders by vision tokens)."""
    if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
        raise ValueError(
            f"row {str(row)[:80]!r}: expected a dict with a 'conversations' list (qwen-vl-finetune layout)"
        )
    images = row.get("image") or []
    messages = []
    for turn in row["conversations"]:
        if not isinstance(turn, dict) or turn.get("from") not in ROLES:
            raise ValueError(f"turn {str(turn)[:80]!r}: expected {{'from': one of {sorted(ROLES)}, 'value': text}}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise ValueError(f"turn {str(turn)[:80]!r}: 'value' must be a string")
        messages.append({"role": ROLES[turn["from"]], "content": _parts(value) or [{"type": "text", "text": ""}]})
    return {"messages": messages, "images": [images] if isinstance(images, str) else list(images)}


def to_messages_layout(row: dict) -> dict:
    """Any accepted layout → ``{"messages": [{"role", "content": [parts]}], "images": [paths]}``.

    String contents (LLaMA-Factory) become parts; the empty keys ``datasets`` adds when it unifies
    the parts' schema (``{"type": "image", "text": None}``) are dropped."""
    if "conversations" in row:
        return from_qwen_vl_finetune(row)
    if not isinstance(row.get("messages"), list):
        raise ValueError(
            f"row {str(row)[:80]!r}: expected 'messages' (TRL / datasets) or 'conversations' "
            f"(qwen-vl-finetune); accepted layouts: {LAYOUTS}"
        )
    messages = []
    for turn in row["messages"]:
        content = turn.get("content")
        if isinstance(content, str):
            content = _parts(content)
        else:
            content = [{k: v for k, v in part.items() if v is not None} for part in content or []]
        messages.append({"role": turn.get("role"), "content": content})
    images = row.get("images") or []
    return {"messages": messages, "images": [images] if isinstance(images, str) else list(images)}


# ---------------------------------------------------------------------------------------------
# Reading a dataset from disk
# ---------------------------------------------------------------------------------------------


def split_files(path) -> dict[str, Path]:
    """``{split: jsonl}`` for a folder (``train.jsonl`` required, ``test.jsonl`` optional) or one file."""
    path = Path(path)
    if path.is_file():
        return {"train": path}
    if not path.is_dir():
        raise FileNotFoundError(
            f"data={str(path)!r} does not exist: expected a folder with train.jsonl (and test.jsonl) or a .jsonl file"
        )
    files = {split: path / name for split, name in SPLIT_FILES.items() if (path / name).is_file()}
    if "train" not in files:
        raise FileNotFoundError(
            f"{str(path)!r} has no train.jsonl: expected {sorted(SPLIT_FILES.values())} beside images/"
        )
    return files


def read_rows(path, cache_dir=None) -> dict[str, list[dict]]:
    """``{split: rows in the messages layout}`` read with ``datasets.load_dataset("json", ...)``
    (local files only; its Arrow cache goes to ``cache_dir``, by default a temporary folder). Image
    paths stay strings here: a missing file must become a validation message, not a crash inside
    ``datasets``' image decoder."""
    import tempfile

    from datasets import load_dataset

    files = split_files(path)
    with tempfile.TemporaryDirectory() as scratch:
        loaded = load_dataset("json", data_files={k: str(v) for k, v in files.items()}, cache_dir=cache_dir or scratch)
        return {split: [to_messages_layout(row) for row in loaded[split]] for split in files}


def image_root(path) -> Path:
    """The folder image paths are relative to: the dataset folder, or the JSONL file's folder."""
    path = Path(path)
    return path.parent if path.is_file() else path


def as_hf_dataset(rows: list[dict], root):
    """The rows as a ``datasets.Dataset`` whose ``images`` column decodes to PIL images (``Image``
    feature), as TRL's ``SFTTrainer`` takes a VLM dataset. Validate first: decoding fails on a bad file."""
    from datasets import Dataset, Image, Sequence

    table = Dataset.from_list(
        [{"messages": r["messages"], "images": [str(Path(root) / p) for p in r["images"]]} for r in rows]
    )
    return table.cast_column("images", Sequence(Image()))


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


def pixel_limits(processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) of the processor's images (its ``size`` shortest/longest edge)."""
    size = processor.image_processor.size
    return int(size["shortest_edge"]), int(size["longest_edge"])


def image_tokens(height: int, width: int, processor) -> tuple[int, int, int]:
    """(resized height, resized width, visual tokens) of one image: ``smart_resize`` with the
    processor's limits (notebook 02), one token per (patch·merge)² pixels."""
    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    low, high = pixel_limits(processor)
    h, w = smart_resize(height, width, factor=factor, min_pixels=low, max_pixels=high)
    return h, w, h * w // factor**2


def row_tokens(messages: list[dict], sizes: list[tuple[int, int]], processor) -> dict:
    """Token counts of one conversation without running the image processor: the chat template's
    ids with each ``<|image_pad|>`` expanded to its image's token count (what ``processor(text,
    images)`` does). Returns ``{"total", "image", "text", "image_end", "answer_end"}``: the length, the
    tokens images take, the rest, and the positions just after the last image token and the answer."""
    text = processor.apply_chat_template(messages, tokenize=False)
    ids = processor.tokenizer(text)["input_ids"]
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = [image_tokens(h, w, processor)[2] for h, w in sizes]
    where = [i for i, t in enumerate(ids) if t == pad]
    if len(where) != len(counts):
        raise ValueError(f"{len(where)} <|image_pad|> in the prompt but {len(counts)} images: expected one per image")
    extra = sum(counts) - len(counts)
    image_end = (where[-1] + 1 + extra) if where else 0
    return {
        "total": len(ids) + extra,
        "image": sum(counts),
        "text": len(ids) - len(counts),
        "image_end": image_end,
        "answer_end": len(ids) + extra - 1,
    }  # the trailing "\n" carries no loss


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def answer_text(messages: list[dict]) -> str:
    """The text of the last turn (the answer SFT trains on) if it is the assistant's, else ''."""
    if not messages or messages[-1].get("role") != "assistant":
        return ""
    return "".join(p.get("text", "") for p in messages[-1]["content"] if p.get("type") == "text")


def answer_boxes(answer: str) -> list[list[float]]:
    """Every ``bbox_2d`` in a grounding answer (JSON, fenced or not); [] if the answer is not one."""
    if "bbox_2d" not in answer:
        return []
    try:
        objects = parse_grounding(answer)
    except ValueError:
        return [[float("nan")] * 4]
    return [list(o.get("bbox_2d", [])) if isinstance(o, dict) else [] for o in objects]


def box_problem(box, original: tuple[int, int], resized: tuple[int, int]) -> str | None:
    """Why ``box`` is not an ``[x1, y1, x2, y2]`` in pixels of the resized image (height, width), or None.

    Out-of-range boxes are diagnosed by the coordinate system they fit: fractions (0–1), pixels of
    the original image (map them with ``helpers.boxes.box_to_resized``), Qwen2-VL's 0–1000."""
    if len(box) != 4 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box
    ):
        return f"box {box} is not four finite numbers [x1, y1, x2, y2]"
    x1, y1, x2, y2 = box
    (H, W), (h, w) = original, resized
    if not (x1 < x2 and y1 < y2):
        return f"box {box} is empty or reversed: expected x1 < x2 and y1 < y2"
    if 0 <= x1 and 0 <= y1 and x2 <= w and y2 <= h:
        if max(box) <= 1 < min(h, w) // 2:
            return f"box {box} looks like fractions of the image (0–1); Qwen2.5-VL reads pixels of the {w}×{h} (W×H) resized image"
        return None
    where = f"outside the {w}×{h} (W×H) image the model sees (smart_resize of {W}×{H})"
    if min(box) >= 0 and x2 <= W and y2 <= H:
        return (
            f"box {box} is {where}; it fits the original {W}×{H} pixels: map it with "
            f"helpers.boxes.box_to_resized(box, ({H}, {W}), ({h}, {w}))"
        )
    if min(box) >= 0 and 2 * max(h, w) < max(box) <= 1000:
        return (
            f"box {box} is {where}; it looks like Qwen2-VL's 0–1000 coordinates: scale x by {w}/1000 and y by {h}/1000"
        )
    return f"box {box} is {where}"


@dataclass
class Report:
    """What ``validate`` found: ``problems`` (one line per bad row), the good rows' indices and token counts."""

    split: str
    rows: int
    problems: list[str] = field(default_factory=list)
    good: list[int] = field(default_factory=list)
    tokens: list[dict] = field(default_factory=list)  # row_tokens of each good row
    sizes: list[list[tuple[int, int]]] = field(default_factory=list)

    def raise_if_bad(self) -> None:
        """ValueError listing every problem (not only the first), if there is any."""
        if self.problems:
            raise ValueError(
                f"{len(self.problems)} of {self.rows} {self.split} rows cannot be trained on:\n  "
                + "\n  ".join(self.problems)
            )


def _row_problems(row: dict, root: Path, processor, max_length: int | None) -> tuple[list[str], list, dict | None]:
    messages, images = row["messages"], row["images"]
    placeholders = sum(p.get("type") == "image" for m in messages for p in m["content"])
    problems = []
    if placeholders != len(images):
        problems.append(
            f"{placeholders} image placeholder(s) but {len(images)} image(s) listed: expected one "
            f"{{'type': 'image'}} part (or <image>) per image (trap 7)"
        )
    if not answer_text(messages).strip():
        problems.append("empty answer: the last turn must be the assistant's, with text to learn")
    sizes = []
    for name in images:
        path = root / str(name)
        if not path.is_file():
            problems.append(f"image file {str(name)!r} does not exist (paths are relative to the dataset folder)")
            continue
        try:
            image = open_image(path)
        except ValueError:
            problems.append(f"image file {str(name)!r} cannot be read as an image")
            continue
        sizes.append((image.height, image.width))
    if problems:
        return problems, sizes, None
    try:  # smart_resize refuses extreme aspect ratios (over 200:1)
        resized = [image_tokens(*size, processor)[:2] for size in sizes]
    except ValueError as error:
        return [f"an image cannot be resized for the model: {error}"], sizes, None
    for box in answer_boxes(answer_text(messages)):  # boxes refer to the first image
        reason = box_problem(box, sizes[0], resized[0])
        if reason:
            problems.append(reason + " (trap 1)")
    tokens = row_tokens(messages, sizes, processor)
    if max_length is not None and tokens["image_end"] > max_length:
        problems.append(
            f"{tokens['total']} tokens, image tokens up to {tokens['image_end']}: max_length={max_length} "
            f"truncates through the image (trap 6); raise max_length or lower max_pixels"
        )
    elif max_length is not None and tokens["answer_end"] > max_length:
        problems.append(
            f"{tokens['total']} tokens: max_length={max_length} cuts the answer; raise it to ≥ {tokens['answer_end']}"
        )
    return problems, sizes, tokens


def validate(rows: list[dict], root, processor, max_length: int | None = None, split: str = "train") -> Report:
    """Check every row (messages layout) and collect every problem: see the module docstring."""
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1):
        raise ValueError(f"max_length={max_length!r}: expected None or an integer ≥ 1")
    report = Report(split, len(rows))
    for i, row in enumerate(rows):
        problems, sizes, tokens = _row_problems(row, Path(root), processor, max_length)
        report.problems += [f"{split} row {i}: {p}" for p in problems]
        if not problems:
            report.good.append(i)
            report.tokens.append(tokens)
            report.sizes.append(sizes)
    return report


# ---------------------------------------------------------------------------------------------
# Estimate and samples
# ---------------------------------------------------------------------------------------------


def estimate(report: Report, text_config, parameters: int, trainable: int) -> dict:
    """Tokens of the whole (validated) split and a memory floor from the processor's numbers: bf16
    weights, the KV-sized activations of the longest row (``helpers.forward.kv_cache_bytes_per_token``,
    notebook 09), AdamW's fp32 moments and gradients of the trainable parameters."""
    from helpers.forward import kv_cache_bytes_per_token, weight_bytes

    totals = [t["total"] for t in report.tokens]
    longest = max(totals) if totals else 0
    memory = {
        "weights (bf16)": weight_bytes(parameters),
        "longest row's K/V": longest * kv_cache_bytes_per_token(text_config),
        "grads + AdamW (fp32)": 12 * trainable,
    }
    return {
        "rows": len(totals),
        "tokens": sum(totals),
        "image_tokens": sum(t["image"] for t in report.tokens),
        "text_tokens": sum(t["text"] for t in report.tokens),
        "longest": longest,
        "memory": memory,
    }


def infer_task(answer: str) -> tuple[str, object]:
    """(task, target) for ``helpers.evaluation``: a box answer → grounding, digits → count, one word →
    attribute (exact match); anything else → ("text", answer), trained on but not scored."""
    from helpers.rewards import parse_answer

    for task in ("grounding", "count", "attribute"):
        value = parse_answer(task, answer)
        if value is not None:
            return task, value
    return "text", answer


def to_samples(rows: list[dict], root, report: Report) -> list[Sample]:
    """The good rows as ``helpers.data.Sample`` s (one image, the user's text, the answer): what
    ``helpers.sft.SFTCollator`` renders with the default system turn, image before text."""
    samples = []
    for i in report.good:
        row = rows[i]
        if len(row["images"]) != 1 or len(row["messages"]) != 2:
            raise ValueError(
                f"{report.split} row {i}: {len(row['images'])} images, {len(row['messages'])} turns; the course "
                "collator trains one image, one question and one answer per row (use TRL for more)"
            )
        question = " ".join(p["text"] for p in row["messages"][0]["content"] if p.get("type") == "text")
        answer = answer_text(row["messages"])
        task, target = infer_task(answer)
        samples.append(
            Sample(
                open_image(Path(root) / row["images"][0]), task, question, answer, target, split=report.split, index=i
            )
        )
    return samples


# ---------------------------------------------------------------------------------------------
# The course's demonstration dataset
# ---------------------------------------------------------------------------------------------

#: (width, height) of the demo images: multiples of 28 that smart_resize keeps for the real
#: checkpoint's limits and for max_pixels ≥ 112² (so their boxes hold for both).
DEMO_SIZES = ((112, 84), (84, 112), (112, 112), (84, 84))


def _photo_crop(rng, photo):
    width, height = DEMO_SIZES[rng.integers(len(DEMO_SIZES))]
    scale = rng.uniform(1.5, 4.0)
    cw, ch = int(width * scale), int(height * scale)
    x, y = int(rng.integers(0, photo.width - cw)), int(rng.integers(0, photo.height - ch))
    return photo.crop((x, y, x + cw, y + ch)).resize((width, height))


def _demo_row(rng, photo, k: int) -> tuple:
    """Row k: a photo crop with one shape pasted (colour or box question), or drawn shapes (a count)."""
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    if k % 3 == 2:  # drawn: 1–3 shapes of one kind on a plain background
        n = int(rng.integers(1, 4))
        cells = rng.permutation(12)[:n]
        shapes = [
            {
                "shape": shape,
                "colour": colour,
                "bbox": [int(c % 4) * 28 + 4, int(c // 4) * 28 + 4, int(c % 4) * 28 + 24, int(c // 4) * 28 + 24],
            }
            for c in cells
        ]
        image = draw_shapes(112, shapes).crop((0, 0, 112, 84))
        return image, f"How many {colour} {shape}s are there?", str(n)
    image = _photo_crop(rng, photo)
    side = int(rng.integers(18, 29))
    x, y = int(rng.integers(0, image.width - side + 1)), int(rng.integers(0, image.height - side + 1))
    drawn = draw_shapes(28, [{"shape": shape, "colour": colour, "bbox": [0, 0, side, side]}]).crop((0, 0, side, side))
    mask = (
        draw_shapes(28, [{"shape": shape, "colour": "red", "bbox": [0, 0, side, side]}])
        .crop((0, 0, side, side))
        .convert("L")
    )
    image.paste(drawn, (x, y), mask.point(lambda v: 255 if v < 200 else 0))
    if k % 3 == 0:
        return image, f"What colour is the {shape}?", colour
    return (
        image,
        f"Where is the {colour} {shape}?",
        compact_grounding_answer([x, y, x + side, y + side], f"{colour} {shape}"),
    )


def write_demo_dataset(folder, n_train: int = 240, n_test: int = 60, seed: int = 0) -> Path:
    """Write the course's demo dataset as a reader's would be: ``images/`` + ``train.jsonl`` +
    ``test.jsonl`` (messages layout). Photos: crops of matplotlib's ``grace_hopper.jpg`` with one
    shape pasted (colour and box questions; boxes in pixels of the saved image, which smart_resize
    keeps); drawn: 1–3 shapes to count. Deterministic by ``seed``; nothing downloaded."""
    from helpers.vision import course_photo

    for name, value in (("n_train", n_train), ("n_test", n_test), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
            raise ValueError(f"{name}={value!r}: expected an integer ≥ {0 if name == 'seed' else 1}")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    photo = course_photo()
    for split, n in (("train", n_train), ("test", n_test)):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        lines = []
        for k in range(n):
            image, question, answer = _demo_row(rng, photo, k)
            name = f"images/{split}_{k:04d}.png"
            image.save(folder / name)
            lines.append(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                        ],
                        "images": [name],
                    }
                )
            )
        (folder / SPLIT_FILES[split]).write_text("\n".join(lines) + "\n")
    return folder

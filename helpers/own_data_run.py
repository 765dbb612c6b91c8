"""Fine-tuning on your own data, end to end: validated rows → LoRA SFT with the course loop → held-out
scores beside an image-blind baseline → a saved checkpoint (notebooks/13_own_data.ipynb;
``python -m helpers.sft --data DIR_OR_JSONL --out DIR [--model PATH] [--steps N]``).

The model fine-tuned is a real checkpoint (``--model`` or ``$QWENVL_MODEL``) or, without one, the
course model as notebook 10 trained it (``helpers.checkpoints``' cached run; trained on the spot,
about a minute, if missing). Either way the settings are ``helpers.recipes.recipe``'s checkpoint
recipe (LoRA r = 16 at 2e-4 on the language model, merger trained). The reading and checking of
the data is ``helpers.own_data``; the training loop ``helpers.sft.train``; the scores
``helpers.evaluation``. This module also holds notebook 13's row browser and token figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from helpers import own_data
from helpers.constants import TOKEN_PIXELS
from helpers.plots import COLOURS, new_figure
from helpers.widgets import View, register_widget

#: Image budget for the course model (16 visual tokens at most): the demo images keep their size.
COURSE_MAX_PIXELS = 16 * TOKEN_PIXELS
#: Share of train rows held out when a dataset has no test.jsonl.
HOLD_OUT = 0.2


def start_checkpoint(profile: str | None = None, model=None) -> Path:
    """The checkpoint to fine-tune: ``model``, else ``$QWENVL_MODEL``, else notebook 10's course-model
    run (its full run if cached, else ``helpers.checkpoints.sft_checkpoint``, which trains one)."""
    from helpers import checkpoints

    path = model or os.environ.get("QWENVL_MODEL")
    if path:
        return Path(path)
    full = checkpoints.profile_checkpoint_dir(profile)
    return full if checkpoints.is_complete(full) else checkpoints.sft_checkpoint(profile, progress=False)


def is_course_model(path) -> bool:
    """True for a checkpoint of the course model (saved by ``helpers.checkpoints``), not a real Qwen2.5-VL."""
    return (Path(path) / "trainer_state.json").is_file() and not os.environ.get("QWENVL_MODEL")


def load_data(data, processor, max_length: int | None = None, cache_dir=None, seed: int = 0) -> dict:
    """Read (``datasets``), validate every split (ValueError listing every bad row) and make samples:
    ``{"rows", "reports", "train", "test", "root"}``. Without ``test.jsonl``, ``HOLD_OUT`` of the
    train rows (a seeded draw) are held out."""
    rows = own_data.read_rows(data, cache_dir=cache_dir)
    root = own_data.image_root(data)
    reports = {split: own_data.validate(r, root, processor, max_length, split) for split, r in rows.items()}
    problems = [p for rep in reports.values() for p in rep.problems]
    if problems:
        raise ValueError(f"{len(problems)} rows cannot be trained on:\n  " + "\n  ".join(problems))
    samples = {split: own_data.to_samples(rows[split], root, rep) for split, rep in reports.items()}
    if "test" not in samples:
        order = torch.randperm(len(samples["train"]), generator=torch.Generator().manual_seed(seed)).tolist()
        cut = max(1, int(len(order) * HOLD_OUT))
        samples["test"] = [samples["train"][i] for i in order[:cut]]
        samples["train"] = [samples["train"][i] for i in order[cut:]]
    return {"rows": rows, "reports": reports, "root": root, **samples}


@torch.no_grad()
def mean_loss(model, processor, samples, batch_size: int = 32) -> float:
    """Mean answer-token loss (``helpers.sft.labelled_loss``) of ``samples``: the held-out loss."""
    from helpers.evaluation import unwrap
    from helpers.sft import SFTCollator, labelled_loss

    collator, total, count = SFTCollator(processor), 0.0, 0
    device = next(unwrap(model).parameters()).device
    for lo in range(0, len(samples), batch_size):
        batch = {k: v.to(device) for k, v in collator(samples[lo : lo + batch_size]).items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(labelled_loss(model, batch, "sum"))
        count += n
    return total / max(count, 1)


def scores(model, processor, samples) -> list[dict]:
    """``helpers.evaluation.score_table`` on the scorable samples (count, attribute, grounding)."""
    from helpers.evaluation import blind_baselines, evaluate, score_table

    scorable = [s for s in samples if s.task != "text"]
    return score_table(evaluate(model, processor, scorable), blind_baselines(scorable)) if scorable else []


def _plain(recipe) -> dict:
    """A recipe's settings as a dict, whether ``recipes.recipe`` returns a dict or a dataclass."""
    return dict(recipe) if isinstance(recipe, dict) else dataclasses.asdict(recipe)


def own_recipe(profile: str | None = None, start=None) -> SimpleNamespace:
    """``recipes.recipe(profile, model=start)``: the checkpoint recipe (LoRA), read by attribute. For
    the course model, which learnt from scratch at a larger rate than a pretrained 3B tolerates, the
    learning rate is the course recipe's (``recipe(profile).lr``), one micro-batch per step."""
    from helpers import recipes

    values = _plain(recipes.recipe(profile, model=start))
    if is_course_model(start):
        values.update(lr=_plain(recipes.recipe(profile, model=None))["lr"], grad_accum=1)
    return SimpleNamespace(**values)


def finetune(
    data,
    out=None,
    profile: str | None = None,
    model=None,
    steps: int | None = None,
    max_pixels: int | None = None,
    max_length: int | None = None,
    progress: bool = True,
    cache_dir=None,
) -> dict:
    """Validate ``data``, LoRA-fine-tune the start checkpoint as ``own_recipe`` says (``steps``
    overrides its count), score the held-out split before and after, save the merged model to ``out``."""
    from helpers import checkpoints, recipes
    from helpers.lora import merge_lora
    from helpers.qwen import load_processor
    from helpers.sft import train

    start = start_checkpoint(profile, model)
    r = own_recipe(profile, start)
    net, processor = recipes.model_for_profile(profile, model=start)
    if max_pixels or is_course_model(start):
        processor = load_processor(start, min_pixels=TOKEN_PIXELS, max_pixels=max_pixels or COURSE_MAX_PIXELS)
    d = load_data(data, processor, max_length, cache_dir, r.seed)
    before = {"loss": mean_loss(net, processor, d["test"]), "scores": scores(net, processor, d["test"])}
    t0 = time.perf_counter()
    result = train(
        net,
        processor,
        d["train"],
        steps=steps or r.steps,
        batch_size=r.batch_size,
        grad_accum=r.grad_accum,
        lr=r.lr,
        warmup=r.warmup,
        seed=r.seed,
        device="cuda" if torch.cuda.is_available() else "cpu",
        progress=progress,
    )
    seconds = time.perf_counter() - t0
    merged = merge_lora(result.model)
    after = {"loss": mean_loss(merged, processor, d["test"]), "scores": scores(merged, processor, d["test"])}
    if out is not None:
        checkpoints.save_checkpoint(
            out,
            merged,
            processor,
            {"step": result.state["step"], "history": result.history, "data": str(data), "start": str(start)},
        )
    tokens = {
        split: own_data.estimate(rep, merged.config.get_text_config(), 0, 0) for split, rep in d["reports"].items()
    }
    return {
        "start": str(start),
        "recipe": vars(r),
        "rows": {k: len(v) for k, v in d["rows"].items()},
        "train": len(d["train"]),
        "test": len(d["test"]),
        "tokens": {k: v["tokens"] for k, v in tokens.items()},
        "steps": result.state["step"],
        "train_seconds": seconds,
        "train_loss": result.history["loss"],
        "before": before,
        "after": after,
        "out": None if out is None else str(out),
        "model": merged,
        "processor": processor,
    }


def report_lines(report: dict) -> list[str]:
    """The final report of ``finetune`` as printed lines: rows, tokens, losses, scores, checkpoint."""
    lines = [
        f"start: {report['start']} ({report['recipe']['method']}, lr {report['recipe']['lr']})",
        f"rows: {report['rows']} → train {report['train']}, held out {report['test']}; tokens {report['tokens']}",
        f"held-out answer loss: {report['before']['loss']:.3f} before → {report['after']['loss']:.3f} after "
        f"{report['steps']} steps ({report['train_seconds']:.0f} s); train loss {report['train_loss'][0]:.3f} → "
        f"{report['train_loss'][-1]:.3f}",
    ]
    for b, a in zip(report["before"]["scores"], report["after"]["scores"]):
        lines.append(
            f"  {a['task']:<10} n={a['n']:<4} before {b['score']:.3f}  after {a['score']:.3f}  "
            f"image-blind {a['blind']:.3f}  p(after > blind) = {a['p']:.2g}"
        )
    lines.append(f"checkpoint: {report['out']}" if report["out"] else "checkpoint: not saved (no --out)")
    return lines


def main(argv=None) -> None:
    """``python -m helpers.sft --data DIR_OR_JSONL --out DIR``: ``finetune`` and its report."""
    parser = argparse.ArgumentParser(prog="python -m helpers.sft --data", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", required=True, help="a folder with train.jsonl (+ test.jsonl) and images, or a .jsonl"
    )
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--profile", choices=("cpu", "gpu"), default=None)
    parser.add_argument(
        "--model", default=None, help="a local Qwen2.5-VL checkpoint (default: $QWENVL_MODEL, else the course model)"
    )
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    parser.add_argument("--max-pixels", type=int, default=None, help="image budget (default: the checkpoint's)")
    parser.add_argument(
        "--max-length", type=int, default=None, help="token budget per row (rows it would cut are refused)"
    )
    parser.add_argument("--metrics", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    report = finetune(args.data, args.out, args.profile, args.model, args.steps, args.max_pixels, args.max_length)
    print("\n".join(report_lines(report)))
    if args.metrics:
        keep = {k: v for k, v in report.items() if k not in ("model", "processor")}
        Path(args.metrics).write_text(json.dumps(keep, indent=1, default=str))


# ---------------------------------------------------------------------------------------------
# Notebook 13's pictures
# ---------------------------------------------------------------------------------------------


def token_figure(reports: dict, estimates: dict, title: str = ""):
    """Left: tokens per row (rows sorted by length) of each report; right: the parts of each
    estimate's memory floor (``own_data.estimate``), MiB on a log axis."""
    figure, (left, right) = new_figure(2, 1, width=10, height=3.2)
    for (name, rep), colour in zip(reports.items(), (COLOURS["image"], COLOURS["text"], COLOURS["loss"])):
        totals = sorted(t["total"] for t in rep.tokens)
        left.step(range(len(totals)), totals, color=colour, label=f"{name}: {sum(totals):,} tokens")
    left.set_xlabel("row (sorted by length)")
    left.set_ylabel("tokens per row")
    left.legend(fontsize=8)
    names = list(estimates)
    parts = list(next(iter(estimates.values()))["memory"])
    for k, (part, colour) in enumerate(zip(parts, (COLOURS["pad"], COLOURS["text"], COLOURS["loss"]))):
        values = [estimates[n]["memory"][part] / 2**20 for n in names]
        right.barh([i + 0.27 * (k - 1) for i in range(len(names))], values, 0.27, color=colour, label=part)
    right.set_yticks(range(len(names)), names)
    right.set_xscale("log")
    right.set_xlabel("MiB (log)")
    right.legend(fontsize=8)
    right.set_title(title or "memory floor for training")
    return figure


_ROWS: dict = {}


def browse_data(data, processor, rows: dict, reports: dict) -> None:
    """Set what ``row_view`` browses: a dataset's rows, validation reports and processor."""
    _ROWS.update(data=Path(data), processor=processor, rows=rows, reports=reports)


def _default_browse() -> None:
    from helpers.qwen import cache_dir, load_processor

    folder = cache_dir() / "own_data_demo"
    if not (folder / "test.jsonl").is_file():
        own_data.write_demo_dataset(folder)
    processor = load_processor(min_pixels=TOKEN_PIXELS, max_pixels=COURSE_MAX_PIXELS)
    rows = own_data.read_rows(folder, cache_dir=cache_dir() / "datasets")
    browse_data(folder, processor, rows, {s: own_data.validate(r, folder, processor, split=s) for s, r in rows.items()})


@register_widget("13_own_data", {"split": "train", "row": 0}, [{"row": 1}, {"split": "test", "row": 3}])
def row_view(split: str = "train", row: int = 0) -> View:
    """One row: its image as the model sees it (resized) with the answer's boxes drawn, the rendered
    prompt, and its validation status."""
    if not _ROWS:
        _default_browse()
    rows, report, processor = _ROWS["rows"][split], _ROWS["reports"][split], _ROWS["processor"]
    row = min(int(row), len(rows) - 1)
    item, problems = rows[row], [p for p in report.problems if p.startswith(f"{split} row {row}:")]
    figure, ax = new_figure(width=3.2, height=3.2)
    try:
        image = own_data.open_image(_ROWS["data"] / item["images"][0])
        h, w, tokens = own_data.image_tokens(image.height, image.width, processor)
        ax.imshow(image.resize((w, h)))
        for box in own_data.answer_boxes(own_data.answer_text(item["messages"])):
            x1, y1, x2, y2 = box
            ax.add_patch(
                __import__("matplotlib").patches.Rectangle(
                    (x1, y1), x2 - x1, y2 - y1, fill=False, color=COLOURS["loss"], lw=2
                )
            )
        ax.set_title(f"{w}×{h} px, {tokens} visual tokens", fontsize=9)
    except (ValueError, IndexError, OSError) as error:
        ax.text(0.5, 0.5, f"no image:\n{type(error).__name__}", ha="center", va="center")
    ax.set_xticks([])
    ax.set_yticks([])
    import html

    prompt = processor.apply_chat_template(item["messages"], tokenize=False)
    status = (
        "<b style='color:#009E73'>valid</b>"
        if not problems
        else "<br>".join(f"<b style='color:#D55E00'>{html.escape(p)}</b>" for p in problems)
    )
    page = f"<pre style='font-size:11px'>{html.escape(prompt)}</pre>{status}"
    return View(html=page, figure=figure, data={"problems": problems, "prompt": prompt})

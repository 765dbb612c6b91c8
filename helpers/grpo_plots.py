"""Pictures and the rollout browser of GRPO (notebook 11): the rewards and advantages of one batch,
training curves, scores per arm, and a widget that browses recorded rollouts."""

from __future__ import annotations

import json

import torch

from helpers import rewards as R
from helpers.data import make_split
from helpers.grpo import Rollout, compute_rewards, group_advantages
from helpers.plots import COLOURS, new_figure
from helpers.widgets import View, register_widget

# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def plot_groups(rewards: torch.Tensor, advantages: torch.Tensor, num_generations: int, width: float = 8.0):
    """Left: each prompt's G rewards (dots) and their mean (bar); right: the advantages, coloured by
    group. Equal rewards in a group show as one dot and advantages of 0."""
    fig, (left, right) = new_figure(2, 1, width, 2.8)
    grouped = rewards.view(-1, num_generations)
    for p, row in enumerate(grouped):
        left.bar(p, row.mean().item(), color=COLOURS["accent"], alpha=0.4, width=0.7)
        left.scatter([p] * num_generations, row.tolist(), color=COLOURS["text"], s=14, zorder=3)
    left.set(xlabel="prompt (group)", ylabel="reward", title=f"rewards of the G = {num_generations} completions")
    left.set_xticks(range(len(grouped)))
    colours = [COLOURS["loss"], COLOURS["image"], COLOURS["video"], COLOURS["special"], COLOURS["text"], COLOURS["pad"]]
    for i, a in enumerate(advantages.tolist()):
        right.bar(i, a, color=colours[(i // num_generations) % len(colours)])
    right.axhline(0, color="black", lw=0.6)
    right.set(xlabel="completion (groups side by side)", ylabel="advantage", title="group-normalised advantages")
    return fig


def plot_history(histories: dict[str, list[dict]], width: float = 10.0):
    """Per-step curves of one or more runs (name → history): reward, accuracy and IoU, KL, length."""
    fig, axes = new_figure(4, 1, width, 2.5)
    panels = (
        ("reward", "mean reward"),
        (("accuracy", "iou"), "accuracy (count, attribute) / IoU"),
        ("kl", "KL to reference (k3)"),
        ("completion_length", "completion length (tokens)"),
    )
    for ax, (keys, title) in zip(axes, panels):
        for name, history in histories.items():
            steps = [h["step"] for h in history]
            for key in keys if isinstance(keys, tuple) else (keys,):
                style = "--" if key == "iou" else "-"
                label = f"{name} {key}" if isinstance(keys, tuple) or len(histories) > 1 else None
                ax.plot(steps, [h[key] for h in history], style, label=label, lw=1.2)
        ax.set(title=title, xlabel="step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return fig


def plot_comparison(table: dict, width: float = 7.0):
    """Grouped bars: score per split for each model (``table[model][split] = mean`` or a list of
    seeds, then the bar is the mean and the dots are the seeds)."""
    fig, ax = new_figure(1, 1, width, 2.8)
    models = list(table)
    splits = list(next(iter(table.values())))
    colours = [COLOURS["pad"], COLOURS["loss"], COLOURS["text"], COLOURS["image"]]
    bar = 0.8 / len(models)
    for m, name in enumerate(models):
        for s, split in enumerate(splits):
            values = table[name][split]
            values = values if isinstance(values, (list, tuple)) else [values]
            x = s + (m - (len(models) - 1) / 2) * bar
            ax.bar(
                x, sum(values) / len(values), bar * 0.9, color=colours[m % len(colours)], label=name if s == 0 else None
            )
            if len(values) > 1:
                ax.scatter([x] * len(values), values, color="black", s=8, zorder=3)
    ax.set_xticks(range(len(splits)), splits)
    ax.set(ylabel="score (accuracy / IoU)", ylim=(0, 1), title="SFT vs SFT + GRPO")
    ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------
# Widget: browse rollouts
# ---------------------------------------------------------------------------------------------

#: Rollouts recorded during training (``record_rollout``), one entry per step, read by the widget.
ROLLOUTS: list[dict] = []


def record_rollout(step: int, log: dict, rollout: Rollout, advantages: torch.Tensor, store: list | None = None) -> None:
    """An ``on_step`` callback for ``train``: keep what the rollout browser shows."""
    store = ROLLOUTS if store is None else store
    P = len(rollout.samples) // rollout.num_generations
    store.append(
        dict(
            step=step,
            samples=rollout.samples[:: rollout.num_generations][:P],
            texts=list(rollout.texts),
            rewards=compute_rewards(rollout.texts, rollout.tasks, rollout.targets, {"task": 1.0, "format": 1.0}),
            advantages=advantages.detach().cpu(),
            G=rollout.num_generations,
        )
    )


def _demo_rollouts() -> list[dict]:
    """Stand-in rollouts (no model) so the widget renders before any training: the true answer,
    near misses and malformed text, scored by the real rewards."""
    store = []
    samples = make_split("train", 3, seed=0, image_size=84)
    texts, tasks, targets = [], [], []
    for s in samples:
        if s.task == "grounding":
            x1, y1, x2, y2 = s.target
            options = [s.answer, json.dumps([{"bbox_2d": [x1 + 4, y1 + 2, x2 + 6, y2]}]), "the square", s.answer]
        elif s.task == "count":
            options = [s.answer, str(int(s.answer) + 1), "three", s.answer]
        else:
            options = [s.answer, "blue" if s.answer != "blue" else "red", "It is " + s.answer, s.answer]
        texts += options
        tasks += [s.task] * 4
        targets += [s.target] * 4
    rewards = compute_rewards(texts, tasks, targets, {"task": 1.0, "format": 1.0})
    advantages = group_advantages(rewards["task"] + 0.2 * rewards["format"], 4)
    store.append(dict(step=0, samples=samples, texts=texts, rewards=rewards, advantages=advantages, G=4))
    return store


_DEMO: list[dict] = []


@register_widget("11_grpo", {"step": 0, "prompt": 0}, [{"step": 0, "prompt": 1}, {"step": 0, "prompt": 2}])
def rollout_view(step: int = 0, prompt: int = 0, store: list | None = None) -> View:
    """One prompt's rollouts at one step: the image (true box in green, sampled boxes in orange),
    the question, and the G completions with their rewards and advantages."""
    from html import escape

    store = store if store is not None else (ROLLOUTS or _DEMO or _DEMO.extend(_demo_rollouts()) or _DEMO)
    entry = store[min(max(step, 0), len(store) - 1)]
    G = entry["G"]
    p = min(max(prompt, 0), len(entry["samples"]) - 1)
    sample = entry["samples"][p]
    rows = slice(p * G, (p + 1) * G)
    texts = entry["texts"][rows]
    task_r, format_r = entry["rewards"]["task"][rows].tolist(), entry["rewards"]["format"][rows].tolist()
    adv = entry["advantages"][rows].tolist()
    fig, ax = new_figure(1, 1, 2.4, 2.4)
    ax.imshow(sample.image)
    ax.set_axis_off()
    if sample.task == "grounding":
        from matplotlib.patches import Rectangle

        x1, y1, x2, y2 = sample.target
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=COLOURS["image"], lw=2))
        for text in texts:
            box = R.parse_answer("grounding", text)
            if box is not None:
                ax.add_patch(
                    Rectangle(
                        (box[0], box[1]),
                        box[2] - box[0],
                        box[3] - box[1],
                        fill=False,
                        ec=COLOURS["special"],
                        lw=1,
                        ls="--",
                    )
                )
    head = (
        f"<b>step {entry['step']}, prompt {p}</b> — {escape(sample.question)} "
        f"(task {sample.task}, truth <code>{escape(sample.answer)}</code>)"
    )
    body = "".join(
        f"<tr><td>{i}</td><td><code>{escape(t) or '∅'}</code></td><td>{a:.2f}</td><td>{f:.0f}</td>"
        f"<td style='color:{'#009E73' if d > 0 else '#D55E00' if d < 0 else '#999'}'>{d:+.2f}</td></tr>"
        for i, (t, a, f, d) in enumerate(zip(texts, task_r, format_r, adv))
    )
    html = (
        head
        + "<table><tr><th>#</th><th>completion</th><th>task reward</th><th>format</th><th>advantage</th></tr>"
        + body
        + "</table>"
    )
    return View(html=html, figure=fig, data=dict(texts=texts, task=task_r, format=format_r, advantages=adv))

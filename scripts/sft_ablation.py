"""Why the cpu SFT profile is set as it is: the same cpu run with one setting changed at a time.

Trains the course model with the cpu profile of ``helpers.profiles`` and with variants of it, then
scores each on the same held-out test questions. Writes ``ablation.json`` and ``ablation.png``
into ``--out`` (committed under ``assets/results/sft_cpu/``; notebook 10 shows them).

    python scripts/sft_ablation.py --out assets/results/sft_cpu [--eval 300] [--jobs 2]

About 10 minutes on 2 cores with ``--jobs 2`` (each job one thread; the JSON records the wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs import run_jobs  # noqa: E402  (scripts/jobs.py)

#: name → (what changes, overrides of settings("sft", "cpu")); "data" overrides merge into the profile's data
VARIANTS: dict[str, tuple[str, dict]] = {
    "profile": ("the cpu profile as committed", {}),
    "profile, seed 1": ("another seed (model init and data)", {"seed": 1}),
    "profile, seed 2": ("another seed (model init and data)", {"seed": 2}),
    "norm weight 1": ("final norm at transformers' init (1, not 8)", {"logit_scale_init": 1.0}),
    "table std 0.25, norm 1": (
        "logit room from a larger table instead (std 0.25 ≈ 2.8/√d)",
        {"embedding_std": 0.25, "logit_scale_init": 1.0},
    ),
    "table trainable": ("embedding table trained with the rest", {"freeze_embeddings": False}),
    "per-token average": ("loss averaged over tokens, not answers", {"average": "token"}),
    "no position cue": ("plain background", {"data": {"position_cue": 0.0}}),
}


def run_variant(name: str, n_eval: int) -> dict:
    """Train one variant in this process and score it on ``n_eval`` test samples, beside the
    image-blind baselines of those samples."""
    import torch

    torch.set_num_threads(int(os.environ.get("ABLATION_THREADS", "1")))
    from helpers.data import make_split
    from helpers.evaluation import blind_baselines, evaluate, score_table
    from helpers.recipes import recipe, run_profile

    overrides = VARIANTS[name][1]
    r = recipe("cpu", overrides=overrides)
    start = time.perf_counter()
    run = run_profile("cpu", progress=False, evaluate_splits=False, overrides=overrides)
    seconds = time.perf_counter() - start
    scored = {}
    for split in ("test", "ood"):
        questions = make_split(split, n_eval, 0, **r.data)  # seed 0: every variant meets the same questions
        rows = score_table(evaluate(run["model"], run["processor"], questions), blind_baselines(questions))
        scored[split] = {
            row["task"]: {
                "score": round(row["score"], 4),
                "n": row["n"],
                "blind": round(row["blind"], 4),
                "p": row["p"],
            }
            for row in rows
        }
    return {
        "variant": name,
        "change": VARIANTS[name][0],
        "train_seconds": round(seconds, 1),
        "steps": run["steps"],
        "final_loss": round(sum(run["loss"][-10:]) / 10, 4),
        **scored,
    }


def plot(results: list[dict], path: Path) -> None:
    from helpers.plots import new_figure

    tasks = ("attribute", "count", "grounding")
    fig, axes = new_figure(2, 1, width=11, height=3.8)
    names = [r["variant"] for r in results]
    for k, task in enumerate(tasks):
        values = [r["test"].get(task, {}).get("score", 0.0) for r in results]
        axes[0].barh([i + (k - 1) * 0.27 for i in range(len(names))], values, height=0.27, label=task)
    blind = results[0]["test"]
    for k, task in enumerate(tasks):
        if task in blind:
            axes[0].axvline(blind[task]["blind"], color=f"C{k}", ls=":", lw=1.2, label=f"{task}: image-blind best")
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("test accuracy (count, attribute) / mean IoU (grounding)")
    axes[0].legend(fontsize=8, loc="lower right")
    axes[1].barh(range(len(names)), [r["final_loss"] for r in results], color="tab:grey")
    axes[1].set_yticks(range(len(names)), [""] * len(names))
    axes[1].invert_yaxis()
    axes[1].set_xlabel("training loss, mean of the last 10 steps")
    fig.suptitle("cpu SFT profile, one setting changed at a time")
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "assets" / "results" / "sft_cpu"))
    parser.add_argument("--eval", type=int, default=300, help="test samples per variant")
    parser.add_argument("--jobs", type=int, default=2, help="variants trained at once (one thread each)")
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = parser.parse_args(argv)
    if args.one is not None:
        print("RESULT " + json.dumps(run_variant(args.one, args.eval)), flush=True)
        return
    names = args.only or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if args.eval < 1 or args.jobs < 1:
        raise SystemExit(f"--eval={args.eval}, --jobs={args.jobs}: each must be ≥ 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def report(name, r):
        print(
            f"{name:20s} {r['train_seconds']:6.1f} s  loss {r['final_loss']:.3f}  "
            + "  ".join(f"{t} {v['score']:.3f} (n={v['n']})" for t, v in r["test"].items()),
            flush=True,
        )

    results = run_jobs(
        {name: [sys.executable, __file__, "--one", name, "--eval", str(args.eval)] for name in names},
        args.jobs,
        ROOT,
        report,
    )
    ordered = [results[n] for n in names]
    import torch
    import transformers

    meta = {
        "command": "python scripts/sft_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores, {args.jobs} jobs of one thread",
        "wall_seconds": round(time.perf_counter() - started, 1),
        "n_eval": args.eval,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (out / "ablation.json").write_text(json.dumps({"meta": meta, "results": ordered}, indent=1))
    plot(ordered, out / "ablation.png")
    print(f"wrote {out / 'ablation.json'} and {out / 'ablation.png'}")


if __name__ == "__main__":
    main()

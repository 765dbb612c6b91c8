"""GRPO against its compute-matched SFT control, over several seeds (notebook 11 reads the result).

For each seed, from the same SFT start (``helpers.checkpoints.sft_checkpoint``: the profile's SFT run
stopped at ``start_step``):

- **GRPO**: ``helpers.grpo.train`` for ``steps`` steps of P prompts × G samples;
- **SFT control**: ``helpers.grpo.sft_continuation``, the same prompt images (same schedule, each
  with its reference answer), the same steps, learning rate and trainable parameters;

then both and the start are scored greedily on the same ``n_eval`` test and OOD questions
(``helpers.evaluation``, with image-blind baselines), and sharpening is measured on the first 40
grounding test questions: mean reward of G samples and best-of-G (``helpers.rollouts.best_of_g``). With
``--trl-steps N``, seed 0 also trains TRL's ``GRPOTrainer`` for N steps on the same prompts beside N
steps of our loop, so the two reward curves can be compared.

    python scripts/grpo_experiment.py --out assets/results/grpo_cpu [--profile cpu] [--steps 30] [--jobs 2]
        [--set temperature=1.0 lr=2e-4 …]   (any GRPOSettings field, typed as in the profile)

Writes ``experiment.json`` and ``experiment.png`` into ``--out``.
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

ARMS = ("start", "sft", "grpo")


def _one_thread_each() -> None:
    """Each process of the experiment on ``$EXPERIMENT_THREADS`` torch threads (1: jobs share the cores)."""
    import torch

    torch.set_num_threads(int(os.environ.get("EXPERIMENT_THREADS", "1")))


def _provenance(argv, started: float) -> dict:
    """What every file this script writes records: the command that made it, the date, the wall time."""
    return {
        "command": "python scripts/grpo_experiment.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def _write_json(path: Path, data: dict) -> None:
    """``data`` into ``path`` whole or not at all (a staged file, then a rename)."""
    staged = path.with_suffix(".json.tmp")
    staged.write_text(json.dumps(data, indent=1))
    staged.replace(path)


def run_seed(
    profile: str, seed: int, steps: int | None, n_eval: int | None, trl_steps: int, overrides: tuple[str, ...] = ()
) -> dict:
    """Both arms of one seed, scored beside the start (one process, one thread on a CPU)."""
    import torch

    _one_thread_each()
    from helpers import grpo
    from helpers.checkpoints import load_checkpoint, sft_checkpoint
    from helpers.data import make_split
    from helpers.evaluation import blind_baselines, evaluate, score_table
    from helpers.profiles import settings
    from helpers.rollouts import best_of_g

    cfg = grpo.GRPOSettings.from_profile(profile, **({"steps": steps} if steps else {})).replace_from_strings(overrides)
    n_eval = n_eval or cfg.n_eval
    start = sft_checkpoint(profile, progress=False)
    prompts = grpo.train_prompts(cfg, profile=profile)
    data = settings("sft", profile).data
    questions = {split: make_split(split, n_eval, 0, **data) for split in ("test", "ood")}
    sharpen_on = [s for s in questions["test"] if s.task in cfg.tasks][:40]  # G samples each: 320 rollouts
    out = {"seed": seed, "arms": {}, "best_of_g": {}, "seconds": {}}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for arm in ARMS:
        model, processor, _ = load_checkpoint(start, device=device)
        t0 = time.perf_counter()
        if arm == "grpo":
            out["history"] = grpo.train(model, processor, prompts, cfg, seed=seed, progress=False)
        elif arm == "sft":
            out["sft_loss"] = grpo.sft_continuation(model, processor, prompts, cfg, seed=seed).history["loss"]
        out["seconds"][arm] = round(time.perf_counter() - t0, 1)
        out["arms"][arm] = {
            split: {
                row["task"]: {k: row[k] for k in ("score", "n", "blind", "p")}
                for row in score_table(evaluate(model, processor, smp), blind_baselines(smp))
            }
            for split, smp in questions.items()
        }
        out["best_of_g"][arm] = best_of_g(model, processor, sharpen_on, cfg, seed=1000 + seed)
    if trl_steps and seed == 0:
        out["trl_route"] = trl_route(start, prompts, cfg, trl_steps)
    return out


def trl_route(start, prompts, cfg, steps: int) -> dict:
    """TRL ``GRPOTrainer`` and our loop, ``steps`` steps each from ``start`` on the same prompts
    (one step = P prompts × G), their mean reward per step."""
    import tempfile

    from helpers import grpo
    from helpers.checkpoints import load_checkpoint
    from helpers.grpo_trl import trl_trainer

    short = cfg.replace(steps=steps)
    chosen = [prompts[i] for step in grpo.prompt_schedule(len(prompts), cfg.prompts_per_step, steps, 0) for i in step]
    model, processor, _ = load_checkpoint(start)
    t0 = time.perf_counter()
    ours = grpo.train(model, processor, chosen, short.replace(n_prompts=len(chosen)), seed=0, progress=False)
    ours_seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trl_trainer(start, processor, chosen, short, tmp, steps=steps, seed=0)
        t0 = time.perf_counter()
        trainer.train()
        trl_seconds = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {
        "steps": steps,
        "ours_reward": [h["reward"] for h in ours],
        "trl_reward": [h["reward"] for h in logs],
        "ours_zero_std": [h["zero_std_groups"] for h in ours],
        "trl_zero_std": [h.get("frac_reward_zero_std") for h in logs],
        "ours_seconds": round(ours_seconds, 1),
        "trl_seconds": round(trl_seconds, 1),
    }


def rerun_trl_route(path: Path, cfg, args, argv) -> None:
    """``--trl-only``: the TRL route of seed 0 again (``--trl-steps`` steps each), written into an existing
    experiment file beside the rest, with its own command, date and wall time."""
    from helpers import grpo
    from helpers.checkpoints import sft_checkpoint

    if args.trl_steps < 1 or not path.is_file():
        raise SystemExit(f"--trl-only needs --trl-steps ≥ 1 (got {args.trl_steps}) and an experiment file at {path}")
    _one_thread_each()
    experiment = json.loads(path.read_text())
    started = time.perf_counter()
    route = trl_route(sft_checkpoint(args.profile), grpo.train_prompts(cfg, profile=args.profile), cfg, args.trl_steps)
    experiment["runs"][0]["trl_route"] = route
    experiment["meta"]["trl_route"] = _provenance(argv, started)
    _write_json(path, experiment)
    print(f"TRL route, {args.trl_steps} steps: written into {path}")


def greedy_trajectory(path: Path, cfg, args, argv) -> None:
    """``--trajectory K``: one GRPO run (seed 0, ``cfg.steps`` steps) with the greedy IoU of the test grounding
    questions measured at the start and every K steps, beside the rollouts' mean reward: what the
    end-of-run scores hide (greedy decoding draws no random numbers, so the run is the one without probes)."""
    from helpers import grpo
    from helpers.checkpoints import load_checkpoint, sft_checkpoint
    from helpers.data import make_split
    from helpers.evaluation import evaluate
    from helpers.profiles import as_plain, settings

    _one_thread_each()
    model, processor, _ = load_checkpoint(sft_checkpoint(args.profile, progress=False))
    split = make_split("test", args.eval or cfg.n_eval, 0, **settings("sft", args.profile).data)
    questions = [s for s in split if s.task in cfg.tasks]
    points = [{"step": 0, "greedy": evaluate(model, processor, questions)["grounding"]["score"], "reward": None}]

    def probe(step, log, rollout, advantages):
        if (step + 1) % args.trajectory == 0:
            score = evaluate(model, processor, questions)["grounding"]["score"]
            points.append({"step": step + 1, "greedy": score, "reward": log["reward"]})
            print(f"step {step + 1}: greedy IoU {score:.3f}", flush=True)

    started = time.perf_counter()
    grpo.train(
        model, processor, grpo.train_prompts(cfg, profile=args.profile), cfg, seed=0, progress=False, on_step=probe
    )
    meta = {**_provenance(argv, started), "n": len(questions), "settings": as_plain(cfg)}
    _write_json(path, {"meta": meta, "points": points})
    print(f"wrote {path}")


def summarise(runs: list[dict]) -> dict:
    """Per split and task: each arm's score per seed, mean and spread over seeds (max − min; the start
    is one checkpoint, so its spread is 0); the GRPO gain over the start, whether it exceeds GRPO's seed
    spread, and GRPO minus the SFT control."""
    table = {}
    first = runs[0]["arms"]["start"]
    for split, tasks in first.items():
        for task, row in tasks.items():
            scores = {arm: [r["arms"][arm][split][task]["score"] for r in runs] for arm in ARMS}
            mean = {arm: sum(v) / len(v) for arm, v in scores.items()}
            spread = {arm: max(v) - min(v) for arm, v in scores.items()}
            table.setdefault(split, {})[task] = {
                "n": row["n"],
                "blind": row["blind"],
                "scores": scores,
                "mean": mean,
                "spread": spread,
                "grpo_gain": mean["grpo"] - mean["start"],
                "grpo_vs_sft": mean["grpo"] - mean["sft"],
                "grpo_gain_beats_spread": mean["grpo"] - mean["start"] > spread["grpo"],
            }
    return table


def plot(summary: dict, runs: list[dict], path: Path) -> None:
    from helpers.plots import new_figure

    fig, axes = new_figure(3, 1, width=12, height=3.4)
    splits = list(summary)
    tasks = list(summary[splits[0]])
    labels = [f"{split}\n{task}" for split in splits for task in tasks]
    for a, arm in enumerate(ARMS):
        xs = [i + (a - 1) * 0.27 for i in range(len(labels))]
        values = [summary[s][t]["scores"][arm] for s in splits for t in tasks]
        axes[0].bar(xs, [sum(v) / len(v) for v in values], 0.25, label=arm, color=f"C{a}")
        for x, v in zip(xs, values):
            axes[0].scatter([x] * len(v), v, color="black", s=6, zorder=3)
    axes[0].scatter(
        range(len(labels)),
        [summary[s][t]["blind"] for s in splits for t in tasks],
        marker="_",
        s=300,
        color="red",
        label="image-blind",
        zorder=4,
    )
    axes[0].set_xticks(range(len(labels)), labels, fontsize=7)
    axes[0].set(ylabel="accuracy / mean IoU", title="start, SFT control, GRPO (dots: seeds)")
    axes[0].legend(fontsize=7)
    for r in runs:
        axes[1].plot([h["iou"] for h in r["history"]], lw=1, label=f"seed {r['seed']}")
        axes[2].plot([h["zero_std_groups"] for h in r["history"]], lw=1)
    axes[1].set(xlabel="GRPO step", ylabel="mean sampled IoU", title="reward of the rollouts")
    axes[1].legend(fontsize=7)
    axes[2].set(xlabel="GRPO step", ylabel="share", title="groups with equal rewards (no signal)", ylim=(0, 1))
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "assets" / "results" / "grpo_cpu"))
    parser.add_argument("--profile", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the profile's seeds")
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps per seed (default: the profile's)")
    parser.add_argument("--eval", type=int, default=None, help="questions per split (default: the profile's n_eval)")
    parser.add_argument("--trl-steps", type=int, default=0, help="TRL route steps on seed 0 (0: skip)")
    parser.add_argument("--jobs", type=int, default=2, help="seeds run at once (one thread each on a CPU)")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="override GRPOSettings fields")
    parser.add_argument(
        "--trl-only", action="store_true", help="rerun only the TRL route (--trl-steps) into --out's experiment.json"
    )
    parser.add_argument(
        "--trajectory", type=int, default=0, metavar="K", help="seed 0 only: greedy test IoU every K GRPO steps"
    )
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one seed, print JSON
    args = parser.parse_args(argv)
    if args.one is not None:
        print(
            "RESULT " + json.dumps(run_seed(args.profile, args.one, args.steps, args.eval, args.trl_steps, args.set)),
            flush=True,
        )
        return
    from helpers.grpo import GRPOSettings

    cfg = GRPOSettings.from_profile(args.profile, **({"steps": args.steps} if args.steps else {}))
    cfg = cfg.replace_from_strings(args.set)
    if args.trl_only:
        rerun_trl_route(Path(args.out) / "experiment.json", cfg, args, argv)
        return
    if args.trajectory < 0:
        raise SystemExit(f"--trajectory={args.trajectory}: expected K ≥ 1 (every K steps), or 0 for no trajectory")
    if args.trajectory:
        greedy_trajectory(Path(args.out) / "trajectory.json", cfg, args, argv)
        return
    seeds = args.seeds or list(cfg.seeds)
    if args.jobs < 1 or (args.eval is not None and args.eval < 3):
        raise SystemExit(f"--jobs={args.jobs} must be ≥ 1 and --eval={args.eval} ≥ 3")
    from helpers.checkpoints import sft_checkpoint

    sft_checkpoint(args.profile)  # once, before the seeds start (they all read it)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    flags = ["--profile", args.profile, "--trl-steps", str(args.trl_steps)]
    flags += (["--steps", str(args.steps)] if args.steps else []) + (["--eval", str(args.eval)] if args.eval else [])
    flags += ["--set", *args.set] if args.set else []

    def report(seed, run):
        print(
            f"seed {seed}: "
            + json.dumps(
                {
                    arm: {s: {t: round(v["score"], 3) for t, v in r.items()} for s, r in run["arms"][arm].items()}
                    for arm in ARMS
                }
            ),
            flush=True,
        )

    runs = run_jobs(
        {seed: [sys.executable, __file__, "--one", str(seed), *flags] for seed in seeds}, args.jobs, ROOT, report
    )
    ordered = [runs[s] for s in seeds]
    import torch
    import transformers

    from helpers.profiles import as_plain

    meta = {
        **_provenance(argv, started),
        "machine": f"{os.cpu_count()} CPU cores, {args.jobs} jobs of one thread",
        "settings": as_plain(cfg),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    summary = summarise(ordered)
    _write_json(out / "experiment.json", {"meta": meta, "summary": summary, "runs": ordered})
    plot(summary, ordered, out / "experiment.png")
    print(f"wrote {out / 'experiment.json'} and {out / 'experiment.png'}")


if __name__ == "__main__":
    main()

"""GRPO by hand: rollouts, rewards, group advantages, the clipped loss with a k3 KL penalty, the
loop, and TRL's ``GRPOTrainer`` on the same batch (taught in notebooks/11_grpo.ipynb).

One GRPO step, for a batch of P prompts:

1. **Rollouts** — sample G completions per prompt at ``temperature`` (``sample_completions``).
2. **Rewards** — score each completion with the verifiable rewards of ``helpers.rewards``.
3. **Advantages** — within each group of G: ``(r - mean) / (std + 1e-4)`` (``group_advantages``).
   A group whose G rewards are equal has advantage 0 everywhere: no learning signal.
4. **Loss** — per completion token, the ratio ``π/π_old`` clipped to ``[1-ε_low, 1+ε_high]``
   times the advantage (PPO's pessimistic min), plus ``β ×`` the k3 estimate of KL(π‖π_ref)
   against a frozen reference model, averaged as ``loss_type`` says (``grpo_loss``).

Where this departs from the DeepSeekMath paper (and matches TRL 1.16): the std is Bessel-corrected
and ``1e-4`` is added to it; log-probabilities are taken at the sampling temperature; with
``num_iterations == 1`` the "old" policy is the current one detached, so the ratio is exactly 1 and
**clipping never acts** (the gradient is the plain policy gradient). The settings are typed
(``GRPOSettings``, kept in ``helpers.profiles`` beside the other settings); where the profiles
depart from TRL 1.16's ``GRPOConfig`` defaults, the profile says so. Simplified against TRL: no
vLLM, no entropy masks, one process unless launched with ``torchrun`` (then each rank rolls out its
own prompts and DDP averages gradients).

Beside the algorithm: ``sft_continuation`` (the compute-matched control every RL claim needs),
``best_of_g`` (pass@1 against best-of-G), the SFT start (``sft_checkpoint``). Figures and the rollout
browser live in ``helpers.grpo_plots``; the multi-seed experiment in ``scripts/grpo_experiment.py``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from helpers import rewards as R
from helpers.profiles import LOSS_TYPES, GRPOSettings  # noqa: F401  (GRPOSettings: grpo.GRPOSettings, as before)
from helpers.rewards import REWARD_FUNCTIONS
from helpers.rollouts import CompletionLogProbs, Rollout, _unwrap, per_token_logps, sample_completions

# ---------------------------------------------------------------------------------------------
# 2–3. Rewards and group-normalised advantages
# ---------------------------------------------------------------------------------------------


def compute_rewards(texts: Sequence[str], tasks: Sequence[str], targets: Sequence, weights: dict[str, float]) -> dict:
    """Each reward of ``weights`` (name → weight) per completion, and their weighted ``total``."""
    unknown = set(weights) - set(REWARD_FUNCTIONS)
    if unknown:
        raise ValueError(f"unknown rewards {sorted(unknown)}; accepted: {sorted(REWARD_FUNCTIONS)}")
    out = {
        name: torch.tensor(
            REWARD_FUNCTIONS[name](completions=list(texts), task=list(tasks), target=list(targets)), dtype=torch.float32
        )
        for name in weights
    }
    out["total"] = sum(weights[name] * out[name] for name in weights)
    return out


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """GRPO's advantages: each reward minus its group's mean, divided by (group std + eps).

    Mirrors TRL ``GRPOTrainer`` (``scale_rewards="group"``: Bessel-corrected std; ``"none"``: no
    division, Dr. GRPO's choice). ``rewards`` is (P·G,) with groups consecutive.
    """
    if rewards.dim() != 1 or num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} do not split into groups of "
            f"num_generations={num_generations}: expected a 1-D tensor of P·G rewards"
        )
    if scale not in ("group", "none"):
        raise ValueError(f"scale={scale!r}: expected 'group' or 'none'")
    grouped = rewards.view(-1, num_generations)  # (P, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(grouped[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


# ---------------------------------------------------------------------------------------------
# 4. KL and the loss (log-probabilities: helpers.rollouts.per_token_logps)
# ---------------------------------------------------------------------------------------------


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π‖π_ref) per token: ``exp(ref - logp) - (ref - logp) - 1`` (≥ 0)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _check_loss_shapes(logps, old_logps, ref_logps, advantages, mask) -> None:
    """(N, K) log-probs and mask, one advantage per completion: else a clear error, not a broadcast."""
    if not isinstance(logps, torch.Tensor) or logps.dim() != 2:
        raise ValueError(f"logps of shape {tuple(getattr(logps, 'shape', ()))}: expected (completions, tokens)")
    for name, value in (("old_logps", old_logps), ("ref_logps", ref_logps), ("mask", mask)):
        if value is not None and tuple(value.shape) != tuple(logps.shape):
            raise ValueError(f"{name} of shape {tuple(value.shape)}: expected logps' shape {tuple(logps.shape)}")
    if tuple(advantages.shape) != (logps.size(0),):
        raise ValueError(
            f"advantages of shape {tuple(advantages.shape)}: expected one per completion, ({logps.size(0)},)"
        )


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    kl_ratio_correction: bool = True,
) -> tuple[torch.Tensor, dict]:
    """The clipped GRPO objective (to minimise) and its diagnostics.

    Per token: ``-min(ρ·A, clip(ρ, 1-ε_low, 1+ε_high)·A) + β·k3``, with ``ρ = exp(logp - old)``.
    Averaged as TRL's ``loss_type``: ``grpo`` (per completion, then over completions), ``bnpo`` and
    ``dapo`` (over all tokens of the batch), ``dr_grpo`` (sum / (N · max_completion_length)).
    ``kl_ratio_correction`` multiplies the k3 term by ρ (TRL 1.16's default
    ``use_bias_correction_kl=True``, from DeepSeek-V3.2): the same value on-policy (ρ = 1), but its
    gradient becomes the unbiased gradient of KL(π‖π_ref). Mirrors ``GRPOTrainer._compute_loss``
    (token-level ratios, one process, no gradient accumulation).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {LOSS_TYPES}")
    if beta < 0 or epsilon_low < 0 or (epsilon_high is not None and epsilon_high < 0):
        raise ValueError(f"beta={beta}, epsilon_low={epsilon_low}, epsilon_high={epsilon_high}: expected ≥ 0")
    if beta > 0 and ref_logps is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logps (the reference model's log-probabilities)")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    _check_loss_shapes(logps, old_logps, ref_logps, advantages, mask)
    mask = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype).unsqueeze(1)  # (N, 1): one advantage for every token
    ratio = torch.exp(logps - old_logps)  # (N, K)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = kl_k3(logps, ref_logps) if beta > 0 else torch.zeros_like(logps)
    per_token = per_token + beta * (kl * ratio if kl_ratio_correction else kl)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = _masked_mean(per_token, mask)
    else:
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length (the normaliser)")
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    with torch.no_grad():
        low = (ratio < 1 - epsilon_low) & (adv < 0)
        high = (ratio > 1 + epsilon_high) & (adv > 0)
        stats = dict(
            kl=_masked_mean(kl, mask).item(),
            clip_low=_masked_mean(low.to(mask.dtype), mask).item(),
            clip_high=_masked_mean(high.to(mask.dtype), mask).item(),
            ratio_mean=_masked_mean(ratio, mask).item(),
        )
    return loss, stats


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _group_stats(rollout: Rollout, rewards: dict) -> dict:
    """What a step logs about its rollouts: mean reward, accuracy (count, colour), IoU (boxes),
    format, completion length, and the share of groups whose G rewards are all equal, overall and
    per task (``zero_std_<task>``: those groups teach nothing)."""
    tasks, G = rollout.tasks, rollout.num_generations
    scores = (
        rewards["task"] if "task" in rewards else torch.as_tensor(R.task_reward(rollout.texts, tasks, rollout.targets))
    )
    flat = rewards["total"].view(-1, G).std(1) == 0 if G > 1 else torch.ones(len(tasks), dtype=torch.bool)
    group_tasks = tasks[::G]
    out = dict(
        reward=rewards["total"].mean().item(),
        accuracy=_mean([float(v) for t, v in zip(tasks, scores) if t != "grounding"]),
        iou=_mean([float(v) for t, v in zip(tasks, scores) if t == "grounding"]),
        format=_mean(R.format_reward(rollout.texts, tasks)),
        completion_length=rollout.completion_mask.sum(1).float().mean().item(),
        zero_std_groups=flat.float().mean().item(),
    )
    for task in dict.fromkeys(group_tasks):
        out[f"zero_std_{task}"] = _mean([float(f) for t, f in zip(group_tasks, flat) if t == task])
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def grpo_step(
    model, ref_model, processor, optimizer, samples: Sequence, cfg: GRPOSettings, seed: int, scorer=None
) -> tuple[dict, Rollout, torch.Tensor]:
    """One GRPO step on ``samples`` (P prompts): rollout, rewards, advantages, ``num_iterations``
    gradient steps of the clipped loss. Returns (logged numbers, the rollout, its advantages).
    ``scorer`` computes the policy's log-probs (a DDP-wrapped ``CompletionLogProbs`` under torchrun)."""
    scorer = scorer if scorer is not None else model
    start = time.perf_counter()
    G, T = cfg.num_generations, cfg.temperature
    rollout = sample_completions(
        model, processor, samples, G, T, cfg.max_new_tokens, seed=seed, bf16=cfg.bf16, bucket_by_task=cfg.bucket_by_task
    )
    rewards = compute_rewards(rollout.texts, rollout.tasks, rollout.targets, cfg.reward_weights)
    advantages = group_advantages(rewards["total"], G, cfg.scale_rewards).to(rollout.prompt_ids.device)
    autocast = _autocast(rollout.prompt_ids.device, cfg.bf16)
    with torch.no_grad(), autocast():
        ref = per_token_logps(ref_model, rollout, T) if cfg.beta > 0 else None
        old = per_token_logps(scorer, rollout, T) if cfg.num_iterations > 1 else None
    model.train()
    for _ in range(cfg.num_iterations):
        with autocast():
            logps = per_token_logps(scorer, rollout, T)
        loss, stats = grpo_loss(
            logps,
            old if old is not None else logps.detach(),
            ref,
            advantages,
            rollout.completion_mask,
            cfg.beta,
            cfg.epsilon,
            cfg.epsilon_high,
            cfg.loss_type,
            cfg.max_new_tokens,
            cfg.kl_ratio_correction,
        )
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    tokens = rollout.completion_mask.sum().item()
    log = dict(
        loss=loss.item(),
        grad_norm=grad_norm,
        **stats,
        **_group_stats(rollout, rewards),
        step_seconds=time.perf_counter() - start,
        rollout_seconds=rollout.generation_seconds,
        rollout_tokens=tokens,
        rollout_tokens_per_s=tokens / max(rollout.generation_seconds, 1e-9),
    )
    return log, rollout, advantages


def _autocast(device, bf16: bool):
    use = device.type == "cuda" and bf16
    return lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=use)


def frozen_copy(model):
    """A frozen reference model: a deep copy in eval mode with ``requires_grad=False``."""
    ref = copy.deepcopy(_unwrap(model)).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def prompt_schedule(
    n_prompts: int, per_step: int, steps: int, seed: int = 0, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """The prompt indices of each step (this rank's share): a seeded permutation of ``range(n_prompts)``,
    cycled. GRPO and its SFT control (``sft_continuation``) read the same schedule."""
    order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed)).tolist()
    return [
        [order[(step * per_step * world + rank * per_step + i) % n_prompts] for i in range(per_step)]
        for step in range(steps)
    ]


def _freeze_table(model, cfg: GRPOSettings) -> None:
    if cfg.freeze_embeddings:  # as in the SFT profile: AdamW would drift all 151,936 tied rows (notebook 10)
        _unwrap(model).get_input_embeddings().weight.requires_grad_(False)


def train(
    model,
    processor,
    prompts: Sequence,
    cfg: GRPOSettings,
    seed: int = 0,
    ref_model=None,
    progress: bool = True,
    on_step: Callable | None = None,
) -> list[dict]:
    """The hand-written GRPO loop: ``cfg.steps`` steps of ``cfg.prompts_per_step`` prompts
    (``prompt_schedule``), AdamW at a constant ``cfg.lr``. Returns one dict of logged numbers per
    step; trains in place. Stops early after ``cfg.max_seconds`` of wall time if set."""
    from tqdm.auto import tqdm

    rank, world = _rank_world()
    if cfg.beta == 0:  # no KL term: no reference model at all (TRL's default)
        ref_model = None
    elif ref_model is None:
        ref_model = frozen_copy(model)
    _freeze_table(model, cfg)  # before DDP lists the trainable parameters
    scorer = CompletionLogProbs(model)
    if world > 1:  # DDP hooks the scorer's forward: gradients are averaged over ranks in backward
        device = next(model.parameters()).device
        scorer = torch.nn.parallel.DistributedDataParallel(
            scorer, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99)
    )
    schedule = prompt_schedule(len(prompts), cfg.prompts_per_step, cfg.steps, seed, rank, world)
    history, start = [], time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"GRPO seed {seed}", disable=not progress or rank != 0)
    for step in bar:
        log, rollout, advantages = grpo_step(
            model,
            ref_model,
            processor,
            optimizer,
            [prompts[i] for i in schedule[step]],
            cfg,
            seed=seed * 100_003 + step * world + rank,
            scorer=scorer,
        )
        log["step"] = step
        history.append(_all_reduce_means(log) if world > 1 else log)
        bar.set_postfix(reward=f"{log['reward']:.3f}", kl=f"{log['kl']:.4f}", refresh=False)
        if on_step is not None:
            on_step(step, log, rollout, advantages)
        if cfg.max_seconds is not None and time.perf_counter() - start > cfg.max_seconds:
            break
    return history


def sft_continuation(model, processor, prompts: Sequence, cfg: GRPOSettings, seed: int = 0, progress: bool = False):
    """The control of a GRPO run: the same start trained further by **SFT** on the same prompt images
    (``prompt_schedule``: each step's P prompts, with their reference answers), for the same number
    of steps, at the same constant learning rate, with the same parameters trainable. Same images
    seen; an SFT step costs a fraction of a GRPO step (no sampling, one answer instead of G)."""
    from helpers.sft import train as sft_train

    _freeze_table(model, cfg)
    seen = [prompts[i] for step in prompt_schedule(len(prompts), cfg.prompts_per_step, cfg.steps, seed) for i in step]
    return sft_train(
        model,
        processor,
        seen,
        steps=cfg.steps,
        batch_size=cfg.prompts_per_step,
        lr=cfg.lr,
        warmup=0,
        lr_floor=1.0,
        weight_decay=cfg.weight_decay,
        clip=cfg.max_grad_norm,
        seed=seed,
        progress=progress,
        average="answer",
    )


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce_means(log: dict) -> dict:
    keys = [k for k, v in log.items() if isinstance(v, (int, float)) and k != "step"]
    values = torch.tensor([float(log[k]) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(values)
    return {**log, **{k: v / torch.distributed.get_world_size() for k, v in zip(keys, values.tolist())}}


def train_prompts(cfg: GRPOSettings, seed: int = 1, profile: str | None = None) -> list:
    """``cfg.n_prompts`` training prompts of ``cfg.tasks`` (the SFT profile's data options; GRPO reads
    only images, questions and targets)."""
    from helpers.data import make_split
    from helpers.profiles import settings

    return make_split("train", cfg.n_prompts, seed, **{**settings("sft", profile).data, "tasks": tuple(cfg.tasks)})


def main(argv=None) -> None:
    """``python -m helpers.grpo --out DIR [--profile P] [--sft DIR] [--seed S] [--steps N] [--set NAME=VALUE …]``:
    one GRPO run from the SFT start, saved as a checkpoint with its per-step log (under ``torchrun`` it runs DDP).
    The multi-seed comparison with the SFT control is ``scripts/grpo_experiment.py``."""
    import argparse
    import json
    import os

    from helpers.checkpoints import load_checkpoint, save_checkpoint, sft_checkpoint

    parser = argparse.ArgumentParser(prog="python -m helpers.grpo", description=main.__doc__.split(":")[0])
    for flag, kind in (("--out", str), ("--profile", str), ("--sft", str), ("--seed", int), ("--steps", int)):
        parser.add_argument(flag, type=kind, required=flag == "--out", default=0 if flag == "--seed" else None)
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="override GRPOSettings fields")
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = _rank_world()
    cfg = GRPOSettings.from_profile(args.profile, **({"steps": args.steps} if args.steps else {}))
    cfg = cfg.replace_from_strings(args.set)
    start = Path(args.sft) if args.sft else sft_checkpoint(args.profile, progress=rank == 0)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    model, processor, _ = load_checkpoint(start, device=device)
    history = train(model, processor, train_prompts(cfg, profile=args.profile), cfg, seed=args.seed, progress=rank == 0)
    if rank == 0:
        save_checkpoint(args.out, model, processor, {"step": len(history), "history": history, "world": world})
        print(json.dumps({"steps": len(history), "world": world, "last": history[-1]}, default=str))
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

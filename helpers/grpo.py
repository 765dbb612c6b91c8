"""GRPO by hand: rollouts, rewards, group advantages, the clipped loss with a k3 KL penalty, the
loop, evaluation, and TRL's ``GRPOTrainer`` driven on the same batch (taught in
notebooks/11_grpo.ipynb).

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
``num_iterations == 1`` the "old" policy is the current one detached (ratio 1, the gradient is
still the policy gradient). Simplified against TRL: no vLLM, no entropy masks, one process unless
launched with ``torchrun`` (then each rank rolls out its own prompts and DDP averages gradients).

Run outside a notebook with ``python -m helpers.grpo --profile gpu --out DIR [--sft DIR]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from helpers import rewards as R
from helpers.qwen import SPECIAL_TOKENS

IM_END = SPECIAL_TOKENS["<|im_end|>"]
PAD = SPECIAL_TOKENS["<|endoftext|>"]
EOS_IDS = (IM_END, PAD)
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")

# ---------------------------------------------------------------------------------------------
# 1. Rollouts
# ---------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """G sampled completions for each of P prompts, as the tensors the loss needs (N = P·G rows).

    Prompts are left-padded (generation needs it), completions right-padded; ``completion_mask``
    is 1 up to and including the first end token. ``samples`` and ``texts`` follow the same N rows
    (each sample repeated G times, groups consecutive).
    """

    prompt_ids: torch.Tensor        # (N, Lp) left-padded
    prompt_mask: torch.Tensor       # (N, Lp)
    completion_ids: torch.Tensor    # (N, K)  right-padded with <|endoftext|>
    completion_mask: torch.Tensor   # (N, K)  1 up to and including the first end token
    pixel_values: torch.Tensor      # (patches of all N images, 1176)
    image_grid_thw: torch.Tensor    # (N, 3)
    mm_token_type_ids: torch.Tensor  # (N, Lp) 1 on image tokens
    samples: list = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    num_generations: int = 1
    generation_seconds: float = 0.0

    def forward_inputs(self) -> dict:
        """The model inputs for prompt + completion (what a log-prob forward pass reads)."""
        zeros = torch.zeros_like(self.completion_ids)
        return dict(
            input_ids=torch.cat([self.prompt_ids, self.completion_ids], dim=1),
            attention_mask=torch.cat([self.prompt_mask, self.completion_mask], dim=1),
            pixel_values=self.pixel_values,
            image_grid_thw=self.image_grid_thw,
            mm_token_type_ids=torch.cat([self.mm_token_type_ids, zeros], dim=1),
        )

    @property
    def tasks(self) -> list[str]:
        return [s.task for s in self.samples]

    @property
    def targets(self) -> list:
        return [s.target for s in self.samples]


def encode_prompts(processor, samples: Sequence, device="cpu") -> dict:
    """Left-padded prompt batch (chat template with the generation prompt) for ``samples``.

    Mirrors what TRL's ``_tokenize_prompts`` + left padding build for a conversational VLM dataset.
    """
    from helpers.data import sample_messages

    if not samples:
        raise ValueError("samples is empty: expected at least one helpers.data.Sample")
    texts = [processor.apply_chat_template(sample_messages(s, with_answer=False), add_generation_prompt=True,
                                           tokenize=False) for s in samples]
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = processor(text=texts, images=[s.image for s in samples], padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    return {k: v.to(device) for k, v in batch.items()}


def completion_mask_after_eos(completion_ids: torch.Tensor, eos_ids: Sequence[int] = EOS_IDS) -> torch.Tensor:
    """1 on each completion token up to and including its first end token, 0 after (TRL's rule).

    A completion with no end token (truncated at ``max_new_tokens``) keeps all of its tokens.
    """
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_ids), device=completion_ids.device))
    length = completion_ids.size(1)
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], length, dtype=torch.long))
    positions = torch.arange(length, device=completion_ids.device).expand_as(completion_ids)
    return (positions <= first.unsqueeze(1)).long()


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def _rows(batch: dict, rows: list[int]) -> dict:
    """The sub-batch of ``rows`` (their pixel rows too: ``grid_t·grid_h·grid_w`` patches per image)."""
    patches = batch["image_grid_thw"].prod(-1)
    offsets = torch.cat([patches.new_zeros(1), patches.cumsum(0)]).tolist()
    pixels = torch.cat([batch["pixel_values"][offsets[r]:offsets[r + 1]] for r in rows])
    index = torch.tensor(rows, device=batch["input_ids"].device)
    return {k: (pixels if k == "pixel_values" else v[index]) for k, v in batch.items()}


@torch.no_grad()
def sample_completions(model, processor, samples: Sequence, num_generations: int = 4, temperature: float = 1.0,
                       max_new_tokens: int = 40, greedy: bool = False, seed: int | None = None,
                       bf16: bool | None = None, bucket_by_task: bool = False) -> Rollout:
    """Roll out ``num_generations`` completions per sample (``model.generate``, left padding).

    Sampling is plain multinomial at ``temperature`` (no top-k / top-p: TRL's defaults), or greedy
    when ``greedy`` (then use ``num_generations=1``). Groups are consecutive rows. On a GPU the
    forward passes run under bf16 autocast unless ``bf16=False``. ``bucket_by_task`` runs one
    ``generate`` per task, so two-token answers (count, attribute) do not wait for the 30-token
    boxes: cheaper on a CPU, where each decoding step costs in proportion to the rows.
    """
    if num_generations < 1:
        raise ValueError(f"num_generations={num_generations}: expected ≥ 1")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature={temperature}: expected > 0 when sampling")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: expected ≥ 1")
    net = _unwrap(model)
    device = next(net.parameters()).device
    repeated = [s for s in samples for _ in range(num_generations)]
    batch = encode_prompts(processor, repeated, device)
    buckets = {}
    for row, sample in enumerate(repeated):
        buckets.setdefault(sample.task if bucket_by_task else "all", []).append(row)
    if seed is not None:
        torch.manual_seed(seed)
    was_training = net.training
    net.eval()
    sampling = {} if greedy else dict(temperature=temperature, top_k=0, top_p=1.0)
    pieces, seconds = {}, 0.0
    for rows in buckets.values():
        part = batch if len(buckets) == 1 else _rows(batch, rows)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and bf16 is not False):
            output = net.generate(**part, max_new_tokens=max_new_tokens, do_sample=not greedy, pad_token_id=PAD,
                                  eos_token_id=list(EOS_IDS), **sampling)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        pieces[tuple(rows)] = output[:, batch["input_ids"].size(1):]
    net.train(was_training)
    width = max(1, max(p.size(1) for p in pieces.values()))  # ≥ 1 column so shapes stay valid
    completion = torch.full((len(repeated), width), PAD, dtype=batch["input_ids"].dtype, device=device)
    for rows, piece in pieces.items():
        completion[list(rows), :piece.size(1)] = piece
    mask = completion_mask_after_eos(completion)
    if bucket_by_task:  # columns a bucket never generated are padding, not tokens
        for rows, piece in pieces.items():
            mask[list(rows), piece.size(1):] = 0
    completion = torch.where(mask.bool(), completion, torch.full_like(completion, PAD))
    texts = processor.tokenizer.batch_decode(completion, skip_special_tokens=True)
    return Rollout(batch["input_ids"], batch["attention_mask"], completion, mask, batch["pixel_values"],
                   batch["image_grid_thw"], batch["mm_token_type_ids"], repeated, texts, num_generations, seconds)


# ---------------------------------------------------------------------------------------------
# 2–3. Rewards and group-normalised advantages
# ---------------------------------------------------------------------------------------------

#: reward name → function (TRL convention), the ones the loop sums with ``reward_weights``.
REWARD_FUNCTIONS: dict[str, Callable] = {"task": R.task_reward, "format": R.format_reward}


def compute_rewards(texts: Sequence[str], tasks: Sequence[str], targets: Sequence, weights: dict[str, float]) -> dict:
    """Each reward of ``weights`` (name → weight) per completion, and their weighted ``total``."""
    unknown = set(weights) - set(REWARD_FUNCTIONS)
    if unknown:
        raise ValueError(f"unknown rewards {sorted(unknown)}; accepted: {sorted(REWARD_FUNCTIONS)}")
    out = {name: torch.tensor(REWARD_FUNCTIONS[name](completions=list(texts), task=list(tasks), target=list(targets)),
                              dtype=torch.float32) for name in weights}
    out["total"] = sum(weights[name] * out[name] for name in weights)
    return out


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages: each reward minus its group's mean, divided by (group std + eps).

    Mirrors TRL ``GRPOTrainer`` (``scale_rewards="group"``: Bessel-corrected std; ``"none"``: no
    division, Dr. GRPO's choice). ``rewards`` is (P·G,) with groups consecutive.
    """
    if rewards.dim() != 1 or num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of "
                         f"num_generations={num_generations}: expected a 1-D tensor of P·G rewards")
    if scale not in ("group", "none"):
        raise ValueError(f"scale={scale!r}: expected 'group' or 'none'")
    grouped = rewards.view(-1, num_generations)  # (P, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(grouped[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


# ---------------------------------------------------------------------------------------------
# 4. Log-probabilities, KL and the loss
# ---------------------------------------------------------------------------------------------


class CompletionLogProbs(torch.nn.Module):
    """log π(token | prefix) of the completion tokens, with the LM head applied only where
    ``completion_mask`` is 1 (a module, so DDP can wrap it under ``torchrun``).

    The backbone runs once over prompt + completion; the hidden state at position t predicts
    token t+1, so the K states before each completion token are kept, then only the unmasked ones
    go through the 151,936-row LM head: two-token answers no longer pay for the longest row.
    Mirrors TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``), which also projects
    only the scored positions. Masked positions are returned as 0.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, completion_ids,
                completion_mask, temperature: float = 1.0) -> torch.Tensor:
        base = self.model
        hidden = base.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                            image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids,
                            use_cache=False).last_hidden_state  # (N, Lp + K, D)
        k = completion_ids.size(1)
        keep = completion_mask.bool()  # (N, K)
        states = hidden[:, -k - 1:-1][keep]  # (M, D): M scored tokens ≪ N·K
        logits = base.lm_head(states)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # (M, V)
        chosen = logits.gather(1, completion_ids[keep].unsqueeze(1)).squeeze(1)  # (M,)
        out = torch.zeros(completion_ids.shape, dtype=logits.dtype, device=logits.device)
        out[keep] = chosen - torch.logsumexp(logits, dim=-1)  # log-softmax at the chosen tokens only
        return out


def per_token_logps(model, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """log π(token | prefix) of every completion token, (N, K), at ``temperature`` (0 where masked).

    ``model`` is a Qwen2.5-VL model, or a ``CompletionLogProbs`` (possibly inside DDP). Mirrors
    TRL's ``_get_per_token_logps_and_entropies`` (logits divided by the sampling temperature).
    """
    scorer = model if isinstance(_unwrap(model), CompletionLogProbs) else CompletionLogProbs(model)
    return scorer(**rollout.forward_inputs(), completion_ids=rollout.completion_ids,
                  completion_mask=rollout.completion_mask, temperature=temperature)


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π‖π_ref) per token: ``exp(ref - logp) - (ref - logp) - 1`` (≥ 0)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, beta: float = 0.0, epsilon_low: float = 0.2, epsilon_high: float | None = None,
              loss_type: str = "grpo", max_completion_length: int | None = None,
              kl_ratio_correction: bool = True) -> tuple[torch.Tensor, dict]:
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
        stats = dict(kl=_masked_mean(kl, mask).item(), clip_low=_masked_mean(low.to(mask.dtype), mask).item(),
                     clip_high=_masked_mean(high.to(mask.dtype), mask).item(),
                     ratio_mean=_masked_mean(ratio, mask).item())
    return loss, stats


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def evaluate(model, processor, samples: Sequence, batch_size: int = 32) -> dict:
    """``helpers.evaluation.evaluate`` summarised: overall ``score``, ``format`` and one score per task
    (the one evaluator SFT uses too, so an SFT checkpoint scores the same in notebooks 10 and 11)."""
    from helpers.evaluation import evaluate as evaluate_all, summary

    return summary(evaluate_all(model, processor, samples, batch_size))


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def default_settings(profile: str | None = None) -> dict:
    """The ``grpo`` section of the profile in force (see ``helpers.profiles``)."""
    from helpers.profiles import settings

    return settings("grpo", profile)


def _group_stats(rollout: Rollout, rewards: dict, advantages: torch.Tensor) -> dict:
    tasks = rollout.tasks
    scores = rewards["task"] if "task" in rewards else R.task_reward(rollout.texts, tasks, rollout.targets)
    scores = torch.as_tensor(scores)
    acc = [float(v) for t, v in zip(tasks, scores) if t != "grounding"]
    ious = [float(v) for t, v in zip(tasks, scores) if t == "grounding"]
    grouped = rewards["total"].view(-1, rollout.num_generations)
    return dict(
        reward=rewards["total"].mean().item(),
        accuracy=sum(acc) / len(acc) if acc else float("nan"),
        iou=sum(ious) / len(ious) if ious else float("nan"),
        format=R_mean(R.format_reward(rollout.texts, tasks)),
        completion_length=rollout.completion_mask.sum(1).float().mean().item(),
        zero_std_groups=(grouped.std(1) == 0).float().mean().item() if rollout.num_generations > 1 else 1.0,
    )


def R_mean(values) -> float:
    return sum(values) / len(values) if len(values) else float("nan")


def grpo_step(model, ref_model, processor, optimizer, samples: Sequence, cfg: dict, seed: int,
              scorer=None) -> tuple[dict, Rollout, torch.Tensor]:
    """One GRPO step on ``samples`` (P prompts): rollout, rewards, advantages, ``num_iterations``
    gradient steps of the clipped loss. Returns (logged numbers, the rollout, its advantages).
    ``scorer`` computes the policy's log-probs (a DDP-wrapped ``CompletionLogProbs`` under torchrun)."""
    scorer = scorer if scorer is not None else model
    start = time.perf_counter()
    G, T = cfg["num_generations"], cfg["temperature"]
    rollout = sample_completions(model, processor, samples, G, T, cfg["max_new_tokens"], seed=seed, bf16=cfg.get("bf16"),
                                 bucket_by_task=cfg.get("bucket_by_task", False))
    rewards = compute_rewards(rollout.texts, rollout.tasks, rollout.targets, cfg["reward_weights"])
    advantages = group_advantages(rewards["total"], G, cfg.get("scale_rewards", "group")).to(rollout.prompt_ids.device)
    beta, iterations = cfg["beta"], cfg.get("num_iterations", 1)
    autocast = _autocast(rollout.prompt_ids.device, cfg)
    with torch.no_grad(), autocast():
        ref = per_token_logps(ref_model, rollout, T) if beta > 0 else None
        old = per_token_logps(scorer, rollout, T) if iterations > 1 else None
    model.train()
    for _ in range(iterations):
        with autocast():
            logps = per_token_logps(scorer, rollout, T)
        loss, stats = grpo_loss(logps, old if old is not None else logps.detach(), ref, advantages,
                                rollout.completion_mask, beta, cfg["epsilon"], cfg.get("epsilon_high"),
                                cfg["loss_type"], cfg["max_new_tokens"], cfg.get("kl_ratio_correction", True))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"]).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    tokens = rollout.completion_mask.sum().item()
    log = dict(loss=loss.item(), grad_norm=grad_norm, **stats, **_group_stats(rollout, rewards, advantages),
               step_seconds=time.perf_counter() - start, rollout_seconds=rollout.generation_seconds,
               rollout_tokens=tokens, rollout_tokens_per_s=tokens / max(rollout.generation_seconds, 1e-9))
    return log, rollout, advantages


def _autocast(device, cfg):
    use = device.type == "cuda" and cfg.get("bf16", True)
    return lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=use)


def frozen_copy(model):
    """A frozen reference model: a deep copy in eval mode with ``requires_grad=False``."""
    ref = copy.deepcopy(_unwrap(model)).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def train(model, processor, prompts: Sequence, cfg: dict, seed: int = 0, ref_model=None, progress: bool = True,
          on_step: Callable | None = None, max_seconds: float | None = None) -> list[dict]:
    """The hand-written GRPO loop: ``cfg["steps"]`` steps of ``cfg["prompts_per_step"]`` prompts
    (cycling through ``prompts`` in a seeded order), AdamW at ``cfg["lr"]``. Returns one dict of
    logged numbers per step (reward, accuracy, IoU, KL, completion length, …); trains in place.
    ``cfg["freeze_embeddings"]`` fixes the tied embedding table first (``requires_grad=False``).
    Stops early after ``max_seconds`` of wall time if given (the log says how many steps ran).
    """
    from tqdm.auto import tqdm

    rank, world = _rank_world()
    ref_model = ref_model if ref_model is not None else frozen_copy(model)
    if cfg.get("freeze_embeddings"):  # as in the SFT profiles: AdamW would drift all 151,936 tied rows
        _unwrap(model).get_input_embeddings().weight.requires_grad_(False)  # before DDP lists the trainable ones
    scorer = CompletionLogProbs(model)
    if world > 1:  # DDP hooks the scorer's forward: gradients are averaged over ranks in backward
        device = next(model.parameters()).device
        scorer = torch.nn.parallel.DistributedDataParallel(scorer, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"],
                                  weight_decay=cfg.get("weight_decay", 0.0), betas=(0.9, 0.99))
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    P, history, start = cfg["prompts_per_step"], [], time.perf_counter()
    bar = tqdm(range(cfg["steps"]), desc=f"GRPO seed {seed}", disable=not progress or rank != 0)
    for step in bar:
        chosen = [prompts[order[(step * P * world + rank * P + i) % len(order)]] for i in range(P)]
        log, rollout, advantages = grpo_step(model, ref_model, processor, optimizer, chosen, cfg,
                                             seed=seed * 100_003 + step * world + rank, scorer=scorer)
        log["step"] = step
        history.append(_all_reduce_means(log) if world > 1 else log)
        bar.set_postfix(reward=f"{log['reward']:.3f}", kl=f"{log['kl']:.4f}", len=f"{log['completion_length']:.1f}")
        if on_step is not None:
            on_step(step, log, rollout, advantages)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    return history


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce_means(log: dict) -> dict:
    keys = [k for k, v in log.items() if isinstance(v, (int, float)) and k != "step"]
    values = torch.tensor([float(log[k]) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(values)
    return {**log, **{k: v / torch.distributed.get_world_size() for k, v in zip(keys, values.tolist())}}


# ---------------------------------------------------------------------------------------------
# TRL: the same loss, and the TRL route
# ---------------------------------------------------------------------------------------------


def trl_dataset(samples: Sequence):
    """A conversational prompt dataset for TRL's ``GRPOTrainer``: ``prompt`` (user turn with an
    image part), ``image``, and the ``task`` / ``target`` columns our rewards read (the target as
    its answer string, so the column has one type)."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
                               "image": s.image, "task": s.task, "target": s.answer} for s in samples])


def trl_trainer(model_dir, processor, samples: Sequence, cfg: dict, output_dir, steps: int = 1, seed: int = 0,
                dtype: str = "float32", **extra):
    """TRL's ``GRPOTrainer`` with our settings (G, temperature, β, ε, loss type, lr) and rewards.

    ``model_dir`` must be a saved checkpoint directory: with ``beta > 0`` TRL builds its reference
    model from the policy's config name, which an in-memory model lacks (DESIGN §5).
    """
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    n = cfg["prompts_per_step"] * cfg["num_generations"]
    cuda = torch.cuda.is_available()
    args = GRPOConfig(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=n, num_generations=cfg["num_generations"],
        max_completion_length=cfg["max_new_tokens"], temperature=cfg["temperature"], top_p=1.0, top_k=0,
        beta=cfg["beta"], epsilon=cfg["epsilon"], epsilon_high=cfg.get("epsilon_high"), loss_type=cfg["loss_type"],
        num_iterations=cfg.get("num_iterations", 1), use_bias_correction_kl=cfg.get("kl_ratio_correction", True),
        scale_rewards=cfg.get("scale_rewards", "group"),
        learning_rate=cfg["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=cfg.get("weight_decay", 0.0),
        adam_beta2=0.99, max_grad_norm=cfg["max_grad_norm"], reward_weights=list(cfg["reward_weights"].values()),
        model_init_kwargs={"dtype": getattr(torch, dtype) if isinstance(dtype, str) else dtype}, bf16=cuda and cfg.get("bf16", True), use_cpu=not cuda,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=seed, data_seed=seed,
        dataloader_num_workers=0, remove_unused_columns=False, **extra)
    funcs = [REWARD_FUNCTIONS[name] for name in cfg["reward_weights"]]
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=funcs, args=args, train_dataset=trl_dataset(samples),
                          processing_class=processor)
    trainer.remove_callback(PrinterCallback)  # keep notebooks quiet: the log lives in trainer.state.log_history
    return trainer


def trl_loss(trainer, rollout: Rollout, advantages: torch.Tensor, old_logps: torch.Tensor,
             ref_logps: torch.Tensor | None) -> torch.Tensor:
    """TRL's ``GRPOTrainer.compute_loss`` on our fixed batch: the ``inputs`` dict its
    ``_generate_and_score_completions`` would have produced, with our advantages and log-probs."""
    forward = rollout.forward_inputs()
    inputs = dict(prompt_ids=rollout.prompt_ids, prompt_mask=rollout.prompt_mask, completion_ids=rollout.completion_ids,
                  completion_mask=rollout.completion_mask, advantages=advantages, old_per_token_logps=old_logps,
                  pixel_values=rollout.pixel_values, image_grid_thw=rollout.image_grid_thw,
                  num_images=[1] * rollout.prompt_ids.size(0), mm_token_type_ids=forward["mm_token_type_ids"],
                  num_items_in_batch=rollout.completion_mask.sum())
    if ref_logps is not None:
        inputs["ref_per_token_logps"] = ref_logps
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train for each accumulation window
    return trainer.compute_loss(trainer.model, inputs)


def trl_timings(trainer) -> dict:
    """Train ``trainer`` (its ``max_steps``) timing ``generate``; returns step time and rollout tokens/s."""
    model = trainer.model
    generate, spent = model.generate, []

    def timed(*args, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        spent.append(time.perf_counter() - start)
        return out

    model.generate = timed
    try:
        trainer.train()
    finally:
        del model.generate
    logs = [h for h in trainer.state.log_history if "step_time" in h]
    n = trainer.args.per_device_train_batch_size
    tokens = [h["completions/mean_length"] * n for h in logs]
    return dict(step_seconds=[h["step_time"] for h in logs], rollout_seconds=spent,
                rollout_tokens=tokens, reward=[h["reward"] for h in logs], kl=[h.get("kl", 0.0) for h in logs],
                rollout_tokens_per_s=sum(tokens) / max(sum(spent), 1e-9))


# ---------------------------------------------------------------------------------------------
# The SFT starting point
# ---------------------------------------------------------------------------------------------


def sft_checkpoint(profile: str | None = None, directory=None, progress: bool = True) -> Path:
    """The SFT checkpoint GRPO starts from: ``directory`` if given, else the course cache
    (``helpers.checkpoints.profile_checkpoint_dir``: notebook 10 saves its run there). When it is
    missing or incomplete, says so and trains it with ``helpers.recipes.run_profile`` (a few minutes
    on a CPU)."""
    from helpers import checkpoints, recipes
    from helpers.profiles import current_profile

    name = current_profile(profile)
    path = Path(directory) if directory is not None else checkpoints.profile_checkpoint_dir(name)
    if not checkpoints.is_complete(path):
        if progress:
            print(f"no complete SFT checkpoint at {path.name!r} (run notebook 10 first to reuse one): "
                  f"training it now with helpers.recipes.run_profile({name!r})")
        recipes.run_profile(name, out=path, progress=progress, evaluate_splits=False)
    return path


def load_start(path, device="cpu"):
    """(model, processor) of a saved checkpoint, the model in float32 on ``device``, eval mode."""
    from helpers.qwen import load_model, load_processor

    return load_model(path, device=device), load_processor(path)


def data_options(profile: str | None = None) -> dict:
    """The data options of the SFT profile (same image size and distractors as its training)."""
    from helpers.profiles import settings

    return dict(settings("sft", profile).get("data", {}))


def eval_splits(n: int, seed: int = 0, profile: str | None = None) -> dict:
    """``n`` samples of val, test and ood with the SFT profile's data options."""
    from helpers.data import make_split

    opts = data_options(profile)
    return {split: make_split(split, n, seed, **opts) for split in ("val", "test", "ood")}


def train_prompts(n: int, seed: int = 0, profile: str | None = None) -> list:
    """``n`` training prompts (the train split; GRPO reads only images, questions and targets)."""
    from helpers.data import make_split

    return make_split("train", n, seed, **data_options(profile))


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def plot_groups(rewards: torch.Tensor, advantages: torch.Tensor, num_generations: int, width: float = 8.0):
    """Left: each prompt's G rewards (dots) and their mean (bar); right: the advantages, coloured by
    group. Equal rewards in a group show as one dot and advantages of 0."""
    from helpers.plots import COLOURS, new_figure

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
    from helpers.plots import new_figure

    fig, axes = new_figure(4, 1, width, 2.5)
    panels = (("reward", "mean reward"), (("accuracy", "iou"), "accuracy (count, attribute) / IoU"),
              ("kl", "KL to reference (k3)"), ("completion_length", "completion length (tokens)"))
    for ax, (keys, title) in zip(axes, panels):
        for name, history in histories.items():
            steps = [h["step"] for h in history]
            for key in (keys if isinstance(keys, tuple) else (keys,)):
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
    from helpers.plots import COLOURS, new_figure

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
            ax.bar(x, sum(values) / len(values), bar * 0.9, color=colours[m % len(colours)], label=name if s == 0 else None)
            if len(values) > 1:
                ax.scatter([x] * len(values), values, color="black", s=8, zorder=3)
    ax.set_xticks(range(len(splits)), splits)
    ax.set(ylabel="score (accuracy / IoU)", ylim=(0, 1), title="SFT vs SFT + GRPO")
    ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------
# Widget: browse rollouts
# ---------------------------------------------------------------------------------------------

from helpers.widgets import View, register_widget  # noqa: E402

#: Rollouts recorded during training (``record_rollout``), one entry per step, read by the widget.
ROLLOUTS: list[dict] = []


def record_rollout(step: int, log: dict, rollout: Rollout, advantages: torch.Tensor, store: list | None = None) -> None:
    """An ``on_step`` callback for ``train``: keep what the rollout browser shows."""
    store = ROLLOUTS if store is None else store
    P = len(rollout.samples) // rollout.num_generations
    store.append(dict(step=step, samples=rollout.samples[::rollout.num_generations][:P], texts=list(rollout.texts),
                      rewards=compute_rewards(rollout.texts, rollout.tasks, rollout.targets,
                                              {"task": 1.0, "format": 1.0}),
                      advantages=advantages.detach().cpu(), G=rollout.num_generations))


def _demo_rollouts() -> list[dict]:
    """Stand-in rollouts (no model) so the widget renders before any training: the true answer,
    near misses and malformed text, scored by the real rewards."""
    from helpers.data import make_split

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

    from helpers.plots import COLOURS, new_figure

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
                ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                                       ec=COLOURS["special"], lw=1, ls="--"))
    head = (f"<b>step {entry['step']}, prompt {p}</b> — {escape(sample.question)} "
            f"(task {sample.task}, truth <code>{escape(sample.answer)}</code>)")
    body = "".join(f"<tr><td>{i}</td><td><code>{escape(t) or '∅'}</code></td><td>{a:.2f}</td><td>{f:.0f}</td>"
                   f"<td style='color:{'#009E73' if d > 0 else '#D55E00' if d < 0 else '#999'}'>{d:+.2f}</td></tr>"
                   for i, (t, a, f, d) in enumerate(zip(texts, task_r, format_r, adv)))
    html = (head + "<table><tr><th>#</th><th>completion</th><th>task reward</th><th>format</th><th>advantage</th></tr>"
            + body + "</table>")
    return View(html=html, figure=fig, data=dict(texts=texts, task=task_r, format=format_r, advantages=adv))


# ---------------------------------------------------------------------------------------------
# Command line: python -m helpers.grpo --profile gpu --out DIR [--sft DIR]
# ---------------------------------------------------------------------------------------------

SMOKE = dict(n_prompts=8, n_eval=3, steps=2, prompts_per_step=2, num_generations=2, max_new_tokens=8, max_seconds=None)


def _init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return _rank_world()


def _scores(result: dict) -> dict:
    return {k: round(v, 4) for k, v in result.items()}


def run(profile: str | None = None, out=None, sft_dir=None, seeds=None, steps=None, n_eval=None, smoke=False,
        trl_steps: int = 4, log=print) -> dict:
    """The whole GRPO experiment: SFT start evaluated, one GRPO run per seed (each evaluated on
    val/test/ood), our loop vs TRL timings; writes metrics.json, log.txt and two PNGs to ``out``."""
    rank, world = _init_distributed()
    cfg = default_settings(profile)
    if smoke:
        cfg.update(SMOKE)
    cfg["steps"] = steps or cfg["steps"]
    cfg["n_eval"] = cfg["n_eval"] if n_eval is None else n_eval
    seeds = list(seeds if seeds is not None else cfg["seeds"])
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    lines: list[str] = []

    def say(text):
        lines.append(text)
        if rank == 0 and log is not None:
            log(text)

    clock = time.perf_counter()
    start = sft_checkpoint(profile, sft_dir, progress=rank == 0) if rank == 0 or sft_dir else None
    if world > 1:
        torch.distributed.barrier()
        start = start or sft_checkpoint(profile, sft_dir, progress=False)
    say(f"SFT start: {Path(start).name} ({time.perf_counter() - clock:.0f} s); device {device}; world {world}")
    evals = eval_splits(cfg["n_eval"], 0, profile) if cfg["n_eval"] and rank == 0 else {}
    prompts = train_prompts(cfg["n_prompts"], seed=1, profile=profile)
    model, processor = load_start(start, device)
    metrics = {"profile": profile, "settings": {k: v for k, v in cfg.items()}, "seeds": seeds, "world": world,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "sft": {split: _scores(evaluate(model, processor, s, cfg["eval_batch_size"])) for split, s in evals.items()},
               "runs": {}}
    say(f"SFT: {json.dumps(metrics['sft'])}")
    histories = {}
    for seed in seeds:
        model, _ = load_start(start, device)
        t0 = time.perf_counter()
        history = train(model, processor, prompts, cfg, seed=seed, progress=rank == 0, max_seconds=cfg.get("max_seconds"))
        seconds = time.perf_counter() - t0
        after = {split: _scores(evaluate(_unwrap(model), processor, s, cfg["eval_batch_size"])) for split, s in evals.items()}
        histories[f"seed {seed}"] = history
        metrics["runs"][str(seed)] = {"steps": len(history), "train_seconds": seconds, "eval": after,
                                      "history": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items()} for h in history]}
        say(f"seed {seed}: {len(history)} steps in {seconds:.1f} s; {json.dumps(after)}")
        if out is not None and rank == 0:  # write as we go: a run cut short still leaves its results
            _write_outputs(Path(out), metrics, histories, lines)
    if evals:
        metrics["summary"] = _summary_table(metrics)
        say("summary (score = mean of accuracy / IoU over all questions): " + json.dumps(metrics["summary"]))
    ours = [h for run_ in histories.values() for h in run_[1:]] or [h for run_ in histories.values() for h in run_]
    metrics["ours"] = {"step_seconds": _median([h["step_seconds"] for h in ours]),
                       "rollout_tokens_per_s": sum(h["rollout_tokens"] for h in ours) / max(sum(h["rollout_seconds"] for h in ours), 1e-9)}
    if trl_steps and world == 1:
        import tempfile

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            trainer = trl_trainer(start, processor, prompts, cfg, tmp, steps=trl_steps, seed=seeds[0])
            timing = trl_timings(trainer)
        del trainer
        metrics["trl"] = {"step_seconds": _median(timing["step_seconds"][1:] or timing["step_seconds"]),
                          "rollout_tokens_per_s": timing["rollout_tokens_per_s"], "steps": trl_steps,
                          "raw": timing, "wall_seconds": time.perf_counter() - t0}
    say(f"timing (median step s, rollout tokens/s): ours {metrics['ours']}; TRL "
        f"{ {k: metrics['trl'][k] for k in ('step_seconds', 'rollout_tokens_per_s')} if 'trl' in metrics else 'skipped'}")
    metrics["wall_seconds"] = time.perf_counter() - clock
    say(f"total wall {metrics['wall_seconds']:.0f} s")
    if out is not None and rank == 0:
        _write_outputs(Path(out), metrics, histories, lines)
    if world > 1:
        torch.distributed.barrier()
    return metrics


def _median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def _summary_table(metrics: dict) -> dict:
    """Per split: SFT score, GRPO score per seed, their mean, spread (max - min), the gain (mean -
    SFT) and whether the gain exceeds the spread (the issue's target)."""
    table = {}
    for split, sft_scores in metrics["sft"].items():
        per_seed = [run_["eval"][split]["score"] for run_ in metrics["runs"].values()]
        mean = sum(per_seed) / len(per_seed)
        table[split] = {"sft": sft_scores["score"], "grpo_seeds": per_seed, "grpo_mean": round(mean, 4),
                        "spread": round(max(per_seed) - min(per_seed), 4), "gain": round(mean - sft_scores["score"], 4),
                        "beats_spread": mean - sft_scores["score"] > max(per_seed) - min(per_seed),
                        "every_seed_above_sft": min(per_seed) > sft_scores["score"]}
    return table


def _write_outputs(out: Path, metrics: dict, histories: dict, lines: list[str]) -> None:
    """At most four files: metrics.json, log.txt, grpo_curves.png, grpo_vs_sft.png."""
    from helpers.plots import use_course_style

    use_course_style()
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    (out / "log.txt").write_text("\n".join(lines) + "\n")
    if histories:
        plot_history(histories).savefig(out / "grpo_curves.png", dpi=90)
    if "summary" in metrics:
        table = {"SFT": {s: v["sft"] for s, v in metrics["summary"].items()},
                 "SFT + GRPO": {s: v["grpo_seeds"] for s, v in metrics["summary"].items()}}
        plot_comparison(table).savefig(out / "grpo_vs_sft.png", dpi=90)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.grpo", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=("cpu", "gpu"), default=None)
    parser.add_argument("--out", required=True, help="folder for metrics.json, log.txt and two PNGs")
    parser.add_argument("--sft", default=None, help="SFT checkpoint folder to start from (trained there if missing)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None, help="override the profile's steps per seed")
    parser.add_argument("--n-eval", type=int, default=None, help="samples per eval split (0: no evaluation)")
    parser.add_argument("--trl-steps", type=int, default=4, help="TRL GRPOTrainer steps to time (0: skip)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to test the pipeline end to end")
    args = parser.parse_args(argv)
    run(args.profile, args.out, args.sft, args.seeds, args.steps, args.n_eval, args.smoke, args.trl_steps)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

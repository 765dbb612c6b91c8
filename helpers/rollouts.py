"""Rollouts: G sampled completions per prompt, as the tensors a policy-gradient loss needs, and their
per-token log-probabilities (notebook 11, steps 3.1 and 3.3; ``helpers.grpo`` trains on them,
``best_of_g`` measures sharpening with them)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from helpers import rewards as R
from helpers.data import sample_messages
from helpers.tokenizer import SPECIAL_TOKENS

IM_END = SPECIAL_TOKENS["<|im_end|>"]
PAD = SPECIAL_TOKENS["<|endoftext|>"]
EOS_IDS = (IM_END, PAD)

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

    prompt_ids: torch.Tensor  # (N, Lp) left-padded
    prompt_mask: torch.Tensor  # (N, Lp)
    completion_ids: torch.Tensor  # (N, K)  right-padded with <|endoftext|>
    completion_mask: torch.Tensor  # (N, K)  1 up to and including the first end token
    pixel_values: torch.Tensor  # (patches of all N images, 1176)
    image_grid_thw: torch.Tensor  # (N, 3)
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
    if not samples:
        raise ValueError("samples is empty: expected at least one helpers.data.Sample")
    texts = [
        processor.apply_chat_template(sample_messages(s, with_answer=False), add_generation_prompt=True, tokenize=False)
        for s in samples
    ]
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
    pixels = torch.cat([batch["pixel_values"][offsets[r] : offsets[r + 1]] for r in rows])
    index = torch.tensor(rows, device=batch["input_ids"].device)
    return {k: (pixels if k == "pixel_values" else v[index]) for k, v in batch.items()}


@torch.no_grad()
def sample_completions(
    model,
    processor,
    samples: Sequence,
    num_generations: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 40,
    greedy: bool = False,
    seed: int | None = None,
    bf16: bool | None = None,
    bucket_by_task: bool = False,
) -> Rollout:
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
            output = net.generate(
                **part,
                max_new_tokens=max_new_tokens,
                do_sample=not greedy,
                pad_token_id=PAD,
                eos_token_id=list(EOS_IDS),
                **sampling,
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        pieces[tuple(rows)] = output[:, batch["input_ids"].size(1) :]
    net.train(was_training)
    width = max(1, max(p.size(1) for p in pieces.values()))  # ≥ 1 column so shapes stay valid
    completion = torch.full((len(repeated), width), PAD, dtype=batch["input_ids"].dtype, device=device)
    for rows, piece in pieces.items():
        completion[list(rows), : piece.size(1)] = piece
    mask = completion_mask_after_eos(completion)
    if bucket_by_task:  # columns a bucket never generated are padding, not tokens
        for rows, piece in pieces.items():
            mask[list(rows), piece.size(1) :] = 0
    completion = torch.where(mask.bool(), completion, torch.full_like(completion, PAD))
    texts = processor.tokenizer.batch_decode(completion, skip_special_tokens=True)
    return Rollout(
        batch["input_ids"],
        batch["attention_mask"],
        completion,
        mask,
        batch["pixel_values"],
        batch["image_grid_thw"],
        batch["mm_token_type_ids"],
        repeated,
        texts,
        num_generations,
        seconds,
    )


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

    def forward(
        self,
        input_ids,
        attention_mask,
        pixel_values,
        image_grid_thw,
        mm_token_type_ids,
        completion_ids,
        completion_mask,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        base = self.model
        hidden = base.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            use_cache=False,
        ).last_hidden_state  # (N, Lp + K, D)
        k = completion_ids.size(1)
        keep = completion_mask.bool()  # (N, K)
        states = hidden[:, -k - 1 : -1][keep]  # (M, D): M scored tokens ≪ N·K
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
    return scorer(
        **rollout.forward_inputs(),
        completion_ids=rollout.completion_ids,
        completion_mask=rollout.completion_mask,
        temperature=temperature,
    )


@torch.no_grad()
def best_of_g(model, processor, samples: Sequence, cfg, seed: int = 0) -> dict:
    """Sharpening, measured: per task, the mean reward of G samples at ``cfg.temperature`` (what a
    rollout scores on average), best-of-G (the mean over prompts of the best of its G: what GRPO can
    reinforce) and the share of prompts whose G rewards are all equal (no signal)."""
    G = cfg.num_generations
    rollout = sample_completions(
        model, processor, samples, G, cfg.temperature, cfg.max_new_tokens, seed=seed, bucket_by_task=True
    )
    scores = torch.tensor(R.task_reward(rollout.texts, rollout.tasks, rollout.targets)).view(-1, G)
    out = {}
    for task in dict.fromkeys(s.task for s in samples):
        rows = torch.tensor([s.task == task for s in samples])
        out[task] = {
            "mean": scores[rows].mean().item(),
            "best": scores[rows].max(1).values.mean().item(),
            "zero_std": (scores[rows].std(1) == 0).float().mean().item(),
            "n": int(rows.sum()),
        }
    return out

"""TRL's ``GRPOTrainer`` beside our GRPO (notebook 11, sections 4 and 7): the same settings and rewards,
its ``compute_loss`` on our batch, and its training timed."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from helpers.grpo import REWARD_FUNCTIONS, GRPOSettings
from helpers.rollouts import Rollout

# ---------------------------------------------------------------------------------------------
# TRL: the same loss, and the TRL route
# ---------------------------------------------------------------------------------------------


def trl_dataset(samples: Sequence):
    """A conversational prompt dataset for TRL's ``GRPOTrainer``: ``prompt`` (user turn with an
    image part), ``image``, and the ``task`` / ``target`` columns our rewards read (the target as
    its answer string, so the column has one type)."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
                "image": s.image,
                "task": s.task,
                "target": s.answer,
            }
            for s in samples
        ]
    )


def trl_trainer(
    model_dir,
    processor,
    samples: Sequence,
    cfg: GRPOSettings,
    output_dir,
    steps: int = 1,
    seed: int = 0,
    dtype: str = "float32",
    **extra,
):
    """TRL's ``GRPOTrainer`` with our settings (G, temperature, β, ε, loss type, lr) and rewards.

    ``model_dir`` must be a saved checkpoint directory: with ``beta > 0`` TRL builds its reference
    model from the policy's config name, which an in-memory model lacks (notebook 11 shows the error).
    """
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    n = cfg.prompts_per_step * cfg.num_generations
    cuda = torch.cuda.is_available()
    args = GRPOConfig(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=n,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=1.0,
        top_k=0,
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high,
        loss_type=cfg.loss_type,
        num_iterations=cfg.num_iterations,
        use_bias_correction_kl=cfg.kl_ratio_correction,
        scale_rewards=cfg.scale_rewards,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=cfg.weight_decay,
        adam_beta2=0.99,
        max_grad_norm=cfg.max_grad_norm,
        reward_weights=list(cfg.reward_weights.values()),
        model_init_kwargs={"dtype": getattr(torch, dtype) if isinstance(dtype, str) else dtype},
        bf16=cuda and cfg.bf16,
        use_cpu=not cuda,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        **extra,
    )
    funcs = [REWARD_FUNCTIONS[name] for name in cfg.reward_weights]
    trainer = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=funcs,
        args=args,
        train_dataset=trl_dataset(samples),
        processing_class=processor,
    )
    trainer.remove_callback(PrinterCallback)  # keep notebooks quiet: the log lives in trainer.state.log_history
    return trainer


def trl_loss(
    trainer, rollout: Rollout, advantages: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None
) -> torch.Tensor:
    """TRL's ``GRPOTrainer.compute_loss`` on our fixed batch: the ``inputs`` dict its
    ``_generate_and_score_completions`` would have produced, with our advantages and log-probs."""
    forward = rollout.forward_inputs()
    inputs = dict(
        prompt_ids=rollout.prompt_ids,
        prompt_mask=rollout.prompt_mask,
        completion_ids=rollout.completion_ids,
        completion_mask=rollout.completion_mask,
        advantages=advantages,
        old_per_token_logps=old_logps,
        pixel_values=rollout.pixel_values,
        image_grid_thw=rollout.image_grid_thw,
        num_images=[1] * rollout.prompt_ids.size(0),
        mm_token_type_ids=forward["mm_token_type_ids"],
        num_items_in_batch=rollout.completion_mask.sum(),
    )
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
    return dict(
        step_seconds=[h["step_time"] for h in logs],
        rollout_seconds=spent,
        rollout_tokens=tokens,
        reward=[h["reward"] for h in logs],
        kl=[h.get("kl", 0.0) for h in logs],
        rollout_tokens_per_s=sum(tokens) / max(sum(spent), 1e-9),
    )

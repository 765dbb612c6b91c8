"""The optimiser and learning-rate schedule of the course's training loops (notebook 10, section 6).

- ``make_optimizer``: AdamW over the trainable parameters, no weight decay on norms, biases and
  embeddings, optional per-module learning-rate factors (``lr_scales``).
- ``lr_factor``: linear warmup then cosine to a floor, a pure function of the step (so a resumed
  run follows the same schedule).
"""

from __future__ import annotations

import math

import torch

from helpers.evaluation import unwrap


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup from 0 to 1 over ``warmup`` steps, then cosine down to ``floor`` at ``total``
    (mirrors ``transformers.get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=floor)``)."""
    if not 0 <= step <= total or warmup < 0 or not 0 <= floor <= 1:
        raise ValueError(
            f"step={step!r}, total={total!r}, warmup={warmup!r}, floor={floor!r}: expected "
            "0 ≤ step ≤ total, warmup ≥ 0 and floor in [0, 1]"
        )
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(
    model, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95), lr_scales: dict[str, float] | None = None
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on norms, biases and embeddings.

    ``lr_scales`` maps a parameter-name prefix (e.g. ``"model.language_model.norm"``) to a factor on
    the learning rate of the parameters under it; each group keeps its factor as ``lr_scale``, which
    the schedule in ``train`` applies (the same idea as per-module learning rates in TRL/transformers'
    ``optimizer_cls_and_kwargs``)."""
    lr_scales = dict(lr_scales or {})
    named = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
    for prefix, factor in lr_scales.items():
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 0 <= factor < float("inf"):
            raise ValueError(f"lr_scales[{prefix!r}] = {factor!r}: expected a finite number ≥ 0")
        if not any(n.startswith(prefix) for n, _ in unwrap(model).named_parameters()):
            raise ValueError(f"lr_scales key {prefix!r} names no parameter of this model")
    groups: dict[tuple, list] = {}
    for name, p in named:
        scale = next((f for prefix, f in lr_scales.items() if name.startswith(prefix)), 1.0)
        no_decay = p.ndim < 2 or "embed" in name or "norm" in name
        groups.setdefault((0.0 if no_decay else weight_decay, scale), []).append(p)
    param_groups = [
        {"params": ps, "weight_decay": wd, "lr_scale": scale, "lr": lr * scale} for (wd, scale), ps in groups.items()
    ]
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas)

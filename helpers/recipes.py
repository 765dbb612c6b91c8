"""The settings SFT trains with, and the run from data to an evaluated checkpoint (notebook 10;
``python -m helpers.sft``).

Two recipes, chosen by whether a checkpoint is given (``model=`` or ``$QWENVL_MODEL``):

- **course model**: the ``sft`` section of the profile (``helpers.profiles``): the small course
  model trained from its random initialisation, on the shapes task.
- **checkpoint**: the ``checkpoint`` section: settings a practitioner uses on a pretrained
  Qwen2.5-VL (LoRA r = 16 at 2e-4 on the language model, or a full fine-tune at 1e-5 with the
  vision tower frozen and the merger trained), on the same data and step budget. None of the
  course model's from-scratch choices (frozen embedding table) apply there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from helpers import checkpoints
from helpers.constants import TOKEN_PIXELS
from helpers.data import DEFAULTS as DATA_DEFAULTS
from helpers.data import ShapesStream, make_split
from helpers.evaluation import evaluate, summary, unwrap
from helpers.lora import apply_lora, freeze_vision, merge_lora
from helpers.profiles import SFTSettings, as_plain, settings
from helpers.qwen import course_config, init_logit_scale, load_model, load_processor, parameter_count
from helpers.sft import _dist, train


@dataclass(frozen=True)
class Recipe(SFTSettings):
    """The SFT settings in force: the profile's ``sft`` section, with what a checkpoint changes."""

    kind: str = "course model"  # or "checkpoint"
    model_path: str | None = None  # the checkpoint (None: the course model)
    method: str = "full"  # "lora" or "full"
    lora_r: int | None = None
    lora_alpha: int | None = None
    freeze_vision: bool = False
    train_merger: bool = False


def recipe(profile: str | None = None, model: str | os.PathLike | None = None, overrides: dict | None = None) -> Recipe:
    """The SFT settings in force (a frozen ``Recipe``): what ``run_profile`` and notebook 10 train with.

    With no checkpoint (neither ``model`` nor ``$QWENVL_MODEL``) it is the ``sft`` section of the
    profile: the course model, trained from its random initialisation. With one, it is the
    ``checkpoint`` section, settings a practitioner uses on a pretrained Qwen2.5-VL (LoRA at 2e-4 on
    the language model, or a full fine-tune at 1e-5 with the vision tower frozen), on the profile's
    data and step budget. ``kind`` says which; ``model`` names the checkpoint (None: the course model).
    ``overrides`` replaces settings by name (``"data"`` and ``"model"`` are merged key by key): what
    ``scripts/sft_ablation.py`` changes, one at a time, without touching the profile.
    """
    course = settings("sft", profile)
    values = {f.name: getattr(course, f.name) for f in dataclasses.fields(course)}
    unknown = set(overrides or {}) - set(values)
    if unknown:
        raise KeyError(f"unknown sft settings {sorted(unknown)}; known: {sorted(values)}")
    for key, value in (overrides or {}).items():
        values[key] = dataclasses.replace(values[key], **value) if key in ("data", "model") else value
    path = model or os.environ.get("QWENVL_MODEL") or None
    if path is None:
        return Recipe(**values)
    ckpt = settings("checkpoint", profile)
    if ckpt.method not in ("lora", "full"):
        raise ValueError(f"checkpoint method={ckpt.method!r}: expected 'lora' or 'full'")
    return Recipe(
        **{
            **values,
            "steps": ckpt.steps,
            "batch_size": ckpt.batch_size,
            "grad_accum": ckpt.grad_accum,
            "warmup": ckpt.warmup,
            "max_seconds": ckpt.max_seconds,
            "lr": ckpt.lr_lora if ckpt.method == "lora" else ckpt.lr_full,
            "kind": "checkpoint",
            "model_path": str(path),
            "method": ckpt.method,
            "lora_r": ckpt.lora_r,
            "lora_alpha": ckpt.lora_alpha,
            "freeze_vision": ckpt.freeze_vision,
            "train_merger": ckpt.train_merger,
            "freeze_embeddings": False,
            "lr_scales": None,
            "logit_scale_init": None,
            "embedding_std": None,
        }
    )


def model_for_profile(
    profile: str | None = None, device="cpu", model: str | os.PathLike | None = None, overrides: dict | None = None
):
    """(model, processor) as ``recipe(profile, model)`` says: a checkpoint (LoRA-wrapped or with its
    vision tower frozen) or the course model from ``course_config(**recipe['model'])``, with images
    limited to the data's size."""
    r = recipe(profile, model, overrides)
    if r.kind == "checkpoint":
        processor = load_processor(r.model_path)
        built = load_model(r.model_path, device=device)
        if r.method == "lora":
            return apply_lora(built, r=r.lora_r, alpha=r.lora_alpha, train_merger=r.train_merger), processor
        return (freeze_vision(built, train_merger=r.train_merger) if r.freeze_vision else built), processor
    side = r.data.image_size or DATA_DEFAULTS["image_size"]
    processor = load_processor(min_pixels=TOKEN_PIXELS, max_pixels=side * side)
    built = load_model(config=course_config(**r.model), seed=r.seed, device=device)
    init_course_model(built, r.embedding_std, r.logit_scale_init, r.seed)
    if r.freeze_embeddings:
        unwrap(built).get_input_embeddings().weight.requires_grad_(False)
    return built, processor


def init_course_model(model, embedding_std: float, logit_scale: float, seed: int = 0):
    """Apply the recipe's two from-scratch init choices to a freshly built course model: the tied
    embedding table redrawn at ``embedding_std`` (unless it is transformers' ``initializer_range``,
    which ``load_model`` already used) and the final norm at ``logit_scale``
    (``helpers.qwen.init_logit_scale``). ``scripts/sft_ablation.py`` varies both."""
    if isinstance(embedding_std, bool) or not (
        isinstance(embedding_std, (int, float)) and 0 < embedding_std < float("inf")
    ):
        raise ValueError(f"embedding_std={embedding_std!r}: expected a finite number > 0")
    table = model.get_input_embeddings().weight
    if embedding_std != model.config.get_text_config().initializer_range:
        with torch.no_grad():
            table.normal_(0.0, embedding_std, generator=torch.Generator().manual_seed(seed))
    return init_logit_scale(model, logit_scale)


def eval_splits(n: int | None = None, profile: str | None = None, seed: int = 0) -> dict:
    """``n`` (default: the profile's ``n_eval``) questions each of val, test and ood, drawn with the
    profile's data options: what notebooks 10 and 11 score on."""
    s = settings("sft", profile)
    return {split: make_split(split, n or s.n_eval, seed, **s.data) for split in ("val", "test", "ood")}


def run_profile(
    profile: str | None = None,
    out=None,
    steps: int | None = None,
    progress: bool = True,
    evaluate_splits: bool = True,
    log: list | None = None,
    model: str | None = None,
    overrides: dict | None = None,
) -> dict:
    """Train as ``recipe`` says, save to ``out``, evaluate before and after on val/test/ood."""
    r = recipe(profile, model, overrides)
    steps = steps or r.steps
    rank, world = _dist()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net, processor = model_for_profile(profile, model=model, overrides=overrides)
    data = ShapesStream("train", r.n_train, r.seed, **r.data)
    evals = (
        {split: make_split(split, r.n_eval, 0, **r.data) for split in ("val", "test", "ood")}
        if evaluate_splits and rank == 0
        else {}
    )
    net.to(device)
    before = {split: summary(evaluate(net, processor, smp)) for split, smp in evals.items()}
    lora = r.method == "lora"
    t0 = time.perf_counter()
    result = train(
        net,
        processor,
        data,
        steps=steps,
        batch_size=r.batch_size,
        grad_accum=r.grad_accum,
        lr=r.lr,
        warmup=r.warmup,
        lr_scales=r.lr_scales,
        seed=r.seed,
        average=r.average,
        num_workers=r.num_workers if device == "cuda" else 0,
        checkpoint_dir=None if lora else out,
        progress=progress,
        log=log,
        max_seconds=r.max_seconds,
    )
    seconds = time.perf_counter() - t0
    if lora:
        result.model = merge_lora(result.model)
        if out is not None and rank == 0:
            checkpoints.save_checkpoint(
                out, result.model, processor, {"step": result.state["step"], "history": result.history}
            )
    after = {split: evaluate(result.model, processor, smp) for split, smp in evals.items()}
    h = result.history
    return {
        "recipe": as_plain(r),
        "steps": result.state["step"],
        "world": world,
        "train_seconds": seconds,
        "tokens_per_second": sum(h["tokens"]) / max(h["seconds"][-1], 1e-9) if h["seconds"] else 0.0,
        "parameters": parameter_count(unwrap(result.model)),
        "trainable": sum(p.numel() for p in unwrap(net).parameters() if p.requires_grad),
        "before": before,
        "after": {split: summary(v) for split, v in after.items()},
        "after_full": after,
        "evals": evals,
        "loss": h["loss"],
        "history": h,
        "model": result.model,
        "processor": processor,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.sft", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=("cpu", "gpu"), default=None)
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument(
        "--model", default=None, help="a local Qwen2.5-VL checkpoint (default: $QWENVL_MODEL, else the course model)"
    )
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    parser.add_argument("--metrics", default=None, help="write a metrics JSON here")
    parser.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    args = parser.parse_args(argv)
    log: list[str] = []
    metrics = run_profile(
        args.profile, out=args.out, steps=args.steps, evaluate_splits=not args.no_eval, log=log, model=args.model
    )
    rank, world = _dist()
    if rank == 0:
        print(
            json.dumps(
                {k: metrics[k] for k in ("steps", "world", "train_seconds", "tokens_per_second", "before", "after")}
            )
        )
        print(f"final loss {metrics['loss'][-1]:.4f}; checkpoint in {args.out}")
        if args.metrics:
            keep = {
                k: v for k, v in metrics.items() if k not in ("model", "processor", "history", "after_full", "evals")
            }
            Path(args.metrics).write_text(json.dumps(keep, indent=1, default=str))
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

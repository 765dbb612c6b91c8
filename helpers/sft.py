"""Supervised fine-tuning of Qwen2.5-VL (taught in notebooks/10_sft.ipynb; GRPO, notebook 11, starts
from a checkpoint it saves).

What is here, in the order the notebook teaches it:

- ``SFTCollator``: samples → one padded batch (``input_ids``, ``attention_mask``,
  ``mm_token_type_ids``, ``pixel_values``, ``image_grid_thw``, ``labels``): the processor's keys plus
  labels that keep only each answer and its ``<|im_end|>`` (``helpers.chat.assistant_loss_mask``),
  with clear errors when truncation cut image tokens or the answer (trap #6).
- ``labelled_loss``: the causal-LM loss with the LM head applied only at labelled positions (mirrors
  transformers' ``ForCausalLMLoss`` and TRL's fused LM head).
- ``train_step`` and ``train``: AdamW, warmup + cosine, accumulation, clipping, bf16 autocast on a
  GPU. ``train`` wraps the loop in what is not the lesson: DDP under ``torchrun``, resume from a
  checkpoint (``helpers.checkpoints``), a time cap.
- ``trl_trainer``: the same model trained by TRL's ``SFTTrainer``.

What is not the algorithm lives beside it: the settings in force and the end-to-end run in
``helpers.recipes`` (the course model's profile, or a real checkpoint's: LoRA at 2e-4 or a full
fine-tune at 1e-5), evaluation in ``helpers.evaluation`` (shared with GRPO), checkpoints in
``helpers.checkpoints``, LoRA and freezing in ``helpers.lora``, pictures in ``helpers.sft_plots``,
GPU measurements in ``scripts/gpu_sft.py``. Command line (the
same training outside the notebook; under ``torchrun --nproc_per_node N`` it runs DDP)::

    python -m helpers.sft --profile gpu --out DIR [--steps N] [--metrics FILE] [--model PATH]
    python -m helpers.sft --data DIR_OR_JSONL --out DIR [--steps N] [--model PATH]   (own data, notebook 13)
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import helpers  # noqa: F401  (offline settings before transformers loads)
from helpers import checkpoints
from helpers.chat import IGNORE_INDEX, assistant_loss_mask, labels_from_mask
from helpers.data import Sample, sample_messages
from helpers.evaluation import unwrap
from helpers.optim import lr_factor, make_optimizer
from helpers.packing import PackingCollator, token_count
from helpers.tokenizer import SPECIAL_TOKENS

IMAGE_PAD = SPECIAL_TOKENS["<|image_pad|>"]
PAD_ID = SPECIAL_TOKENS["<|endoftext|>"]


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def encode_samples(
    processor, samples: list[Sample], with_answer: bool = True, max_length: int | None = None
) -> list[dict]:
    """Each sample → ``{"input_ids", "labels", "pixel_values", "image_grid_thw"}`` (1-D ids, no padding).

    Mirrors what TRL's ``DataCollatorForVisionLanguageModeling`` does before padding: the chat
    template (no generation prompt when the answer is included), then the processor, which expands
    ``<|image_pad|>`` to one token per merged 2×2 patch block. ``max_length`` truncates the ids from
    the right as trainers do; ``check_batch`` then says what the cut broke.
    """
    if not samples:
        raise ValueError("samples is empty: expected at least one Sample")
    texts = [
        processor.apply_chat_template(
            sample_messages(s, with_answer), tokenize=False, add_generation_prompt=not with_answer
        )
        for s in samples
    ]
    enc = processor(text=texts, images=[s.image for s in samples], padding=True, return_tensors="pt")
    merge = processor.image_processor.merge_size
    patches = enc["image_grid_thw"].prod(-1).tolist()  # patches per image
    pixel_rows = torch.split(enc["pixel_values"], patches)
    items = []
    for row, (ids, keep) in enumerate(zip(enc["input_ids"], enc["attention_mask"])):
        types = enc["mm_token_type_ids"][row][keep.bool()]  # 1 on image tokens: M-RoPE needs it
        ids = ids[keep.bool()]  # drop the processor's padding: we pad later, our way
        mask = assistant_loss_mask(ids) if with_answer else torch.zeros_like(ids)
        item = {
            "input_ids": ids,
            "labels": labels_from_mask(ids, mask),
            "mm_token_type_ids": types,
            "pixel_values": pixel_rows[row],
            "image_grid_thw": enc["image_grid_thw"][row : row + 1],
            "merge": merge,
        }
        items.append(item if max_length is None else truncate_item(item, max_length))
    return items


#: The keys of an encoded item that hold one entry per token.
PER_TOKEN_KEYS = ("input_ids", "labels", "mm_token_type_ids")


def truncate_item(item: dict, max_length: int) -> dict:
    """``item`` with every per-token field cut to its first ``max_length`` tokens: what TRL's
    ``DataCollatorForVisionLanguageModeling(max_length=...)`` gets from the processor's
    ``truncation=True``. Pixels are kept whole, so ``check_batch`` can say what the cut broke."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length={max_length!r}: expected an integer ≥ 1")
    return {**item, **{key: item[key][:max_length] for key in PER_TOKEN_KEYS}}


def pad_batch(items: list[dict], pad_id: int = PAD_ID, side: str = "right") -> dict:
    """Stack encoded items into one batch, padding ``input_ids`` with ``pad_id`` and ``labels`` with
    ``IGNORE_INDEX`` on ``side`` ("right" for training, "left" for generation)."""
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r}: expected 'left' or 'right'")
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    types = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        where = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, where], labels[row, where], attention[row, where] = it["input_ids"], it["labels"], 1
        types[row, where] = it["mm_token_type_ids"]
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "mm_token_type_ids": types,
        "labels": labels,
        "pixel_values": torch.cat([it["pixel_values"] for it in items]),
        "image_grid_thw": torch.cat([it["image_grid_thw"] for it in items]),
    }


def check_batch(batch: dict, merge_size: int = 2, need_labels: bool = True) -> None:
    """Raise ValueError if a row lost image tokens (trap #6) or, for training, its whole answer.

    The language model replaces each ``<|image_pad|>`` by one merged vision feature; an image of
    grid (t, h, w) gives t·h·w / merge_size² features, so that many pads must survive.
    """
    pads = (batch["input_ids"] == IMAGE_PAD).sum(-1)
    need = batch["image_grid_thw"].prod(-1) // merge_size**2
    if len(need) != len(pads):
        raise ValueError(f"{len(need)} images for {len(pads)} rows: this collator expects one image per sample")
    for row in range(len(pads)):
        if pads[row] != need[row]:
            raise ValueError(
                f"row {row} has {int(pads[row])} <|image_pad|> tokens but its image gives {int(need[row])} features "
                f"(grid {batch['image_grid_thw'][row].tolist()}): max_length truncated the image; raise max_length "
                f"to at least the longest sample, or drop samples that do not fit (trap #6)"
            )
    if need_labels:
        labelled = (batch["labels"] != IGNORE_INDEX).sum(-1)
        empty = [r for r in range(len(labelled)) if labelled[r] == 0]
        if empty:
            raise ValueError(
                f"rows {empty} have no labelled token: max_length truncated their answer away; "
                f"raise max_length (longest row has {batch['input_ids'].shape[1]} tokens)"
            )


class SFTCollator:
    """Samples → a training batch whose labels are only the answers and their ``<|im_end|>``.

    Plays the role of TRL's ``DataCollatorForVisionLanguageModeling`` (prompt/completion mode), with
    the mask of ``helpers.chat.assistant_loss_mask``: never the system or user turns, never vision
    or padding tokens, never the newline after ``<|im_end|>``.
    """

    def __init__(self, processor, max_length: int | None = None, with_answer: bool = True, side: str = "right"):
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length={max_length!r}: expected None or an integer ≥ 1")
        self.processor, self.max_length, self.with_answer, self.side = processor, max_length, with_answer, side

    def __call__(self, samples: list[Sample]) -> dict:
        items = encode_samples(self.processor, samples, self.with_answer, self.max_length)
        batch = pad_batch(items, side=self.side)
        check_batch(batch, items[0]["merge"], need_labels=self.with_answer)
        return batch


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------

#: What the model's forward receives; without ``mm_token_type_ids`` transformers 5.24 silently gives
#: every token (image tokens included) a 1-D position instead of M-RoPE's (t, h, w) (trap #18).
MODEL_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def labelled_loss(model, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """Causal-LM cross-entropy with the LM head applied only where a label exists.

    Same value as ``model(**batch).loss`` (transformers' ``ForCausalLMLoss``: logits at position t
    predict the token at t+1; ``IGNORE_INDEX`` skipped). It runs the backbone (vision tower +
    language model) once, keeps the hidden states whose *next* token is labelled, and only
    multiplies those by the 151,936-row LM head. ``reduction="sum"`` returns the summed loss (for
    gradient accumulation over a known token count); ``"answer_sum"`` averages each row's tokens
    first and sums the rows, so a 2-token colour answer weighs as much as a 30-token box.
    """
    base = unwrap(model)
    inputs = {k: batch[k] for k in (*MODEL_INPUTS, "position_ids") if k in batch}  # packed rows: no attention_mask
    hidden = base.model(**inputs, use_cache=False).last_hidden_state  # (B, T, D)
    labels = batch["labels"][:, 1:]  # (B, T-1): the token each position predicts
    keep = labels != IGNORE_INDEX  # (B, T-1)
    logits = base.lm_head(hidden[:, :-1][keep])  # (N, V), N = labelled tokens ≪ B·T
    if reduction != "answer_sum":
        return F.cross_entropy(logits.float(), labels[keep], reduction=reduction)
    per_token = F.cross_entropy(logits.float(), labels[keep], reduction="none")  # (N,)
    rows = torch.arange(len(labels), device=labels.device)[:, None].expand_as(labels)[keep]
    per_row = torch.zeros(len(labels), device=labels.device).index_add(0, rows, per_token)
    return (per_row / keep.sum(1).clamp(min=1)).sum()


def full_logits_loss(model, batch: dict) -> torch.Tensor:
    """The same loss through the full ``(B, T, V)`` logits: ``model(**batch).loss`` (transformers)."""
    return model(**{k: batch[k] for k in (*MODEL_INPUTS, "labels")}, use_cache=False).loss


class SFTLoss(torch.nn.Module):
    """``labelled_loss`` as a module, so DDP (which hooks ``forward``) can wrap it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, reduction: str = "sum") -> torch.Tensor:
        return labelled_loss(self.model, batch, reduction)


# ---------------------------------------------------------------------------------------------
# Optimiser, schedule, data order
# ---------------------------------------------------------------------------------------------


def batch_indices(n: int, batch_size: int, step: int, seed: int = 0) -> list[int]:
    """The sample indices of global micro-batch number ``step``: epochs are seeded permutations of
    ``range(n)``, so the order depends only on (n, batch_size, step, seed), which makes resuming exact."""
    for name, value, low in (("n", n, 1), ("batch_size", batch_size, 1), ("step", step, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r}: expected an integer ≥ {low}")
    per_epoch = max(1, n // batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order[offset * batch_size : (offset + 1) * batch_size].tolist()


class _StepBatches(torch.utils.data.Sampler):
    """Micro-batches from ``start`` on, this rank's share of each global micro-batch."""

    def __init__(self, n, batch_size, start, stop, seed, rank, world):
        self.args = (n, batch_size, start, stop, seed, rank, world)

    def __iter__(self):
        n, batch_size, start, stop, seed, rank, world = self.args
        for step in range(start, stop):
            yield batch_indices(n, batch_size * world, step, seed)[rank::world]

    def __len__(self):
        return self.args[3] - self.args[2]


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What ``train`` returns: the trained model and its per-step history."""

    model: object
    history: dict = field(default_factory=dict)  # step, loss, lr, grad_norm, tokens, seconds
    state: dict = field(default_factory=dict)
    optimizer: object = None


def _dist():
    """(rank, world) — initialises torch.distributed if a launcher set WORLD_SIZE > 1."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


AVERAGES = ("token", "answer")


def train_step(
    loss_module,
    optimizer,
    micro: list[dict],
    lr: float,
    world: int = 1,
    clip: float = 1.0,
    bf16: bool = False,
    average: str = "token",
) -> dict:
    """One optimiser step over the micro-batches ``micro``: the lesson of section 6.

    The step's loss is the mean over all its labelled tokens: each micro-batch's summed loss is
    divided by the step's token count (as transformers does with ``num_items_in_batch``), so
    accumulation gives the gradient of one big batch. ``average="answer"`` makes it the mean over
    answers of each answer's mean token loss instead. Then clip, set the learning rate, step."""
    device = micro[0]["input_ids"].device
    unit = (
        (lambda b: (b["labels"][:, 1:] != IGNORE_INDEX).sum())
        if average == "token"
        else (lambda b: (b["labels"][:, 1:] != IGNORE_INDEX).any(1).sum())
    )
    count = torch.tensor(float(sum(int(unit(b)) for b in micro)), device=device)
    if world > 1:
        torch.distributed.all_reduce(count)
    total = torch.zeros((), device=device)
    for i, batch in enumerate(micro):
        last = world == 1 or i == len(micro) - 1
        with (
            contextlib.nullcontext() if last else loss_module.no_sync(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
        ):
            loss_sum = loss_module(batch, "sum" if average == "token" else "answer_sum")
        (loss_sum * world / count).backward()  # DDP averages over ranks: × world makes it the global mean
        total += loss_sum.detach()
    if world > 1:
        torch.distributed.all_reduce(total)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss": float(total / count),
        "grad_norm": float(norm),
        "lr": lr,
        "tokens": sum(token_count(b) for b in micro),
    }


def train(
    model,
    processor,
    data,
    *,
    steps: int,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float = 1e-3,
    warmup: int = 10,
    weight_decay: float = 0.0,
    lr_scales: dict | None = None,
    clip: float = 1.0,
    seed: int = 0,
    lr_floor: float = 0.1,
    device=None,
    bf16: bool | None = None,
    num_workers: int = 0,
    checkpoint_dir=None,
    save_every: int = 0,
    resume_from=None,
    stop_at: int | None = None,
    progress: bool = True,
    log: list | None = None,
    max_seconds: float | None = None,
    average: str = "token",
    pack: bool = False,
) -> TrainResult:
    """Train ``model`` on ``data`` (a list of Samples or a ``ShapesStream``) for ``steps`` optimiser steps.

    One step = ``grad_accum`` micro-batches of ``batch_size`` samples per process (``train_step``).
    The learning rate follows ``lr_factor`` (a pure function of the step, so a resumed run is exact):
    warmup, then cosine down to ``lr_floor`` × ``lr`` (``lr_floor=1`` keeps it constant after warmup).
    Around the loop: DDP when launched by ``torchrun``; ``resume_from`` continues a checkpoint saved
    by this function (refused if its schedule, batch or trainable parameters differ); ``stop_at``
    ends early at that step (the schedule still spans ``steps``); ``max_seconds`` measures 20 steps,
    then shortens ``steps`` (hence the schedule) so that training ends within that many seconds.
    ``pack=True`` feeds each micro-batch as one packed row (``helpers.packing.PackingCollator``,
    notebook 12): the same labels and loss, no padding.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}: expected an integer ≥ 1")
    if average not in AVERAGES:
        raise ValueError(f"average={average!r}: expected one of {AVERAGES}")
    if pack and average != "token":
        raise ValueError(f"average={average!r} with pack=True: a packed row holds many answers; expected 'token'")
    if not (isinstance(lr, (int, float)) and 0 < lr < 1):
        raise ValueError(f"lr={lr!r}: expected a learning rate in (0, 1)")
    rank, world = _dist()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    bf16 = (device.type == "cuda") if bf16 is None else bf16
    model = model.to(device)
    optimizer = make_optimizer(model, lr, weight_decay, lr_scales=lr_scales)
    signature = checkpoints.run_signature(model, steps, batch_size, grad_accum, lr, warmup)
    start, history = 0, {"step": [], "loss": [], "lr": [], "grad_norm": [], "tokens": [], "seconds": []}
    if resume_from is not None:
        start, history = checkpoints.resume(model, optimizer, resume_from, signature)
    model.train()
    loss_module = SFTLoss(model)
    if world > 1:
        loss_module = torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    stop = min(steps, stop_at or steps)
    loader = torch.utils.data.DataLoader(
        data,
        batch_sampler=_StepBatches(len(data), batch_size, start * grad_accum, stop * grad_accum, seed, rank, world),
        collate_fn=PackingCollator(processor) if pack else SFTCollator(processor),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers else None,
    )
    batches = iter(loader)
    from tqdm.auto import tqdm

    bar = tqdm(total=stop - start, desc="SFT", disable=not progress or rank != 0, mininterval=1.0)
    clock, step = time.perf_counter(), start
    while step < stop:
        micro = [{k: v.to(device, non_blocking=True) for k, v in next(batches).items()} for _ in range(grad_accum)]
        out = train_step(
            loss_module, optimizer, micro, lr * lr_factor(step, steps, warmup, lr_floor), world, clip, bf16, average
        )
        step += 1
        for key, value in (("step", step), *out.items(), ("seconds", time.perf_counter() - clock)):
            history[key].append(value)
        bar.update(1)
        bar.set_postfix(loss=f"{out['loss']:.3f}", refresh=False)
        if log is not None and rank == 0:
            log.append(f"step {step} loss {out['loss']:.4f} lr {out['lr']:.2e}")
        if max_seconds and step - start == 20 and world == 1:  # fit the run into max_seconds
            elapsed = time.perf_counter() - clock
            per_step = (elapsed - history["seconds"][-20]) / 19  # the first step pays for warm-up
            steps = stop = max(step, min(stop, step + int((max_seconds - elapsed) / per_step)))
            signature["steps"] = steps
            bar.total = stop - start
        if checkpoint_dir is not None and rank == 0 and (step == stop or (save_every and step % save_every == 0)):
            checkpoints.save_checkpoint(
                checkpoint_dir, model, processor, {"step": step, "history": history, "signature": signature}, optimizer
            )
    bar.close()
    model.eval()
    return TrainResult(model, history, {"step": stop, "steps": steps, "world": world}, optimizer)


# ---------------------------------------------------------------------------------------------
# TRL
# ---------------------------------------------------------------------------------------------


#: SFTConfig settings for batches the course collates itself (``SFTCollator``): TRL neither prepares,
#: truncates nor drops columns; it logs every step and saves nothing.
TRL_COURSE_BATCHES = dict(
    logging_steps=1, save_strategy="no", report_to="none", remove_unused_columns=False,
    dataset_kwargs={"skip_prepare_dataset": True}, max_length=None,
)  # fmt: skip


def trl_trainer(
    model,
    processor,
    data,
    *,
    steps: int,
    batch_size: int = 8,
    lr: float = 1e-3,
    warmup: int = 10,
    output_dir: str = "/tmp/trl_sft",
    bf16: bool = False,
    seed: int = 0,
    lr_scales: dict | None = None,
    stop_at: int | None = None,
    **extra,
):
    """TRL's ``SFTTrainer`` on the same model, data and collator (so the same labels), with the same
    AdamW groups as ``train`` (``make_optimizer``, handed to the Trainer, which adds the schedule).
    ``stop_at`` ends training after that many steps while the schedule still spans ``steps``."""
    from trl import SFTConfig, SFTTrainer

    collator = SFTCollator(processor)
    args = SFTConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        warmup_steps=warmup,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        weight_decay=0.0,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        **TRL_COURSE_BATCHES,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        **{"dataloader_num_workers": 0, **extra},
    )
    from datasets import Dataset
    from transformers import PrinterCallback

    # TRL wants a datasets.Dataset: rows hold only an index; the collator draws the samples themselves.
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"index": list(range(len(data)))}),
        processing_class=processor,
        data_collator=lambda rows: collator([data[r["index"]] for r in rows]),
        optimizers=(make_optimizer(model, lr, 0.0, lr_scales=lr_scales), None),
    )
    trainer.remove_callback(
        PrinterCallback
    )  # its per-step dicts would flood a notebook; read trainer.state.log_history
    if stop_at is not None:
        from transformers import TrainerCallback

        class StopAt(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                control.should_training_stop = state.global_step >= stop_at

        trainer.add_callback(StopAt())
    return trainer


def main(argv=None) -> None:
    """``python -m helpers.sft``: ``helpers.recipes.main`` (train as the recipe says, evaluate, save);
    with ``--data DIR_OR_JSONL``, ``helpers.own_data_run.main`` (your own dataset, notebook 13)."""
    import sys

    args = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--data" or a.startswith("--data=") for a in args):
        from helpers.own_data_run import main as own_data_main

        return own_data_main(args)
    from helpers.recipes import main as recipes_main

    recipes_main(argv)


if __name__ == "__main__":
    main()

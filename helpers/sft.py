"""Supervised fine-tuning of Qwen2.5-VL on the shapes task (taught in notebooks/10_sft.ipynb; the
GRPO notebook 11 starts from a checkpoint this module saves).

What is here, in the order the notebook teaches it:

- ``SFTCollator``: samples → one padded batch (``input_ids``, ``attention_mask``, ``pixel_values``,
  ``image_grid_thw``, ``labels``) whose labels keep only each answer and its ``<|im_end|>``
  (``helpers.chat.assistant_loss_mask``), with clear errors when truncation cut image tokens or the
  answer (what transformers would report as "Image features and image tokens do not match").
- ``labelled_loss``: the causal-LM loss computed by running the backbone once and applying the LM
  head only at the positions that carry a label (mirrors transformers' ``ForCausalLMLoss`` and TRL's
  fused LM head, ``trl.trainer.utils.add_fused_lm_head``).
- ``train``: a hand-written loop (AdamW, warmup + cosine, gradient accumulation and clipping, bf16
  autocast on GPU, tqdm, DDP when launched by ``torchrun``/``accelerate launch``) with safetensors
  checkpoints that resume on the same loss curve (``save_checkpoint`` / ``load_checkpoint``).
- ``evaluate``: greedy answers scored by ``helpers.rewards.score`` (accuracy, IoU).
- ``apply_lora`` / ``freeze_vision`` / ``trainable_by_module``: what LoRA and freezing train.
- ``trl_trainer``: the same model trained by TRL's ``SFTTrainer``.
- ``benchmark_*``: the GPU measurements of ``scripts/gpu_sft.sh``.

Command line (same training outside the notebook; under ``torchrun --nproc_per_node N`` it runs DDP)::

    python -m helpers.sft --profile gpu --out DIR [--steps N] [--metrics FILE]

Quick start for other notebooks (no checkpoint yet): ``quick_checkpoint(DIR)`` trains the cpu
profile (about 2 minutes on 2 cores) and saves it; ``load_checkpoint(DIR)`` loads it back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import helpers  # noqa: F401  (offline settings before transformers loads)

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from helpers.chat import IGNORE_INDEX, assistant_loss_mask, labels_from_mask
from helpers.data import Sample, make_sample, make_split, sample_messages
from helpers.profiles import settings
from helpers.qwen import SPECIAL_TOKENS, course_config, load_model, load_processor, parameter_count
from helpers.widgets import View, register_widget

IMAGE_PAD = SPECIAL_TOKENS["<|image_pad|>"]
PAD_ID = SPECIAL_TOKENS["<|endoftext|>"]
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def encode_samples(processor, samples: list[Sample], with_answer: bool = True, max_length: int | None = None) -> list[dict]:
    """Each sample → ``{"input_ids", "labels", "pixel_values", "image_grid_thw"}`` (1-D ids, no padding).

    Mirrors what TRL's ``DataCollatorForVisionLanguageModeling`` does before padding: the chat
    template (no generation prompt when the answer is included), then the processor, which expands
    ``<|image_pad|>`` to one token per merged 2×2 patch block. ``max_length`` truncates the ids from
    the right as trainers do; ``check_batch`` then says what the cut broke.
    """
    if not samples:
        raise ValueError("samples is empty: expected at least one Sample")
    texts = [processor.apply_chat_template(sample_messages(s, with_answer), tokenize=False,
                                           add_generation_prompt=not with_answer) for s in samples]
    enc = processor(text=texts, images=[s.image for s in samples], padding=True, return_tensors="pt")
    merge = processor.image_processor.merge_size
    patches = enc["image_grid_thw"].prod(-1).tolist()  # patches per image
    pixel_rows = torch.split(enc["pixel_values"], patches)
    items = []
    for row, (ids, keep) in enumerate(zip(enc["input_ids"], enc["attention_mask"])):
        ids = ids[keep.bool()]  # drop the processor's padding: we pad later, our way
        if max_length is not None:
            ids = ids[:max_length]
        mask = assistant_loss_mask(ids) if with_answer else torch.zeros_like(ids)
        items.append({"input_ids": ids, "labels": labels_from_mask(ids, mask),
                      "pixel_values": pixel_rows[row], "image_grid_thw": enc["image_grid_thw"][row:row + 1],
                      "merge": merge})
    return items


def pad_batch(items: list[dict], pad_id: int = PAD_ID, side: str = "right") -> dict:
    """Stack encoded items into one batch, padding ``input_ids`` with ``pad_id`` and ``labels`` with
    ``IGNORE_INDEX`` on ``side`` ("right" for training, "left" for generation)."""
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r}: expected 'left' or 'right'")
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        where = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, where], labels[row, where], attention[row, where] = it["input_ids"], it["labels"], 1
    return {"input_ids": ids, "attention_mask": attention, "labels": labels,
            "pixel_values": torch.cat([it["pixel_values"] for it in items]),
            "image_grid_thw": torch.cat([it["image_grid_thw"] for it in items])}


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
                f"to at least the longest sample, or drop samples that do not fit (trap #6)")
    if need_labels:
        labelled = (batch["labels"] != IGNORE_INDEX).sum(-1)
        empty = [r for r in range(len(labelled)) if labelled[r] == 0]
        if empty:
            raise ValueError(f"rows {empty} have no labelled token: max_length truncated their answer away; "
                             f"raise max_length (longest row has {batch['input_ids'].shape[1]} tokens)")


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


def unwrap(model):
    """The ``Qwen2_5_VLForConditionalGeneration`` inside DDP / PEFT wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


_MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")


def labelled_loss(model, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """Causal-LM cross-entropy with the LM head applied only where a label exists.

    Same value as ``model(**batch).loss`` (transformers' ``ForCausalLMLoss``: logits at position t
    predict the token at t+1; ``IGNORE_INDEX`` skipped). It runs the backbone (vision tower +
    language model) once, keeps the hidden states whose *next* token is labelled, and only
    multiplies those by the 151,936-row LM head. ``reduction="sum"`` returns the summed loss (for
    gradient accumulation over a known token count).
    """
    base = unwrap(model)
    hidden = base.model(**{k: batch[k] for k in _MODEL_INPUTS}, use_cache=False).last_hidden_state  # (B, T, D)
    labels = batch["labels"][:, 1:]                   # (B, T-1): the token each position predicts
    keep = labels != IGNORE_INDEX                     # (B, T-1)
    logits = base.lm_head(hidden[:, :-1][keep])       # (N, V), N = labelled tokens ≪ B·T
    return F.cross_entropy(logits.float(), labels[keep], reduction=reduction)


def full_logits_loss(model, batch: dict) -> torch.Tensor:
    """The same loss through the full ``(B, T, V)`` logits: ``model(**batch).loss`` (transformers)."""
    return model(**{k: batch[k] for k in (*_MODEL_INPUTS, "labels")}, use_cache=False).loss


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


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup from 0 to 1 over ``warmup`` steps, then cosine down to ``floor`` at ``total``
    (mirrors ``transformers.get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=floor)``)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95),
                   lr_scales: dict[str, float] | None = None) -> torch.optim.AdamW:
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
    param_groups = [{"params": ps, "weight_decay": wd, "lr_scale": scale, "lr": lr * scale}
                    for (wd, scale), ps in groups.items()]
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas)


def batch_indices(n: int, batch_size: int, step: int, seed: int = 0) -> list[int]:
    """The sample indices of global micro-batch number ``step``: epochs are seeded permutations of
    ``range(n)``, so the order depends only on (n, batch_size, step, seed), which makes resuming exact."""
    per_epoch = max(1, n // batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order[offset * batch_size:(offset + 1) * batch_size].tolist()


class ShapesStream(torch.utils.data.Dataset):
    """``make_sample(split, i, seed, **options)`` as a Dataset: samples drawn on demand (DataLoader
    workers draw them in parallel on a GPU machine)."""

    def __init__(self, split: str, n: int, seed: int = 0, **options):
        make_sample(split, 0, seed, **options)  # validates the options now
        self.split, self.n, self.seed, self.options = split, n, seed, options

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return make_sample(self.split, int(i), self.seed, **self.options)


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
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _architecture(config) -> dict:
    """The config fields that make two checkpoints interchangeable."""
    text, vision = config.get_text_config().to_dict(), config.vision_config.to_dict()
    keys_t = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")
    keys_v = ("hidden_size", "depth", "num_heads", "intermediate_size", "out_hidden_size", "patch_size", "spatial_merge_size")
    return {**{f"text.{k}": text.get(k) for k in keys_t}, **{f"vision.{k}": vision.get(k) for k in keys_v}}


def save_checkpoint(directory, model, processor, state: dict | None = None, optimizer=None) -> Path:
    """``save_pretrained`` of model and processor (weights as safetensors) plus, for resuming,
    ``trainer_state.json`` (step, loss history, settings) and the AdamW moments in
    ``optimizer.safetensors``. Loadable by ``helpers.qwen.load_model(directory)`` and
    ``load_processor(directory)``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = unwrap(model)
    if hasattr(model, "merge_and_unload") and getattr(model, "peft_config", None):
        raise ValueError("save a LoRA model with merge_lora(model) first, so the checkpoint loads as a plain model")
    base.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    if optimizer is not None:
        tensors, groups = {}, []
        index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
        for p, s in optimizer.state.items():
            for key, value in s.items():
                tensors[f"{index[id(p)]}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        for g in optimizer.param_groups:
            groups.append({k: v for k, v in g.items() if k != "params"} | {"size": len(g["params"])})
        save_file(tensors, directory / OPTIMIZER_FILE)
        state = {**(state or {}), "optimizer_groups": groups}
    (directory / STATE_FILE).write_text(json.dumps({**(state or {}), "architecture": _architecture(base.config)}, indent=1))
    return directory


def load_checkpoint(directory, expect_config=None, device="cpu", dtype=torch.float32):
    """(model, processor, state) from ``save_checkpoint``'s folder. Raises FileNotFoundError if it is
    missing or incomplete, ValueError if ``expect_config`` names another architecture."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist; train one with "
                                f"helpers.sft.train(...) and save_checkpoint, or quick_checkpoint(dir)")
    state = json.loads((directory / STATE_FILE).read_text()) if (directory / STATE_FILE).is_file() else {}
    if expect_config is not None:
        want = _architecture(expect_config)
        have = state.get("architecture")
        if have is None:
            if not (directory / "config.json").is_file():
                raise FileNotFoundError(f"{str(directory)!r} has no config.json: not a saved checkpoint")
            from transformers import AutoConfig

            have = _architecture(AutoConfig.from_pretrained(directory, local_files_only=True))
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            raise ValueError(f"checkpoint {directory.name!r} is from another config: "
                             + ", ".join(f"{k} = {a} there, {b} expected" for k, (a, b) in diff.items()))
    model = load_model(directory, dtype=dtype, device=device)
    processor = load_processor(directory)
    return model, processor, state


def _restore_optimizer(optimizer, directory: Path) -> None:
    path = directory / OPTIMIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has no {OPTIMIZER_FILE}: it cannot be resumed (save with optimizer=...)")
    tensors = load_file(path)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        optimizer.state[params[int(i)]][name] = value.to(params[int(i)].device) if name != "step" else value


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What ``train`` returns: the trained model and its per-step history."""

    model: object
    history: dict = field(default_factory=dict)   # step, loss, lr, grad_norm, tokens, seconds
    state: dict = field(default_factory=dict)
    optimizer: object = None


def _dist():
    """(rank, world) — initialises torch.distributed if a launcher set WORLD_SIZE > 1."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def train(model, processor, data, *, steps: int, batch_size: int = 8, grad_accum: int = 1, lr: float = 1e-3,
          warmup: int = 10, weight_decay: float = 0.0, lr_scales: dict | None = None, clip: float = 1.0, seed: int = 0, device=None,
          bf16: bool | None = None, num_workers: int = 0, checkpoint_dir=None, save_every: int = 0,
          resume_from=None, stop_at: int | None = None, progress: bool = True, log: list | None = None,
          max_seconds: float | None = None) -> TrainResult:
    """Train ``model`` on ``data`` (a list of Samples or a ``ShapesStream``) for ``steps`` optimiser steps.

    One step = ``grad_accum`` micro-batches of ``batch_size`` samples per process. The loss of a step
    is the mean over all its labelled tokens (summed per micro-batch, divided by the step's token
    count, as transformers does with ``num_items_in_batch``). ``resume_from`` continues a checkpoint
    saved by this function (weights, AdamW moments, step, history). ``stop_at`` ends early at that
    step (the schedule still spans ``steps``), which is how the resume test splits one run in two.
    ``max_seconds`` caps the run's length: after 20 steps the step time is measured and ``steps``
    (hence the cosine schedule) is shortened so that training ends within that many seconds.
    """
    if steps < 1 or batch_size < 1 or grad_accum < 1:
        raise ValueError(f"steps={steps}, batch_size={batch_size}, grad_accum={grad_accum}: each must be ≥ 1")
    rank, world = _dist()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    bf16 = (device.type == "cuda") if bf16 is None else bf16
    history = {"step": [], "loss": [], "lr": [], "grad_norm": [], "tokens": [], "seconds": []}
    start = 0
    model = model.to(device)
    optimizer = make_optimizer(model, lr, weight_decay, lr_scales=lr_scales)
    if resume_from is not None:
        resume_from = Path(resume_from)
        loaded, _, state = load_checkpoint(resume_from, expect_config=unwrap(model).config)
        unwrap(model).load_state_dict(loaded.state_dict())
        _restore_optimizer(optimizer, resume_from)
        start, history = state["step"], state["history"]
    model.train()
    wrapped = SFTLoss(model)
    if world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    stop = min(steps, stop_at or steps)
    collator = SFTCollator(processor)
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=_StepBatches(len(data), batch_size, start * grad_accum, stop * grad_accum, seed, rank, world),
        collate_fn=collator, num_workers=num_workers, pin_memory=device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if num_workers else None)
    batches = iter(loader)
    from tqdm.auto import tqdm

    bar = tqdm(total=stop - start, desc="SFT", disable=not progress or rank != 0, mininterval=1.0)
    clock = time.perf_counter()
    step = start
    while step < stop:
        micro = [{k: v.to(device, non_blocking=True) for k, v in next(batches).items()} for _ in range(grad_accum)]
        count = torch.tensor(float(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)), device=device)
        tokens = torch.tensor(float(sum(int(b["attention_mask"].sum()) for b in micro)), device=device)
        if world > 1:
            torch.distributed.all_reduce(count)
            torch.distributed.all_reduce(tokens)
        total = torch.zeros((), device=device)
        for i, batch in enumerate(micro):
            sync = contextlib.nullcontext() if world == 1 or i == grad_accum - 1 else wrapped.no_sync()
            with sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss_sum = wrapped(batch)
            (loss_sum * world / count).backward()  # DDP averages over ranks: × world makes it the global mean
            total += loss_sum.detach()
        if world > 1:
            torch.distributed.all_reduce(total)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for group in optimizer.param_groups:  # the schedule is a pure function of the step: resumable
            group["lr"] = lr * group.get("lr_scale", 1.0) * lr_factor(step, steps, warmup)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history["lr"].append(optimizer.param_groups[0]["lr"])
        history["step"].append(step + 1)
        history["loss"].append(float(total / count))
        history["grad_norm"].append(float(norm))
        history["tokens"].append(int(tokens))
        history["seconds"].append(time.perf_counter() - clock)
        if rank == 0:
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", refresh=False)
            if log is not None:
                log.append(f"step {step + 1} loss {history['loss'][-1]:.4f} lr {history['lr'][-1]:.2e}")
        done = step + 1
        if max_seconds and done - start == 20 and world == 1:  # fit the run into max_seconds
            elapsed = time.perf_counter() - clock
            per_step = (elapsed - history["seconds"][0]) / 19  # the first step pays for warm-up
            steps = stop = max(done, min(stop, done + int((max_seconds - elapsed) / per_step)))
            bar.total = stop - start
        step = done
        bar.update(1)
        if checkpoint_dir is not None and rank == 0 and (done == stop or (save_every and done % save_every == 0)):
            save_checkpoint(checkpoint_dir, model, processor, {"step": done, "history": history, "steps": steps}, optimizer)
    bar.close()
    model.eval()
    state = {"step": stop, "steps": steps, "world": world}
    return TrainResult(model, history, state, optimizer)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

MAX_NEW_TOKENS = {"count": 4, "attribute": 4, "grounding": 40}


def _score(task: str, completion: str, target) -> float:
    """``helpers.rewards.score`` when that module exists (it is the course's one scorer)."""
    from helpers.rewards import score

    return float(score(task, completion, target))


@torch.no_grad()
def generate_answers(model, processor, samples: list[Sample], batch_size: int = 32, max_new_tokens: int | None = None,
                     bf16: bool | None = None) -> list[str]:
    """Greedy answers (``model.generate``, left padding, stop at ``<|im_end|>``), in order."""
    base = unwrap(model).eval()
    device = next(base.parameters()).device
    bf16 = device.type == "cuda" if bf16 is None else bf16
    collator = SFTCollator(processor, with_answer=False, side="left")
    answers = []
    for lo in range(0, len(samples), batch_size):
        chunk = samples[lo:lo + batch_size]
        batch = collator(chunk)
        batch.pop("labels")
        new = max_new_tokens or max(MAX_NEW_TOKENS[s.task] for s in chunk)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = base.generate(**{k: v.to(device) for k, v in batch.items()}, max_new_tokens=new, do_sample=False,
                                eos_token_id=SPECIAL_TOKENS["<|im_end|>"], pad_token_id=PAD_ID)
        answers += processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def evaluate(model, processor, samples: list[Sample], batch_size: int = 32) -> dict:
    """Per task: ``{"score", "n", "predictions"}``; score = accuracy (count, attribute) or mean IoU (grounding)."""
    result = {}
    for task in dict.fromkeys(s.task for s in samples):
        chosen = [s for s in samples if s.task == task]
        answers = generate_answers(model, processor, chosen, batch_size)
        scores = [_score(task, a, s.target) for a, s in zip(answers, chosen)]
        result[task] = {"score": sum(scores) / len(scores), "n": len(chosen), "predictions": answers, "scores": scores}
    return result


# ---------------------------------------------------------------------------------------------
# Freezing and LoRA
# ---------------------------------------------------------------------------------------------

MODULE_GROUPS = (("vision: patch embed", "model.visual.patch_embed"), ("vision: blocks", "model.visual.blocks"),
                 ("vision: merger", "model.visual.merger"), ("LM: embeddings (= tied head)", "model.language_model.embed_tokens"),
                 ("LM: decoder layers", "model.language_model.layers"), ("LM: final norm", "model.language_model.norm"))


def trainable_by_module(model) -> dict[str, tuple[int, int]]:
    """Group → (trainable, total) parameter counts, tied weights counted once (trap #14)."""
    out = {name: [0, 0] for name, _ in MODULE_GROUPS}
    out["other"] = [0, 0]
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        clean = name.replace("base_model.model.", "").replace("base_layer.", "")
        group = next((g for g, prefix in MODULE_GROUPS if clean.startswith(prefix)), "other")
        out[group][1] += p.numel()
        out[group][0] += p.numel() if p.requires_grad else 0
    return {k: tuple(v) for k, v in out.items() if v[1]}


def freeze_vision(model, train_merger: bool = True):
    """Freeze the vision tower (patch embed + blocks); keep the merger trainable if asked."""
    visual = unwrap(model).model.visual
    for name, p in visual.named_parameters():
        p.requires_grad_(train_merger and name.startswith("merger."))
    return model


#: LoRA targets in the language model only. A bare list like ["q_proj", ..., "down_proj"] would
#: also match the vision blocks' MLPs (gate_proj/up_proj/down_proj), so the regex anchors them.
LM_LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def apply_lora(model, r: int = 16, alpha: int = 32, target_modules=LM_LORA_TARGETS, train_merger: bool = False):
    """PEFT LoRA on ``target_modules`` (default: the language model's attention and MLP); everything
    else frozen, the merger optionally fully trained (``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules,
                        modules_to_save=["merger"] if train_merger else None)
    return get_peft_model(model, config)


# ---------------------------------------------------------------------------------------------
# TRL
# ---------------------------------------------------------------------------------------------


def trl_trainer(model, processor, data, *, steps: int, batch_size: int = 8, lr: float = 1e-3, warmup: int = 10,
                output_dir: str = "/tmp/trl_sft", bf16: bool = False, seed: int = 0, lr_scales: dict | None = None,
                stop_at: int | None = None, **extra):
    """TRL's ``SFTTrainer`` on the same model, data and collator (so the same labels), with the same
    AdamW groups as ``train`` (``make_optimizer``, handed to the Trainer, which adds the schedule).
    ``stop_at`` ends training after that many steps while the schedule still spans ``steps``."""
    from trl import SFTConfig, SFTTrainer

    collator = SFTCollator(processor)
    args = SFTConfig(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size,
                     learning_rate=lr, warmup_steps=warmup, lr_scheduler_type="cosine_with_min_lr",
                     lr_scheduler_kwargs={"min_lr_rate": 0.1}, weight_decay=0.0,
                     adam_beta2=0.95, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none",
                     remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, max_length=None,
                     bf16=bf16, use_cpu=not torch.cuda.is_available(), seed=seed, data_seed=seed,
                     disable_tqdm=True, **{"dataloader_num_workers": 0, **extra})
    from datasets import Dataset

    from transformers import PrinterCallback

    # TRL wants a datasets.Dataset: rows hold only an index; the collator draws the samples themselves.
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"index": list(range(len(data)))}),
                         processing_class=processor, data_collator=lambda rows: collator([data[r["index"]] for r in rows]),
                         optimizers=(make_optimizer(model, lr, 0.0, lr_scales=lr_scales), None))
    trainer.remove_callback(PrinterCallback)  # its per-step dicts would flood a notebook; read trainer.state.log_history
    if stop_at is not None:
        from transformers import TrainerCallback

        class StopAt(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                control.should_training_stop = state.global_step >= stop_at

        trainer.add_callback(StopAt())
    return trainer


# ---------------------------------------------------------------------------------------------
# Profiles, quick start, command line
# ---------------------------------------------------------------------------------------------


def model_for_profile(profile: str | None = None, device="cpu"):
    """(model, processor) as the profile says: ``$QWENVL_MODEL`` if set, else the course model
    built from ``course_config(**settings('sft')['model'])``; images limited to the profile's size.
    With ``freeze_embeddings`` the tied embedding / LM head (19.4 M of the course model's 20 M
    parameters) stays fixed: the cpu profile's AdamW then updates under 1 M numbers instead of 20 M."""
    s = settings("sft", profile)
    side = s["data"]["image_size"]
    checkpoint = os.environ.get("QWENVL_MODEL")
    processor = load_processor(min_pixels=28 * 28, max_pixels=side * side)
    model = load_model(checkpoint, config=None if checkpoint else course_config(**s["model"]), seed=s["seed"], device=device)
    if s.get("freeze_embeddings"):
        unwrap(model).get_input_embeddings().weight.requires_grad_(False)
    return model, processor


def run_profile(profile: str | None = None, out=None, steps: int | None = None, progress: bool = True,
                evaluate_splits: bool = True, log: list | None = None, examples: int = 0) -> dict:
    """Train as the profile says, save to ``out``, evaluate before/after on val/test/ood; returns a
    metrics dict (``examples`` > 0 keeps that many test and ood samples with their predictions)."""
    s = settings("sft", profile)
    steps = steps or s["steps"]
    rank, world = _dist()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = model_for_profile(profile)
    data = ShapesStream("train", s["n_train"], s["seed"], **s["data"])
    evals = {split: make_split(split, s["n_eval"], s["seed"], **s["data"]) for split in ("val", "test", "ood")} if evaluate_splits and rank == 0 else {}
    model.to(device)
    before = {split: _summary(evaluate(model, processor, smp)) for split, smp in evals.items()}
    t0 = time.perf_counter()
    result = train(model, processor, data, steps=steps, batch_size=s["batch_size"], grad_accum=s["grad_accum"],
                   lr=s["lr"], warmup=s["warmup"], lr_scales=s.get("lr_scales"), seed=s["seed"], num_workers=s["num_workers"] if device == "cuda" else 0,
                   checkpoint_dir=out, progress=progress, log=log, max_seconds=s.get("max_seconds"))
    seconds = time.perf_counter() - t0
    after_full = {split: evaluate(result.model, processor, smp) for split, smp in evals.items()}
    h = result.history
    shown = {}
    for split in ("test", "ood"):
        if examples and split in evals:
            picked = [i for task in ("count", "attribute", "grounding") for i in [j for j, x in enumerate(evals[split]) if x.task == task][:examples]]
            preds = {task: iter(v["predictions"]) for task, v in after_full[split].items()}
            answers = [None] * len(evals[split])
            for j, x in enumerate(evals[split]):
                answers[j] = next(preds[x.task])
            shown[split] = [(evals[split][j], answers[j]) for j in picked]
    return {"profile": s, "steps": result.state["step"], "world": world, "train_seconds": seconds,
            "tokens_per_second": sum(h["tokens"]) / max(h["seconds"][-1], 1e-9) if h["seconds"] else 0.0,
            "parameters": parameter_count(unwrap(model)),
            "trainable": sum(p.numel() for p in unwrap(model).parameters() if p.requires_grad),
            "before": before, "after": {split: _summary(v) for split, v in after_full.items()},
            "loss": h["loss"], "history": h, "examples": shown, "model": result.model, "processor": processor}
def _summary(result: dict) -> dict:
    return {task: round(v["score"], 4) for task, v in result.items()}


def profile_checkpoint_dir(profile: str | None = None) -> Path:
    """Where the SFT run of a profile is cached: ``cache_dir()/sft-<profile>-<hash of its settings>``
    (a changed profile gets a new folder). Notebook 10 saves there; GRPO (notebook 11) starts there."""
    import hashlib

    from helpers.profiles import current_profile
    from helpers.qwen import cache_dir

    name = current_profile(profile)
    digest = hashlib.sha256(json.dumps(settings("sft", name), sort_keys=True, default=str).encode()).hexdigest()[:10]
    return cache_dir() / f"sft-{name}-{digest}"


def quick_checkpoint(directory, profile: str = "cpu", steps: int | None = None) -> Path:
    """Train the cpu profile (no evaluation) and save it: what notebook 11 calls when no SFT
    checkpoint exists yet. About 2 minutes on 2 cores."""
    run_profile(profile, out=directory, steps=steps, progress=False, evaluate_splits=False)
    return Path(directory)


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------

TOKEN_KINDS = ("system / user text", "special", "vision", "answer (labelled)", "padding")


def token_kinds(batch: dict) -> torch.Tensor:
    """Per token: 0 text, 1 special, 2 vision, 3 labelled, 4 padding (what the batch picture colours)."""
    ids = batch["input_ids"]
    kind = torch.zeros_like(ids)
    kind[ids >= SPECIAL_TOKENS["<|endoftext|>"]] = 1
    kind[(ids == IMAGE_PAD) | (ids == SPECIAL_TOKENS["<|video_pad|>"])] = 2
    kind[batch["labels"] != IGNORE_INDEX] = 3
    kind[batch["attention_mask"] == 0] = 4
    return kind


def plot_batch(batch: dict, processor=None, width: float = 9.0):
    """A real batch as a picture: one row per sample, one cell per token, coloured by ``token_kinds``."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from helpers.plots import COLOURS, new_figure

    colours = [COLOURS["text"], COLOURS["special"], COLOURS["image"], COLOURS["loss"], "#dddddd"]
    kinds = token_kinds(batch)
    figure, ax = new_figure(width=width, height=0.9 + 0.28 * len(kinds))
    ax.imshow(kinds.numpy(), cmap=ListedColormap(colours), vmin=0, vmax=4, aspect="auto")
    ax.set_xlabel("token position")
    ax.set_ylabel("sample")
    ax.grid(False)
    ax.set_yticks(range(len(kinds)))
    ax.legend(handles=[Patch(color=c, label=k) for c, k in zip(colours, TOKEN_KINDS)], ncols=5,
              loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(kinds) > 4 else -0.45), fontsize=8)
    return figure


def plot_training(history: dict, after: dict | None = None, title: str = "SFT", smooth: int = 10):
    """Loss per step (and its running mean) and the learning rate; final scores in the title."""
    from helpers.plots import COLOURS, new_figure

    figure, (ax, ax_lr) = new_figure(2, 1, width=9, height=3.2)
    steps, loss = history["step"], torch.tensor(history["loss"])
    ax.plot(steps, loss, color=COLOURS["loss"], alpha=0.35, lw=0.8, label="loss per step")
    if len(loss) >= smooth:
        running = loss.unfold(0, smooth, 1).mean(-1)
        ax.plot(steps[smooth - 1:], running, color=COLOURS["loss"], label=f"mean of {smooth}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (labelled tokens)")
    ax.legend()
    ax.set_title(title)
    ax_lr.plot(steps, history["lr"], color=COLOURS["accent"])
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    if after:
        ax_lr.set_title("after: " + "; ".join(f"{split} " + ", ".join(f"{t} {v:.2f}" for t, v in scores.items())
                                            for split, scores in after.items() if split != "val"), fontsize=7)
    return figure


def plot_predictions(pairs: list, ncols: int = 6, size: float = 1.6):
    """Each (sample, predicted text) as its image with the question, the answer and the prediction;
    grounding boxes drawn (reference green, prediction red dashed)."""
    from matplotlib.patches import Rectangle

    from helpers.plots import COLOURS, new_figure
    from helpers.rewards import parse_answer

    nrows = max(1, math.ceil(len(pairs) / ncols))
    import numpy as np

    figure, axes = new_figure(ncols, nrows, width=size * ncols, height=(size + 0.55) * nrows)
    axes = np.asarray(axes).reshape(-1)
    for ax in axes:
        ax.axis("off")
    for ax, (sample, text) in zip(axes, pairs):
        ax.imshow(sample.image)
        ok = _score(sample.task, text, sample.target)
        if sample.task == "grounding":
            x1, y1, x2, y2 = sample.target
            ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, ec=COLOURS["image"], lw=1.5))
            box = parse_answer("grounding", text)
            if box is not None:
                ax.add_patch(Rectangle((box[0] - 0.5, box[1] - 0.5), box[2] - box[0], box[3] - box[1], fill=False,
                                       ec=COLOURS["loss"], lw=1.5, ls="--"))
            shown = f"IoU {ok:.2f}"
        else:
            shown = f"→ {text.strip()[:12]!r} ({'✓' if ok == 1 else '✗'})"
        ax.set_title(f"{sample.question}\n[{sample.split}] {shown}", fontsize=6)
    return figure


_WIDGET_CACHE: dict = {}


def _widget_batch():
    if "items" not in _WIDGET_CACHE:
        processor = load_processor(min_pixels=28 * 28, max_pixels=settings("sft")["data"]["image_size"] ** 2)
        samples = make_split("val", 6, 0, **settings("sft")["data"])
        _WIDGET_CACHE.update(processor=processor, samples=samples, items=encode_samples(processor, samples))
    return _WIDGET_CACHE


@register_widget("10_sft", {"row": 0, "max_length": 0}, [{"row": 2, "max_length": 30}, {"row": 5, "max_length": 60}])
def batch_view(row: int = 0, max_length: int = 0) -> View:
    """One sample of a real batch, token by token, coloured by kind (labelled tokens underlined);
    ``max_length`` > 0 truncates it as a trainer would and says what broke."""
    import html as html_lib

    from helpers.plots import COLOURS

    cache = _widget_batch()
    item = dict(cache["items"][row])
    if max_length:
        item = {**item, "input_ids": item["input_ids"][:max_length], "labels": item["labels"][:max_length]}
    batch = pad_batch([item])
    kinds = token_kinds(batch)[0].tolist()
    colours = [COLOURS["text"], COLOURS["special"], COLOURS["image"], COLOURS["loss"], "#999999"]
    tokenizer = cache["processor"].tokenizer
    pieces = []
    for token, kind in zip(batch["input_ids"][0].tolist(), kinds):
        text = html_lib.escape(tokenizer.decode([token])).replace("\n", "↵")
        style = f"color:{colours[kind]};" + ("text-decoration:underline;font-weight:bold;" if kind == 3 else "")
        pieces.append(f"<span style='{style}'>{text}</span>")
    try:
        check_batch(batch)
        status = f"OK: {sum(k == 3 for k in kinds)} labelled tokens of {len(kinds)}"
    except ValueError as error:
        status = f"ValueError: {error}"
    sample = cache["samples"][row]
    head = f"<b>{html_lib.escape(sample.question)}</b> → {html_lib.escape(sample.answer)}<br>"
    body = "<div style='font-family:monospace;font-size:12px;line-height:1.6'>" + "".join(pieces) + "</div>"
    return View(html=head + body + f"<p>{html_lib.escape(status)}</p>",
                data={"tokens": len(kinds), "labelled": sum(k == 3 for k in kinds), "status": status})


# ---------------------------------------------------------------------------------------------
# GPU measurements (scripts/gpu_sft.sh)
# ---------------------------------------------------------------------------------------------

PEAK_BF16_FLOPS = 989e12  # H100/H200 dense bf16 (1979 is the sparse figure)


def training_flops(model, batch: dict, lora: bool = False) -> dict:
    """Model FLOPs of one training step (the MFU numerator), by part.

    Counted: every matmul of the language model's decoder layers at every token (2·N per token
    forward; backward 4·N with weight gradients, 2·N without, as in LoRA where the frozen weights
    need only input gradients), causal attention scores (QKᵀ and AV: 2·2·T²/2·d per layer, forward),
    the LM head only at labelled positions (2·V·d each), the vision tower per patch (2·N_vision
    forward; 6·N_vision if trained, nothing backward if frozen) and its attention over each window.
    Not counted: gradient checkpointing's recomputed forward (hardware FLOPs, not model FLOPs),
    norms, rotary, softmax, the LoRA matrices themselves (r ≪ d).
    """
    base = unwrap(model)
    text = base.config.get_text_config()
    d, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    n_layers = sum(p.numel() for p in base.model.language_model.layers.parameters())
    n_vision = sum(p.numel() for p in base.model.visual.parameters())
    vision_trained = any(p.requires_grad for p in base.model.visual.parameters())
    lengths = batch["attention_mask"].sum(-1).double()
    tokens = float(lengths.sum())
    labelled = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    patches = float(batch["image_grid_thw"].prod(-1).sum())
    vcfg = base.config.vision_config
    window = (vcfg.window_size // vcfg.patch_size) ** 2  # patches per window (64)
    per_image = batch["image_grid_thw"].prod(-1).double()
    full_blocks = len(vcfg.fullatt_block_indexes)
    vision_attn = 4 * vcfg.hidden_size * float((per_image**2).sum() * full_blocks
                                               + (per_image * per_image.clamp(max=window)).sum() * (vcfg.depth - full_blocks))
    back = 1 if lora else 2            # backward / forward matmul ratio
    parts = {
        "lm_layers": 2 * n_layers * tokens * (1 + back),
        "lm_attention": 2 * d * layers * float((lengths**2).sum()) * 3,  # 4·T²/2·d fwd, ×3 with backward
        "lm_head": 2 * vocab * d * labelled * (1 + back),
        "vision": (6 * n_vision * patches + 3 * vision_attn) if vision_trained else (2 * n_vision * patches + vision_attn),
    }
    parts["total"] = sum(parts.values())
    return parts


def benchmark_3b(mode: str, batch: dict, steps: int = 3, warmup: int = 2, lr: float = 1e-5, config=None) -> dict:
    """Step time, tokens/s, MFU and peak memory of ``qwen25vl_3b_config()`` (random weights, bf16,
    gradient checkpointing) for ``mode`` "full" (AdamW on every weight, bf16 states) or "lora"
    (r=16 on the language model, vision tower frozen)."""
    from helpers.qwen import qwen25vl_3b_config
    from transformers import Qwen2_5_VLForConditionalGeneration

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = config or qwen25vl_3b_config()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "lora":
        model.enable_input_require_grads()
        model = apply_lora(model, r=16)
    model.train()
    optimizer = make_optimizer(model, lr)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = labelled_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step = sum(times[warmup:]) / steps
    flops = training_flops(model, batch, lora=mode == "lora")
    tokens = float(batch["attention_mask"].sum())
    result = {"mode": mode, "step_seconds": step, "tokens_per_step": tokens, "tokens_per_second": tokens / step,
              "model_tflops_per_step": flops["total"] / 1e12, "flops_by_part_tflop": {k: v / 1e12 for k, v in flops.items()},
              "mfu": flops["total"] / step / PEAK_BF16_FLOPS, "loss": float(loss.detach()),
              "parameters": parameter_count(unwrap(model)),
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    del model, optimizer, loss
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def benchmark_loops(model_fn, processor, samples: list[Sample], steps: int = 30, skip: int = 5, batch_size: int = 64,
                    lr: float = 1e-3, num_workers: int = 0, lr_scales: dict | None = None) -> dict:
    """Tokens/s of our loop vs TRL's ``SFTTrainer`` on the same model (fresh from ``model_fn``),
    batches, collator, loss and optimiser settings; the first ``skip`` steps are not timed."""
    from transformers import TrainerCallback

    n = batch_size * steps
    data = samples[:n]
    ours = train(model_fn(), processor, data, steps=steps, batch_size=batch_size, lr=lr, warmup=2,
                 num_workers=num_workers, progress=False, lr_scales=lr_scales)
    h = ours.history
    ours_tps = sum(h["tokens"][skip:]) / (h["seconds"][-1] - h["seconds"][skip - 1])

    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    trainer = trl_trainer(model_fn(), processor, data, steps=steps, batch_size=batch_size, lr=lr, warmup=2,
                          lr_scales=lr_scales, bf16=torch.cuda.is_available(), output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "trl_bench"),
                          dataloader_num_workers=num_workers)
    trainer.add_callback(Clock())
    trainer.train()
    logs = [e for e in trainer.state.log_history if "num_tokens" in e]
    tokens = [float(e["num_tokens"]) for e in logs]  # cumulative input tokens (TRL's count)
    trl_tps = (tokens[-1] - tokens[skip - 1]) / (marks[-1] - marks[skip - 1])
    return {"ours_tokens_per_second": ours_tps, "trl_tokens_per_second": trl_tps, "steps": steps, "skip": skip,
            "batch_size": batch_size, "ours_loss": h["loss"], "trl_loss": [e["loss"] for e in logs],
            "speedup": ours_tps / trl_tps}


def _batch_for_3b(batch_size: int, image_size: int, seed: int = 0) -> dict:
    processor = load_processor(min_pixels=28 * 28, max_pixels=image_size * image_size)
    return SFTCollator(processor)(make_split("train", batch_size, seed, image_size=image_size))


def gpu_report(out_dir, checkpoint_dir, smoke: bool = False) -> dict:
    """Everything ``scripts/gpu_sft.sh`` measures; writes metrics.json, log.txt, sft_training.png and
    sft_examples.png to ``out_dir`` and the trained checkpoint to ``checkpoint_dir``."""
    import platform

    import transformers

    from helpers.plots import use_course_style

    use_course_style()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    say = lambda text: (print(text, flush=True), log.append(text))  # noqa: E731
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    say(f"device {device}; torch {torch.__version__}; transformers {transformers.__version__}; smoke={smoke}")
    metrics: dict = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
                     "date": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke": smoke}
    t0 = time.perf_counter()
    run = run_profile("cpu" if smoke else "gpu", out=checkpoint_dir, steps=3 if smoke else None, progress=False,
                      log=log, examples=2)
    metrics["sft"] = {k: v for k, v in run.items() if k not in ("history", "examples", "model", "processor", "loss")}
    metrics["sft"]["loss_every_10"] = run["loss"][::10]
    say(f"SFT: {run['steps']} steps in {run['train_seconds']:.1f} s, {run['tokens_per_second']:.0f} tokens/s; "
        f"before {run['before']} after {run['after']}")
    figure = plot_training(run["history"], run["after"], title=f"SFT, gpu profile on {device}")
    figure.savefig(out_dir / "sft_training.png")
    figure = plot_predictions([x for split in ("test", "ood") for x in run["examples"].get(split, [])], ncols=6)
    figure.savefig(out_dir / "sft_examples.png")
    processor = run["processor"]
    del run
    try:  # our loop vs TRL on the same model, batches and loss
        s = settings("sft", "cpu" if smoke else "gpu")
        steps, batch_size = (4, 4) if smoke else (30, s["batch_size"])
        samples = make_split("train", steps * batch_size, 5, **s["data"])
        metrics["loop_vs_trl"] = benchmark_loops(lambda: model_for_profile("cpu" if smoke else "gpu")[0], processor, samples,
                                                 steps=steps, skip=2 if smoke else 5, batch_size=batch_size,
                                                 lr=s["lr"], lr_scales=s.get("lr_scales"))
        say(f"loop vs TRL: {metrics['loop_vs_trl']['ours_tokens_per_second']:.0f} vs "
            f"{metrics['loop_vs_trl']['trl_tokens_per_second']:.0f} tokens/s")
    except Exception as error:  # noqa: BLE001  (a missing TRL must not cost the other measurements)
        metrics["loop_vs_trl"] = {"error": repr(error)[:500]}
        say(f"loop vs TRL failed: {error!r}"[:500])
    metrics["3b"] = {}
    config = course_config() if smoke else None
    batch = _batch_for_3b(2 if smoke else 8, 112 if smoke else 448)
    for mode in ("full", "lora"):
        try:
            r = benchmark_3b(mode, batch, steps=1 if smoke else 3, warmup=1 if smoke else 2, config=config)
            metrics["3b"][mode] = r
            say(f"3B {mode}: {r['step_seconds']:.3f} s/step, {r['tokens_per_second']:.0f} tokens/s, MFU {r['mfu']:.3f}, "
                f"peak {r['peak_memory_gib']} GiB, trainable {r['trainable']:,}")
        except Exception as error:  # noqa: BLE001
            metrics["3b"][mode] = {"error": repr(error)[:500]}
            say(f"3B {mode} failed: {error!r}"[:500])
    metrics["3b_batch"] = {"images": int(batch["image_grid_thw"].shape[0]), "image_size": 112 if smoke else 448,
                           "tokens": int(batch["attention_mask"].sum()), "labelled": int((batch["labels"] != IGNORE_INDEX).sum())}
    metrics["mfu_flops"] = training_flops.__doc__.split("\n\n")[1].strip()
    metrics["wall_seconds"] = time.perf_counter() - t0
    say(f"all done in {metrics['wall_seconds']:.0f} s")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    (out_dir / "log.txt").write_text("\n".join(log) + "\n")
    return metrics


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.sft", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=("cpu", "gpu"), default=None)
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=None, help="override the profile's step count")
    parser.add_argument("--metrics", default=None, help="write a metrics JSON here")
    parser.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    parser.add_argument("--report", default=None, help="run every GPU measurement (scripts/gpu_sft.sh); "
                        "write metrics.json, log.txt and two PNGs here; --out receives the checkpoint")
    parser.add_argument("--smoke", action="store_true", help="with --report: a tiny CPU rehearsal")
    args = parser.parse_args(argv)
    if args.report:
        gpu_report(args.report, args.out, smoke=args.smoke)
        return
    log: list[str] = []
    metrics = run_profile(args.profile, out=args.out, steps=args.steps, evaluate_splits=not args.no_eval, log=log)
    metrics = {k: v for k, v in metrics.items() if k not in ("model", "processor", "examples")}
    rank, world = _dist()
    if rank == 0:
        print(json.dumps({k: metrics[k] for k in ("steps", "world", "train_seconds", "tokens_per_second", "before", "after")}))
        print(f"final loss {metrics['loss'][-1]:.4f}; checkpoint in {args.out}")
        if args.metrics:
            Path(args.metrics).write_text(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=1))
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

"""Training checkpoints shared by SFT (notebook 10) and GRPO (notebook 11): save, load, resume.

A checkpoint folder is what ``save_pretrained`` writes for the model and the processor (weights as
``model.safetensors``), so ``helpers.qwen.load_model(folder)`` loads it like any checkpoint, plus
``trainer_state.json`` (step, loss history, settings) and, for resuming, the AdamW moments in
``optimizer.safetensors``. A save is atomic: everything is written to a temporary folder beside
the target and renamed into place, so an interrupted save leaves the previous checkpoint whole and
no file of an earlier save survives into a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from helpers import cache
from helpers.evaluation import unwrap
from helpers.qwen import cache_dir, load_model, load_processor, parameter_count

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
WEIGHTS_FILE = "model.safetensors"


def architecture(config) -> dict:
    """The config fields that make two checkpoints interchangeable."""
    text, vision = config.get_text_config().to_dict(), config.vision_config.to_dict()
    keys_t = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
    )
    keys_v = (
        "hidden_size",
        "depth",
        "num_heads",
        "intermediate_size",
        "out_hidden_size",
        "patch_size",
        "spatial_merge_size",
    )
    return {**{f"text.{k}": text.get(k) for k in keys_t}, **{f"vision.{k}": vision.get(k) for k in keys_v}}


def _optimizer_tensors(optimizer) -> tuple[dict, list]:
    tensors, groups = {}, []
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    for p, s in optimizer.state.items():
        for key, value in s.items():
            tensors[f"{index[id(p)]}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    for g in optimizer.param_groups:
        groups.append({k: v for k, v in g.items() if k != "params"} | {"size": len(g["params"])})
    return tensors, groups


def save_checkpoint(directory, model, processor, state: dict | None = None, optimizer=None) -> Path:
    """Write model, processor, ``trainer_state.json`` and (if given) the optimizer state to
    ``directory``, atomically: into a temporary sibling folder, then renamed over the old one."""
    directory = Path(directory)
    if hasattr(model, "merge_and_unload") and getattr(model, "peft_config", None):
        raise ValueError(
            "save a LoRA model with helpers.lora.merge_lora(model) first, so the checkpoint loads as a plain model"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    for debris in directory.parent.glob(f".{directory.name}.tmp-*"):  # staging folders of killed saves
        if not _alive(debris.name.rsplit(".tmp-", 1)[1].split("-")[0]):
            shutil.rmtree(debris, ignore_errors=True)
    return _save(directory, model, processor, state, optimizer)


def _alive(pid: str) -> bool:
    """Whether process ``pid`` (as written in a staging folder's name) still runs."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _save(directory: Path, model, processor, state, optimizer) -> Path:
    staging = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        base = unwrap(model)
        base.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        state = dict(state or {})
        if optimizer is not None:
            tensors, groups = _optimizer_tensors(optimizer)
            save_file(tensors, staging / OPTIMIZER_FILE)
            state["optimizer_groups"] = groups
        (staging / STATE_FILE).write_text(json.dumps({**state, "architecture": architecture(base.config)}, indent=1))
        cache.replace_folder(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def is_complete(directory) -> bool:
    """True when ``directory`` holds a finished model save (``weights_problem`` finds nothing)."""
    return weights_problem(directory) is None


def weights_problem(directory) -> str | None:
    """None when ``directory`` holds a finished model save: a readable ``config.json`` and readable
    safetensors weights (one file, or every shard its index names) holding as many numbers as the
    model that config describes (built on the meta device). Else what is wrong. A folder that
    ``save_pretrained`` was still writing (config first, weights last), truncated weights, or weights
    of another config are not complete."""
    import math

    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForImageTextToText

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        return f"{directory.name!r} has no config.json"
    index = directory / "model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [WEIGHTS_FILE]
        numbers = 0
        for name in files:
            with safe_open(directory / name, "pt") as weights:
                numbers += sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        with torch.device("meta"):
            expected = parameter_count(AutoModelForImageTextToText.from_config(config))
    except Exception as error:  # noqa: BLE001  (missing, truncated or foreign file: not a checkpoint)
        return f"{directory.name!r} has unreadable weights or config ({type(error).__name__})"
    if numbers != expected:
        return f"{directory.name!r} holds {numbers} weights, its config.json describes {expected}"
    return None


def load_checkpoint(directory, expect_config=None, device="cpu", dtype=torch.float32):
    """(model, processor, state) from ``save_checkpoint``'s folder. Raises FileNotFoundError if it is
    missing or incomplete, ValueError if ``expect_config`` names another architecture."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"checkpoint directory {str(directory)!r} does not exist; train one with "
            f"helpers.sft.train(..., checkpoint_dir=...) or python -m helpers.sft --out DIR"
        )
    problem = weights_problem(directory)
    if problem is not None:
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} is not a complete save: {problem}")
    state = json.loads((directory / STATE_FILE).read_text()) if (directory / STATE_FILE).is_file() else {}
    if expect_config is not None:
        want = architecture(expect_config)
        have = state.get("architecture")
        if have is None:
            if not (directory / "config.json").is_file():
                raise FileNotFoundError(f"{str(directory)!r} has no config.json: not a saved checkpoint")
            from transformers import AutoConfig

            have = architecture(AutoConfig.from_pretrained(directory, local_files_only=True))
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            raise ValueError(
                f"checkpoint {directory.name!r} is from another config: "
                + ", ".join(f"{k} = {a} there, {b} expected" for k, (a, b) in diff.items())
            )
    model = load_model(directory, dtype=dtype, device=device)
    processor = load_processor(directory)
    return model, processor, state


def restore_optimizer(optimizer, directory) -> None:
    """Load the AdamW moments saved beside a checkpoint into ``optimizer`` (same parameter order)."""
    path = Path(directory) / OPTIMIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} has no {OPTIMIZER_FILE}: it cannot be resumed (save with optimizer=...)"
        )
    tensors = _checked_moments(path, optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        optimizer.state[params[int(i)]][name] = value.to(params[int(i)].device) if name != "step" else value


def _checked_moments(path: Path, optimizer) -> dict:
    """The saved moments, after checking each belongs to a parameter of ``optimizer`` of its shape."""
    try:
        tensors = load_file(path)
    except Exception as error:  # noqa: BLE001  (truncated or foreign file)
        raise ValueError(f"{str(path)!r} is not readable optimizer state ({type(error).__name__})") from None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        if int(i) >= len(params) or (name != "step" and value.shape != params[int(i)].shape):
            raise ValueError(
                f"{str(path)!r} holds moments for parameter {i} of shape {tuple(value.shape)}, but this "
                f"optimizer has {len(params)} parameters: the set of trainable parameters changed since the save"
            )
    return tensors


def run_signature(model, steps, batch_size, grad_accum, lr, warmup) -> dict:
    """What a resumed run must share with the saved one (the schedule and the optimiser's parameters)."""
    trainable = [n for n, p in unwrap(model).named_parameters() if p.requires_grad]
    return {
        "steps": steps,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "lr": lr,
        "warmup": warmup,
        "trainable": settings_digest(trainable),
    }


def resume(model, optimizer, directory, signature: dict) -> tuple[int, dict]:
    """Validate a checkpoint against this run, then load its weights and moments into ``model``."""
    directory = Path(directory)
    if not is_complete(directory) or not all((directory / f).is_file() for f in (STATE_FILE, OPTIMIZER_FILE)):
        raise FileNotFoundError(
            f"{str(directory)!r} is not a complete resumable checkpoint (needs config.json, "
            f"{WEIGHTS_FILE}, {STATE_FILE} and {OPTIMIZER_FILE})"
        )
    loaded, _, state = load_checkpoint(directory, expect_config=unwrap(model).config)
    saved = state.get("signature")
    if not isinstance(saved, dict) or not isinstance(state.get("step"), int):
        raise ValueError(
            f"cannot resume {str(directory)!r}: its {STATE_FILE} has no run signature or step "
            "(saved by another tool than helpers.sft.train)"
        )
    diff = {k: (saved.get(k), v) for k, v in signature.items() if saved.get(k) != v}
    if diff:
        raise ValueError(
            f"cannot resume {str(directory)!r}: "
            + ", ".join(f"{k} = {a} there, {b} here" for k, (a, b) in diff.items())
        )
    if state["step"] >= signature["steps"]:
        raise ValueError(
            f"cannot resume {str(directory)!r}: it is at step {state['step']}, and steps={signature['steps']} "
            "leaves nothing to train; pass steps above it"
        )
    _checked_moments(directory / OPTIMIZER_FILE, optimizer)  # everything checked: now change the caller's model
    unwrap(model).load_state_dict(loaded.state_dict())
    restore_optimizer(optimizer, directory)
    return state["step"], state["history"]


def settings_digest(values) -> str:
    """A short hash of a JSON-able settings object: names a cached run after what produced it."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]


def profile_checkpoint_dir(profile: str | None = None, step: int | None = None) -> Path:
    """Where the SFT run of a profile is cached: ``cache_dir()/sft-<profile>-<hash of its settings>``
    (a changed profile gets a new folder), with ``-step<N>`` for the run stopped at step N.
    Notebook 10 saves both; GRPO (notebook 11) starts from the one at its ``start_step``."""
    from helpers.profiles import as_plain, current_profile, settings

    name = current_profile(profile)
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 1):
        raise ValueError(f"step={step!r}: expected None or an integer ≥ 1")
    return cache_dir() / (
        f"sft-{name}-{settings_digest(as_plain(settings('sft', name)))}" + (f"-step{step}" if step else "")
    )


def sft_checkpoint(profile: str | None = None, directory=None, progress: bool = True) -> Path:
    """The SFT checkpoint GRPO starts from: ``directory`` if given, else the course cache
    (``helpers.checkpoints.profile_checkpoint_dir(profile, step=start_step)``: notebook 10 saves its run
    there at that step). When it is missing or incomplete, says so and trains it (the profile's SFT
    run, stopped at ``start_step``: about a minute on a CPU)."""
    from helpers import recipes
    from helpers.data import ShapesStream
    from helpers.grpo import GRPOSettings
    from helpers.profiles import current_profile
    from helpers.sft import train as sft_train

    name = current_profile(profile)
    step = GRPOSettings.from_profile(name).start_step
    path = Path(directory) if directory is not None else profile_checkpoint_dir(name, step=step)
    if not is_complete(path):
        print(
            f"no complete SFT checkpoint at {path.name!r}: notebook 10 saves it there when it runs; "
            f"training it now (the {name} SFT profile, stopped at step {step})"
        )
        r = recipes.recipe(name, model=None)
        model, processor = recipes.model_for_profile(name, model=None)
        data = ShapesStream("train", r.n_train, r.seed, **r.data)
        sft_train(
            model,
            processor,
            data,
            steps=r.steps,
            stop_at=step,
            batch_size=r.batch_size,
            lr=r.lr,
            warmup=r.warmup,
            seed=r.seed,
            average=r.average,
            checkpoint_dir=path,
            progress=progress,
        )
    return path

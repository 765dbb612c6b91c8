"""The two run profiles of the course, in one place.

``QWENVL_PROFILE=cpu`` (the default, what CI runs: minutes on 2 cores) or ``QWENVL_PROFILE=gpu``
(small scale on one GPU). A notebook reads its settings with ``settings("sft")`` and never edits
code to switch: set the variable (or pass ``profile=``) instead.
"""

from __future__ import annotations

import copy
import json
import os

PROFILE_NAMES = ("cpu", "gpu")

# Every profile-dependent number of the course lives here, grouped by the part that uses it.
PROFILES: dict[str, dict[str, dict]] = {
    "cpu": {
        "course": {"device": "cpu", "dtype": "float32"},
        "grpo": {  # helpers.grpo.GRPOSettings / notebooks/11_grpo.ipynb (the live seed)
            # start from notebook 10's SFT run stopped at step 150 of 300: boxes right now and then
            # (greedy IoU ~0.2, best of 8 samples ~0.5), grounding prompts only, so groups carry signal
            "start_step": 150, "tasks": ("grounding",), "seeds": (0, 1, 2),
            "n_prompts": 1024, "n_eval": 300, "eval_batch_size": 32,
            # 8 steps live in notebook 11 (a demonstration); scripts/grpo_experiment.py --steps 30 for the comparison
            "steps": 8, "prompts_per_step": 8, "num_generations": 8, "temperature": 1.0, "max_new_tokens": 40,
            # TRL 1.16's defaults (dapo, beta 0, G 8, one iteration); lr: 1e-4 moved the boxes, 5e-4
            # collapsed the policy (every answer malformed within 30 steps)
            "lr": 1e-4, "beta": 0.0, "epsilon": 0.2, "loss_type": "dapo", "num_iterations": 1,
            "reward_weights": {"task": 1.0}, "bf16": False, "max_seconds": None, "bucket_by_task": False,
            "freeze_embeddings": True,
        },
        "sft": {  # the course model from its random initialisation (helpers.recipes)
            "model": {},  # course_config() defaults: ~20 M parameters, 19.4 M of them the embedding
            "seed": 0,
            # one shape per 28-px cell of a 2 × 2 grid (4 image tokens), tasks 1:1:1, background
            # tinted by position (helpers.data explains both; notebook 10 measures them). At 112 px
            # (16 tokens) 300 cpu steps did not learn to read colours (closing note of issue 11)
            "data": {"image_size": 56, "max_distractors": 0},
            "n_train": 4096, "n_eval": 300,
            "steps": 300, "batch_size": 16, "grad_accum": 1, "lr": 1e-3, "warmup": 30, "num_workers": 0,
            # from scratch only (notebook 10, appendix): the random tied embedding stays fixed; the
            # final norm starts at 8 (helpers.qwen.init_logit_scale); the table keeps std 0.02
            "freeze_embeddings": True, "lr_scales": None, "logit_scale_init": 8.0, "embedding_std": 0.02,
            "average": "answer",  # each answer weighs the same, however many tokens it has (section 6)
        },
        "checkpoint": {  # a pretrained Qwen2.5-VL ($QWENVL_MODEL): helpers.recipes.recipe
            "method": "lora", "lr": {"lora": 2e-4, "full": 1e-5},
            "lora_r": 16, "lora_alpha": 32, "freeze_vision": True, "train_merger": True,
            "steps": 300, "batch_size": 8, "grad_accum": 2, "warmup": 10,
        },
    },
    "gpu": {
        "course": {"device": "cuda", "dtype": "bfloat16"},
        "grpo": {  # helpers.grpo.GRPOSettings / scripts/gpu_grpo.sh: 3 seeds, each capped at 60 s of training
            "start_step": 1000, "tasks": ("grounding",), "seeds": (0, 1, 2),
            "n_prompts": 4096, "n_eval": 600, "eval_batch_size": 256,
            "steps": 60, "prompts_per_step": 32, "num_generations": 8, "temperature": 1.0, "max_new_tokens": 40,
            "lr": 1e-4, "beta": 0.0, "epsilon": 0.2, "loss_type": "dapo", "num_iterations": 1,
            "reward_weights": {"task": 1.0}, "bf16": True, "max_seconds": 60, "bucket_by_task": False,
            "freeze_embeddings": True,
        },
        "sft": {
            "model": {"text_hidden": 256, "text_layers": 6, "text_heads": 4, "text_kv_heads": 2, "text_mlp": 768,
                      "vision_hidden": 128, "vision_depth": 4, "vision_heads": 4, "vision_mlp": 256},
            "seed": 0,
            "data": {"image_size": 112, "max_distractors": 2},
            "n_train": 1_000_000, "n_eval": 600,
            "steps": 3000, "batch_size": 64, "grad_accum": 1, "lr": 1e-3, "warmup": 100, "num_workers": 8,
            "freeze_embeddings": True, "lr_scales": None, "logit_scale_init": 8.0, "embedding_std": 0.02,
            "average": "answer",
            "max_seconds": 170,  # the step count shrinks (after 20 measured steps) to end within this
        },
        "checkpoint": {
            "method": "lora", "lr": {"lora": 2e-4, "full": 1e-5},
            "lora_r": 16, "lora_alpha": 32, "freeze_vision": True, "train_merger": True,
            "steps": 1000, "batch_size": 16, "grad_accum": 1, "warmup": 30, "max_seconds": 170,
        },
    },
}


def current_profile(profile: str | None = None) -> str:
    """The profile in force: ``profile`` if given, else ``$QWENVL_PROFILE``, else ``"cpu"``."""
    name = (profile or os.environ.get("QWENVL_PROFILE") or "cpu").strip().lower()
    if name not in PROFILE_NAMES:
        raise ValueError(
            f"unknown profile {name!r}: QWENVL_PROFILE must be one of {', '.join(PROFILE_NAMES)}"
        )
    return name


def settings(section: str, profile: str | None = None) -> dict:
    """A deep copy of the settings of ``section`` (e.g. ``"sft"``) in the profile in force: editing
    it never changes the profile."""
    name = current_profile(profile)
    sections = PROFILES[name]
    if section not in sections:
        raise KeyError(f"profile {name!r} has no section {section!r}; known: {sorted(sections)}")
    return copy.deepcopy(sections[section])


def changed_settings(recorded: dict, current: dict) -> dict:
    """``{key: (recorded value, current value)}`` for every key whose value differs, compared as
    JSON (so a tuple in the profile equals the list a metrics file recorded); what notebooks 10 and
    11 print to say whether a committed GPU run still matches today's profile."""
    def as_json(value):
        return json.dumps(value, sort_keys=True, default=str)

    return {key: (recorded.get(key), current.get(key)) for key in sorted(set(recorded) | set(current))
            if as_json(recorded.get(key)) != as_json(current.get(key))}

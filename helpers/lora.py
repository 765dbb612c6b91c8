"""What a fine-tune trains: the trainable parameters by module, freezing the vision tower, and LoRA
with PEFT (taught in notebooks/10_sft.ipynb, trap #14: is the merger trained? is the tower frozen?).
"""

from __future__ import annotations

from helpers.evaluation import unwrap

MODULE_GROUPS = (
    ("vision: patch embed", "model.visual.patch_embed"),
    ("vision: blocks", "model.visual.blocks"),
    ("vision: merger", "model.visual.merger"),
    ("LM: embeddings (= tied head)", "model.language_model.embed_tokens"),
    ("LM: decoder layers", "model.language_model.layers"),
    ("LM: final norm", "model.language_model.norm"),
)


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

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=target_modules,
        modules_to_save=["merger"] if train_merger else None,
    )
    return get_peft_model(model, config)


def merge_lora(model):
    """The plain model with each LoRA update folded into its weight (PEFT's ``merge_and_unload``),
    ready for ``save_checkpoint`` and for loading without PEFT."""
    return model.merge_and_unload() if getattr(model, "peft_config", None) else model

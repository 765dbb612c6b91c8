"""A representative Qwen2.5-VL-3B fine-tuning benchmark (issue 17; ``scripts/bench_3b.sh`` calls it).

Data shaped like real VLM SFT: one image of 448–1,024 px a side per conversation, 200–1,000 text
tokens of which 30–50 % are the labelled answer, packed (``helpers.packing``) into rows of about
16 k tokens, one row per optimiser step. The loop (``step``) times three parts separately:

- vision: the tower with one attention call per layer (``helpers.segment_attention``), forward
  (and, for a full fine-tune, its backward from the gradient the language model hands back);
- language model: packed row, attention inside each conversation (the "segment" implementation),
  LM head on labelled positions only, forward + backward;
- optimizer: gradient clipping and AdamW (fused on a GPU).

Modes: ``full`` (fp32 master weights and moments, bf16 autocast: the correct full fine-tune and its
real memory), ``lora`` (r=16 on the language model, the frozen tower run under ``torch.no_grad``),
``trl`` (TRL's ``SFTTrainer`` on the same packed rows, model and LoRA settings; TRL 1.16 refuses
``padding_free`` for vision data, so it gets our packing collator). Activation checkpointing is
(every transformer block: the tower's and the language model's) is switched on only when a step runs
out of memory without it. Memory: a full fine-tune keeps 16 bytes per parameter (fp32 weights,
gradients and two moments: about 60 GB for the 3B) before activations, so ~16 k-token rows need an
H200 (139 GB); on an H100 pass ``--tokens 8192``.

Per mode: tokens/s, model FLOPs per step (``step_flops``), MFU (against 989 TFLOP/s dense bf16) and
HFU (with the recomputed forward), the time split, peak memory. Before timing, the segment attention
is checked against the library's vision tower and packed language model on this device.

    python scripts/bench_3b.py --out DIR [--tiny] [--modes full,lora,trl] [--steps 6]

``--tiny`` is a CPU rehearsal (the course model shrunk, small images, 1 k-token rows, float32): it
exercises every path, and its numbers are not GPU results.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F

from helpers.chat import IGNORE_INDEX
from helpers.constants import FACTOR
from helpers.packing import pack_items, pack_lengths, synthetic_item
from helpers.segment_attention import BACKENDS, VARLEN_FAILED, register_text_attention, use_segment_attention
from helpers.vision_tower import window_index

PEAK_BF16_FLOPS = 989e12  # H100/H200 dense bf16 (1979 is the sparse figure)
SHAPES = {  # text tokens, image side (px), labelled fraction, tokens per packed row
    "3b": {"text": (200, 1000), "side": (448, 1024), "labelled": (0.3, 0.5), "budget": 16384},
    "tiny": {"text": (40, 200), "side": (56, 168), "labelled": (0.3, 0.5), "budget": 768},
}
MODEL_INPUTS = ("input_ids", "labels", "mm_token_type_ids", "position_ids", "pixel_values", "image_grid_thw")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def packed_rows(shape: dict, rows: int, seed: int = 0) -> list[dict]:
    """``rows`` packed rows of synthetic conversations of ``shape``: a pool of conversations binned
    first-fit-decreasing into rows of ``shape["budget"]`` tokens; the fullest rows are kept."""
    rng = np.random.default_rng(seed)
    pool = []
    while sum(len(it["input_ids"]) for it in pool) < 1.3 * rows * shape["budget"]:
        side = [int(rng.uniform(*shape["side"]) // FACTOR * FACTOR) for _ in range(2)]
        pool.append(synthetic_item(rng, int(rng.uniform(*shape["text"])), side, float(rng.uniform(*shape["labelled"]))))
    bins = pack_lengths([len(it["input_ids"]) for it in pool], shape["budget"])
    bins = sorted(bins, key=lambda b: -sum(len(pool[i]["input_ids"]) for i in b))[:rows]
    return [
        {k: v for k, v in pack_items([pool[i] for i in b]).items() if k in (*MODEL_INPUTS, "seq_lengths")} for b in bins
    ]


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


def step_flops(config, row: dict, mode: str, checkpointing: bool = False) -> dict:
    """Model FLOPs of one training step on the packed ``row``, by part (HFU adds ``recompute``: with
    activation checkpointing, one more forward of every trained block, vision and language model).

    Matmuls count 2 FLOPs per multiply-add. Forward: every decoder-layer weight at every token
    (2·N_layers·T), causal attention inside each conversation (2·d·L² per layer: QKᵀ and AV over
    the L²/2 visible pairs), the LM head at labelled positions only (2·V·d each), the vision blocks
    at every patch and the merger at every merged token, vision attention inside each window or
    image (4·d·w²). Backward: 2× forward for trained weights; frozen weights (LoRA) need only input
    gradients (1×), attention always 2×; the frozen tower (LoRA) has no backward at all.
    """
    text, vision = config.text_config, config.vision_config
    d, hd, kv = text.hidden_size, text.hidden_size // text.num_attention_heads, text.num_key_value_heads
    n_layer = d * (d + 2 * kv * hd) + d * d + 3 * d * text.intermediate_size
    lengths = row["seq_lengths"].double()
    tokens, labelled = float(lengths.sum()), float((row["labels"][0, 1:] != IGNORE_INDEX).sum())
    grid = row["image_grid_thw"]
    patches = float(grid.prod(-1).sum())
    dv, unit = vision.hidden_size, vision.spatial_merge_size**2
    n_block = 4 * dv * dv + 3 * dv * vision.intermediate_size
    windows = window_index(grid, vision.spatial_merge_size, vision.window_size, vision.patch_size)[1].diff().double()
    full = len(vision.fullatt_block_indexes)
    vision_attention = (
        4 * dv * (full * float((grid.prod(-1).double() ** 2).sum()) + (vision.depth - full) * float((windows**2).sum()))
    )
    forward = {
        "lm_layers": 2 * n_layer * text.num_hidden_layers * tokens,
        "lm_attention": 2 * d * text.num_hidden_layers * float((lengths**2).sum()),
        "lm_head": 2 * text.vocab_size * d * labelled,
        "vision": 2 * (vision.depth * n_block + 3 * 2 * 14 * 14 * dv) * patches
        + 2 * (unit * dv * unit * dv + unit * dv * vision.out_hidden_size) * patches / unit,
        "vision_attention": vision_attention,
    }
    frozen = mode != "full"
    scale = {
        "lm_layers": 2 if frozen else 3,
        "lm_attention": 3,
        "lm_head": 2 if frozen else 3,
        "vision": 1 if frozen else 3,
        "vision_attention": 1 if frozen else 3,
    }
    parts = {k: v * scale[k] for k, v in forward.items()}
    parts["total"] = sum(parts.values())
    recomputed = ("lm_layers", "lm_attention") + (("vision", "vision_attention") if mode == "full" else ())
    parts["recompute"] = sum(forward[k] for k in recomputed) if checkpointing else 0.0
    return parts


# ---------------------------------------------------------------------------------------------
# The model and the step
# ---------------------------------------------------------------------------------------------


def build(config, mode: str, device: torch.device, lr: float = 1e-5):
    """The model (random weights, fp32 master copy), segment attention, and its optimizer."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from helpers.lora import apply_lora

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32)
    use_segment_attention(model.model.visual)
    model.config.text_config._attn_implementation = register_text_attention()
    if mode != "full":
        model = apply_lora(model, r=16)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, **fused)
    return model, optimizer


def _inputs(row: dict) -> dict:
    return {k: row[k] for k in MODEL_INPUTS}


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def step(model, optimizer, row: dict, mode: str, device: torch.device, amp: bool) -> dict:
    """One optimiser step on one packed row; seconds of vision, language model and optimizer."""
    base = model.get_base_model() if mode != "full" else model
    inner = base.model
    clock = [_sync(device)]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        with torch.no_grad() if mode != "full" else torch.enable_grad():
            features = inner.visual(row["pixel_values"], row["image_grid_thw"]).pooler_output
        leaf = features.detach().requires_grad_(mode == "full")
        clock.append(_sync(device))
        embeds = inner.language_model.embed_tokens(row["input_ids"])
        embeds = embeds.masked_scatter((row["mm_token_type_ids"] == 1)[..., None], leaf.to(embeds.dtype))
        hidden = inner.language_model(
            inputs_embeds=embeds, position_ids=row["position_ids"], use_cache=False
        ).last_hidden_state
        labels = row["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        loss = F.cross_entropy(base.lm_head(hidden[:, :-1][keep]).float(), labels[keep])
    loss.backward()
    clock.append(_sync(device))
    if mode == "full":
        features.backward(leaf.grad)
    clock.append(_sync(device))
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    clock.append(_sync(device))
    seconds = np.diff(clock)
    return {
        "loss": float(loss.detach()),
        "vision": float(seconds[0] + seconds[2]),
        "language_model": float(seconds[1]),
        "optimizer": float(seconds[3]),
        "total": float(clock[-1] - clock[0]),
    }


def run_mode(config, mode: str, rows: list[dict], device: torch.device, amp: bool, warmup: int) -> dict:
    """Build, (retry with activation checkpointing on out-of-memory), time every row's step."""
    for checkpointing in (False, True):
        model, optimizer = build(config, mode, device)
        if checkpointing:
            (model.get_base_model() if mode != "full" else model).activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        _free(device)
        try:
            steps = [step(model, optimizer, row, mode, device, amp) for row in rows]
        except torch.OutOfMemoryError:
            if checkpointing:
                raise
            steps = None  # leave the except block first: its traceback holds the step's tensors
        if steps is not None:
            break
        model = optimizer = None  # drop the first attempt before building again
    timed, rows_timed = steps[warmup:], rows[warmup:]
    seconds = sum(s["total"] for s in timed)
    tokens = sum(float(r["seq_lengths"].sum()) for r in rows_timed)
    parts = [step_flops(config, r, mode, checkpointing) for r in rows_timed]
    flops = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}  # per step, averaged over the timed rows
    per_step = seconds / len(timed)
    result = {
        "mode": mode,
        "activation_checkpointing": checkpointing,
        "timed_steps": len(timed),
        "step_seconds_mean": per_step,
        "step_seconds_median": statistics.median(s["total"] for s in timed),
        "tokens_per_step": tokens / len(timed),
        "tokens_per_second": tokens / seconds,
        "split_seconds_median": {
            k: statistics.median(s[k] for s in timed) for k in ("vision", "language_model", "optimizer")
        },
        "model_tflop_per_step": {k: v / 1e12 for k, v in flops.items()},
        "achieved_tflops": flops["total"] / per_step / 1e12,
        "loss": [s["loss"] for s in steps],
        "attention_backend": dict(BACKENDS),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if device.type == "cuda":
        result.update(
            mfu=flops["total"] / per_step / PEAK_BF16_FLOPS,
            hfu=(flops["total"] + flops["recompute"]) / per_step / PEAK_BF16_FLOPS,
            peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30,
        )
    del model, optimizer
    return result


def run_trl(config, rows: list[dict], device: torch.device, amp: bool, warmup: int, out: Path) -> dict:
    """TRL's ``SFTTrainer`` (LoRA, same model build and attention) over the same packed rows."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from helpers.qwen import load_processor
    from helpers.sft import TRL_COURSE_BATCHES

    model, _ = build(config, "lora", device)
    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(_sync(device))

    args = SFTConfig(
        output_dir=str(out / "trl"),
        max_steps=len(rows),
        per_device_train_batch_size=1,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
        **TRL_COURSE_BATCHES,
        bf16=amp,
        use_cpu=device.type != "cuda",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    order = itertools.count()  # the Trainer shuffles its dataset: hand the rows over in our order instead
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"index": list(range(len(rows)))}),
        processing_class=load_processor(),
        data_collator=lambda batch: _inputs(rows[next(order) % len(rows)]),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Clock())
    start = _sync(device)
    trainer.train()
    seconds = float(np.sum(np.diff([start, *marks])[warmup:]))
    tokens = sum(float(r["seq_lengths"].sum()) for r in rows[warmup:])
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    del trainer, model
    return {
        "mode": "trl",
        "step_seconds_mean": seconds / (len(rows) - warmup),
        "tokens_per_second": tokens / seconds,
        "loss": losses,
    }


# ---------------------------------------------------------------------------------------------
# Checks, report
# ---------------------------------------------------------------------------------------------


def check_segment_attention(config, device: torch.device, amp: bool) -> dict:
    """Max |ours − library| / max |library| of the vision tower and of the packed LM's hidden states."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    rows = packed_rows({**SHAPES["tiny"], "budget": 600}, 1, seed=1)
    row = {k: v.to(device) for k, v in rows[0].items()}
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32).eval()
    inputs = {k: v for k, v in _inputs(row).items() if k != "labels"}
    out = {}
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        library = (
            model.model.visual(row["pixel_values"], row["image_grid_thw"]).pooler_output.float(),
            model.model(**inputs, use_cache=False).last_hidden_state.float(),
        )
        use_segment_attention(model.model.visual)
        model.config.text_config._attn_implementation = register_text_attention()
        ours = (
            model.model.visual(row["pixel_values"], row["image_grid_thw"]).pooler_output.float(),
            model.model(**inputs, use_cache=False).last_hidden_state.float(),
        )
    for name, a, b in zip(("vision_tower", "language_model"), ours, library):
        out[name] = float((a - b).abs().max() / b.abs().max())
    del model
    return out


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def report(results: dict, out: Path) -> str:
    """RUN.md: what ran, where, and the per-mode table."""
    env = results["environment"]
    lines = [
        f"# bench_3b: {'CPU REHEARSAL, tiny config (not a GPU result)' if results['tiny'] else 'Qwen2.5-VL-3B'}",
        "",
        f"- device: {env['device']}; date {env['date']}; torch {env['torch']}, transformers {env['transformers']}",
        f"- command: `{results['command']}`",
        (
            f"- data: {results['data']['rows']} packed rows, {results['data']['tokens_per_row_mean']:.0f} tokens, "
            f"{results['data']['images_per_row_mean']:.1f} images each; shape {json.dumps(results['data']['shape'])}"
        ),
        f"- segment attention vs library (max rel. diff): {json.dumps(results['check'])}",
        "",
        "| mode | tokens/s | s/step | MFU | HFU | vision / LM / optimizer s | peak GiB | ckpt |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["modes"].values():
        split = r.get("split_seconds_median")
        lines.append(
            f"| {r['mode']} | {r['tokens_per_second']:.0f} | {r['step_seconds_mean']:.3f} | "
            f"{_fmt(r.get('mfu'), '.3f')} | {_fmt(r.get('hfu'), '.3f')} | "
            + (" / ".join(f"{split[k]:.3f}" for k in split) if split else "–")
            + f" | {_fmt(r.get('peak_memory_gib'), '.1f')} | {r.get('activation_checkpointing', '–')} |"
        )
    if "trl_ratio" in results:
        lines += ["", f"Our LoRA loop / TRL SFTTrainer tokens/s: {results['trl_ratio']:.2f}"]
    text = "\n".join(lines) + "\n"
    (out / "RUN.md").write_text(text)
    return text


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal with a tiny config")
    parser.add_argument("--modes", default="full,lora,trl")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode (6; --tiny: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (2; --tiny: 1)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per packed row (16384; --tiny: 768)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.tiny else 6)
    args.warmup = args.warmup or (1 if args.tiny else 2)
    modes = args.modes.split(",")
    if not set(modes) <= {"full", "lora", "trl"} or args.steps < 1 or args.warmup < 1:
        parser.error(
            f"--modes {args.modes} --steps {args.steps} --warmup {args.warmup}: expected modes from "
            "full,lora,trl, steps ≥ 1, warmup ≥ 1"
        )
    import transformers

    from helpers.qwen import course_config, qwen25vl_3b_config

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    amp = device.type == "cuda"
    config = (
        course_config(text_hidden=64, text_layers=2, text_mlp=128, vision_hidden=32, vision_depth=4, vision_mlp=64)
        if args.tiny
        else qwen25vl_3b_config()
    )
    shape = dict(SHAPES["tiny" if args.tiny else "3b"])
    if args.tokens is not None:
        if args.tokens < 2 * max(shape["text"]) + (max(shape["side"]) // 28) ** 2:
            parser.error(
                f"--tokens {args.tokens}: expected at least two of the longest conversations, "
                f"{2 * max(shape['text']) + (max(shape['side']) // 28) ** 2} tokens"
            )
        shape["budget"] = args.tokens
    rows = packed_rows(shape, args.warmup + args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "tiny": args.tiny,
        "command": " ".join(["python scripts/bench_3b.py", *(argv or sys.argv[1:])]),
        "environment": {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "data": {
            "shape": shape,
            "rows": len(rows),
            "tokens_per_row_mean": statistics.mean(float(r["seq_lengths"].sum()) for r in rows),
            "images_per_row_mean": statistics.mean(len(r["image_grid_thw"]) for r in rows),
        },
        "check": check_segment_attention(config, device, amp),
        "modes": {},
    }
    if max(results["check"].values()) > (2e-2 if amp else 1e-4):
        raise SystemExit(f"segment attention differs from the library: {results['check']}")
    rows = [{k: v.to(device) for k, v in r.items()} for r in rows]
    for mode in modes:
        result = (
            run_trl(config, rows, device, amp, args.warmup, args.out)
            if mode == "trl"
            else run_mode(config, mode, rows, device, amp, args.warmup)
        )
        results["modes"][mode] = result
        print(json.dumps(result), flush=True)
        _free(device)
    if {"lora", "trl"} <= set(modes):
        results["trl_ratio"] = (
            results["modes"]["lora"]["tokens_per_second"] / results["modes"]["trl"]["tokens_per_second"]
        )
    results["environment"]["varlen_failures"] = list(VARLEN_FAILED)
    (args.out / "bench_3b.json").write_text(json.dumps(results, indent=1))
    print(report(results, args.out))
    return results


if __name__ == "__main__":
    main()

"""Every GPU measurement of SFT in one run (``scripts/gpu_sft.sh`` calls it): the gpu profile trained
and evaluated beside its image-blind baselines, our loop against TRL's ``SFTTrainer``, and the
Qwen2.5-VL-3B step time, MFU and memory (full fine-tune and LoRA).

    python scripts/gpu_sft.py --report OUT_DIR --out CKPT_DIR [--smoke]

``--smoke`` is a tiny CPU rehearsal (the cpu profile for 3 steps, the course model instead of the 3B).
Writes OUT_DIR/metrics.json, log.txt, sft_training.png, sft_examples.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from helpers.chat import IGNORE_INDEX  # noqa: E402
from helpers.constants import TOKEN_PIXELS  # noqa: E402
from helpers.data import Sample, make_split  # noqa: E402
from helpers.evaluation import blind_baselines, score_table, unwrap  # noqa: E402
from helpers.lora import apply_lora  # noqa: E402
from helpers.optim import make_optimizer  # noqa: E402
from helpers.qwen import course_config, load_processor, parameter_count  # noqa: E402
from helpers.recipes import model_for_profile, recipe, run_profile  # noqa: E402
from helpers.sft import SFTCollator, labelled_loss, train, trl_trainer  # noqa: E402
from helpers.sft_plots import plot_predictions, plot_training  # noqa: E402


def examples(samples, result: dict, per_task: int = 2) -> list:
    """The first ``per_task`` (sample, prediction) pairs of each task."""
    pairs = []
    for task, r in result.items():
        chosen = [s for s in samples if s.task == task]
        pairs += list(zip(chosen, r["predictions"]))[:per_task]
    return pairs


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
    vision_attn = (
        4
        * vcfg.hidden_size
        * float(
            (per_image**2).sum() * full_blocks
            + (per_image * per_image.clamp(max=window)).sum() * (vcfg.depth - full_blocks)
        )
    )
    back = 1 if lora else 2  # backward / forward matmul ratio
    parts = {
        "lm_layers": 2 * n_layers * tokens * (1 + back),
        "lm_attention": 2 * d * layers * float((lengths**2).sum()) * 3,  # 4·T²/2·d fwd, ×3 with backward
        "lm_head": 2 * vocab * d * labelled * (1 + back),
        "vision": (6 * n_vision * patches + 3 * vision_attn)
        if vision_trained
        else (2 * n_vision * patches + vision_attn),
    }
    parts["total"] = sum(parts.values())
    return parts


def benchmark_3b(mode: str, batch: dict, steps: int = 3, warmup: int = 2, lr: float = 1e-5, config=None) -> dict:
    """Step time, tokens/s, MFU and peak memory of ``qwen25vl_3b_config()`` (random weights, bf16,
    gradient checkpointing) for ``mode`` "full" (AdamW on every weight, bf16 states) or "lora"
    (r=16 on the language model, vision tower frozen)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from helpers.qwen import qwen25vl_3b_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = config or qwen25vl_3b_config()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if mode == "lora":
        model.enable_input_require_grads()
        model = apply_lora(model, r=16)
    model.train()
    optimizer = make_optimizer(model, lr)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    times = []
    for _i in range(warmup + steps):
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
    result = {
        "mode": mode,
        "step_seconds": step,
        "tokens_per_step": tokens,
        "tokens_per_second": tokens / step,
        "model_tflops_per_step": flops["total"] / 1e12,
        "flops_by_part_tflop": {k: v / 1e12 for k, v in flops.items()},
        "mfu": flops["total"] / step / PEAK_BF16_FLOPS,
        "loss": float(loss.detach()),
        "parameters": parameter_count(unwrap(model)),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    del model, optimizer, loss
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def benchmark_loops(
    model_fn,
    processor,
    samples: list[Sample],
    steps: int = 30,
    skip: int = 5,
    batch_size: int = 64,
    lr: float = 1e-3,
    num_workers: int = 0,
    lr_scales: dict | None = None,
) -> dict:
    """Tokens/s of our loop vs TRL's ``SFTTrainer`` on the same model (fresh from ``model_fn``),
    batches, collator, loss and optimiser settings; the first ``skip`` steps are not timed."""
    from transformers import TrainerCallback

    n = batch_size * steps
    data = samples[:n]
    same = dict(steps=steps, batch_size=batch_size, lr=lr, warmup=2, lr_scales=lr_scales)  # both loops
    ours = train(model_fn(), processor, data, num_workers=num_workers, progress=False, **same)
    h = ours.history
    ours_tps = sum(h["tokens"][skip:]) / (h["seconds"][-1] - h["seconds"][skip - 1])

    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    trainer = trl_trainer(
        model_fn(),
        processor,
        data,
        **same,
        bf16=torch.cuda.is_available(),
        output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "trl_bench"),
        dataloader_num_workers=num_workers,
    )
    trainer.add_callback(Clock())
    trainer.train()
    logs = [e for e in trainer.state.log_history if "num_tokens" in e]
    tokens = [float(e["num_tokens"]) for e in logs]  # cumulative input tokens (TRL's count)
    trl_tps = (tokens[-1] - tokens[skip - 1]) / (marks[-1] - marks[skip - 1])
    return {
        "ours_tokens_per_second": ours_tps,
        "trl_tokens_per_second": trl_tps,
        "steps": steps,
        "skip": skip,
        "batch_size": batch_size,
        "ours_loss": h["loss"],
        "trl_loss": [e["loss"] for e in logs],
        "speedup": ours_tps / trl_tps,
    }


def _batch_for_3b(batch_size: int, image_size: int, seed: int = 0) -> dict:
    processor = load_processor(min_pixels=TOKEN_PIXELS, max_pixels=image_size * image_size)
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
    metrics: dict = {
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "smoke": smoke,
    }
    t0 = time.perf_counter()
    run = run_profile(
        "cpu" if smoke else "gpu", out=checkpoint_dir, steps=3 if smoke else None, progress=False, log=log
    )
    metrics["sft"] = {
        k: v for k, v in run.items() if k not in ("history", "model", "processor", "loss", "after_full", "evals")
    }
    metrics["sft"]["baselines"] = {
        split: {t: b["score"] for t, b in blind_baselines(smp).items()} for split, smp in run["evals"].items()
    }
    metrics["sft"]["score_table"] = {
        split: score_table(run["after_full"][split], blind_baselines(smp)) for split, smp in run["evals"].items()
    }  # score, blind, n, interval, p per task
    metrics["sft"]["loss_every_10"] = run["loss"][::10]
    say(
        f"SFT: {run['steps']} steps in {run['train_seconds']:.1f} s, {run['tokens_per_second']:.0f} tokens/s; "
        f"before {run['before']} after {run['after']}"
    )
    figure = plot_training(run["history"], run["after"], title=f"SFT, gpu profile on {device}")
    figure.savefig(out_dir / "sft_training.png")
    figure = plot_predictions(
        [x for split in ("test", "ood") for x in examples(run["evals"][split], run["after_full"][split])], ncols=6
    )
    figure.savefig(out_dir / "sft_examples.png")
    processor = run["processor"]
    del run
    try:  # our loop vs TRL on the same model, batches and loss
        s = recipe("cpu" if smoke else "gpu")
        steps, batch_size = (4, 4) if smoke else (30, s.batch_size)
        samples = make_split("train", steps * batch_size, 5, **s.data)
        metrics["loop_vs_trl"] = benchmark_loops(
            lambda: model_for_profile("cpu" if smoke else "gpu")[0],
            processor,
            samples,
            steps=steps,
            skip=2 if smoke else 5,
            batch_size=batch_size,
            lr=s.lr,
            lr_scales=s.lr_scales,
        )
        say(
            f"loop vs TRL: {metrics['loop_vs_trl']['ours_tokens_per_second']:.0f} vs "
            f"{metrics['loop_vs_trl']['trl_tokens_per_second']:.0f} tokens/s"
        )
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
            say(
                f"3B {mode}: {r['step_seconds']:.3f} s/step, {r['tokens_per_second']:.0f} tokens/s, MFU {r['mfu']:.3f}, "
                f"peak {r['peak_memory_gib']} GiB, trainable {r['trainable']:,}"
            )
        except Exception as error:  # noqa: BLE001
            metrics["3b"][mode] = {"error": repr(error)[:500]}
            say(f"3B {mode} failed: {error!r}"[:500])
    metrics["3b_batch"] = {
        "images": int(batch["image_grid_thw"].shape[0]),
        "image_size": 112 if smoke else 448,
        "tokens": int(batch["attention_mask"].sum()),
        "labelled": int((batch["labels"] != IGNORE_INDEX).sum()),
    }
    metrics["mfu_flops"] = training_flops.__doc__.split("\n\n")[1].strip()
    metrics["wall_seconds"] = time.perf_counter() - t0
    say(f"all done in {metrics['wall_seconds']:.0f} s")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    (out_dir / "log.txt").write_text("\n".join(log) + "\n")
    return metrics


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", required=True, help="folder for metrics.json, log.txt and the two PNGs")
    parser.add_argument("--out", required=True, help="folder for the trained checkpoint")
    parser.add_argument("--smoke", action="store_true", help="a tiny CPU rehearsal")
    args = parser.parse_args(argv)
    gpu_report(args.report, args.out, smoke=args.smoke)


if __name__ == "__main__":
    main()

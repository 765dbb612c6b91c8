"""Tests of helpers.grpo: advantages, KL, masks, the loss against TRL's GRPOTrainer, the loop, the
widget and the command line (smoke sizes, a random course model)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from support import run_two_processes

from helpers import grpo, grpo_plots, grpo_trl, rollouts
from helpers.data import make_split
from helpers.qwen import load_model, load_processor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random course model saved as a checkpoint, its processor, and a fixed rollout batch."""
    folder = tmp_path_factory.mktemp("policy")
    model, processor = load_model(seed=0), load_processor()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    samples = make_split("train", 3, seed=0, image_size=84)
    rollout = rollouts.sample_completions(model, processor, samples, num_generations=2, max_new_tokens=5, seed=0)
    # Variable completion lengths: end tokens at different places (the random model rarely stops).
    ids = rollout.completion_ids.clone()
    for row, stop in enumerate([0, 1, 2, 4, 3, 5]):
        if stop < ids.size(1):
            ids[row, stop] = rollouts.IM_END
    rollout.completion_mask = rollouts.completion_mask_after_eos(ids)
    rollout.completion_ids = torch.where(rollout.completion_mask.bool(), ids, torch.full_like(ids, rollouts.PAD))
    return dict(folder=folder, model=model, processor=processor, samples=samples, rollout=rollout)


# ------------------------------------------------------------------ advantages, masks, KL


def trl_advantages(rewards, G):
    """TRL 1.16 GRPOTrainer's group normalisation, with its own nanstd."""
    from trl.trainer.utils import nanstd

    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
    std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G)
    return (rewards - mean) / (std + 1e-4)


@pytest.mark.parametrize("G", [2, 3, 4, 8, 16])
def test_group_advantages_match_trl_on_a_sweep(G):
    generator = torch.Generator().manual_seed(G)
    for trial in range(20):
        rewards = torch.rand(5 * G, generator=generator)
        if trial % 3 == 0:
            rewards = (rewards > 0.5).float()  # binary rewards, some groups all equal
        if trial % 5 == 0:
            rewards[:G] = 1.0  # one group of equal rewards (exact in binary: no rounding residue)
        ours = grpo.group_advantages(rewards, G)
        torch.testing.assert_close(ours, trl_advantages(rewards, G), rtol=1e-6, atol=1e-6)
        if trial % 5 == 0:
            assert torch.equal(ours[:G], torch.zeros(G))  # equal rewards → no signal (trap #16)
    torch.testing.assert_close(
        grpo.group_advantages(rewards, G, scale="none"), rewards - rewards.view(-1, G).mean(1).repeat_interleave(G)
    )


@pytest.mark.parametrize(
    "rewards, G, scale",
    [
        (torch.ones(7), 2, "group"),
        (torch.ones(2, 4), 4, "group"),
        (torch.ones(4), 0, "group"),
        (torch.ones(4), 2, "batch"),
    ],
)
def test_group_advantages_reject_bad_input(rewards, G, scale):
    with pytest.raises(ValueError, match="num_generations|scale="):
        grpo.group_advantages(rewards, G, scale)


def test_completion_mask_keeps_up_to_the_first_end_token():
    E, P, x = rollouts.IM_END, rollouts.PAD, 11
    ids = torch.tensor([[x, x, E, x, E], [E, x, x, x, x], [x, x, x, x, x], [x, P, x, E, x]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert torch.equal(rollouts.completion_mask_after_eos(ids), expected)


def test_k3_is_nonnegative_zero_at_equality_and_unbiased():
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        p = torch.softmax(torch.randn(50, generator=generator), 0)
        q = torch.softmax(torch.randn(50, generator=generator), 0)
        tokens = torch.multinomial(p, 200_000, replacement=True, generator=generator)
        k3 = grpo.kl_k3(p.log()[tokens], q.log()[tokens])
        assert (k3 >= 0).all()
        exact = (p * (p.log() - q.log())).sum()
        torch.testing.assert_close(k3.mean(), exact, rtol=0.03, atol=0.0)
    logp = torch.randn(4, 6)
    assert torch.equal(grpo.kl_k3(logp, logp), torch.zeros(4, 6))


# ------------------------------------------------------------------ the loss


def test_loss_at_ratio_one_is_minus_mean_advantage_and_checks_arguments(setup):
    ro = setup["rollout"]
    logps = torch.randn(ro.completion_ids.shape, requires_grad=True)
    adv = torch.randn(len(logps))
    loss, stats = grpo.grpo_loss(logps, logps.detach(), None, adv, ro.completion_mask, beta=0.0)
    torch.testing.assert_close(loss, -adv.mean())  # ratio 1: the value is -mean(A), the gradient is the PG
    loss.backward()
    per_row = ro.completion_mask.sum(1, keepdim=True).float()
    torch.testing.assert_close(logps.grad, -(adv.unsqueeze(1) * ro.completion_mask / per_row) / len(adv))
    assert stats["clip_low"] == stats["clip_high"] == 0.0
    with pytest.raises(ValueError, match="loss_type="):
        grpo.grpo_loss(logps, logps, None, adv, ro.completion_mask, loss_type="ppo")
    with pytest.raises(ValueError, match="needs ref_logps"):
        grpo.grpo_loss(logps, logps, None, adv, ro.completion_mask, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo.grpo_loss(logps, logps, None, adv, ro.completion_mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="expected ≥ 0"):
        grpo.grpo_loss(logps, logps, None, adv, ro.completion_mask, epsilon_low=-0.1)


CASES = [  # loss type, beta, epsilon, epsilon_high, KL × ratio (TRL's use_bias_correction_kl)
    ("grpo", 0.04, 0.2, None, True),
    ("grpo", 0.04, 0.2, None, False),
    ("grpo", 0.0, 0.2, None, True),
    ("bnpo", 0.04, 0.2, 0.28, True),
    ("dr_grpo", 0.1, 0.1, None, False),
    ("dapo", 0.04, 0.2, 0.28, True),
]


@pytest.mark.parametrize("mode", ["maths", "end_to_end"])
def test_our_loss_equals_trl_grpo_trainer_compute_loss(setup, tmp_path, mode):
    """Same batch, same β / ε / loss type: our loss and its gradient equal TRL's compute_loss.

    ``maths``: float64, TRL fed our per-token log-probs, so only the two loss computations differ
    (tolerance 1e-12). ``end_to_end``: float32, TRL computes its own log-probs with its fused LM
    head (always float32), so the forward passes differ by rounding too (tolerance 1e-5).
    """
    ro, processor = setup["rollout"], setup["processor"]
    dtype, tolerance = (torch.float64, 1e-12) if mode == "maths" else (torch.float32, 1e-5)
    cfg = grpo.GRPOSettings.from_profile(
        "cpu", prompts_per_step=3, num_generations=2, max_new_tokens=ro.completion_ids.size(1)
    )
    ours = load_model(setup["folder"], dtype=dtype)
    reference = load_model(seed=1, dtype=dtype)  # another model, so the KL is not zero
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        current = rollouts.per_token_logps(ours, ro)
        ref = rollouts.per_token_logps(reference, ro)
    old = current + 0.3 * torch.randn(current.shape, generator=generator, dtype=dtype)  # ratios off 1: clipping acts
    advantages = torch.randn(len(current), generator=generator, dtype=dtype)
    for i, (loss_type, beta, eps, eps_high, correction) in enumerate(CASES):
        settings = cfg.replace(
            loss_type=loss_type, beta=beta, epsilon=eps, epsilon_high=eps_high, kl_ratio_correction=correction
        )
        trainer = grpo_trl.trl_trainer(
            setup["folder"], processor, setup["samples"], settings, tmp_path / str(i), dtype=dtype
        )
        logps = rollouts.per_token_logps(ours, ro, settings.temperature)  # TRL divides by it too
        if mode == "maths":
            shared = logps.detach().requires_grad_(True)
            trainer._get_per_token_logps_and_entropies = lambda *a, shared=shared, **k: (
                shared,
                torch.zeros_like(shared),
                None,
            )
            logps = shared
        theirs = grpo_trl.trl_loss(trainer, ro, advantages, old, ref if beta else None)
        mine, stats = grpo.grpo_loss(
            logps,
            old,
            ref,
            advantages,
            ro.completion_mask,
            beta,
            eps,
            eps_high,
            loss_type,
            ro.completion_ids.size(1),
            correction,
        )
        torch.testing.assert_close(mine, theirs.to(dtype), rtol=0, atol=tolerance)
        assert stats["clip_low"] + stats["clip_high"] > 0  # the batch really exercises clipping
        if mode == "maths":
            (grad_mine,) = torch.autograd.grad(mine, shared, retain_graph=True)
            (grad_theirs,) = torch.autograd.grad(theirs, shared)
            torch.testing.assert_close(grad_mine, grad_theirs, rtol=0, atol=1e-12)
        else:
            ours.zero_grad()
            mine.backward()
            theirs.backward()
            trl_params = dict(trainer.model.named_parameters())
            for name, p in ours.named_parameters():
                if "language_model.layers.3" in name:  # the last decoder layer: every term reaches it
                    torch.testing.assert_close(p.grad, trl_params[name].grad, rtol=1e-3, atol=1e-6)


def test_per_token_logps_match_full_forward(setup):
    ro, model = setup["rollout"], setup["model"]
    with torch.no_grad():
        ours = rollouts.per_token_logps(model, ro, temperature=0.7)
        logits = model(**ro.forward_inputs()).logits  # (N, Lp + K, V)
        k = ro.completion_ids.size(1)
        full = (logits[:, -k - 1 : -1] / 0.7).log_softmax(-1).gather(2, ro.completion_ids.unsqueeze(-1)).squeeze(-1)
    keep = ro.completion_mask.bool()
    torch.testing.assert_close(ours[keep], full[keep], rtol=1e-5, atol=1e-5)  # the LM head ran only there
    assert (ours[~keep] == 0).all()


# ------------------------------------------------------------------ rollouts, loop, widget


def test_sample_completions_shapes_groups_and_determinism(setup):
    model, processor, samples = setup["model"], setup["processor"], setup["samples"]
    a = rollouts.sample_completions(model, processor, samples[:2], num_generations=3, max_new_tokens=4, seed=5)
    b = rollouts.sample_completions(model, processor, samples[:2], num_generations=3, max_new_tokens=4, seed=5)
    assert a.completion_ids.shape == (6, 4) and a.prompt_ids.size(0) == 6 and len(a.texts) == 6
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert [s.index for s in a.samples] == [0, 0, 0, 1, 1, 1]
    assert (a.prompt_mask[:, -1] == 1).all()  # left padding: every prompt ends at the last column
    for bad in (dict(num_generations=0), dict(temperature=0.0), dict(max_new_tokens=0)):
        with pytest.raises(ValueError, match="expected"):
            rollouts.sample_completions(model, processor, samples[:1], **({"num_generations": 2} | bad))


def test_train_logs_every_step_and_widget_reads_the_rollouts(setup):
    model = load_model(setup["folder"])
    cfg = grpo.GRPOSettings.from_profile(
        "cpu", steps=2, prompts_per_step=2, num_generations=2, max_new_tokens=4, beta=0.04
    )
    store = []
    history = grpo.train(
        model,
        setup["processor"],
        setup["samples"],
        cfg,
        seed=0,
        progress=False,
        on_step=lambda *a: grpo_plots.record_rollout(*a, store=store),
    )
    assert [h["step"] for h in history] == [0, 1] and len(store) == 2
    for key in ("reward", "accuracy", "iou", "kl", "completion_length", "loss", "step_seconds", "rollout_tokens_per_s"):
        assert key in history[0]
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step: policy = reference
    assert cfg.freeze_embeddings and torch.equal(
        model.get_input_embeddings().weight, setup["model"].get_input_embeddings().weight
    )
    view = grpo_plots.rollout_view(step=1, prompt=1, store=store)
    assert len(view.data["texts"]) == 2 and "advantage" in view.html
    demo = grpo_plots.rollout_view()  # no training yet: stand-in rollouts, real rewards
    assert demo.data["task"][0] == 1.0 and demo.figure is not None


def test_compute_rewards_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown rewards"):
        grpo.compute_rewards(["3"], ["count"], [3], {"length": 1.0})


# ------------------------------------------------------------------ command line


def test_sft_continuation_sees_the_grpo_prompts_at_a_constant_rate(setup):
    """The control arm: the same prompt images as GRPO's schedule, each once, at GRPO's learning rate."""
    cfg = grpo.GRPOSettings.from_profile("cpu", steps=2, prompts_per_step=2, lr=3e-4)
    prompts = make_split("train", 5, seed=4, image_size=84)
    run = grpo.sft_continuation(load_model(setup["folder"]), setup["processor"], prompts, cfg, seed=0)
    assert run.history["lr"] == [3e-4, 3e-4] and len(run.history["loss"]) == 2
    schedule = grpo.prompt_schedule(5, 2, 2, seed=0)
    assert sorted(i for step in schedule for i in step) == sorted(
        set(i for step in schedule for i in step)
    )  # each once


def test_best_of_g_is_at_least_the_mean_reward(setup):
    cfg = grpo.GRPOSettings.from_profile("cpu", num_generations=3, max_new_tokens=4)
    out = rollouts.best_of_g(setup["model"], setup["processor"], setup["samples"], cfg, seed=0)
    for _task, row in out.items():
        assert 0 <= row["mean"] <= row["best"] <= 1 and 0 <= row["zero_std"] <= 1 and row["n"] >= 1


def test_settings_are_typed_and_checked(monkeypatch):
    cfg = grpo.GRPOSettings.from_profile("cpu")
    assert (cfg.loss_type, cfg.beta, cfg.num_generations, cfg.num_iterations) == (
        "dapo",
        0.0,
        8,
        1,
    )  # TRL 1.16's defaults
    for bad, match in (
        (dict(loss_type="ppo"), "loss_type="),
        (dict(steps=0), "steps="),
        (dict(lr=2.0), "lr="),
        (dict(tasks=("colour",)), "tasks="),
        (dict(reward_weights={"length": 1.0}), "unknown rewards"),
    ):
        with pytest.raises(ValueError, match=match):
            cfg.replace(**bad)
    from helpers import profiles

    monkeypatch.setitem(profiles.PROFILES["cpu"]["grpo"], "gamma", 0.9)
    with pytest.raises(KeyError, match="unknown grpo settings"):
        grpo.GRPOSettings.from_profile("cpu")


def test_experiment_summary_compares_arms_against_the_seed_spread():
    sys.path.insert(0, str(ROOT / "scripts"))
    from grpo_experiment import summarise

    def run(seed, start, sft, grpo_score):
        arms = {
            arm: {"test": {"grounding": {"score": v, "n": 100, "blind": 0.33, "p": 0.5}}}
            for arm, v in (("start", start), ("sft", sft), ("grpo", grpo_score))
        }
        return {"seed": seed, "arms": arms}

    table = summarise([run(0, 0.2, 0.4, 0.30), run(1, 0.2, 0.45, 0.32), run(2, 0.2, 0.42, 0.31)])["test"]["grounding"]
    assert table["spread"]["sft"] == pytest.approx(0.05) and table["spread"]["grpo"] == pytest.approx(0.02)
    assert table["spread"]["start"] == 0 and table["grpo_gain"] == pytest.approx(0.11)
    assert table["grpo_gain_beats_spread"] and table["grpo_vs_sft"] == pytest.approx(0.31 - 1.27 / 3)


def test_experiment_modes_refuse_bad_arguments_and_write_nothing(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from grpo_experiment import main

    for flags in (["--trl-steps", "0"], ["--trl-steps", "2"]):  # no steps; no experiment.json in tmp_path
        with pytest.raises(SystemExit, match="--trl-only needs --trl-steps"):
            main(["--out", str(tmp_path), "--trl-only", *flags])
    with pytest.raises(SystemExit, match="--trajectory=-4: expected K ≥ 1"):
        main(["--out", str(tmp_path), "--trajectory", "-4"])
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_runs_under_torchrun_with_two_processes(setup, tmp_path):
    small = ["prompts_per_step=2", "num_generations=2", "max_new_tokens=6", "n_prompts=8"]  # the DDP path, not scale
    done = run_two_processes(
        "helpers.grpo", "--out", str(tmp_path / "ddp"), "--sft", str(setup["folder"]), "--steps", "1", "--set", *small
    )
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "ddp" / "trainer_state.json").read_text())
    assert saved["world"] == 2 and saved["step"] == 1
    assert saved["history"][0]["completion_length"] <= 6


def test_settings_from_the_command_line_are_typed_and_checked():
    cfg = grpo.GRPOSettings.from_profile("cpu")
    changed = cfg.replace_from_strings(["temperature=1", "steps=3", "loss_type=grpo", "bf16=true"])
    assert cfg.replace(bf16=True).replace_from_strings(["bf16=no"]).bf16 is False
    assert (changed.temperature, changed.steps, changed.loss_type, changed.bf16) == (1.0, 3, "grpo", True)
    assert isinstance(changed.temperature, float) and isinstance(changed.steps, int)
    for bad, named in (
        (["steps=two"], "cannot be read as int"),
        (["colour=red"], "name one of"),
        (["steps"], "name=value"),
        (["bf16=maybe"], "is not a bool; accepted"),
    ):
        with pytest.raises(ValueError, match=named):
            cfg.replace_from_strings(bad)
    with pytest.raises(ValueError, match="steps=0"):
        cfg.replace_from_strings(["steps=0"])


def test_bucketing_by_task_gives_the_same_greedy_answers(setup):
    model, processor = setup["model"], setup["processor"]
    samples = make_split("train", 6, seed=3, image_size=84)
    assert len({s.task for s in samples}) > 1
    plain = rollouts.sample_completions(model, processor, samples, 1, max_new_tokens=6, greedy=True)
    bucketed = rollouts.sample_completions(
        model, processor, samples, 1, max_new_tokens=6, greedy=True, bucket_by_task=True
    )
    assert bucketed.texts == plain.texts
    assert torch.equal(bucketed.completion_mask.sum(1), plain.completion_mask.sum(1))

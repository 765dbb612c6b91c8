import sys

import nbformat as nbf

cells = []


def md(text):
    cells.append(nbf.v4.new_markdown_cell(text.strip("\n")))


def code(text):
    cells.append(nbf.v4.new_code_cell(text.strip("\n")))


md(r"""
# 11 · Reinforcement learning with verifiable rewards (GRPO)

Notebook 10 taught a small Qwen2.5-VL to answer questions about coloured shapes by imitation (SFT).
Here the same model learns from **rewards** instead of answers: it samples several answers to each
question, a program scores them, and GRPO pushes up the answers that scored better than their siblings.
By the end you will be able to:

- write verifiable rewards that never crash on whatever a model emits (`helpers/rewards.py`);
- run **one GRPO step piece by piece**: G sampled completions per prompt, rewards, group-normalised
  advantages, per-token ratios and clipping, the k3 estimate of the KL to a frozen reference, the loss;
- show that this loss **equals TRL's `GRPOTrainer`** for every loss type, and see what each loss type weighs;
- measure what RL does, honestly: GRPO beside the **same start trained further by SFT on the same images**
  (the control every RL claim needs), with image-blind baselines, three seeds and their spread, and
  *sharpening* (greedy accuracy against the best of G samples) before and after;
- recognise two traps people hit in practice: a format reward stuck at 0, and an IoU reward stuck at 0.
""")

code(r"""
import dataclasses
import importlib.metadata as metadata
import json
import tempfile
import time
import warnings
from pathlib import Path

import ipywidgets
import pandas as pd
import torch
import transformers
from IPython.display import Image, display

from helpers import grpo, grpo_plots, grpo_trl, rewards, rollouts
from helpers.checkpoints import load_checkpoint, sft_checkpoint
from helpers.data import make_split
from helpers.evaluation import blind_baselines, evaluate, score_table
from helpers.plots import new_figure, use_course_style
from helpers.profiles import current_profile, settings
from helpers.qwen import load_model
from helpers.widgets import show

use_course_style()
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)
torch.manual_seed(0)
PROFILE = current_profile()
for package in ("torch", "transformers", "trl", "datasets"):
    print(f"{package:13} {metadata.version(package)}")
""")

md(r"""
## 1. Where RL starts: an SFT model that is right only now and then

GRPO can only reinforce answers the policy already **samples** sometimes: from a random model every reward
is 0 and nothing is learnt, and from a model that is always right every group's rewards are equal and
nothing is learnt either. So the start is notebook 10's SFT run **stopped halfway** (the profile's
`start_step`; notebook 10 saves it in the course cache, and `sft_checkpoint` trains it, saying so, when
it is missing). The task RL trains on is **grounding** only, rewarded by the IoU of the box: at this point
of SFT the model places boxes right now and then, so most groups of G samples hold a better and a worse
answer.

The settings are typed (`grpo.GRPOSettings`, read from the profile). Where they equal TRL 1.16's
`GRPOConfig` defaults, the cell checks it against TRL itself:
""")

code(r"""
from trl import GRPOConfig

cfg = grpo.GRPOSettings.from_profile()
start = sft_checkpoint()
model, processor, start_state = load_checkpoint(start)
G, T = cfg.num_generations, cfg.temperature
trl_defaults = GRPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=not torch.cuda.is_available())
shared = ("loss_type", "beta", "num_generations", "num_iterations", "epsilon", "temperature", "scale_rewards")
print(f"start: SFT step {start_state['step']} of {settings('sft')['steps']}; GRPO on {cfg.tasks}, "
      f"{cfg.steps} steps × {cfg.prompts_per_step} prompts × G = {G}")
print("as TRL's defaults (ours, TRL):", {name: (getattr(cfg, name), getattr(trl_defaults, name)) for name in shared})
print(f"departures: lr {cfg.lr} constant (TRL: {trl_defaults.learning_rate}, {trl_defaults.lr_scheduler_type.value} decay, "
      f"sized for pretrained models); the tied embedding table frozen as in notebook 10's recipe")
assert start_state["step"] == cfg.start_step and all(getattr(cfg, n) == getattr(trl_defaults, n) for n in shared)
""")

md(r"""
How far is the start from what RL could reach? `evaluate` scores greedy answers (pass@1, the one evaluator
of notebook 10); `rollouts.best_of_g` samples G answers per question at temperature T and keeps the mean
reward and the best one (best-of-G). A best-of-G well above the greedy score is exactly what GRPO can
turn into greedy behaviour: that is *sharpening*.
""")

code(r"""
questions = {"test": make_split("test", cfg.n_eval, 0, **settings("sft")["data"])}  # OOD too in the committed experiment
blind = {split: blind_baselines(q) for split, q in questions.items()}
grounding_test = [s for s in questions["test"] if s.task in cfg.tasks][:40]  # the sharpening probe

def scored(net):
    return {split: {row["task"]: row for row in score_table(evaluate(net, processor, q), blind[split])}
            for split, q in questions.items()}

before = scored(model)
sharp_before = rollouts.best_of_g(model, processor, grounding_test, cfg, seed=1000)["grounding"]
print(f"test grounding: greedy IoU {before['test']['grounding']['score']:.3f} (n={before['test']['grounding']['n']}), "
      f"best constant box {blind['test']['grounding']['score']:.3f}")
print(f"G = {G} samples on {sharp_before['n']} of them: mean IoU {sharp_before['mean']:.3f}, best-of-{G} {sharp_before['best']:.3f}, "
      f"groups with equal rewards {sharp_before['zero_std']:.2f}")
assert sharp_before["best"] > sharp_before["mean"] and sharp_before["zero_std"] < 1  # some groups carry signal
""")

md(r"""
## 2. Verifiable rewards

A reward here is a program, not a model. `rewards.parse_answer(task, text)` accepts exactly the format the
SFT data taught — `3`, `red`, or `[{"bbox_2d": [x1, y1, x2, y2], "label": …}]` in pixels of the resized
image (a ```` ```json ```` fence is allowed) — and returns `None` for anything else. On top of it:

| reward | value | range |
|---|---|---|
| `task_reward` (what GRPO trains on) | exact match for count/attribute, IoU for grounding | [0, 1] |
| `accuracy_reward` | 1 if right (grounding: IoU ≥ 0.5) | {0, 1} |
| `format_reward` | 1 if the parser accepts the answer | {0, 1} |

A reward function sees whatever the policy samples, so it must never raise on a completion (the unit tests
feed it empty strings, nested JSON, several answers, huge numbers, inverted boxes), while a malformed
*call* (columns of different lengths, an unknown task) is a bug and does raise.
""")

code(r"""
box = [10, 20, 60, 70]
hostile = ["3", " 3.", "There are 3.", "3 4", "-3", "", '[{"bbox_2d": [60, 20, 10, 70]}]',
           '```json\n[{"bbox_2d": [10, 20, 60, 70], "label": "red circle"}]\n```', "[[[[", None]
tasks = ["count"] * 5 + ["grounding"] * 5
targets = [3] * 5 + [box] * 5
task_scores = rewards.task_reward(completions=hostile, task=tasks, target=targets)
formats = rewards.format_reward(completions=hostile, task=tasks)
for text, s, f in zip(hostile, task_scores, formats):
    print(f"{text!r:62} task {s:.2f}  format {f:.0f}")
assert task_scores == [1, 1, 0, 0, 0, 0, 0, 1, 0, 0] and formats == [1, 1, 0, 0, 0, 0, 0, 1, 0, 0]
""")

md(r"""
## 3. One GRPO step, piece by piece

### 3.1 Rollouts: G completions per prompt

Take P grounding prompts from the training split and sample **G completions for each**, at temperature T,
with plain multinomial sampling (TRL's defaults: no top-k, no top-p). Each prompt is repeated G times, so a
batch of P·G rows holds P *groups* of consecutive rows. Prompts are left-padded, because `generate` appends
to the right end of every row.
""")

code(r"""
prompts = grpo.train_prompts(cfg)
batch = prompts[:4]
for seed in range(10):  # a batch in which at least two groups carry signal (3.2 shows why some do not)
    rollout = rollouts.sample_completions(model, processor, batch, G, T, cfg.max_new_tokens, seed=seed)
    ious = torch.tensor(rewards.task_reward(rollout.texts, rollout.tasks, rollout.targets)).view(-1, G)
    if (ious.std(1) > 0).sum() >= 2:
        break
N, K = rollout.completion_ids.shape  # (P·G rows, longest completion)
print(f"{len(batch)} prompts × G = {G} → completion_ids {tuple(rollout.completion_ids.shape)}, prompt_ids {tuple(rollout.prompt_ids.shape)}")
for p, sample in enumerate(batch[:2]):
    print(f"[{sample.task}] {sample.question}  truth {sample.answer}")
    for text in rollout.texts[p * G:(p + 1) * G]:
        print("     ", repr(text))
assert N == len(batch) * G and rollout.completion_mask.shape == (N, K)
""")

md(r"""
### 3.2 Rewards and group-normalised advantages

Each completion gets its reward (here the IoU of its box). GRPO needs no value network: the **baseline is
the group's mean**. The advantage of completion *i* in group *g* is $A_i = (r_i - \bar r_g) / (\sigma_g + 10^{-4})$,
with the Bessel-corrected std as in TRL. Within a group the advantages sum to zero: better-than-siblings
answers are pushed up, worse ones down. A group whose G rewards are all equal gets $A = 0$ on every row —
it teaches nothing.
""")

code(r"""
scores = grpo.compute_rewards(rollout.texts, rollout.tasks, rollout.targets, cfg.reward_weights)
advantages = grpo.group_advantages(scores["total"], G)
grouped = advantages.view(-1, G)  # (P, G)
print("rewards   ", [round(v, 2) for v in scores["total"].tolist()])
print("advantages", [round(v, 2) for v in advantages.tolist()])
assert torch.allclose(grouped.sum(1), torch.zeros(len(grouped)), atol=1e-4)  # each group sums to 0
equal = scores["total"].view(-1, G).std(1) == 0
assert (grouped[equal].abs() < 1e-3).all()  # equal rewards → (almost exactly) zero advantage
print(f"{int(equal.sum())} of {len(grouped)} groups have equal rewards (no learning signal)")
""")

code(r"""
grpo_plots.plot_groups(scores["total"], advantages, G)
""")

md(r"""
### 3.3 Per-token log-probabilities and the ratio

The loss needs $\log\pi_\theta(o_t \mid q, o_{<t})$ for every completion token. One forward pass over
prompt + completion gives them; the LM head runs only at the completion positions
(`rollouts.per_token_logps`), and the logits are divided by the sampling temperature, as TRL does. The
ratio $\rho_t = \pi_\theta / \pi_{\text{old}}$ compares the policy being trained with the one that sampled.
With `num_iterations = 1` (TRL's default and ours) every batch gets exactly one gradient step, taken by
the very policy that sampled it: $\rho_t = 1$ exactly, **so clipping never acts in training** — the loss's
value is $-\text{mean}(A)$ and its gradient is the plain policy gradient. Clipping only matters when a batch
is reused (`num_iterations > 1`), as section 3.5 shows.
""")

code(r"""
demo = cfg.replace(beta=0.04, loss_type="grpo")  # the KL term on (β of the DeepSeekMath paper), to show it
reference = grpo.frozen_copy(model)  # π_ref: the SFT start, frozen
logps = rollouts.per_token_logps(model, rollout, T)  # (N, K)
old = logps.detach()  # π_old = the sampler
with torch.no_grad():
    ref_logps = rollouts.per_token_logps(reference, rollout, T)
ratio = torch.exp(logps - old)
mask = rollout.completion_mask
print(f"log-probs {tuple(logps.shape)}; ratio on completion tokens: min {ratio[mask.bool()].min():.3f}, max {ratio[mask.bool()].max():.3f}")
assert torch.equal(ratio[mask.bool()], torch.ones(int(mask.sum())))
""")

md(r"""
### 3.4 KL to the reference: the k3 estimator

GRPO as published keeps the policy near the SFT model with a penalty $\beta\,\mathrm{KL}(\pi_\theta\|\pi_{\text{ref}})$.
The exact KL sums over the whole vocabulary; instead each sampled token gives Schulman's **k3** estimate
$e^{\delta} - \delta - 1$ with $\delta = \log\pi_{\text{ref}} - \log\pi_\theta$: never negative, 0 when the
two agree, unbiased in expectation (a unit test checks it against the exact KL of random distributions).
Right now the policy *is* the reference, so every term is 0. TRL 1.16 defaults to β = 0 (no reference model
at all), and so does our profile; the demonstration below turns it on.
""")

code(r"""
kl = grpo.kl_k3(logps.detach(), ref_logps)
print(f"k3 per token: max {kl.max().item():.2e}")
assert torch.equal(kl, torch.zeros_like(kl))
""")

md(r"""
### 3.5 The loss, one update, and clipping when a batch is reused

Per token: $-\min(\rho_t A,\ \mathrm{clip}(\rho_t, 1-\varepsilon, 1+\varepsilon) A) + \beta\,\rho_t\,k3_t$. The factor
$\rho_t$ on the KL term is TRL 1.16's default `use_bias_correction_kl=True` (from DeepSeek-V3.2): the same
value, but its gradient is the unbiased gradient of the reverse KL. After one AdamW step we score **the same
batch** again (what `num_iterations > 1` does): now $\rho_t \neq 1$, tokens whose ratio left
$[1-\varepsilon, 1+\varepsilon]$ in the direction the advantage pushes are clipped (their gradient is 0),
and the KL is no longer 0.
""")

code(r"""
loss, stats = grpo.grpo_loss(logps, old, ref_logps, advantages, mask, demo.beta, demo.epsilon, loss_type=demo.loss_type)
assert torch.isclose(loss, -advantages.mean(), atol=1e-6)  # ρ = 1 and KL = 0: the loss is -mean(A)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
loss.backward()
optimizer.step()
optimizer.zero_grad()
with torch.no_grad():
    logps_after = rollouts.per_token_logps(model, rollout, T)
loss_after, stats_after = grpo.grpo_loss(logps_after, old, ref_logps, advantages, mask, demo.beta, demo.epsilon, loss_type=demo.loss_type)
surrogate, _ = grpo.grpo_loss(logps_after, old, None, advantages, mask, 0.0, demo.epsilon, loss_type=demo.loss_type)
print(f"before the step: loss {loss.item():+.4f}, KL {stats['kl']:.2e}; after: loss {loss_after.item():+.4f} "
      f"(clipped surrogate {surrogate.item():+.4f}), KL {stats_after['kl']:.2e}, "
      f"clipped tokens {100 * (stats_after['clip_low'] + stats_after['clip_high']):.1f} %")
assert stats_after["kl"] > 0 and surrogate < loss  # the step raised the advantage-weighted likelihood
""")

code(r"""
ratio_after = torch.exp(logps_after - old)[mask.bool()]
figure, ax = new_figure(1, 1, 6, 2.6)
ax.hist(ratio_after.numpy(), bins=40, color="#0072B2")
for bound in (1 - demo.epsilon, 1 + demo.epsilon):
    ax.axvline(bound, color="#D55E00", ls="--")
ax.set(xlabel="ratio π_θ / π_old per completion token", ylabel="tokens", title="after one update: ratios and the clip range")
figure
""")

md(r"""
## 4. The same loss in TRL's `GRPOTrainer`, and what each loss type weighs

TRL computes this loss in `GRPOTrainer._compute_loss`, from the `inputs` dict its rollout code builds
(`prompt_ids`, `completion_ids`, masks, `advantages`, `old_per_token_logps`, `ref_per_token_logps`, the
image tensors). `grpo_trl.trl_loss` builds that dict from our batch and calls `trainer.compute_loss`. Two
details matter: `GRPOTrainer` with `beta > 0` builds its own reference model from the **policy's config
name**, so a model built in memory fails with a confusing repo-id error (shown below): save the policy and
pass the folder. And TRL scores tokens with a fused LM head in float32 tiles, so end to end the two losses
agree to float32 rounding (first cell).
""")

code(r"""
tolerance = 1e-5  # float32 end to end
workdir = Path(tempfile.mkdtemp())
trainer = grpo_trl.trl_trainer(start, processor, batch, demo, workdir / "trl")
policy = load_model(start)  # the same weights TRL loaded from the folder
ours, _ = grpo.grpo_loss(rollouts.per_token_logps(policy, rollout, T), logps_after, ref_logps, advantages, mask,
                         demo.beta, demo.epsilon, loss_type=demo.loss_type)
theirs = grpo_trl.trl_loss(trainer, rollout, advantages, logps_after, ref_logps)
print(f"ours {ours.item():.8f}   TRL {theirs.item():.8f}   |difference| {abs(ours - theirs).item():.1e} (tolerance {tolerance})")
assert abs(ours - theirs).item() <= tolerance
""")

md(r"""
The four loss types differ only in how they average the per-token terms, which matters only when the
completions have **different lengths**. So the maths is compared on a batch that mixes one-token answers
(counts, colours) with ~30-token boxes, in float64, with TRL fed our log-probabilities (so only the loss
formulas differ):

- `grpo`: the mean over each completion's tokens, then over completions — every completion weighs the
  same, so each token of a short answer weighs more than a token of a long one;
- `bnpo` and `dapo`: the mean over all tokens of the batch — every token weighs the same, so long
  completions weigh more (the two differ only in how several processes share the normaliser);
- `dr_grpo`: the sum over all tokens divided by (completions × `max_completion_length`) — a constant
  normaliser, so no length bias at all, and smaller values.
""")

code(r"""
maths_tolerance = 1e-12  # float64, same log-probs: only the loss formulas differ
mixed_samples = make_split("train", 12, 5, **settings("sft")["data"])[:4]  # count, colour, box, count
mixed = rollouts.sample_completions(policy, processor, mixed_samples, 2, T, cfg.max_new_tokens, seed=3)
lengths = mixed.completion_mask.sum(1).tolist()
mixed_adv = torch.linspace(-1, 1, len(lengths), dtype=torch.float64)
shared = rollouts.per_token_logps(policy.double(), mixed, T).detach().requires_grad_(True)
old64, ref64 = (shared + 0.05 * torch.randn(shared.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).detach(), shared.detach() - 0.1
by_type = {}
for loss_type in grpo.LOSS_TYPES:
    settings64 = demo.replace(loss_type=loss_type, prompts_per_step=len(mixed_samples), num_generations=2)
    trainer64 = grpo_trl.trl_trainer(start, processor, mixed_samples, settings64, workdir / loss_type, dtype=torch.float64)
    trainer64._get_per_token_logps_and_entropies = lambda *a, **k: (shared, torch.zeros_like(shared), None)  # our log-probs
    theirs64 = grpo_trl.trl_loss(trainer64, mixed, mixed_adv, old64, ref64)
    ours64, _ = grpo.grpo_loss(shared, old64, ref64, mixed_adv, mixed.completion_mask, demo.beta, demo.epsilon, None, loss_type, cfg.max_new_tokens)
    by_type[loss_type] = ours64.item()
    print(f"{loss_type:8} ours {ours64.item():+.15f}  TRL {theirs64.item():+.15f}  |diff| {abs(ours64 - theirs64).item():.1e}")
    assert abs(ours64 - theirs64).item() <= maths_tolerance
print("completion lengths in the batch:", lengths)
assert len(set(lengths)) > 1 and by_type["bnpo"] == by_type["dapo"]  # one process: the same normaliser
assert len({round(by_type[t], 12) for t in ("grpo", "bnpo", "dr_grpo")}) == 3  # mixed lengths: three different losses
""")

code(r"""
from helpers.qwen import course_config
in_memory = load_model(config=course_config(**settings("sft")["model"]))  # built in memory: no folder
print("config name of the loaded policy set:", bool(policy.config.name_or_path), "| of the in-memory one:", bool(in_memory.config.name_or_path))
try:  # an in-memory policy with beta > 0
    from trl import GRPOTrainer
    GRPOTrainer(model=in_memory, reward_funcs=[rewards.task_reward], train_dataset=grpo_trl.trl_dataset(batch), processing_class=processor,
                args=GRPOConfig(output_dir=str(workdir / "x"), beta=0.04, num_generations=G, per_device_train_batch_size=G,
                                report_to="none", use_cpu=True))
    failed = None
except Exception as error:  # noqa: BLE001
    failed = type(error).__name__
print("in-memory policy with beta > 0 →", failed)
assert failed is not None and not in_memory.config.name_or_path
""")

md(r"""
## 5. The loop, and its control

`grpo.train` repeats the step: P prompts, G rollouts each, rewards, advantages, one AdamW step, for
`steps` steps (the prompts follow `grpo.prompt_schedule`), and logs the mean reward, the IoU of the
rollouts, the share of groups with equal rewards, the completion length. The rollouts are recorded for the
browser of section 8.

An RL result means something only beside a **control**: `grpo.sft_continuation` trains the same start
further by SFT on **the same prompt images** (the same schedule, each image once, with its reference answer),
for the same number of steps, at the same constant learning rate, with the same parameters trainable. Same
images seen; an SFT step costs far less (one answer instead of G samples, no generation).
""")

code(r"""
grpo_plots.ROLLOUTS.clear()
trained, _, _ = load_checkpoint(start)
t0 = time.perf_counter()
history = grpo.train(trained, processor, prompts, cfg, seed=0, on_step=grpo_plots.record_rollout)
grpo_seconds = time.perf_counter() - t0
control, _, _ = load_checkpoint(start)
t0 = time.perf_counter()
control_run = grpo.sft_continuation(control, processor, prompts, cfg, seed=0)
sft_seconds = time.perf_counter() - t0
print(f"GRPO: {len(history)} steps × {cfg.prompts_per_step} prompts × G = {G} in {grpo_seconds:.0f} s; "
      f"SFT control: {len(control_run.history['loss'])} steps × {cfg.prompts_per_step} images in {sft_seconds:.0f} s")
print("rollout IoU per step:", [round(h["iou"], 2) for h in history])
assert len(history) == cfg.steps and len(control_run.history["loss"]) == cfg.steps
""")

code(r"""
grpo_plots.plot_history({"GRPO seed 0": history})
""")

md(r"""
## 6. Start, SFT control and GRPO, beside the image-blind baselines

Every model answers the same test questions greedily. First the run above, one seed (the committed
experiment below adds the OOD split, which asks about colour–shape pairs that training never showed together):
""")

code(r"""
results = {"start": before, "SFT control": scored(control), "GRPO": scored(trained)}
rows = [{"split": split, "task": task, "n": results["start"][split][task]["n"], "blind": results["start"][split][task]["blind"],
         **{arm: results[arm][split][task]["score"] for arm in results}}
        for split in questions for task in results["start"][split]]
live = pd.DataFrame(rows).set_index(["split", "task"]).round(3)
live
""")

md(r"""
One seed of eight steps is a demonstration, not a measurement. The committed experiment runs **three seeds** of a longer GRPO
run (30 steps × 8 prompts × G = 8) and its control from the same start, on 300 questions per split
(`python scripts/grpo_experiment.py --out assets/results/grpo_cpu --steps 30 --eval 300 --trl-steps 6`;
command, date and machine are in the file). A gain counts only when it exceeds the spread between seeds:
""")

code(r"""
experiment_file = Path("..") / "assets" / "results" / "grpo_cpu" / "experiment.json"
experiment = json.loads(experiment_file.read_text())
print({k: experiment["meta"][k] for k in ("command", "date", "machine", "wall_seconds")})
table = pd.DataFrame([{"split": split, "task": task, "n": row["n"], "blind": row["blind"],
                       **{f"{arm} (mean)": row["mean"][arm] for arm in ("start", "sft", "grpo")},
                       "SFT spread": row["spread"]["sft"], "GRPO spread": row["spread"]["grpo"],
                       "GRPO − start": row["grpo_gain"], "GRPO − SFT": row["grpo_vs_sft"]}
                      for split, tasks in experiment["summary"].items() for task, row in tasks.items()]).set_index(["split", "task"]).round(3)
display(table)
display(Image(filename=str(experiment_file.with_suffix(".png")), width=950))
""")

EXPERIMENT_PROSE = "EXPERIMENT_PROSE"
md(EXPERIMENT_PROSE)

EXPERIMENT_CHECKS = "EXPERIMENT_CHECKS"
code(EXPERIMENT_CHECKS)

EXPERIMENT_AFTER = "EXPERIMENT_AFTER"
md(EXPERIMENT_AFTER)

md(r"""
## 7. Sharpening, seen directly

Best-of-G is what the policy *can* do when it samples; greedy is what it does. GRPO moves probability
towards the better samples of each group, so on the trained task it should raise what the sampled answers
score on average, and the share of groups with equal rewards (no signal) changes as the policy sharpens.
""")

code(r"""
sharp = {"start": sharp_before, "SFT control": rollouts.best_of_g(control, processor, grounding_test, cfg, seed=1000)["grounding"],
         "GRPO": rollouts.best_of_g(trained, processor, grounding_test, cfg, seed=1000)["grounding"]}
greedy = {arm: results[arm]["test"]["grounding"]["score"] for arm in results}
print(pd.DataFrame({arm: {"greedy IoU (pass@1)": greedy[arm], f"mean of {G} samples": s["mean"], f"best of {G}": s["best"],
                          "groups with equal rewards": s["zero_std"]} for arm, s in sharp.items()}).round(3))
print("committed seeds, mean of G samples / best of G on the test grounding questions:")
for run in experiment["runs"]:
    print(f"  seed {run['seed']}: " + ", ".join(f"{arm} {b['grounding']['mean']:.2f} / {b['grounding']['best']:.2f}" for arm, b in run["best_of_g"].items()))
figure, ax = new_figure(1, 1, 6, 2.4)
for run in experiment["runs"]:
    ax.plot([h["zero_std_grounding"] for h in run["history"]], lw=1, label=f"seed {run['seed']}")
ax.set(xlabel="GRPO step", ylabel="share", ylim=(0, 1), title="grounding groups with equal rewards (no signal), per step")
ax.legend(fontsize=8)
figure
""")

md(r"""
## 8. The TRL route

The same training through TRL: `grpo_trl.trl_trainer` passes our settings (G, temperature, β, ε, loss type,
learning rate, reward weights) and our reward functions to `GRPOConfig` / `GRPOTrainer`, with the SFT
checkpoint **folder** as the model. Two steps live, to see its log; the committed experiment ran TRL and our
loop for six steps each from the same start on the same prompts, and their reward curves are compared below
(the samples differ, so the curves agree only within the noise of a handful of steps).
""")

code(r"""
route = grpo_trl.trl_trainer(start, processor, prompts, cfg.replace(prompts_per_step=2), workdir / "route", steps=2)
route.train()
logs = [h for h in route.state.log_history if "reward" in h]
for h in logs:
    print({k: round(h[k], 3) for k in ("reward", "completions/mean_length", "frac_reward_zero_std", "step_time")})
trl_curve = experiment["runs"][0]["trl_route"]
print("committed, 6 steps each — TRL reward:", [round(v, 3) for v in trl_curve["trl_reward"]])
print("                          ours reward:", [round(v, 3) for v in trl_curve["ours_reward"]])
print(f"seconds for the 6 steps: TRL {trl_curve['trl_seconds']}, ours {trl_curve['ours_seconds']}")
assert len(logs) == 2 and len(trl_curve["trl_reward"]) == len(trl_curve["ours_reward"]) == trl_curve["steps"]
""")

md(r"""
## 9. Browse the rollouts

Pick a training step and a prompt: the image (true box in green, sampled boxes dashed orange), the
question, and the G completions with their task and format rewards and their advantages. Look for groups
where every completion scored the same: their advantages are 0.
""")

code(r"""
show(grpo_plots.rollout_view,
     step=ipywidgets.IntSlider(value=0, min=0, max=len(grpo_plots.ROLLOUTS) - 1, description="step"),
     prompt=ipywidgets.IntSlider(value=0, min=0, max=cfg.prompts_per_step - 1, description="prompt"));
""")

md(r"""
## 10. GPU results

`scripts/gpu_grpo.sh OUT_DIR` runs the same experiment in the `gpu` profile on one H100/H200 (three seeds,
GRPO and its SFT control from the gpu SFT run stopped at its `start_step`). The run committed under
`assets/results/grpo/` was made with an **earlier configuration** (SFT trained without M-RoPE positions on
the old shapes task, all tasks, no control arm), so this cell only says what changed since; none of its
scores is shown. It is kept for the record until a GPU reruns the script.
""")

code(r"""
from helpers.profiles import changed_settings

results_dir = Path("..") / "assets" / "results" / "grpo"
if (results_dir / "metrics.json").is_file():
    gpu = json.loads((results_dir / "metrics.json").read_text())
    print("committed GPU run:", gpu.get("device"), "| seeds:", gpu.get("seeds"))
    changed = changed_settings(gpu["settings"], dataclasses.asdict(grpo.GRPOSettings.from_profile("gpu")))
    print("gpu grpo settings changed since (then → now):", changed or "none")
    assert changed  # an earlier configuration: its scores are not shown
else:
    print("No GPU run committed yet: run scripts/gpu_grpo.sh on a GPU.")
""")

md(r"""
## 11. Common traps

### Trap 16 — the format reward stays at 0 after SFT, and groups give no signal

R1-style recipes reward `<think>…</think><answer>…</answer>`. Our SFT data never showed those tags, so the
SFT model never emits them: that format reward is 0 on **every** completion, every group's rewards are
equal, every advantage is 0, and the policy gradient is exactly zero — training runs and learns nothing.
""")

code(r"""
think = torch.tensor(rewards.think_format_reward(completions=rollout.texts, task=rollout.tasks))
stuck = grpo.group_advantages(think, G)
probe = load_model(start)
loss_stuck, _ = grpo.grpo_loss(rollouts.per_token_logps(probe, rollout, T), old, None, stuck, mask)
loss_stuck.backward()
grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in probe.parameters() if p.grad is not None))
print(f"think-format reward mean {think.mean():.2f}; |advantages| max {stuck.abs().max():.2e}; gradient norm {grad_norm:.2e}")
assert think.sum() == 0 and stuck.abs().max() == 0 and grad_norm == 0
""")

md(r"""
**Fix:** reward the format the SFT data taught (our `format_reward`, which the SFT model already satisfies),
or first SFT on the format you want to reward. And watch the fraction of groups whose rewards are all equal
(`zero_std_groups` in our log, `frac_reward_zero_std` in TRL's): when it nears 1, raise G or the temperature,
or pick harder prompts.
""")

code(r"""
taught = torch.tensor(rewards.format_reward(completions=rollout.texts, task=rollout.tasks))
zero_std = [round(h["zero_std_groups"], 2) for h in history]
print(f"taught-format reward mean {taught.mean():.2f}; fraction of zero-std groups per step: {zero_std}")
assert taught.mean() > think.mean()
""")

md(r"""
### Trap 17 — the IoU reward is always 0

Qwen2.5-VL grounds in **absolute pixels of the resized image**; Qwen2-VL used a 0–1000 grid, and datasets
often store boxes in the original image's pixels. Mix two of these and a perfect box scores IoU 0. Below: a
correct answer from our data, written in the 0–1000 grid, then in the pixels of an "original" photo twice
the size, then mapped back with `rewards.rescale_box`.
""")

code(r"""
sample = next(s for s in make_split("val", 40, 0, **settings("sft")["data"]) if s.task == "grounding")
side = sample.image.width
answer = lambda b: json.dumps([{"bbox_2d": [round(v) for v in b], "label": "x"}])
in_1000 = rewards.rescale_box(sample.target, (side, side), (1000, 1000))
in_original = rewards.rescale_box(sample.target, (side, side), (2 * side, 2 * side))
fixed = rewards.rescale_box(in_1000, (1000, 1000), (side, side))
for name, b in (("resized pixels (right)", sample.target), ("0–1000 grid", in_1000), ("original pixels", in_original), ("0–1000 mapped back", fixed)):
    print(f"{name:24} {str([round(v) for v in b]):22} IoU {rewards.score('grounding', answer(b), sample.target):.2f}")
whole = rewards.iou([0, 0, side, side], sample.target)
print(f"whole-image box: IoU {whole:.2f}")
assert rewards.score("grounding", answer(in_1000), sample.target) < 0.1 and rewards.score("grounding", answer(fixed), sample.target) > 0.9
""")

md(r"""
**Fix:** map ground truth and predictions to one system — the resized image's pixels for Qwen2.5-VL
(`smart_resize` gives the size, notebook 02) — before computing IoU, and check the reward on the
ground-truth answer itself: it must be 1.

## 12. Summary

- Verifiable rewards are small programs; ours parse strictly and never raise on a completion.
- A GRPO step: G samples per prompt → rewards → advantages relative to the group → clipped ratio loss
  (+ β·k3 KL, off by default as in TRL). With one gradient step per batch the ratio is 1 and clipping never
  acts; equal rewards in a group carry no signal.
- Our loss equals TRL `GRPOTrainer.compute_loss` on the same batch (float32 end to end; float64 for the maths
  of all four loss types on a mixed-length batch, where they differ as their normalisers say).
- What RL did here is measured against the start and against SFT on the same images, with three seeds and
  image-blind baselines (section 6 says which won), and sharpening is shown as greedy against best-of-G.

**What we simplified:** one process (or DDP under `torchrun`), no vLLM, full fine-tuning of the small course
model, one gradient step per rollout (`num_iterations=1`), no entropy masks or off-policy corrections; RL on
one task (grounding) from a deliberately early SFT checkpoint.

This is the last notebook of the course: back to the [course map](00_quickstart.ipynb).
""")

prose = open(sys.argv[2]).read() if len(sys.argv) > 2 else "(experiment findings: to be written)"
checks = open(sys.argv[3]).read() if len(sys.argv) > 3 else "print('checks to be written')"
after = open(sys.argv[4]).read() if len(sys.argv) > 4 else "(interpretation: to be written)"
for c in cells:
    if c.source == EXPERIMENT_AFTER:
        c.source = after.strip("\n")
    if c.source == EXPERIMENT_PROSE:
        c.source = prose.strip("\n")
    if c.source == EXPERIMENT_CHECKS:
        c.source = checks.strip("\n")
nb = nbf.v4.new_notebook(cells=cells, metadata={
    "kernelspec": {"display_name": "Python 3 (Qwen2.5-VL course)", "language": "python", "name": "qwenvl-course"},
    "language_info": {"name": "python"}})
nbf.write(nb, sys.argv[1])

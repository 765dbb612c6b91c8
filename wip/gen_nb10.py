import nbformat as nbf

cells = []


def md(text):
    cells.append(nbf.v4.new_markdown_cell(text.strip("\n")))


def code(text):
    cells.append(nbf.v4.new_code_cell(text.strip("\n")))


md(r"""
# 10 · Supervised fine-tuning (SFT) of Qwen2.5-VL on a task we can check

No pretrained weights exist on this machine, so the course trains its own small Qwen2.5-VL on a visual
task whose answers can be checked exactly: counting, naming colours and locating shapes. The same code
fine-tunes a real checkpoint (`QWENVL_MODEL=/path/to/Qwen2.5-VL-3B-Instruct`), with the settings a
practitioner would use there (section 10).

After this notebook you will be able to:
1. build the training data and its conversations, and a **collator** that labels only the answers and
   keeps every input the model's M-RoPE positions need (`mm_token_type_ids`);
2. write the **training loop** yourself (AdamW, warmup + cosine, clipping, accumulation, bf16 autocast)
   with the LM head applied **only at labelled positions**, and show that its loss equals transformers'
   and TRL's;
3. **evaluate** a fine-tune honestly: each score beside what an image-blind model scores, with n and a
   significance test, in and out of distribution;
4. save **safetensors checkpoints** and resume on the same loss curve;
5. train the same model with TRL's `SFTTrainer`, and choose what **LoRA / freezing** trains on a real checkpoint.
""")

code(r"""
import importlib.metadata as md, inspect, math, os, time, warnings
import torch, transformers
from helpers.plots import use_course_style
from helpers.profiles import current_profile
from helpers.recipes import recipe

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore")  # library deprecation notices (they print install paths)
use_course_style()
torch.manual_seed(0)
print({p: md.version(p) for p in ("torch", "transformers", "trl", "peft", "accelerate")})
PROFILE = current_profile()
R = recipe()  # the settings in force: the course model's, or a checkpoint's when QWENVL_MODEL is set
print(f"profile: {PROFILE} | recipe: {R['kind']} | model: {R['model_path'] or 'course model (random init)'}")
print({k: R[k] for k in ("data", "steps", "batch_size", "grad_accum", "lr", "warmup", "average", "freeze_embeddings", "lr_scales")})
""")

md(r"""
## 1. The task: shapes on the merged-token grid

`helpers.data.make_split(split, n, seed)` draws circles, squares and triangles in five colours and asks
one of three questions, the three in equal shares. Answers are exact strings: a count (`"2"`), a colour
(`"red"`), or a box in Qwen2.5-VL's grounding format (`[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]`,
absolute pixels of the image *as the model sees it*; the side is a multiple of 28, so `smart_resize`
keeps it, trap #1 of notebook 02).

Two design choices make the task learnable by a small model in minutes, and `scripts/sft_ablation.py`
(section 7) measures both:

- **one shape per 28-px cell**, centred, so each shape is exactly one *merged* vision token (2×2 patches of
  14 px, notebook 07). A shape straddling four tokens is split across them, and counting or locating it
  becomes a much harder problem.
- **a positional tint**: each cell's background is tinted by its column (red channel) and row (blue
  channel). Rotary positions enter attention *scores*, not the values an answer reads, so a tiny model
  trained for minutes has no easy way to say which cell a shape sits in; the tint writes it into the
  pixels. A pretrained checkpoint has learnt positions from billions of images and needs no such help.

The `ood` split asks only about two colour–shape pairs that training never shows together, with the same
answer vocabulary (counts, colour words, boxes): it measures whether colour and shape were learnt apart,
not whether the model can say a token it never saw.
""")

code(r"""
from collections import Counter
from helpers.data import HELD_OUT_PAIRS, grid_cells, make_split, sample_messages

DATA = R["data"]
train_view, ood_view = make_split("train", 600, R["seed"], **DATA), make_split("ood", 600, R["seed"], **DATA)

def answers(samples, task):
    return {str(s.target) for s in samples if s.task == task}

print(f"{DATA['image_size']} px = {grid_cells(DATA['image_size'])}×{grid_cells(DATA['image_size'])} cells; "
      f"task shares in train: {dict(Counter(s.task for s in train_view))}; held-out pairs {HELD_OUT_PAIRS}")
for task in ("count", "attribute", "grounding"):
    print(f"{task:9s} answers: train {len(answers(train_view, task))}, ood {len(answers(ood_view, task))}, "
          f"ood answers unseen in train: {len(answers(ood_view, task) - answers(train_view, task))}")
    assert answers(ood_view, task) <= answers(train_view, task)  # OOD keeps the answer vocabulary
assert not any((i["colour"], i["shape"]) in HELD_OUT_PAIRS for s in train_view for i in s.shapes)
""")

code(r"""
from helpers.sft_plots import plot_predictions

# A few samples with their reference answers (the same drawing code later shows predictions)
examples = [next(s for s in train_view if s.task == t) for t in ("count", "attribute", "grounding")]
examples += [next(s for s in ood_view if s.task == t) for t in ("count", "attribute", "grounding")]
plot_predictions([(s, s.answer) for s in examples], ncols=6, size=1.7);
""")

md(r"""
## 2. From a sample to a conversation

`sample_messages` calls `helpers.chat.format_data`: the user turn holds the image and the question, the
assistant turn the answer. The chat template adds the default system turn. A training conversation
ends with the answer's `<|im_end|>\n`, **not** with an extra `<|im_start|>assistant` (a generation prompt
belongs to inference only; the seed blog post this course grew from gets this wrong).
""")

code(r"""
from helpers.recipes import model_for_profile

model, processor = model_for_profile()
sample = examples[1]
text = processor.apply_chat_template(sample_messages(sample), tokenize=False)
print(text)
assert text.endswith(sample.answer + "<|im_end|>\n") and not text.rstrip().endswith("<|im_start|>assistant")
""")

md(r"""
## 3. The collator: only the answer carries loss, and every input M-RoPE needs

`SFTCollator` runs the chat template and the processor (which repeats `<|image_pad|>` once per merged
2×2 patch block), pads on the right, and sets `labels` to the token id on each answer and its closing
`<|im_end|>` (`helpers.chat.assistant_loss_mask`), and to `-100` everywhere else: system and user turns,
vision tokens, the `<|im_start|>assistant\n` header, the newline after `<|im_end|>`, padding.

It keeps **every** tensor the processor returns. One of them is easy to drop by accident:
`mm_token_type_ids` (1 on image tokens, 0 elsewhere). In transformers 5.24 the model computes its 3-D
M-RoPE positions (notebook 08) from it; without it, it falls back to plain 1-D positions for every token,
image tokens included, silently (trap #18, below). The key set is checked against the processor's and
against TRL's own vision-language collator:
""")

code(r"""
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling
from helpers.sft import IGNORE_INDEX, IMAGE_PAD, SFTCollator

batch_samples = make_split("val", 8, R["seed"], **DATA)
batch = SFTCollator(processor)(batch_samples)
print({k: tuple(v.shape) for k, v in batch.items()})  # input_ids (B, T); pixel_values (patches, 3·2·14·14)
texts = [processor.apply_chat_template(sample_messages(s), tokenize=False) for s in batch_samples]
from_processor = processor(text=texts, images=[s.image for s in batch_samples], padding=True, return_tensors="pt")
trl_rows = [{"images": [s.image], "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
             "completion": [{"role": "assistant", "content": [{"type": "text", "text": s.answer}]}]} for s in batch_samples]
from_trl = DataCollatorForVisionLanguageModeling(processor=processor, completion_only_loss=True)(trl_rows)
print("processor:", sorted(from_processor), "| TRL:", sorted(from_trl))
assert set(batch) == set(from_processor) | {"labels"} == set(from_trl)
assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == IMAGE_PAD).long())
""")

code(r"""
from helpers.sft_plots import plot_batch, token_kinds

# The check next to the claim: labelled tokens decode to answer + <|im_end|>; no pad or vision token is labelled
for row, s in enumerate(batch_samples):
    labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
    assert processor.decode(labelled) == s.answer + "<|im_end|>"
kinds = token_kinds(batch)
assert (batch["labels"][(batch["attention_mask"] == 0) | (batch["input_ids"] == IMAGE_PAD)] == IGNORE_INDEX).all()
share = (kinds == 3).float().sum() / batch["attention_mask"].sum()
print(f"labelled tokens: {int((kinds == 3).sum())} of {int(batch['attention_mask'].sum())} real tokens ({share:.1%})")
plot_batch(batch);
""")

md(r"""
Move through the batch with the widget. `max_length` truncates a sample as a trainer's `max_length` would:
cut into the answer and the row has nothing to learn from; cut into the image and the number of
`<|image_pad|>` tokens no longer matches the image's features (trap #6, below).
""")

code(r"""
import ipywidgets as W
from helpers.widgets import show
from helpers.sft_plots import batch_view

show(batch_view, row=W.IntSlider(0, 0, 5, description="row"), max_length=W.IntSlider(0, 0, 70, description="max_length"));
""")

md(r"""
## 4. The loss, computed only where there are labels

A causal LM's loss at position *t* scores the token at *t+1*. transformers' `model(..., labels=...)`
builds the logits for **every** position, `(B, T, 151936)`, then ignores all but the labelled ones.
`helpers.sft.labelled_loss` runs the backbone once, keeps the hidden states whose next token is labelled
and multiplies only those by the LM head. Same number; far less work, because the LM head is the largest
matrix multiply of a small model (151,936 × d per token) and the labelled tokens are a minority of the
batch (printed above). TRL 1.16 does the same inside `SFTTrainer` on GPUs (its "fused LM head").
First, the three losses on the same batch:
""")

code(r"""
from helpers.evaluation import unwrap
from helpers.sft import full_logits_loss, labelled_loss, trl_trainer

trainer = trl_trainer(model, processor, batch_samples, steps=1, batch_size=4, output_dir=os.path.join("..", ".cache", "trl_sft"))
model.train()
with torch.no_grad():
    ours, theirs, trls = labelled_loss(model, batch), model(**batch).loss, trainer.compute_loss(model, dict(batch))
print(f"ours {ours.item():.6f} | transformers {theirs.item():.6f} | TRL {trls.item():.6f}")
assert abs(ours - theirs) < 1e-5 and abs(ours - trls) < 1e-5
""")

code(r"""
# Time one forward + backward each way: one warm-up, then 5 interleaved runs, fastest of each
def run(loss_fn):
    model.zero_grad(); t = time.perf_counter(); loss_fn(model, batch).backward(); return time.perf_counter() - t

run(full_logits_loss), run(labelled_loss)
times = [(run(full_logits_loss), run(labelled_loss)) for _ in range(5)]
full, labelled = min(t[0] for t in times), min(t[1] for t in times)
B, T = batch["input_ids"].shape
N, V = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()), unwrap(model).lm_head.out_features
print(f"LM head positions: {B * T} → {N}; logits {B * T * V * 4 / 2**20:.0f} MiB → {N * V * 4 / 2**20:.1f} MiB")
print(f"forward+backward: full logits {full * 1e3:.0f} ms, labelled only {labelled * 1e3:.0f} ms → {full / labelled:.1f}× faster")
assert labelled < full
model.zero_grad()
""")

md(r"""
## 5. Before training, and what a model that never looks can score

`helpers.evaluation.evaluate` (the one evaluator of this notebook and of GRPO in notebook 11) generates
greedy answers from batches built by the same collator (left padding, `mm_token_type_ids` included, stop
at `<|im_end|>`) and scores them with `helpers.rewards.score`: exact match for counts and colours, IoU for
boxes. A score means little alone. `blind_baselines` computes, on the same questions, the best an
**image-blind** model can do: always the commonest count or colour, and the constant box with the highest
mean IoU. Every score below stands beside its baseline, with n and a one-sided p-value of "better than
blind" (exact binomial test for accuracies, paired sign test for IoU; `score_table`).
""")

code(r"""
import pandas as pd
from helpers.evaluation import blind_baselines, evaluate, score_table, summary

eval_sets = {split: make_split(split, R["n_eval"], 0, **DATA) for split in ("test", "ood")}
blind = {split: blind_baselines(smp) for split, smp in eval_sets.items()}

def scores_frame(results):
    rows = [{"split": split, **row} for split, res in results.items() for row in score_table(res, blind[split])]
    return pd.DataFrame(rows).set_index(["split", "task"]).round({"score": 3, "blind": 3, "low": 3, "high": 3})

before_full = {split: evaluate(model, processor, smp) for split, smp in eval_sets.items()}
print("best constant box on test:", blind["test"]["grounding"]["answer"])
scores_frame(before_full)
""")

md(r"""
## 6. The training loop

`helpers.sft.train` wraps one function, `train_step`, in a plain loop: draw `grad_accum` micro-batches,
step, log, save. DDP (when `torchrun` launches it), resume and a time cap wrap the loop; the step is the
lesson. Read it:
""")

code(r"""
from helpers.sft import train, train_step

print(inspect.getsource(train_step))
""")

md(r"""
Three choices in it deserve a sentence each.

- **Accumulation without bias**: each micro-batch's *summed* loss is divided by the whole step's count,
  so `grad_accum` micro-batches give exactly the gradient of one big batch (as transformers does with
  `num_items_in_batch`; averaging per micro-batch would weigh short ones more).
- **What is averaged**: with `average="token"` every labelled token weighs the same, so a ~30-token box
  outweighs a 2-token colour fifteenfold, and the batch's gradient is mostly about box syntax. The course
  recipe uses `average="answer"`: each answer's mean token loss, averaged over answers, so the three
  tasks weigh alike (the ablation in section 7 measures the difference).
- **The schedule** is a pure function of the step: linear warmup, then cosine to 10 %
  (`transformers.get_cosine_with_min_lr_schedule_with_warmup`), which is what makes resuming exact (section 8).

The recipe trains every weight at one learning rate except the tied embedding table, which the course
model keeps fixed because it starts from random weights (the appendix explains and measures why; a
pretrained checkpoint does not need it).
""")

md(r"""
Notebook 11 starts its reinforcement learning from this run **stopped halfway** (the grpo profile's
`start_step`), where the model places a box right only now and then. So the run is made in two calls: the
first stops at that step and saves a checkpoint into the course cache, the second resumes from it and
finishes. Section 8 shows why that is the same run as one call.
""")

code(r"""
from helpers.checkpoints import profile_checkpoint_dir
from helpers.data import ShapesStream
from helpers.grpo import GRPOSettings
from helpers.sft_plots import plot_training

data = ShapesStream("train", R["n_train"], R["seed"], **DATA)  # samples drawn on demand, deterministic
run = dict(steps=R["steps"], batch_size=R["batch_size"], grad_accum=R["grad_accum"], lr=R["lr"], warmup=R["warmup"],
           seed=R["seed"], lr_scales=R["lr_scales"], average=R["average"])
t0 = time.perf_counter()
if R["kind"] == "course model":  # stop at notebook 11's start, save it, resume to the end
    start_step = GRPOSettings.from_profile().start_step
    early_dir = profile_checkpoint_dir(step=start_step)
    train(model, processor, data, stop_at=start_step, checkpoint_dir=early_dir, **run)
    result = train(model, processor, data, resume_from=early_dir, **run)
else:
    result = train(model, processor, data, **run)
train_seconds = time.perf_counter() - t0
loss = result.history["loss"]
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
print(f"{len(loss)} steps in {train_seconds:.0f} s, {trainable:,} trainable parameters; "
      f"loss {loss[0]:.2f} → {sum(loss[-10:]) / 10:.3f} (mean of last 10)")
assert len(loss) == R["steps"] and sum(loss[-10:]) / 10 < loss[0] / 4
plot_training(result.history, title=f"SFT loss, {PROFILE} profile");
""")

md(r"""
## 7. After training: scores beside their baselines
""")

code(r"""
after_full = {split: evaluate(model, processor, smp) for split, smp in eval_sets.items()}
table = scores_frame(after_full)
table.insert(2, "before", [before_full[s][t]["score"] for s, t in table.index])
table
""")

md(r"""
`low`–`high` is the 95 % Wilson interval of an accuracy (none is given for a mean IoU); `p` is the chance
of scoring at least this well by answering blind. The claims this notebook makes about the run above are
these, checked on the test split: counting and colours are read from the image (far above the commonest
answer), and the boxes beat the best constant box question by question.
""")

code(r"""
test = table.loc["test"]
for task in ("count", "attribute", "grounding"):
    print(f"{task:9s} n={test.loc[task, 'n']}: {test.loc[task, 'score']:.3f} vs blind {test.loc[task, 'blind']:.3f}, p = {test.loc[task, 'p']:.1e}")
    assert test.loc[task, "n"] >= 100 and test.loc[task, "p"] < 1e-3 and test.loc[task, "score"] > test.loc[task, "blind"] + 0.2
""")

md(r"""
The OOD colour questions all ask about the two colour–shape pairs that training never showed together.
What does the model answer there, pair by pair?
""")

code(r"""
ood_colour = [s for s in eval_sets["ood"] if s.task == "attribute"]
per_pair = {}
for s, a in zip(ood_colour, after_full["ood"]["attribute"]["predictions"]):
    per_pair.setdefault((s.target, s.question.rsplit(" ", 1)[-1].rstrip("?")), Counter())[a.strip()] += 1
for (truth, shape), answered in per_pair.items():
    print(f"{truth} {shape} (never seen in training): {answered[truth]}/{sum(answered.values())} right; answers {dict(answered.most_common())}")
""")

md(r"""
Read this against the table: if the held-out pairs are answered about as well as the test pairs, colour was
learnt apart from shape; if one pair gets one wrong colour, the model learnt which colours a shape comes in.
An OOD split exists to tell these apart, which in-distribution accuracy alone cannot.
""")

code(r"""
# Predictions drawn over their images: test then ood (boxes: reference green, prediction red dashed)
shown = []
for split in ("test", "ood"):
    answers_by_task = {t: iter(r["predictions"]) for t, r in after_full[split].items()}
    pairs = [(s, next(answers_by_task[s.task])) for s in eval_sets[split]]
    shown += [next(p for p in pairs if p[0].task == t) for t in ("count", "attribute", "grounding")]
plot_predictions(shown, ncols=6, size=1.7);
""")

md(r"""
### One setting changed at a time

`python scripts/sft_ablation.py --out assets/results/sft_cpu` trains this cpu run again with one setting
changed and scores each variant on the same 300 test and 300 OOD questions (seed 0). It takes long on
2 cores (its wall time is printed), so it is read here rather than rerun. Each variant's scores stand
beside the image-blind baselines (dotted lines in the picture); three seeds of the profile show the spread.
""")

code(r"""
import json
from pathlib import Path
from IPython.display import Image, display

ablation_file = Path("..") / "assets" / "results" / "sft_cpu" / "ablation.json"
ablation = json.loads(ablation_file.read_text())
print({k: ablation["meta"][k] for k in ("command", "date", "machine", "wall_seconds", "n_eval")})
frame = pd.DataFrame([{"variant": r["variant"], "change": r["change"], "final loss": r["final_loss"],
                       **{f"{split} {t}": v["score"] for split in ("test", "ood") for t, v in r[split].items()}}
                      for r in ablation["results"]]).set_index("variant")
print("image-blind on test:", {t: v["blind"] for t, v in ablation["results"][0]["test"].items()})
display(frame)
display(Image(filename=str(ablation_file.with_suffix(".png")), width=900))
""")

code(r"""
# The claims of the next paragraph, checked on the committed file
by_variant = {r["variant"]: r for r in ablation["results"]}
seeds = [by_variant[v] for v in ("profile", "profile, seed 1", "profile, seed 2")]
boxes = [r["test"]["grounding"]["score"] for r in seeds]
print(f"profile seeds, test IoU: {boxes} (spread {max(boxes) - min(boxes):.2f}); constant box {seeds[0]['test']['grounding']['blind']:.2f}")
for r in seeds:
    assert r["test"]["count"]["score"] >= 0.9 and r["test"]["attribute"]["score"] >= 0.9 and r["test"]["grounding"]["p"] < 1e-3
norm1 = by_variant["norm weight 1"]
assert norm1["final_loss"] > 5 and norm1["test"]["attribute"]["score"] >= 0.9      # right argmax, flat probabilities
big = by_variant["table std 0.25, norm 1"]["test"]
assert big["count"]["score"] < 0.8 and big["attribute"]["score"] < 0.8 and big["grounding"]["score"] < big["grounding"]["blind"]
trainable = by_variant["table trainable"]
assert trainable["test"]["grounding"]["score"] < min(boxes) - 0.2 and trainable["train_seconds"] > seeds[0]["train_seconds"]
assert by_variant["per-token average"]["test"]["grounding"]["score"] < min(boxes)
cue = by_variant["no position cue"]["test"]
assert cue["grounding"]["score"] < cue["grounding"]["blind"] and cue["count"]["score"] >= 0.9 and cue["attribute"]["score"] >= 0.9
""")

ABLATION_PROSE = "ABLATION_PROSE"
md(ABLATION_PROSE)

md(r"""
## 8. Checkpoints: safetensors, and resuming on the same curve

`save_checkpoint` (`helpers.checkpoints`) writes `save_pretrained` of the model and processor (weights as
`model.safetensors`), the AdamW moments as `optimizer.safetensors` and the step, history and run signature
as JSON, into a temporary folder renamed into place only when complete, so an interrupted save never leaves
a half-written checkpoint. `helpers.qwen.load_model(dir)` loads it like any checkpoint. The run is also
saved in the course cache (`profile_checkpoint_dir()`, named after the profile's settings), where
notebook 11 looks for its start. Because the data order and the learning rate are pure functions of the
step, a run split in two and resumed gives the same losses as one run; `resume` refuses a checkpoint
whose batch, schedule or trainable parameters differ from the run asking for it.
""")

code(r"""
import tempfile
from helpers.checkpoints import save_checkpoint
from helpers.qwen import load_model

folder = tempfile.mkdtemp(prefix="sft_")
save_checkpoint(folder, model, processor, {"step": len(loss), "history": result.history}, result.optimizer)
print(sorted(os.listdir(folder)))
with torch.no_grad():
    assert labelled_loss(load_model(folder), batch) == labelled_loss(model, batch)
if R["kind"] == "course model":  # notebook 11 starts from this run
    save_checkpoint(profile_checkpoint_dir(), model, processor, {"step": len(loss), "history": result.history})
""")

code(r"""
small = make_split("train", 16, 3, **DATA)
kw = dict(steps=4, batch_size=4, lr=R["lr"], warmup=1, progress=False, average=R["average"])
straight = train(model_for_profile()[0], processor, small, **kw).history["loss"]
train(model_for_profile()[0], processor, small, checkpoint_dir=folder + "/half", stop_at=2, **kw)
resumed = train(model_for_profile()[0], processor, small, resume_from=folder + "/half", **kw).history["loss"]
print("one run ", [round(x, 5) for x in straight]); print("resumed ", [round(x, 5) for x in resumed])
assert max(abs(a - b) for a, b in zip(straight, resumed)) < 1e-5
try:
    train(model_for_profile()[0], processor, small, resume_from=folder + "/half", **{**kw, "batch_size": 2})
except ValueError as error:
    print("a different batch size is refused:", str(error)[:120])
""")

md(r"""
## 9. The TRL route

TRL's `SFTTrainer` trains the same model with the same collator (so the same labels and the same
`mm_token_type_ids`) and the same optimiser groups and schedule (`make_optimizer` handed to the Trainer,
the schedule over the profile's steps); only the loop is TRL's. TRL averages the loss over tokens, so the
comparison runs both loops that way. The first 12 steps from a fresh model, beside ours (the data order
differs), and the time per step of each. TRL 1.16's fused LM head (`trl.trainer.utils.add_fused_lm_head`)
scores only the labelled positions on devices with Triton (GPUs); elsewhere, as on this CPU, it scores
every position in chunks, where ours multiplies only the labelled ones.
""")

code(r"""
n = 12
pool = [data[i] for i in range(n * R["batch_size"])]
trl_run = trl_trainer(model_for_profile()[0], processor, pool, steps=R["steps"], stop_at=n, batch_size=R["batch_size"],
                      lr=R["lr"], lr_scales=R["lr_scales"], warmup=R["warmup"], output_dir=os.path.join("..", ".cache", "trl_sft"))
trl_run.train()
trl_loss = [e["loss"] for e in trl_run.state.log_history if "loss" in e]
trl_step = next(e["train_runtime"] for e in trl_run.state.log_history if "train_runtime" in e) / n
ours_run = train(model_for_profile()[0], processor, pool, steps=R["steps"], stop_at=n, batch_size=R["batch_size"],
                 lr=R["lr"], warmup=R["warmup"], seed=R["seed"], progress=False, average="token")
ours_loss = ours_run.history["loss"]
print("TRL  ", [round(x, 2) for x in trl_loss[::3]]); print("ours ", [round(x, 2) for x in ours_loss[::3]])
gap = abs(sum(trl_loss[-4:]) - sum(ours_loss[-4:])) / 4
print(f"steps {n - 3}–{n}: mean loss TRL {sum(trl_loss[-4:]) / 4:.3f}, ours {sum(ours_loss[-4:]) / 4:.3f}")
print(f"seconds per step: TRL {trl_step:.2f}, ours {ours_run.history['seconds'][-1] / n:.2f}")
assert len(trl_loss) == n and trl_loss[-1] < trl_loss[0] - 0.2 and gap < 0.3 * max(trl_loss[-1], ours_loss[-1]) + 0.1
""")

md(r"""
## 10. LoRA or full fine-tuning, and the recipe for a real checkpoint

Full fine-tuning updates every weight. LoRA adds two small matrices (rank *r*) beside chosen linear
layers and trains only those. The usual recipe for a VLM: LoRA on the language model, vision tower
frozen (it already sees well; on a small dataset it over-fits and costs memory), and a decision about the
**merger**, the 2-layer MLP that maps vision features into the LM's space. Count the trainable parameters
by module, for the course model and for the real 3B configuration (built on the meta device: no memory):
""")

code(r"""
from transformers import Qwen2_5_VLForConditionalGeneration
from helpers.lora import apply_lora, freeze_vision, trainable_by_module
from helpers.qwen import qwen25vl_3b_config

def by_module(build):
    rows = {}
    for name, make in (("full FT", lambda m: m), ("frozen vision, merger trained", lambda m: freeze_vision(m, True)),
                       ("LoRA r=16 on LM", lambda m: apply_lora(m, r=16))):
        rows[name] = {g: t for g, (t, _) in trainable_by_module(make(build())).items()}
    rows["total"] = {g: n for g, (_, n) in trainable_by_module(build()).items()}
    return pd.DataFrame(rows).fillna(0).astype(int)

def build_3b():
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(qwen25vl_3b_config())

def build_course():  # every weight trainable (the course recipe's frozen table put back) for the full-FT column
    return model_for_profile()[0].requires_grad_(True)

course, big = by_module(build_course), by_module(build_3b)
big
""")

code(r"""
print(course)
lora_3b = big["LoRA r=16 on LM"].sum()
d, mlp, kv, layers = 2048, 11008, 256, 36  # 3B: hidden, MLP, KV width (2 heads × 128), layers
assert lora_3b == layers * 16 * (2 * (d + d) + 2 * (d + kv) + 2 * (d + mlp) + (mlp + d))
print(f"3B: full FT trains {big['full FT'].sum() / 1e9:.3f} B parameters, LoRA r=16 {lora_3b / 1e6:.1f} M "
      f"({lora_3b / big['full FT'].sum():.2%})")
assert big["total"].sum() == 3_754_622_976  # 3.754 B with the real config, as notebook 09 counts
""")

md(r"""
With `QWENVL_MODEL` set (or `recipe(model=path)`), `helpers.recipes.recipe` switches to the
**checkpoint recipe** of the profile: what a practitioner uses on a pretrained Qwen2.5-VL. LoRA r = 16,
α = 32 on the language model's attention and MLP projections at 2e-4 with the merger trained in full beside
it, or a full fine-tune at 1e-5 with the vision tower frozen and the merger trained (the embedding table
trains too). Nothing is re-initialised, nothing is frozen for from-scratch reasons, and no module gets its
own learning-rate factor. To show exactly what would be in force, save the course
model as if it were a downloaded checkpoint and ask the recipe for it:
""")

code(r"""
as_real = tempfile.mkdtemp(prefix="as_real_ckpt_")
model.save_pretrained(as_real); processor.save_pretrained(as_real)
ckpt = recipe(model=as_real)
print({k: ckpt[k] for k in ("kind", "method", "lr", "lora_r", "lora_alpha", "freeze_vision", "train_merger",
                            "freeze_embeddings", "lr_scales", "logit_scale_init", "steps", "batch_size", "grad_accum", "warmup")})
assert (ckpt["kind"], ckpt["lr_scales"], ckpt["freeze_embeddings"], ckpt["logit_scale_init"]) == ("checkpoint", None, False, None)
assert (ckpt["method"], ckpt["lr"]) in (("lora", 2e-4), ("full", 1e-5))
ft, _ = model_for_profile(model=as_real)
groups = trainable_by_module(ft)
print({g: t for g, (t, n) in groups.items()})
assert groups["vision: blocks"][0] == groups["vision: patch embed"][0] == 0
assert (groups["vision: merger"][0] > 0) == ckpt["train_merger"]
""")

md(r"""
Memory is where the choice matters: full fine-tuning of the 3B with AdamW keeps weights, gradients and two
moments for 3.75 B parameters; LoRA keeps them for its ~30 M adapter numbers (plus the merger's 37 M when it trains) and only the frozen
weights for the rest (counts above).

## 11. GPU results (`scripts/gpu_sft.sh`)

**Lead-engineer cell.** The `gpu` profile (a larger course model, 112-px images with distractors, bf16
autocast) and the 3B measurements run on one H100/H200 with
`bash scripts/gpu_sft.sh assets/results/sft <checkpoint dir>`. The run committed under
`assets/results/sft/` was made with an **earlier configuration** (the old shapes task, without
`mm_token_type_ids`, and the old from-scratch recipe), so this cell shows only which settings changed
since and no score of that run; its files stay for the record.
""")

code(r"""
from helpers.profiles import changed_settings, settings

results = Path("..") / "assets" / "results" / "sft"
if (results / "metrics.json").is_file():
    gpu = json.loads((results / "metrics.json").read_text())
    changed = changed_settings(gpu["sft"]["profile"], settings("sft", "gpu"))
    print(f"committed GPU run: {gpu['device']}, {gpu['date']}")
    print("gpu profile settings changed since (then → now):", changed or "none")
    if changed:
        print("→ an earlier configuration: its scores are not shown; rerun scripts/gpu_sft.sh to measure today's settings")
    else:
        print("SFT after:", gpu["sft"]["after"])
else:
    print("no GPU results yet: run scripts/gpu_sft.sh on a GPU machine (see its header)")
""")

md(r"""
## Common traps

### Trap #18 · SFT without `mm_token_type_ids`: the model silently loses M-RoPE
A hand-written collator that keeps `input_ids`, `attention_mask`, `pixel_values`, `image_grid_thw` and
`labels` trains without error. Capture the positions the language model receives, with and without the key:
""")

code(r"""
def positions_seen(inputs):
    # the (t, h, w) position ids of row 0 as the language model's rotary embedding receives them
    seen = []
    hook = unwrap(model).model.language_model.rotary_emb.register_forward_pre_hook(
        lambda module, args: seen.append(args[1][-3:, 0].clone()))  # args = (hidden_states, position_ids)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    return seen[0]

image = batch["input_ids"][0] == IMAGE_PAD
with_key = positions_seen(batch)
without = positions_seen({k: v for k, v in batch.items() if k != "mm_token_type_ids"})
print("image tokens (t, h, w) with mm_token_type_ids:   ", with_key[:, image].T.tolist())
print("image tokens (t, h, w) without mm_token_type_ids:", without[:, image].T.tolist())
assert not torch.equal(with_key, without) and (without[0] == without[1]).all() and (without[1] == without[2]).all()
""")

md(r"""
Without the key every token gets the same index on all three axes, a plain 1-D position: the image
loses its rows and columns, and a checkpoint trained one way is scored another (an earlier version of
this course trained SFT without it and evaluated GRPO with it). The fix: pass every processor output
through, and test the key set against the processor's (section 3).

### Trap #6 · "Image features and image tokens do not match"
Truncating a batch to a `max_length` that cuts into the run of `<|image_pad|>` tokens leaves fewer pads
than the image has features (`grid_t·grid_h·grid_w / 4`), while `pixel_values` keeps every patch.
Reproduced on the model itself, then the fix:
""")

code(r"""
from helpers.sft import check_batch, encode_samples, pad_batch

first_pad = int((batch["input_ids"][0] == IMAGE_PAD).nonzero()[0])
items = encode_samples(processor, batch_samples[:2], max_length=first_pad + 2)  # cut after 2 image pads
cut = pad_batch(items)
pads, features = int((cut["input_ids"][0] == IMAGE_PAD).sum()), int(cut["image_grid_thw"][0].prod()) // 4
print(f"row 0: {pads} <|image_pad|> tokens left for {features} image features")
try:
    model(**cut)
except ValueError as error:
    print("transformers:", str(error)[:110])
try:
    check_batch(cut)
except ValueError as error:
    print("our collator:", str(error)[:150])
assert pads < features
""")

md(r"""
The fix: choose `max_length` from the data (at least the longest sample), or drop the samples that do
not fit; never cut inside an image. Our collator checks every batch and names the row.

### Trap #14 · With LoRA, is the merger trained? Is the vision tower frozen?
It depends on how the target modules are named. A bare list of names also matches the vision blocks,
whose MLPs are also called `gate_proj`/`up_proj`/`down_proj`; the merger (`visual.merger.mlp.0/2`) is
matched by no attention/MLP name, so it stays frozen unless you ask (`modules_to_save`):
""")

code(r"""
names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
naive = trainable_by_module(apply_lora(build_3b(), r=16, target_modules=names))
anchored = trainable_by_module(apply_lora(build_3b(), r=16))
with_merger = trainable_by_module(apply_lora(build_3b(), r=16, train_merger=True))
print(f"bare names: vision blocks get {naive['vision: blocks'][0] / 1e6:.1f} M LoRA parameters")
print(f"anchored regex: vision blocks {anchored['vision: blocks'][0]}, merger {anchored['vision: merger'][0]}")
print(f"modules_to_save=['merger']: a trainable copy of the merger, {with_merger['vision: merger'][0]:,} parameters")
assert naive["vision: blocks"][0] > 0 and anchored["vision: blocks"][0] == anchored["vision: merger"][0] == 0
""")

md(r"""
The fix: list trainable parameters **by module** after building the PEFT model (as above) and anchor the
target names to `language_model`. Whether to train the merger is a choice: it is small and adapts the
vision features to a new task; freeze it when the data are few.

### Trap #15 · What must SFT labels mask?
Padding, vision tokens, and the system and user turns; the answer's closing `<|im_end|>` is kept (or
the model never learns to stop). TRL's collator on a `messages` dataset trains on **every** token by
default; on a prompt/completion dataset it labels only the completion:
""")

code(r"""
rows = [{"images": [s.image], "messages": sample_messages(s)} for s in batch_samples]
for row in rows:  # TRL wants bare {"type": "image"} parts plus the images column
    row["messages"][0]["content"][0] = {"type": "image"}
default = DataCollatorForVisionLanguageModeling(processor=processor)(rows)
labelled_default = int((default["labels"] != IGNORE_INDEX).sum())
vision_default = int(((default["labels"] == IMAGE_PAD)).sum())
print(f"TRL default on messages: {labelled_default} labelled tokens, {vision_default} of them <|image_pad|>")
print(f"TRL on prompt/completion: {int((from_trl['labels'] != IGNORE_INDEX).sum())}; ours (answer + <|im_end|>): {int((batch['labels'] != IGNORE_INDEX).sum())}")
assert labelled_default == int(default["attention_mask"].sum()) and vision_default > 0  # every real token, vision too
""")

md(r"""
The fix: use a prompt/completion dataset (TRL then labels the completion: the answer, `<|im_end|>` and the
newline after it), set `assistant_only_loss=True` with a template that marks the assistant turn, or build
the labels yourself as `SFTCollator` does. Check them on a real batch (section 3).

## Appendix · What only training from scratch needs

**Nothing in this appendix applies to a pretrained checkpoint**: the checkpoint recipe (section 10) trains
the embedding table and re-initialises nothing. The course model starts from random weights, and two of its
settings exist only because of that.

### A. The final norm starts at 8
A logit is `h·e`, with `h` the final RMSNorm's output (norm √d times the norm's weight) and `e` a row of the
tied embedding table (std 0.02, transformers' `initializer_range`). With the norm's weight at transformers'
1, the largest logit the head can produce is far below what a confident answer over 151,936 tokens needs:
""")

code(r"""
from helpers.qwen import LOGIT_SCALE_INIT

table = unwrap(model).get_input_embeddings().weight  # = the LM head's weight (tied), frozen in this recipe
d, V = table.shape[1], table.shape[0]
row = float(table.norm(dim=-1).mean())
print(f"√d × |row| = {math.sqrt(d):.1f} × {row:.3f} = {math.sqrt(d) * row:.2f}: the largest logit with the norm weight at 1")
print(f"ln V = {math.log(V):.2f}: the loss of a uniform guess, the margin a sure answer needs to overcome")
print(f"× {LOGIT_SCALE_INIT:g} (helpers.qwen.init_logit_scale) = {math.sqrt(d) * row * LOGIT_SCALE_INIT:.1f}; "
      f"after training the norm's mean |w| is {float(unwrap(model).model.language_model.norm.weight.abs().mean()):.2f}")
""")

md(r"""
At the learning rate of every other weight, the norm's 128 weights would need thousands of steps to grow
that far; an earlier version of this course gave them 100× the learning rate instead. Starting them at 8
is an initialisation, not a training rule, so the loop trains everything at one rate. The ablation's
"norm weight 1" row is what happens otherwise, and "table std 0.25, norm 1" tries the other way to
make room (a larger table): the token vectors then dwarf what the layers add to the residual stream.

### B. The embedding table stays fixed
19.4 M of the course model's 20 M parameters are the token embedding, which Qwen2.5-VL ties to the LM head.
Leave it trainable and AdamW moves **every one** of its 151,936 rows at every step, although a batch uses a
few dozen tokens: the softmax gives each unused row a tiny gradient (lower your logit), and Adam divides each
gradient by its own running size, so a tiny gradient still takes a step of about `lr`. Fifteen steps with
the table trainable, measured:
""")

code(r"""
from helpers.sft import batch_indices

probe = model_for_profile()[0]
probe_table = unwrap(probe).get_input_embeddings().weight
probe_table.requires_grad_(True)
start = probe_table.detach().clone()
drift_steps = 15
train(probe, processor, data, steps=drift_steps, batch_size=R["batch_size"], lr=R["lr"], warmup=5, seed=R["seed"],
      progress=False, average=R["average"])
used = torch.zeros(len(probe_table), dtype=torch.bool)  # every token id that entered those batches
for step in range(drift_steps):
    ids = SFTCollator(processor)([data[i] for i in batch_indices(len(data), R["batch_size"], step, R["seed"])])["input_ids"]
    used[ids.unique()] = True
shift = probe_table.detach() - start
moved = shift.norm(dim=-1)
same_way = torch.nn.functional.cosine_similarity(shift[~used], shift[~used].mean(0, keepdim=True), dim=-1)
print(f"rows moved: {int((moved > 0).sum()):,} of {len(probe_table):,}; rows the batches used: {int(used.sum())}")
print(f"mean |Δ row|: used {moved[used].mean():.3f}, unused {moved[~used].mean():.3f}; a row's norm at start {start.norm(dim=-1).mean():.3f}")
print(f"cosine of each unused row's step with their mean step: {same_way.mean():.4f}")
assert (moved > 0).all() and moved[~used].mean() > moved[used].mean() / 2  # unused rows move as far as used ones
assert same_way.mean() > 0.9  # and nearly all the same way
""")

md(r"""
Every row moved, the 151,936 − (a few dozen) unused ones about as far as the used ones, and nearly all in one
direction. One shared vector `c` added to every row cancels in the LM head's softmax (every logit gains `h·c`), but at
the input it is added to every token: the part that tells the prompt's tokens apart shrinks against it, and
it grows by up to `lr·√d` per step for as long as training lasts. A pretrained checkpoint fine-tuned at
~1e-5 moves its rows about 100× less per step, and from rows that already mean something; from random
weights at 1e-3 the drift dominates. So the course recipe keeps the table fixed (`freeze_embeddings`):
AdamW then updates under 1 M numbers instead of 20 M (printed with the training run), and a step is
cheaper. The ablation's "table trainable" row measures what training it costs here.

## Summary

- The shapes task puts one shape in each merged-token cell, balances the three tasks, tints the background
  by position, and keeps the answer vocabulary in its OOD split (section 1).
- The collator labels each answer and its `<|im_end|>` only and keeps every processor output, so the model
  trains with the 3-D M-RoPE positions of notebook 08 (section 3, trap #18); our loss applies the LM head at
  the labelled positions only and equals transformers' and TRL's loss (section 4).
- One evaluator, shared with GRPO, puts every score beside its image-blind baseline with n, an interval and a
  p-value (sections 5 and 7); the ablation shows which settings matter, with three seeds for the spread.
- Checkpoints are safetensors written atomically and resume on the same loss curve (section 8); TRL's
  `SFTTrainer` trains the same model (section 9); on a real checkpoint the recipe is LoRA at 2e-4 or a full
  fine-tune at 1e-5 with the vision tower frozen (section 10).

**What we simplified:** a small model trained from scratch instead of fine-tuning a pretrained one (the code
path is the same: set `QWENVL_MODEL`); one image per sample and one turn per conversation; no packing; in the
cpu profile, 2×2-cell images, a positional tint and a short run.

Next: [11 · GRPO](11_grpo.ipynb) starts from the SFT checkpoint and trains with verifiable rewards.
""")

import sys

prose = open(sys.argv[2]).read() if len(sys.argv) > 2 else "(ablation findings: to be written from assets/results/sft_cpu/ablation.json)"
for c in cells:
    if c.source == ABLATION_PROSE:
        c.source = prose.strip("\n")
nb = nbf.v4.new_notebook(cells=cells, metadata={
    "kernelspec": {"display_name": "Python 3 (Qwen2.5-VL course)", "language": "python", "name": "qwenvl-course"},
    "language_info": {"name": "python"}})
nbf.write(nb, sys.argv[1])

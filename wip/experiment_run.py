import argparse, json, time, torch
p = argparse.ArgumentParser()
p.add_argument("--size", type=int, default=56); p.add_argument("--std", type=float, default=0.25)
p.add_argument("--train_table", action="store_true"); p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--steps", type=int, default=300); p.add_argument("--bs", type=int, default=16)
p.add_argument("--average", default="answer"); p.add_argument("--norm_scale", type=float, default=0)
p.add_argument("--tasks", default="count,attribute,grounding"); p.add_argument("--distractors", type=int, default=0)
p.add_argument("--cue", type=float, default=1.0); p.add_argument("--n_eval", type=int, default=60)
p.add_argument("--seed", type=int, default=0); p.add_argument("--warmup", type=int, default=30)
p.add_argument("--norm_init", type=float, default=0)
p.add_argument("--cue_levels", type=float, default=0)
p.add_argument("--cell_tint", action="store_true")
p.add_argument("--out", required=True)
a = p.parse_args()
torch.set_num_threads(1)
from helpers.qwen import load_model, load_processor, course_config
from helpers.data import ShapesStream, make_split
import helpers.data as HD, numpy as np
if a.cue_levels: HD.CUE_LEVELS = a.cue_levels
if a.cell_tint:
    def _bg(size, cue):
        k = size // 28; steps = np.repeat(np.arange(k) / max(1, k - 1), 28) * HD.CUE_LEVELS * cue
        im = np.empty((size, size, 3)); im[..., 0] = HD.BACKGROUND[0] - steps[None, :]; im[..., 1] = HD.BACKGROUND[1]; im[..., 2] = HD.BACKGROUND[2] - steps[:, None]
        return np.rint(im).astype(np.uint8)
    HD._background = _bg
from helpers.sft import train
from helpers.evaluation import evaluate, blind_baselines, summary
data = dict(image_size=a.size, max_distractors=a.distractors, tasks=tuple(a.tasks.split(",")), position_cue=a.cue)
proc = load_processor(min_pixels=28*28, max_pixels=a.size*a.size)
m = load_model(config=course_config(), seed=a.seed)
if a.std > 0:
    with torch.no_grad(): m.get_input_embeddings().weight.normal_(0, a.std, generator=torch.Generator().manual_seed(a.seed))
if a.norm_init:
    with torch.no_grad(): m.model.language_model.norm.weight.fill_(a.norm_init)
if not a.train_table: m.get_input_embeddings().weight.requires_grad_(False)
scales = {"model.language_model.norm": a.norm_scale} if a.norm_scale else None
t0 = time.time()
r = train(m, proc, ShapesStream("train", 4096, a.seed, **data), steps=a.steps, batch_size=a.bs, lr=a.lr, warmup=a.warmup,
          lr_scales=scales, progress=False, average=a.average, seed=a.seed)
sec = time.time() - t0
res = {"args": vars(a), "train_seconds": sec, "loss_last": sum(r.history["loss"][-20:]) / 20}
for split in ("test", "ood"):
    smp = make_split(split, a.n_eval, 0, **data)
    ev = evaluate(r.model, proc, smp)
    res[split] = {"score": {t: v["score"] for t, v in ev.items()}, "n": {t: v["n"] for t, v in ev.items()},
                  "format": {t: v["format"] for t, v in ev.items()}, "blind": {t: v["score"] for t, v in blind_baselines(smp).items()}, "pred_g": list(zip([s_.answer for s_ in smp if s_.task=="grounding"], ev["grounding"]["predictions"]))[:12]}
json.dump(res, open(a.out, "w"), indent=1, default=str)
print(json.dumps({k: res[k] for k in ("train_seconds", "loss_last")}), json.dumps(res["test"]["score"]), json.dumps(res["ood"]["score"]))

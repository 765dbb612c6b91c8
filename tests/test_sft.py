"""helpers.sft (with helpers.optim, helpers.checkpoints, helpers.lora, helpers.recipes): the collator's
keys and labels, M-RoPE positions during training, our loss against transformers and TRL, resuming
and what it refuses, LoRA and freezing counts, the checkpoint recipe, bad inputs, and the command
line under torchrun (2 CPU processes)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
from support import run_two_processes, tiny_model
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from helpers import checkpoints, lora, optim, profiles, recipes, sft
from helpers.chat import IGNORE_INDEX, assistant_loss_mask, labels_from_mask
from helpers.data import make_split
from helpers.qwen import SPECIAL_TOKENS, course_config, parameter_count, qwen25vl_3b_config

transformers.logging.set_verbosity_error()
ROOT = Path(__file__).resolve().parents[1]
DATA = {"image_size": 84}


@pytest.fixture(scope="module")
def processor():
    from helpers.qwen import load_processor

    return load_processor(min_pixels=784, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def samples():
    return make_split("train", 24, seed=1, **DATA)


# --- the collator ----------------------------------------------------------------------------


def test_labels_are_the_answer_and_im_end_only(processor, samples):
    batch = sft.SFTCollator(processor)(samples[:9])
    for row, sample in enumerate(samples[:9]):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        assert processor.decode(labelled) == sample.answer + "<|im_end|>"
    pads = batch["attention_mask"] == 0
    vision = batch["input_ids"] == SPECIAL_TOKENS["<|image_pad|>"]
    assert pads.any() and vision.any()
    assert (batch["labels"][pads | vision] == IGNORE_INDEX).all()


def test_collator_matches_trl_prompt_completion_collator(processor, samples):
    """TRL's own VLM collator (prompt/completion) labels the same tokens, plus the newline after <|im_end|>."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    trl = DataCollatorForVisionLanguageModeling(processor=processor, completion_only_loss=True)
    for lo in (0, 5, 12):
        chunk = samples[lo : lo + 5]
        rows = [
            {
                "images": [s.image],
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
                "completion": [{"role": "assistant", "content": [{"type": "text", "text": s.answer}]}],
            }
            for s in chunk
        ]
        theirs = trl(rows)
        ours = sft.SFTCollator(processor)(chunk)
        torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"])
        for row in range(len(chunk)):
            keep = ours["attention_mask"][row].bool()
            their_keep = theirs["attention_mask"][row].bool()
            assert ours["input_ids"][row][keep].tolist() == theirs["input_ids"][row][their_keep].tolist()
            a = ours["labels"][row][keep]
            b = theirs["labels"][row][their_keep].clone()
            newline = (b != IGNORE_INDEX).nonzero()[-1]  # TRL also trains the "\n" after <|im_end|>
            assert int(theirs["input_ids"][row][their_keep][newline]) == 198
            b[newline] = IGNORE_INDEX
            assert torch.equal(a, b)


# --- the loss: ours == transformers == TRL -----------------------------------------------------


@pytest.mark.parametrize("seed, size", [(0, 2), (1, 5), (2, 8)])
def test_loss_equals_transformers_and_trl(processor, samples, seed, size, tmp_path):
    model = tiny_model(seed)
    with torch.no_grad():  # move off the random init so that the losses are not all ≈ log V
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    trainer = sft.trl_trainer(model, processor, samples, steps=1, batch_size=2, output_dir=str(tmp_path))
    model.train()
    batch = sft.SFTCollator(processor)(samples[seed : seed + size])
    with torch.no_grad():
        ours = sft.labelled_loss(model, batch)
        theirs = model(**batch).loss
        trls = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, trls, atol=1e-5, rtol=0)
    # and the gradients agree too
    grads = []
    for fn in (sft.labelled_loss, sft.full_logits_loss):
        model.zero_grad()
        fn(model, batch).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_schedule_matches_transformers():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for warmup, total in ((0, 10), (3, 20), (10, 50)):
        ref = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=0.1).lr_lambdas[0]
        for step in range(total):
            assert optim.lr_factor(step, total, warmup) == pytest.approx(ref(step), abs=1e-12)


def test_lr_scales_make_groups_that_the_schedule_keeps(processor, samples):
    model = tiny_model()
    optimizer = optim.make_optimizer(model, 1e-3, lr_scales={"model.language_model.norm": 100})
    scaled = [g for g in optimizer.param_groups if g["lr_scale"] == 100]
    assert len(scaled) == 1 and scaled[0]["params"] == [model.model.language_model.norm.weight]
    assert scaled[0]["lr"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="names no parameter"):
        optim.make_optimizer(model, 1e-3, lr_scales={"model.no_such_module": 2})
    for bad in (-1, float("nan"), "10", True):
        with pytest.raises(ValueError, match="finite number"):
            optim.make_optimizer(model, 1e-3, lr_scales={"model.language_model.norm": bad})
    result = sft.train(
        model,
        processor,
        samples,
        steps=3,
        batch_size=4,
        lr=1e-3,
        warmup=1,
        progress=False,
        lr_scales={"model.language_model.norm": 100},
    )
    lrs = {g["lr_scale"]: g["lr"] for g in result.optimizer.param_groups}
    assert lrs[100] == pytest.approx(100 * lrs[1.0]) and lrs[1.0] == pytest.approx(1e-3 * optim.lr_factor(2, 3, 1))


def test_frozen_table_stays_put_and_a_trainable_one_drifts(processor, samples):
    """The cpu profile's reason for freezing the tied table: AdamW moves every row, used or not."""
    frozen, trainable = tiny_model(), tiny_model()
    frozen.get_input_embeddings().weight.requires_grad_(False)
    before = trainable.get_input_embeddings().weight.detach().clone()
    for model in (frozen, trainable):
        sft.train(model, processor, samples, steps=2, batch_size=4, lr=1e-3, warmup=0, progress=False)
    assert torch.equal(frozen.get_input_embeddings().weight, before)  # same seed, same start
    moved = (trainable.get_input_embeddings().weight.detach() - before).norm(dim=-1)
    assert (moved > 0).float().mean() > 0.99  # far more rows than the ~60 token ids the batches hold


def test_trl_trainer_uses_our_groups_and_stops_early(processor, samples, tmp_path):
    model = tiny_model()
    trainer = sft.trl_trainer(
        model,
        processor,
        samples,
        steps=10,
        stop_at=2,
        batch_size=4,
        lr=1e-3,
        warmup=1,
        lr_scales={"model.language_model.norm": 10},
        output_dir=str(tmp_path),
    )
    trainer.train()
    assert trainer.state.global_step == 2
    lrs = sorted(g["lr"] for g in trainer.optimizer.param_groups)
    assert lrs[-1] == pytest.approx(10 * lrs[0])


def test_profile_checkpoint_dir_follows_the_settings(monkeypatch):
    from helpers import profiles

    first = checkpoints.profile_checkpoint_dir("cpu")
    assert first == checkpoints.profile_checkpoint_dir("cpu") and first.name.startswith("sft-cpu-")
    current = profiles.settings("sft", "cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        current.data.image_size = 999  # frozen: nobody edits the profile (or its folder name) in place
    monkeypatch.setitem(profiles.PROFILES["cpu"], "sft", dataclasses.replace(current, steps=7))
    assert checkpoints.profile_checkpoint_dir("cpu") != first
    same_values = dataclasses.replace(current, data=profiles.DataOptions(**current.data))  # equal values, new objects
    monkeypatch.setitem(profiles.PROFILES["cpu"], "sft", same_values)
    assert checkpoints.profile_checkpoint_dir("cpu") == first


def test_the_early_sft_start_has_its_own_folder_and_is_trained_when_missing(monkeypatch, tmp_path, capsys):
    """GRPO's start: the profile's SFT run stopped at start_step, in a folder of its own; when it is
    missing, sft_checkpoint says so and trains exactly that many steps."""
    from helpers import profiles

    assert (
        checkpoints.profile_checkpoint_dir("cpu", step=150).name
        == checkpoints.profile_checkpoint_dir("cpu").name + "-step150"
    )
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="step="):
            checkpoints.profile_checkpoint_dir("cpu", step=bad)
    monkeypatch.setenv("QWENVL_CACHE", str(tmp_path))
    monkeypatch.setitem(profiles.PROFILES["cpu"]["grpo"], "start_step", 2)
    monkeypatch.setitem(
        profiles.PROFILES["cpu"], "sft", dataclasses.replace(profiles.settings("sft", "cpu"), batch_size=2)
    )
    path = checkpoints.sft_checkpoint("cpu", progress=False)
    assert "training it now" in capsys.readouterr().out and checkpoints.is_complete(path)
    assert json.loads((path / checkpoints.STATE_FILE).read_text())["step"] == 2
    assert checkpoints.sft_checkpoint("cpu", progress=False) == path and "training" not in capsys.readouterr().out


# --- training, checkpoints, resume --------------------------------------------------------------


def test_resume_continues_the_same_loss_curve(processor, samples, tmp_path):
    kwargs = dict(steps=6, batch_size=3, grad_accum=2, lr=3e-3, warmup=2, progress=False)
    straight = sft.train(tiny_model(), processor, samples, **kwargs).history["loss"]
    first = sft.train(tiny_model(), processor, samples, checkpoint_dir=tmp_path, stop_at=3, **kwargs)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "optimizer.safetensors").is_file()
    resumed = sft.train(tiny_model(seed=7), processor, samples, resume_from=tmp_path, **kwargs)
    assert resumed.history["step"] == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(torch.tensor(resumed.history["loss"]), torch.tensor(straight), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(first.history["loss"]), torch.tensor(straight[:3]), atol=0, rtol=0)
    assert straight[-1] < straight[0]


def test_checkpoint_loads_with_the_course_loaders(processor, samples, tmp_path):
    from helpers.qwen import load_model, load_processor

    model = tiny_model()
    checkpoints.save_checkpoint(tmp_path, model, processor, {"step": 0})
    batch = sft.SFTCollator(processor)(samples[:3])
    again = load_model(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(sft.labelled_loss(again, batch), sft.labelled_loss(model, batch), atol=0, rtol=0)
    assert load_processor(tmp_path).tokenizer.convert_tokens_to_ids("<|im_end|>") == SPECIAL_TOKENS["<|im_end|>"]
    m, p, state = checkpoints.load_checkpoint(tmp_path, expect_config=model.config)
    assert state["step"] == 0


# --- freezing and LoRA (trap #14) ----------------------------------------------------------------


def test_lora_trains_only_the_language_model():
    model = lora.apply_lora(tiny_model(), r=4)
    groups = lora.trainable_by_module(model)
    assert groups["vision: blocks"][0] == groups["vision: merger"][0] == groups["vision: patch embed"][0] == 0
    assert groups["LM: embeddings (= tied head)"][0] == 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = model.config.get_text_config()
    d, mlp, kv = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads,
    )
    per_layer = 4 * ((d + d) + (d + kv) * 2 + (d + d)) + 4 * ((d + mlp) * 2 + (mlp + d))
    assert trainable == groups["LM: decoder layers"][0] == cfg.num_hidden_layers * per_layer


def test_bare_module_names_also_hit_the_vision_tower():
    naive = lora.apply_lora(
        tiny_model(), r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert lora.trainable_by_module(naive)["vision: blocks"][0] > 0
    merger = lora.apply_lora(tiny_model(), r=4, train_merger=True)
    groups = lora.trainable_by_module(merger)
    merger = sum(p.numel() for n, p in tiny_model().named_parameters() if ".merger." in n)
    assert groups["vision: merger"][0] == merger  # modules_to_save: a trainable copy of the merger


def test_freeze_vision_counts():
    model = lora.freeze_vision(tiny_model(), train_merger=True)
    groups = lora.trainable_by_module(model)
    assert groups["vision: blocks"][0] == 0 and groups["vision: merger"][0] == groups["vision: merger"][1] > 0
    assert sum(t for t, _ in groups.values()) + sum(
        p.numel() for n, p in model.named_parameters() if not p.requires_grad
    ) == parameter_count(model)


def test_3b_counts_on_meta():
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(qwen25vl_3b_config())
    groups = lora.trainable_by_module(model)
    assert sum(total for _, total in groups.values()) == parameter_count(model)
    wrapped = lora.apply_lora(model, r=16)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    d, mlp, kv, layers = 2048, 11008, 256, 36
    assert trainable == layers * 16 * ((d + d) * 2 + (d + kv) * 2 + (d + mlp) * 2 + (mlp + d))


# --- bad input --------------------------------------------------------------------------------------


def test_truncated_image_tokens_raise(processor, samples):
    with pytest.raises(ValueError, match=r"<\|image_pad\|> tokens but its image gives 9 features.*trap #6"):
        sft.SFTCollator(processor, max_length=20)(samples[:2])


def test_truncated_answer_raises(processor, samples):
    items = sft.encode_samples(processor, samples[:3])
    first_answer_token = min(int((it["labels"] != IGNORE_INDEX).nonzero()[0]) for it in items)
    with pytest.raises(
        ValueError, match=r"rows \[0, 1, 2\] have no labelled token: max_length truncated their answer away"
    ):
        sft.SFTCollator(processor, max_length=first_answer_token)(samples[:3])


def test_truncate_item_cuts_every_per_token_field_as_a_trainer_does(processor, samples):
    (item,) = sft.encode_samples(processor, samples[:1])
    k = int((item["labels"] != IGNORE_INDEX).nonzero()[0]) + 2  # inside the answer: labels are cut too
    cut = sft.truncate_item(item, k)
    for key in sft.PER_TOKEN_KEYS:
        assert torch.equal(cut[key], item[key][:k]), key
    # the labels of the cut row are the ones the loss mask gives the cut ids (the mask is a prefix rule)
    assert torch.equal(cut["labels"], labels_from_mask(cut["input_ids"], assistant_loss_mask(cut["input_ids"])))
    (encoded,) = sft.encode_samples(processor, samples[:1], max_length=k)
    assert all(torch.equal(encoded[key], cut[key]) for key in sft.PER_TOKEN_KEYS)
    assert cut["pixel_values"] is item["pixel_values"] and len(item["input_ids"]) > k  # the original is untouched
    sft.pad_batch([cut])  # the field it used to miss (mm_token_type_ids) no longer breaks the batch
    with pytest.raises(ValueError, match=r"max_length=0: expected an integer ≥ 1"):
        sft.truncate_item(item, 0)


def test_bad_checkpoint_dirs(processor, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoints.load_checkpoint(tmp_path / "nope")
    checkpoints.save_checkpoint(tmp_path, tiny_model(), processor)
    with pytest.raises(ValueError, match=r"from another config: text.hidden_size = 64 there, 128 expected"):
        checkpoints.load_checkpoint(tmp_path, expect_config=course_config())
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FileNotFoundError, match="not a complete resumable checkpoint"):
        sft.train(model, processor, make_split("train", 4, **DATA), steps=1, resume_from=tmp_path, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the caller's model untouched


def test_bad_training_settings(processor):
    with pytest.raises(ValueError, match=r"steps=0: expected an integer ≥ 1"):
        sft.train(tiny_model(), processor, [], steps=0)
    with pytest.raises(ValueError, match=r"lr=5: expected a learning rate in \(0, 1\)"):
        sft.train(tiny_model(), processor, [], steps=1, lr=5)
    with pytest.raises(ValueError, match="samples is empty"):
        sft.encode_samples(processor, [])
    with pytest.raises(ValueError, match="max_length=0"):
        sft.SFTCollator(processor, max_length=0)


# --- the command line under torchrun, 2 CPU processes (gloo) -------------------------------------------


def test_torchrun_two_processes(tmp_path):
    out, metrics = tmp_path / "ckpt", tmp_path / "metrics.json"
    done = run_two_processes(
        "helpers.sft", "--profile", "cpu", "--steps", "3", "--no-eval", "--out", str(out), "--metrics", str(metrics)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(metrics.read_text())
    assert result["world"] == 2 and result["steps"] == 3 and len(result["loss"]) == 3
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 3


# --- M-RoPE reaches the model (trap #18) -------------------------------------------------------------


def test_collator_keys_are_the_processors_plus_labels_and_trls(processor, samples):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from helpers.data import sample_messages

    ours = sft.SFTCollator(processor)(samples[:3])
    text = [processor.apply_chat_template(sample_messages(s), tokenize=False) for s in samples[:3]]
    processed = processor(text=text, images=[s.image for s in samples[:3]], padding=True, return_tensors="pt")
    rows = [
        {
            "images": [s.image],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": s.answer}]}],
        }
        for s in samples[:3]
    ]
    theirs = DataCollatorForVisionLanguageModeling(processor=processor, completion_only_loss=True)(rows)
    assert set(ours) == set(processed) | {"labels"} == set(theirs)
    assert set(sft.MODEL_INPUTS) == set(processed)
    assert torch.equal(ours["mm_token_type_ids"], (ours["input_ids"] == sft.IMAGE_PAD).long())


def test_training_forward_receives_the_3d_positions_of_get_rope_index(processor, samples):
    """Capture the position ids the language model gets inside an SFT training step."""
    model = tiny_model()
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"].detach().clone()), with_kwargs=True
    )
    sft.train(model, processor, samples[:4], steps=1, batch_size=4, lr=1e-3, warmup=0, progress=False)
    hook.remove()
    order = sft.batch_indices(4, 4, step=0, seed=0)  # the samples of the step, in the loop's order
    batch = sft.SFTCollator(processor)([samples[i] for i in order])
    want, _ = model.model.get_rope_index(
        batch["input_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
        mm_token_type_ids=batch["mm_token_type_ids"],
    )
    (got,) = seen
    got = got[-3:]  # transformers may prepend a text-position row
    real = batch["attention_mask"].bool()  # padding positions carry no meaning (the two fill them differently)
    assert torch.equal(got[:, real], want[:, real])
    image = batch["input_ids"][0] == sft.IMAGE_PAD
    assert len(set(zip(*(got[k, 0, image].tolist() for k in range(3))))) == int(
        image.sum()
    )  # each image token its own (t, h, w)


def test_sft_and_grpo_generation_paths_agree(processor):
    """One checkpoint, the two trainings' generation paths: GRPO's greedy rollouts give exactly the
    answers helpers.evaluation generates (the one evaluator of notebooks 10 and 11)."""
    from helpers import evaluation, rollouts

    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    samples = make_split("val", 9, **DATA)
    ours = evaluation.generate_answers(model, processor, samples, max_new_tokens=8)
    rollout = rollouts.sample_completions(model, processor, samples, 1, max_new_tokens=8, greedy=True)
    assert rollout.texts == ours


# --- recipes ------------------------------------------------------------------------------------------


def test_course_recipe_has_no_learning_rate_factors():
    r = recipes.recipe("cpu")
    assert r.kind == "course model" and r.model_path is None and not r.lr_scales


def test_recipe_overrides_leave_the_profile_alone():
    """What scripts/sft_ablation.py varies: one setting, or one data option merged into the profile's."""
    profile = profiles.settings("sft", "cpu")
    r = recipes.recipe("cpu", overrides={"seed": 1, "data": {"position_cue": 0.0}})
    assert (r.seed, r.data.position_cue, r.data.image_size) == (1, 0.0, profile.data.image_size)
    assert profiles.settings("sft", "cpu") == profile and profile.data.position_cue is None
    assert make_split("val", 3, 0, **r.data)[0].image.size == (profile.data.image_size,) * 2
    with pytest.raises(KeyError, match="unknown sft settings \\['gamma'\\]"):
        recipes.recipe("cpu", overrides={"gamma": 1})


def test_course_model_starts_with_room_for_confident_logits():
    """The final norm at 8 gives the tied head a largest logit well above ln V from step 0."""
    import math

    model, _ = recipes.model_for_profile("cpu")
    table = model.get_input_embeddings().weight
    norm = model.model.language_model.norm.weight
    assert torch.all(norm == 8.0) and abs(float(table.std()) - 0.02) < 1e-3 and not table.requires_grad
    reach = float(table.norm(dim=-1).mean()) * math.sqrt(table.shape[1]) * 8.0
    assert reach > math.log(table.shape[0]) + 5


def test_init_course_model_redraws_the_table_and_rejects_bad_values():
    from helpers.qwen import init_logit_scale

    model = tiny_model()
    recipes.init_course_model(model, 0.25, 1.0, seed=0)
    assert abs(float(model.get_input_embeddings().weight.detach().std()) - 0.25) < 0.01
    assert torch.all(model.model.language_model.norm.weight == 1.0)
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="scale="):
            init_logit_scale(model, bad)
        with pytest.raises(ValueError, match="embedding_std="):
            recipes.init_course_model(model, bad, 8.0)


@pytest.mark.parametrize("method, lr", [("lora", 2e-4), ("full", 1e-5)])
def test_a_saved_checkpoint_gets_the_checkpoint_recipe(processor, tmp_path, monkeypatch, method, lr):
    from helpers import profiles

    checkpoints.save_checkpoint(tmp_path / "real", tiny_model(), processor, {"step": 0})
    monkeypatch.setenv("QWENVL_MODEL", str(tmp_path / "real"))
    monkeypatch.setitem(
        profiles.PROFILES["cpu"],
        "checkpoint",
        dataclasses.replace(profiles.settings("checkpoint", "cpu"), method=method),
    )
    r = recipes.recipe("cpu")
    assert (r.kind, r.method, r.lr, r.lr_scales, r.freeze_embeddings) == ("checkpoint", method, lr, None, False)
    assert r.logit_scale_init is None and r.embedding_std is None  # no from-scratch init on a checkpoint
    model, loaded = recipes.model_for_profile("cpu")
    groups = lora.trainable_by_module(model)
    assert groups["vision: blocks"][0] == groups["vision: patch embed"][0] == 0
    if method == "lora":
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert names and all(
            "lora_" in n or ".merger." in n for n in names
        )  # LoRA on the LM; the merger as the recipe says
        assert (groups["vision: merger"][0] > 0) == r.train_merger
    else:
        assert groups["vision: merger"][0] == groups["vision: merger"][1] and groups["LM: decoder layers"][0] > 0
        assert groups["LM: embeddings (= tied head)"][0] == groups["LM: embeddings (= tied head)"][1]


# --- checkpoints: atomic, and resume refuses a different run -----------------------------------------


def test_a_save_leaves_no_file_of_an_earlier_one(processor, samples, tmp_path):
    run = sft.train(tiny_model(), processor, samples, steps=1, batch_size=2, progress=False)
    checkpoints.save_checkpoint(tmp_path / "c", run.model, processor, {"step": 1}, run.optimizer)
    assert (tmp_path / "c" / checkpoints.OPTIMIZER_FILE).is_file()
    checkpoints.save_checkpoint(tmp_path / "c", run.model, processor, {"step": 1})
    assert not (tmp_path / "c" / checkpoints.OPTIMIZER_FILE).exists()
    assert checkpoints.is_complete(tmp_path / "c") and sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    (tmp_path / "c" / checkpoints.WEIGHTS_FILE).write_bytes(b"truncated")
    assert not checkpoints.is_complete(tmp_path / "c")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"batch_size": 2}, r"batch_size = 3 there, 2 here"),
        ({"lr": 1e-3}, r"lr = 0.003 there, 0.001 here"),
        ({"steps": 8}, r"steps = 6 there, 8 here"),
    ],
)
def test_resume_refuses_another_run(processor, samples, tmp_path, change, match):
    kwargs = dict(steps=6, batch_size=3, grad_accum=1, lr=3e-3, warmup=2, progress=False)
    sft.train(tiny_model(), processor, samples, checkpoint_dir=tmp_path, stop_at=2, **kwargs)
    with pytest.raises(ValueError, match=match):
        sft.train(tiny_model(), processor, samples, resume_from=tmp_path, **{**kwargs, **change})


def test_resume_refuses_other_trainable_parameters_and_a_finished_run(processor, samples, tmp_path):
    kwargs = dict(steps=2, batch_size=3, lr=3e-3, warmup=0, progress=False)
    sft.train(tiny_model(), processor, samples, checkpoint_dir=tmp_path, **kwargs)
    with pytest.raises(ValueError, match="at step 2, and steps=2 leaves nothing to train"):
        sft.train(tiny_model(), processor, samples, resume_from=tmp_path, **kwargs)
    frozen = lora.freeze_vision(tiny_model())
    with pytest.raises(ValueError, match="trainable = "):
        sft.train(frozen, processor, samples, resume_from=tmp_path, **kwargs)


def test_answer_average_weighs_each_answer_equally(processor, samples):
    model = tiny_model()
    batch = sft.SFTCollator(processor)(samples[:5])
    with torch.no_grad():
        got = sft.labelled_loss(model, batch, "answer_sum")
        # each sample alone: its own mean token loss; "answer_sum" adds these up
        want = sum(sft.labelled_loss(model, sft.SFTCollator(processor)([samples[row]])) for row in range(5))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="average='sample'"):
        sft.train(model, processor, samples, steps=1, average="sample", progress=False)

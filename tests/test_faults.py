"""Faults the caches and checkpoints must survive (issue 15): corrupt, truncated, planted and
missing cache files; two processes building the tokenizer cache at once; a checkpoint save killed
after the weights are written; resumes that must be refused before the caller's model changes.
Everything is written under tmp_path; QWENVL_CACHE points there."""

import dataclasses
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from helpers import cache, checkpoints, optim, qwen, tokenizer, video

ROOT = Path(__file__).resolve().parent.parent


def small_config(text_hidden=32):
    return qwen.course_config(
        text_hidden=text_hidden,
        text_layers=1,
        text_mlp=64,
        vision_hidden=16,
        vision_depth=2,
        vision_mlp=32,
        fullatt_block_indexes=(1,),
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tokenizer cache built once for the module: (cache folder, tokenizer folder, reference tokenizer)."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QWENVL_CACHE", str(root))
        reference = tokenizer.build_tokenizer()
    (folder,) = [p for p in root.iterdir() if p.name.startswith("tokenizer-")]
    return root, folder, reference


@pytest.fixture
def fresh_cache(built, tmp_path, monkeypatch):
    """A copy of the built cache under tmp_path, QWENVL_CACHE pointing at it: (tokenizer folder, reference)."""
    root, folder, reference = built
    shutil.copytree(folder, tmp_path / folder.name)
    monkeypatch.setenv("QWENVL_CACHE", str(tmp_path))
    return tmp_path / folder.name, reference


def same_tokenizer(a, b) -> bool:
    return (
        a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
        and a.chat_template == b.chat_template
        and {i: (t.content, t.special) for i, t in a.added_tokens_decoder.items()}
        == {i: (t.content, t.special) for i, t in b.added_tokens_decoder.items()}
    )


# --- the tokenizer cache ------------------------------------------------------------------------


def test_the_cache_holds_no_pickle_and_a_manifest_of_every_file(built):
    _, folder, reference = built
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["chat_template.jinja", "manifest.json", "tokenizer.json", "tokenizer_config.json"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["files"]) == [n for n in names if n != "manifest.json"]
    assert cache.verify(folder) is None


def test_a_warm_load_equals_the_cold_build(fresh_cache, caplog):
    folder, reference = fresh_cache
    with caplog.at_level(logging.WARNING, logger="helpers.cache"):
        again = tokenizer.build_tokenizer()
    assert same_tokenizer(again, reference) and not caplog.records


def corrupt(path: Path):  # same size, one byte changed
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


@pytest.mark.parametrize(
    "fault, file, says",
    [
        (corrupt, "tokenizer.json", "tokenizer.json does not match its SHA-256"),
        (truncate, "tokenizer.json", "tokenizer.json has .* bytes, the manifest says"),
        (lambda p: p.write_bytes(b""), "tokenizer_config.json", "tokenizer_config.json has 0 bytes"),
        (lambda p: p.unlink(), "chat_template.jinja", "chat_template.jinja is missing"),
        (truncate, "manifest.json", "manifest.json is missing or unreadable"),
        (lambda p: p.unlink(), "manifest.json", "manifest.json is missing or unreadable"),
    ],
)
def test_a_damaged_cache_is_rebuilt_with_one_line_naming_the_file(fresh_cache, caplog, fault, file, says):
    folder, reference = fresh_cache
    fault(folder / file)
    with caplog.at_level(logging.WARNING, logger="helpers.cache"):
        rebuilt = tokenizer.build_tokenizer()
    assert len(caplog.records) == 1 and __import__("re").search(says, caplog.records[0].getMessage())
    assert same_tokenizer(rebuilt, reference) and cache.verify(folder) is None
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="helpers.cache"):
        again = tokenizer.build_tokenizer()  # served from the repaired cache: no second rebuild
    assert same_tokenizer(again, reference) and not caplog.records


class Planted:
    """A pickle that would create a marker file if anything unpickled it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_planted_pickle_is_never_loaded(fresh_cache, caplog, tmp_path):
    folder, reference = fresh_cache
    marker = tmp_path / "code-ran"
    (folder / "tokenizer.pkl").write_bytes(pickle.dumps(Planted(marker)))
    with caplog.at_level(logging.WARNING, logger="helpers.cache"):
        rebuilt = tokenizer.build_tokenizer()
    assert not marker.exists() and "tokenizer.pkl is an unexpected file" in caplog.records[0].getMessage()
    assert not (folder / "tokenizer.pkl").exists() and same_tokenizer(rebuilt, reference)


def test_a_foreign_manifest_is_rebuilt(fresh_cache, caplog):
    folder, reference = fresh_cache
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "source_sha256": "0" * 64}))
    with caplog.at_level(logging.WARNING, logger="helpers.cache"):
        tokenizer.build_tokenizer()
    assert "records source_sha256='000" in caplog.records[0].getMessage() and cache.verify(folder) is None


def test_debris_of_a_killed_build_is_removed_and_never_served(fresh_cache):
    folder, reference = fresh_cache
    debris = folder.with_name(f".{folder.name}.tmp-killed")
    shutil.copytree(folder, debris)
    (debris / "tokenizer.json").write_bytes(b"{")
    truncate(folder / "tokenizer.json")
    assert same_tokenizer(tokenizer.build_tokenizer(), reference)
    assert not debris.exists() and not list(folder.parent.glob(f".{folder.name}.old-*"))


def test_a_relative_cache_is_resolved_against_the_course_root(monkeypatch, tmp_path):
    monkeypatch.setenv("QWENVL_CACHE", "some/relative/cache")
    monkeypatch.chdir(tmp_path)
    assert cache.cache_dir() == ROOT / "some" / "relative" / "cache" == cache.ROOT / "some/relative/cache"


def test_a_read_only_valid_cache_is_used_without_writing(fresh_cache, monkeypatch):
    folder, reference = fresh_cache

    def refuse(*args, **kwargs):
        raise AssertionError("a valid cache must not be written")

    monkeypatch.setattr(cache, "publish", refuse)
    monkeypatch.setattr(cache, "writable_cache_dir", refuse)
    assert same_tokenizer(tokenizer.build_tokenizer(), reference)


BUILD = textwrap.dedent("""
    import json, sys
    from helpers.tokenizer import build_tokenizer
    tokenizer = build_tokenizer()
    print(json.dumps(tokenizer("Hello <|im_start|> 12 ü").input_ids))
""")


def test_two_processes_building_the_cache_at_once_both_succeed(tmp_path, built):
    env = {**os.environ, "QWENVL_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert outputs[0][0] == outputs[1][0] and json.loads(outputs[0][0])[2] == tokenizer.SPECIAL_TOKENS["<|im_start|>"]
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert cache.verify(folder) is None and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert same_tokenizer(tokenizer._load_tokenizer_files(folder), built[2])


# --- the cached clip ------------------------------------------------------------------------------


def test_a_truncated_clip_is_rebuilt_and_no_temporary_file_is_left(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("QWENVL_CACHE", str(tmp_path))
    path = video.synthetic_video(seconds=2, fps=2, width=32, height=32)
    whole = path.read_bytes()
    (path.parent / f"{path.stem}.tmp999.mp4").write_bytes(b"killed mid-write")
    path.write_bytes(whole[: len(whole) // 2])
    with caplog.at_level(logging.WARNING, logger="helpers.cache"):
        again = video.synthetic_video(seconds=2, fps=2, width=32, height=32)
    assert again == path and video.check_video_file(path)[0] == 4
    assert f"videos/{path.name} is truncated or unreadable" in caplog.records[0].getMessage()
    assert sorted(p.name for p in path.parent.iterdir()) == [f".{path.name}.lock", path.name]


# --- checkpoints ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_processor(built):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QWENVL_CACHE", str(built[0]))
        return qwen.load_processor()


SAVE_AND_HANG = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from helpers import checkpoints, qwen

    target, ready = Path(sys.argv[1]), Path(sys.argv[2])
    processor = qwen.load_processor()

    class Hangs:  # the weights are written first (model.save_pretrained), then the processor's files
        def save_pretrained(self, folder):
            processor.save_pretrained(folder)
            ready.write_text("weights written")
            time.sleep(600)

    config = qwen.course_config(text_hidden=32, text_layers=1, text_mlp=64, vision_hidden=16, vision_depth=2,
                                vision_mlp=32, fullatt_block_indexes=(1,))
    checkpoints.save_checkpoint(target, qwen.load_model(config=config, seed=2), Hangs(), {"step": 2})
""")


def test_a_save_killed_after_the_weights_leaves_the_old_checkpoint_whole(tmp_path, built, small_processor):
    target, ready = tmp_path / "run", tmp_path / "ready"
    old = qwen.load_model(config=small_config(), seed=1)
    checkpoints.save_checkpoint(target, old, small_processor, {"step": 1})
    env = {**os.environ, "QWENVL_CACHE": str(built[0]), "PYTHONPATH": str(ROOT)}
    run = subprocess.Popen(
        [sys.executable, "-c", SAVE_AND_HANG, str(target), str(ready)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not ready.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert ready.exists(), run.stderr.read().decode()[-2000:]
    (staging,) = tmp_path.glob(".run.tmp-*")  # the killed save's folder, weights inside
    assert (staging / checkpoints.WEIGHTS_FILE).is_file()
    model, _, state = checkpoints.load_checkpoint(target, expect_config=old.config)
    assert state["step"] == 1 and checkpoints.is_complete(target)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), old.state_dict().values()))
    checkpoints.save_checkpoint(target, old, small_processor, {"step": 1})  # the next save clears the debris
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready", "run"]


def test_incomplete_weights_are_not_a_checkpoint(tmp_path, small_processor):
    checkpoints.save_checkpoint(tmp_path / "a", qwen.load_model(config=small_config()), small_processor, {"step": 1})
    weights = tmp_path / "a" / checkpoints.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-1000])  # the data cut short, the header intact
    assert "unreadable weights" in checkpoints.weights_problem(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="'a' has unreadable weights"):
        checkpoints.load_checkpoint(tmp_path / "a")
    checkpoints.save_checkpoint(tmp_path / "b", qwen.load_model(config=small_config(64)), small_processor)
    shutil.copy(tmp_path / "a" / "config.json", tmp_path / "b" / "config.json")  # weights of another config
    assert "its config.json describes" in checkpoints.weights_problem(tmp_path / "b")


def resume_setup(tmp_path, processor, saved_config, steps=4):
    saved = qwen.load_model(config=saved_config, seed=1)
    opt = optim.make_optimizer(saved, 1e-3)
    signature = checkpoints.run_signature(saved, steps, 2, 1, 1e-3, 0)
    checkpoints.save_checkpoint(tmp_path, saved, processor, {"step": 2, "history": {}, "signature": signature}, opt)
    return signature


def test_resume_refuses_another_model_config_and_leaves_the_model_untouched(tmp_path, small_processor):
    resume_setup(tmp_path, small_processor, small_config(32))
    model = qwen.load_model(config=small_config(64), seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    signature = checkpoints.run_signature(model, 4, 2, 1, 1e-3, 0)
    with pytest.raises(ValueError, match="text.hidden_size = 32 there, 64 expected"):
        checkpoints.resume(model, optim.make_optimizer(model, 1e-3), tmp_path, signature)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resume_checks_the_moments_before_touching_the_model(tmp_path, small_processor):
    signature = resume_setup(tmp_path, small_processor, small_config())
    model = qwen.load_model(config=small_config(), seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (tmp_path / checkpoints.OPTIMIZER_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="optimizer.safetensors' is not readable optimizer state"):
        checkpoints.resume(model, optim.make_optimizer(model, 1e-3), tmp_path, signature)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resume_refuses_a_state_without_signature(tmp_path, small_processor):
    signature = resume_setup(tmp_path, small_processor, small_config())
    state = json.loads((tmp_path / checkpoints.STATE_FILE).read_text())
    (tmp_path / checkpoints.STATE_FILE).write_text(json.dumps({k: v for k, v in state.items() if k != "signature"}))
    model = qwen.load_model(config=small_config())
    with pytest.raises(ValueError, match="has no run signature"):
        checkpoints.resume(model, optim.make_optimizer(model, 1e-3), tmp_path, signature)


def test_sft_checkpoint_retrains_a_truncated_folder(monkeypatch, tmp_path, capsys, small_processor):
    from helpers import profiles

    monkeypatch.setenv("QWENVL_CACHE", str(tmp_path))
    for section, changes in (("grpo", {"start_step": 1}), ("sft", {"batch_size": 2})):
        current = profiles.PROFILES["cpu"][section]  # a dict, or typed settings (a dataclass)
        if isinstance(current, dict):
            for key, value in changes.items():
                monkeypatch.setitem(current, key, value)
        else:
            monkeypatch.setitem(profiles.PROFILES["cpu"], section, dataclasses.replace(current, **changes))
    path = checkpoints.profile_checkpoint_dir("cpu", step=1)
    checkpoints.save_checkpoint(path, qwen.load_model(config=small_config()), small_processor, {"step": 1})
    truncate(path / checkpoints.WEIGHTS_FILE)  # as if the save had been cut short in place
    assert checkpoints.sft_checkpoint("cpu", progress=False) == path
    assert "training it now" in capsys.readouterr().out and checkpoints.is_complete(path)

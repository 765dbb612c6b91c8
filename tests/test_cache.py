"""helpers.cache on small folders: manifests, verification, atomic publish, the lock, the folder."""

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import cache
from helpers.cache import ROOT


def fill(folder):
    (folder / "a.json").write_text('{"x": 1}')
    (folder / "b.txt").write_text("hello")


def test_a_published_folder_verifies_and_records_what_it_was_built_from(tmp_path):
    target = cache.publish(tmp_path / "entry", fill, source="abc")
    assert sorted(p.name for p in target.iterdir()) == ["a.json", "b.txt", "manifest.json"]
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["source"] == "abc" and manifest["files"]["b.txt"]["bytes"] == 5
    assert cache.verify(target, source="abc") is None
    assert "records source='abc', expected 'xyz'" in cache.verify(target, source="xyz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]  # no staging folder left


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda f: (f / "b.txt").write_text("hellO"), "entry/b.txt does not match its SHA-256 in the manifest"),
        (lambda f: (f / "b.txt").write_text("hell"), "entry/b.txt has 4 bytes, the manifest says 5"),
        (lambda f: (f / "a.json").unlink(), "entry/a.json is missing"),
        (lambda f: (f / "x.pkl").write_bytes(b"\x80"), "entry/x.pkl is an unexpected file"),
        (
            lambda f: (f / "manifest.json").write_text("{"),
            "entry/manifest.json is missing or unreadable (JSONDecodeError)",
        ),
    ],
)
def test_verify_names_the_bad_file(tmp_path, damage, says):
    target = cache.publish(tmp_path / "entry", fill)
    damage(target)
    assert cache.verify(target) == says


def test_publish_replaces_an_old_folder_whole_and_keeps_it_when_the_build_fails(tmp_path):
    target = cache.publish(tmp_path / "entry", fill)
    (target / "stale.txt").write_text("from an older build")
    cache.publish(target, fill)
    assert not (target / "stale.txt").exists() and cache.verify(target) is None

    def fails(folder):
        (folder / "half.txt").write_text("half")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        cache.publish(target, fails)
    assert cache.verify(target) is None and sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def hold_lock(path, seconds, log):
    with cache.locked(path):
        log.put(("in", time.monotonic()))
        time.sleep(seconds)
        log.put(("out", time.monotonic()))


def test_the_lock_lets_one_process_in_at_a_time(tmp_path):
    log = multiprocessing.get_context("fork").Queue()
    runs = [
        multiprocessing.get_context("fork").Process(target=hold_lock, args=(tmp_path / "entry", 0.3, log))
        for _ in range(2)
    ]
    for run in runs:
        run.start()
    for run in runs:
        run.join(30)
    events = sorted((log.get(timeout=5) for _ in range(4)), key=lambda e: e[1])
    assert [kind for kind, _ in events] == ["in", "out", "in", "out"]


def test_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("QWENVL_CACHE", raising=False)
    assert cache.cache_dir().parts[-2:] == (".cache", "qwenvl-course")
    monkeypatch.setenv("QWENVL_CACHE", "~/elsewhere")
    assert cache.cache_dir().name == "elsewhere" and "~" not in str(cache.cache_dir())
    monkeypatch.setenv("QWENVL_CACHE", str(tmp_path / "new" / "cache"))
    assert cache.writable_cache_dir().is_dir()
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("QWENVL_CACHE", str(tmp_path / "file"))
    with pytest.raises(NotADirectoryError, match=r"QWENVL_CACHE='.*file'\) is a file"):
        cache.writable_cache_dir()


def test_a_scratch_folder_is_empty_and_gone_when_the_interpreter_exits(tmp_path):
    code = (
        "from helpers.cache import scratch_dir\n"
        "folder = scratch_dir('sft_')\n"
        "assert folder.is_dir() and not any(folder.iterdir()) and folder.name.startswith('sft_')\n"
        "(folder / 'model.safetensors').write_bytes(bytes(1000))\n"
        "print(folder)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    folder = Path(done.stdout.strip())
    assert folder.parent == tmp_path and not folder.exists()


def test_a_scratch_folder_is_gone_when_jupyter_shuts_the_kernel_down(tmp_path):
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(env={**os.environ, "TMPDIR": str(tmp_path)}, cwd=str(ROOT))
    try:
        reply = client.execute_interactive("from helpers.cache import scratch_dir\nprint(scratch_dir())", timeout=60)
        assert reply["content"]["status"] == "ok"
        (folder,) = tmp_path.iterdir()
    finally:
        client.stop_channels()
        manager.shutdown_kernel()  # what JupyterLab does when the reader shuts a kernel down
    assert not folder.exists()

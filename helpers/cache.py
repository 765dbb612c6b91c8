"""The course cache: where it lives, and how a cached folder is written and trusted (notebook 00).

The converted tokenizer (``helpers.tokenizer.build_tokenizer``), the generated clips
(``helpers.video.synthetic_video``) and the cached SFT runs (``helpers.checkpoints``) live under
``cache_dir()``. A cached folder is never trusted blindly:

- it holds only data files (JSON, text, video) and ``manifest.json``, which lists every file with
  its size and SHA-256; nothing executable (no pickle) is ever loaded from it;
- ``verify(folder)`` names the first missing, unexpected, truncated or altered file, and the caller
  rebuilds, logging one line that names it (``log_rebuild``);
- ``publish(folder, write)`` writes into a temporary sibling folder and renames it into place while
  holding an exclusive lock (``fcntl.flock`` on ``.<name>.lock``), so two kernels starting together
  neither corrupt the folder nor build it twice.

Files needed only while a kernel runs go to ``scratch_dir()``, removed when the kernel exits.

Mirrors the idea of ``huggingface_hub``'s cache (files checked by hash, written to a temporary name
then moved, a ``filelock`` per entry), without its download machinery.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; builds still publish atomically, two at once may both build
    fcntl = None

#: Base of a relative ``QWENVL_CACHE``: the course's root folder (the one holding ``helpers/``), so
#: the cache is the same whether a kernel runs in ``notebooks/``, the root or elsewhere.
ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "manifest.json"
log = logging.getLogger("helpers.cache")


def cache_dir() -> Path:
    """The cache folder: ``$QWENVL_CACHE`` or ``~/.cache/qwenvl-course``. A relative ``QWENVL_CACHE``
    is resolved against ``ROOT`` (the course's root folder), never the kernel's working directory."""
    value = os.environ.get("QWENVL_CACHE")
    if not value:
        return Path.home() / ".cache" / "qwenvl-course"
    path = Path(value).expanduser()
    return path if path.is_absolute() else ROOT / path


def scratch_dir(prefix: str = "course-") -> Path:
    """A new empty folder for files a notebook needs only while its kernel runs (a checkpoint saved to
    show the save-and-reload round trip, a trainer's ``output_dir``). ``tempfile.mkdtemp`` leaves such a
    folder behind; this keeps a ``tempfile.TemporaryDirectory`` alive until the interpreter exits, whose
    finalizer removes the folder then, so running the course again does not fill the disk."""
    held = tempfile.TemporaryDirectory(prefix=prefix)
    _SCRATCH.append(held)
    return Path(held.name)


_SCRATCH: list[tempfile.TemporaryDirectory] = []  # kept alive until exit, when each removes its folder


def writable_cache_dir() -> Path:
    """``cache_dir()``, created if needed; a clear error naming ``QWENVL_CACHE`` when it is a file,
    lies under a file, or cannot be written."""
    path = cache_dir()
    hint = (
        f"QWENVL_CACHE={os.environ['QWENVL_CACHE']!r}"
        if os.environ.get("QWENVL_CACHE")
        else "the default cache (set QWENVL_CACHE to move it)"
    )
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"cache folder {str(path)!r} ({hint}) is a file; point QWENVL_CACHE at a "
            "writable folder (it is created if missing)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise PermissionError(
            f"cache folder {str(path)!r} ({hint}) is not writable ({type(error).__name__}: "
            f"{error.strerror}); point QWENVL_CACHE at a writable folder"
        ) from None
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike, **about) -> dict:
    """Write ``manifest.json``: every file of ``folder`` (flat) with its size and SHA-256, plus ``about``."""
    folder = Path(folder)
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir())
        if p.name != MANIFEST
    }
    manifest = {"files": files, **about}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def verify(folder: str | os.PathLike, **about) -> str | None:
    """None when ``folder`` matches its manifest (and the manifest's ``about`` fields equal ``about``);
    else what is wrong, naming the file: missing, unexpected, of another size or hash."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder.name} is missing"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{folder.name}/{MANIFEST} is missing or unreadable ({type(error).__name__})"
    for key, value in about.items():
        if manifest.get(key) != value:
            return f"{folder.name}/{MANIFEST} records {key}={manifest.get(key)!r}, expected {value!r}"
    present = {p.name for p in folder.iterdir()} - {MANIFEST}
    for name in sorted(present - set(files)):
        return f"{folder.name}/{name} is an unexpected file"
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            return f"{folder.name}/{name} is missing"
        if path.stat().st_size != record.get("bytes"):
            return f"{folder.name}/{name} has {path.stat().st_size} bytes, the manifest says {record.get('bytes')}"
        if _sha256(path) != record.get("sha256"):
            return f"{folder.name}/{name} does not match its SHA-256 in the manifest"
    return None


def log_rebuild(problem: str) -> None:
    """The one line logged when a cached entry is invalid and rebuilt."""
    log.warning("cache: %s; rebuilding it", problem)


@contextlib.contextmanager
def locked(target: str | os.PathLike):
    """Hold an exclusive lock on ``target`` (``fcntl.flock`` on ``.<name>.lock`` beside it), so only
    one process at a time builds it; others wait, then find it built."""
    target = Path(target)
    lock = target.parent / f".{target.name}.lock"
    with open(lock, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def replace_folder(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is first renamed aside, then removed."""
    aside = None
    if target.exists():
        aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.rename(target, aside / target.name)
    os.rename(staging, target)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def publish(target: str | os.PathLike, write: Callable[[Path], None], **about) -> Path:
    """Build ``target`` atomically: ``write(staging)`` fills a temporary sibling folder, then a manifest
    (with ``about``) is added and the folder renamed into place. Call it holding ``locked(target)``.
    An interrupted build leaves at most a ``.<name>.tmp-…`` folder that nothing reads."""
    target = Path(target)
    for kind in ("tmp", "old"):  # what a killed build left behind (we hold the lock: nobody writes it)
        for debris in target.parent.glob(f".{target.name}.{kind}-*"):
            shutil.rmtree(debris, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's folder is private; the cache is not
    try:
        write(staging)
        write_manifest(staging, **about)
        replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target

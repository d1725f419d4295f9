"""Crash-safe file writes: the one home of "write beside, then rename".

Every file or folder this package writes that a user may already have (a grid, a JSON record, a pipeline folder, a
checkpoint) goes through here, so that a kill at any instant leaves either the old complete thing or the new one.
Temporary names start with ``.tmp`` (``hub.DEFAULT_PUSH_IGNORE`` never uploads them).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import Any, Callable, Iterator

TMP_PREFIX = ".tmp-"
DELETING_PREFIX = ".deleting-"


def _tmp_sibling(path: str, tag: str = "") -> str:
    """A unique hidden sibling name of ``path`` in the same folder (same filesystem, so rename is atomic)."""
    folder, name = os.path.split(os.path.abspath(path))
    ext = os.path.splitext(name)[1]
    return os.path.join(folder, f"{TMP_PREFIX}{tag}{name}-{uuid.uuid4().hex[:8]}{ext}")


def fsync_path(path: str) -> None:
    """Flushes one file or folder entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """Flushes every file under ``root`` and every folder in it (durability before a rename)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def atomic_write(path: str, write: Callable[[str], Any], *, durable: bool = True) -> str:
    """Calls ``write(tmp_path)``, then renames ``tmp_path`` over ``path``; on any error the temporary file is removed
    and ``path`` is untouched. The temporary file keeps ``path``'s extension (PIL picks the format from it)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path!r}: folder {folder!r} does not exist")
    tmp = _tmp_sibling(path)
    try:
        write(tmp)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    if durable:
        fsync_path(folder)
    return path


def atomic_write_text(path: str, text: str, *, durable: bool = True) -> str:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write, durable=durable)


def atomic_write_json(path: str, obj, *, durable: bool = True, **dump_kwargs) -> str:
    dump_kwargs.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(obj, **dump_kwargs) + "\n", durable=durable)


def atomic_save_image(image, path: str) -> str:
    """Saves a PIL image (format from ``path``'s extension) without ever leaving a half-written file."""
    return atomic_write(path, image.save)


def doomed_name(path: str) -> str:
    """A unique ``.deleting-*`` sibling for ``path``: rename there first, then delete, so that a kill never leaves a
    half-deleted folder under a real name (``sweep_discarded`` finishes the job)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f"{DELETING_PREFIX}{name}-{uuid.uuid4().hex[:8]}")


def discard_dir(path: str) -> None:
    """Removes a folder in two steps (rename to a ``.deleting-*`` name, then delete)."""
    doomed = doomed_name(path)
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def sweep_discarded(folder: str) -> None:
    """Finishes deletions and temporary writes that a killed process left in ``folder``."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(DELETING_PREFIX) or name.startswith(TMP_PREFIX):
                target = os.path.join(folder, name)
                if os.path.isdir(target):
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.remove(target)


@contextlib.contextmanager
def atomic_dir(path: str, *, durable: bool = True) -> Iterator[str]:
    """``with atomic_dir(final) as tmp:`` write a whole folder into ``tmp``; on success it replaces ``final`` in
    one rename (the old folder, if any, is first renamed aside and deleted after), on error ``tmp`` is removed and
    ``final`` is untouched. A kill at any instant leaves ``final`` either absent, old and whole, or new and whole,
    plus hidden leftovers that ``sweep_discarded`` removes."""
    final = os.path.abspath(path)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = _tmp_sibling(final)
    os.makedirs(tmp)
    try:
        yield tmp
        if durable:
            fsync_tree(tmp)
        if os.path.exists(final):
            old = doomed_name(final)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        if durable:
            fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Atomic export of the whole pipeline into ``output_dir``: a SIGKILL at any instant leaves a folder that loads as the
previous complete pipeline or as the new one, never a mix of the two.

``output_dir`` also holds checkpoints, logs and samples, so the pipeline cannot be written into a fresh folder and
renamed over it. Instead (``swap_in``):

1. the new pipeline (model_index.json, unet/, scheduler/, README.md, ...) is written into a hidden staging folder;
2. a shadow tree of ``output_dir`` is built beside it (``.tmp-<name>-*``): every other file is *hard-linked*
   (no copy: checkpoints cost nothing), the staged pipeline entries are moved in;
3. ``renameat2(RENAME_EXCHANGE)`` swaps ``output_dir`` and the shadow tree in one atomic step (Linux);
4. the old tree, now under the shadow name, is renamed to ``.deleting-*`` and removed.

Until step 3 ``output_dir`` is untouched; after it, it is the new tree. Where the exchange or hard links are not
available (other systems, file systems without them), the entries are swapped one by one under a journal
(``.export-journal.json``) and ``recover_export`` (called at the start of every run) finishes an interrupted swap;
the log says so.
"""

import contextlib
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import shutil
import uuid

from .. import fileio

logger = logging.getLogger(__name__)

JOURNAL = ".export-journal.json"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _renameat2_exchange(a: str, b: str) -> None:
    """Atomically exchanges two paths (Linux renameat2 RENAME_EXCHANGE); OSError where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError) as exc:
        raise OSError(errno.ENOSYS, "renameat2 is not available") from exc
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), a)


def _link_tree(src: str, dst: str, skip: set[str]) -> None:
    """Recreates ``src``'s folders under ``dst`` with every file hard-linked (symlinks copied as links); top-level
    names in ``skip`` are left out."""
    for name in os.listdir(src):
        if name in skip:
            continue
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.islink(s):
            os.symlink(os.readlink(s), d)
        elif os.path.isdir(s):
            os.mkdir(d)
            _link_tree(s, d, set())
        else:
            os.link(s, d)


def _hidden(name: str) -> bool:
    return name.startswith((fileio.TMP_PREFIX, fileio.DELETING_PREFIX)) or name == JOURNAL


def sweep_siblings(output_dir: str) -> None:
    """Removes shadow/old trees of ``output_dir`` that a killed export left beside it (only its own names)."""
    final = os.path.abspath(output_dir)
    parent, name = os.path.split(final)
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        if entry.startswith((f"{fileio.TMP_PREFIX}{name}-", f"{fileio.DELETING_PREFIX}{name}-")):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def swap_in(output_dir: str, staged: str) -> None:
    """Replaces the entries of ``output_dir`` named like the entries of ``staged`` (a folder inside or beside it)
    by them, as one atomic step (module docstring). ``staged`` is consumed."""
    final = os.path.abspath(output_dir)
    parent, name = os.path.split(final)
    entries = set(os.listdir(staged))
    shadow = os.path.join(parent, f"{fileio.TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(shadow)
        _link_tree(final, shadow, skip=entries | {n for n in os.listdir(final) if _hidden(n)})
        for entry in entries:
            os.rename(os.path.join(staged, entry), os.path.join(shadow, entry))
        fileio.fsync_tree(shadow)
        _renameat2_exchange(final, shadow)
    except OSError as exc:
        # put staged entries back if they were moved, then fall back to the journaled swap
        for entry in entries:
            moved = os.path.join(shadow, entry)
            if os.path.exists(moved) and not os.path.exists(os.path.join(staged, entry)):
                os.rename(moved, os.path.join(staged, entry))
        shutil.rmtree(shadow, ignore_errors=True)
        logger.warning("atomic folder exchange unavailable here (%s); swapping the pipeline's entries one by one "
                       "under %s", exc, JOURNAL)
        _journaled_swap(final, staged, sorted(entries))
        return
    fileio.discard_dir(shadow)  # the old tree: its files' other links live on in the new one
    fileio.fsync_path(parent)


def _journaled_swap(final: str, staged: str, entries: list[str]) -> None:
    journal = os.path.join(final, JOURNAL)
    fileio.atomic_write_json(journal, {"staged": os.path.abspath(staged), "entries": entries})
    _roll_forward(final)


def _roll_forward(final: str) -> None:
    journal = os.path.join(final, JOURNAL)
    with open(journal, encoding="utf-8") as f:
        plan = json.load(f)
    staged = plan["staged"]
    for entry in plan["entries"]:
        new = os.path.join(staged, entry)
        if not os.path.exists(new):
            continue  # already swapped in
        target = os.path.join(final, entry)
        if os.path.exists(target):
            os.rename(target, fileio.doomed_name(target))
        os.rename(new, target)
    fileio.fsync_path(final)
    os.remove(journal)
    shutil.rmtree(staged, ignore_errors=True)
    fileio.sweep_discarded(final)


def recover_export(output_dir: str) -> bool:
    """Finishes a journaled export that a kill interrupted (True when there was one) and removes leftovers of an
    atomic one. Safe to call at any time."""
    final = os.path.abspath(output_dir)
    sweep_siblings(final)
    if os.path.isfile(os.path.join(final, JOURNAL)):
        _roll_forward(final)
        logger.warning("finished an interrupted export into %s", final)
        return True
    return False


@contextlib.contextmanager
def staged_export(output_dir: str):
    """``with staged_export(out) as stage:`` write the new pipeline files into ``stage``; on success they replace
    their namesakes in ``out`` atomically (``swap_in``), on error nothing in ``out`` changes."""
    final = os.path.abspath(output_dir)
    os.makedirs(final, exist_ok=True)
    stage = os.path.join(final, f"{fileio.TMP_PREFIX}export-{uuid.uuid4().hex[:8]}")
    os.mkdir(stage)
    try:
        yield stage
        fileio.fsync_tree(stage)
        swap_in(final, stage)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def save_pipeline(unet, scheduler, folder: str, class_names=None):
    """``ScratchDDPMPipeline(unet, scheduler, class_names).save_pretrained(folder)`` (safetensors); returns the
    pipeline."""
    from ..pipeline_ddpm import ScratchDDPMPipeline

    pipe = ScratchDDPMPipeline(unet=unet, scheduler=scheduler, class_names=class_names)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe

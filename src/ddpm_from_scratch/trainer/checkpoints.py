"""Resumable checkpoints: atomic save, rotation, choosing the one to resume from, and the resume compatibility check.

Layout of ``output_dir/checkpoint-<step>/``: everything ``accelerator.save_state`` writes (model safetensors,
optimizer, LR scheduler, RNG states of every process), ``ema.safetensors`` (through a save hook) and
``training_state.json`` (step, data position, the run's config and a manifest of every file's size and sha256),
written last. A checkpoint is first written under ``.tmp-checkpoint-<step>-*`` and renamed when complete, so a
folder named ``checkpoint-<step>`` with a state file is whole; the manifest catches a file damaged later.
"""

import errno
import hashlib
import json
import logging
import os
import re
import shutil

from .. import fileio

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = fileio.TMP_PREFIX + "checkpoint-"
STATE_FILE = "training_state.json"
PREVIOUS_PREFIX = "previous-checkpoints-"
RNG_FILE = "random_states_{}.pkl"

# Settings that define the model, the schedule or the data order: a checkpoint trained with other values cannot be
# continued into this run. Everything else may change on resume (the change is logged).
MUST_MATCH = ("unet_preset", "model_config_name_or_path", "resolution", "image_channels", "ddpm_num_steps",
              "ddpm_beta_schedule", "prediction_type", "variance_type", "use_ema", "seed", "global_batch",
              "gradient_accumulation_steps", "dataset_name", "dataset_config_name", "train_data_dir",
              "digits_split", "importance_sampling", "class_conditional", "class_dropout_prob", "label_column")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (corrupt, incomplete, incompatible) or cannot be written."""


# ----------------------------------------------------------------------------------------------------------
# Listing and choosing
# ----------------------------------------------------------------------------------------------------------

def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Checkpoints with a state file in ``output_dir`` as sorted (step, path); temp and unfinished dirs ignored."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest(folder: str) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file under ``folder`` except the state file."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            if rel != STATE_FILE:
                out[rel] = {"size": os.path.getsize(path), "sha256": file_digest(path)}
    return out


def read_training_state(checkpoint: str) -> dict:
    path = os.path.join(checkpoint, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} holds no training state (no 'step')")
    return state


def checkpoint_problem(checkpoint: str, num_processes: int = 1) -> str | None:
    """Why ``checkpoint`` cannot be resumed exactly, naming the file (None when it can): a missing/unreadable state
    file, a file whose size or sha256 differs from the manifest, a missing or unreadable RNG state of a process."""
    try:
        state = read_training_state(checkpoint)
    except CheckpointError as exc:
        return str(exc)
    files = state.get("manifest")
    if files is not None:
        for rel, meta in sorted(files.items()):
            path = os.path.join(checkpoint, rel)
            if not os.path.isfile(path):
                return f"{path} is missing"
            if os.path.getsize(path) != meta["size"]:
                return f"{path} is truncated or damaged ({os.path.getsize(path)} bytes, saved {meta['size']})"
            if file_digest(path) != meta["sha256"]:
                return f"{path} is damaged (its sha256 differs from the one saved with it)"
    for rank in range(num_processes):
        path = os.path.join(checkpoint, RNG_FILE.format(rank))
        if not os.path.isfile(path):
            return f"{path} is missing: the RNG state of process {rank} is needed for an exact resume"
        if files is None:  # an older checkpoint without a manifest: at least the RNG state must load
            try:
                import torch

                torch.load(path, weights_only=False)
            except Exception as exc:
                return f"{path} is unreadable ({type(exc).__name__}): the RNG state is needed for an exact resume"
    return None


def resolve_checkpoint(output_dir: str, spec: str | None, num_processes: int = 1, warn=None) -> str | None:
    """The checkpoint to resume from. None for no spec; for "latest" the newest loadable one (each newer broken one
    is skipped with ``warn(message)`` naming the file; None when there is none); else ``spec`` as a path or a name
    inside ``output_dir``, which must be loadable (CheckpointError naming the file)."""
    if not spec:
        return None
    if spec == "latest":
        for _, path in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(path, num_processes)
            if problem is None:
                return path
            if warn is not None:
                warn(f"skipping checkpoint {path}: {problem}")
        return None
    for path in (spec, os.path.join(output_dir, os.path.basename(os.path.normpath(spec)))):
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, STATE_FILE)):
                raise CheckpointError(f"--resume_from_checkpoint {spec!r}: {path} is not a complete checkpoint "
                                      f"(no {STATE_FILE})")
            problem = checkpoint_problem(path, num_processes)
            if problem:
                raise CheckpointError(f"--resume_from_checkpoint {spec!r}: {problem}")
            return path
    raise CheckpointError(f"--resume_from_checkpoint {spec!r} does not exist (give a checkpoint path or 'latest')")


def compare_configs(recorded: dict, current: dict) -> tuple[list[str], list[str]]:
    """(differences that forbid resuming, other changed settings), each as "name: checkpoint -> now" lines."""
    blocking, changed = [], []
    for key in sorted(set(recorded) | set(current)):
        if key in ("manifest",) or "token" in key:
            continue
        old, new = recorded.get(key, "<unset>"), current.get(key, "<unset>")
        if old == new:
            continue
        line = f"{key}: {old!r} -> {new!r}"
        (blocking if key in MUST_MATCH else changed).append(line)
    return blocking, changed


# ----------------------------------------------------------------------------------------------------------
# Writing and rotating
# ----------------------------------------------------------------------------------------------------------

def set_aside_checkpoints(output_dir: str) -> str | None:
    """Move an earlier run's checkpoints into ``previous-checkpoints-<n>/`` (nothing is deleted), so that a new run's
    "latest" and rotation never mix two runs. Returns that folder, or None when there were none."""
    found = list_checkpoints(output_dir)
    if not found:
        return None
    n = 1
    while os.path.exists(os.path.join(output_dir, f"{PREVIOUS_PREFIX}{n}")):
        n += 1
    dest = os.path.join(output_dir, f"{PREVIOUS_PREFIX}{n}")
    os.makedirs(dest)
    for _, path in found:
        os.rename(path, os.path.join(dest, os.path.basename(path)))
    return dest


def prune_checkpoints(output_dir: str, total_limit: int | None, keep: str | None = None) -> list[str]:
    """Deletes the oldest complete checkpoints so that at most ``total_limit`` remain (``keep`` always stays);
    temp dirs and foreign files are never touched. Returns the removed paths."""
    if total_limit is None:
        return []
    if total_limit < 1:
        raise ValueError(f"checkpoints_total_limit must be >= 1 or None, got {total_limit}")
    found = [p for _, p in list_checkpoints(output_dir)]
    excess = found[:max(0, len(found) - total_limit)]
    removed = []
    for path in excess:
        if keep is not None and os.path.abspath(path) == os.path.abspath(keep):
            continue
        fileio.discard_dir(path)
        removed.append(path)
    return removed


def _write_error(exc: BaseException, folder: str) -> CheckpointError:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return CheckpointError(f"no space left on the device while writing a checkpoint into {folder}; free space "
                               "and resume with --resume_from_checkpoint latest (earlier checkpoints are intact)")
    return CheckpointError(f"could not write a checkpoint into {folder} ({type(exc).__name__}: {exc}); earlier "
                           "checkpoints are intact")


def _all_ok(accelerator, ok: bool) -> bool:
    """True on every process when ``ok`` is True on every process (one tiny collective when distributed)."""
    if accelerator.num_processes == 1:
        return ok
    import torch

    flag = torch.tensor([1.0 if ok else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, "sum").item() == accelerator.num_processes)


def save_checkpoint(accelerator, output_dir: str, step: int, state: dict, total_limit: int | None = None) -> str:
    """Atomic ``accelerator.save_state``: write to a ``.tmp-checkpoint-<step>-*`` folder, add the state file (with
    the manifest), fsync, rename to ``checkpoint-<step>``, then prune older complete checkpoints. Collective: call
    on every process. A failed write (full disk, ...) removes the temporary folder, leaves the earlier checkpoints
    as they were and raises CheckpointError naming the folder on every process. Returns the final path."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f"{TMP_PREFIX}{step}")
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        fileio.sweep_discarded(output_dir)  # leftovers of a killed save or deletion
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(tmp)
    except Exception as exc:  # noqa: BLE001 - reported below, on every process
        error = exc
    if _all_ok(accelerator, error is None) and accelerator.is_main_process:
        try:
            files = manifest(tmp)
            fileio.atomic_write_json(os.path.join(tmp, STATE_FILE), {**state, "step": step, "manifest": files},
                                     sort_keys=True)
            fileio.fsync_tree(tmp)
        except Exception as exc:  # noqa: BLE001
            error = exc
    ok = _all_ok(accelerator, error is None)
    if not ok:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        raise _write_error(error, output_dir) if error is not None else CheckpointError(
            f"another process failed to write its part of a checkpoint into {output_dir}")
    if accelerator.is_main_process:
        if os.path.exists(final):  # re-saving a step (e.g. a resumed run ends on it): swap, never lose both
            old = fileio.doomed_name(final)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fileio.fsync_path(output_dir)
        removed = prune_checkpoints(output_dir, total_limit, keep=final)
        if removed:
            logger.info("removed old checkpoints: %s", ", ".join(os.path.basename(r) for r in removed))
    accelerator.wait_for_everyone()
    return final

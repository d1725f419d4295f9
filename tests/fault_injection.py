"""Runs training/train.py with a pause injected from outside the production code, for the crash tests.

    python tests/fault_injection.py <point>:<arg> [train.py flags...]

Points (the process prints "PAUSED <point>:<arg>" to stderr and sleeps until the test SIGKILLs it):
- ``after_checkpoint:<step>``: checkpoint-<step> is complete (wraps checkpoints.save_checkpoint);
- ``during_save:<step>``: its files and state file are written under the temporary name, before the rename;
- ``before_exchange:<n>`` / ``after_exchange:<n>``: the n-th export (1 = first), right before / after the atomic
  folder exchange (the old tree not yet removed);
- ``mid_stage:<n>``: the n-th export, after the new UNet is staged and before the scheduler is.
Also, without a pause: ``enospc:<step>``: the checkpoint write of <step> fails with OSError(ENOSPC) (a full disk);
``nan_at:<micro>``: the loss of micro-batch number <micro> (0-based, counted in this process) is NaN.
- ``after_eval_start:<step>``: the background evaluation worker of <step> (--eval_async) was started; the log names
  its pid.
"""

import errno
import os
import runpy
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "training", "train.py")


def pause(tag: str) -> None:
    print(f"PAUSED {tag}", file=sys.stderr, flush=True)
    while True:
        time.sleep(60)


def install(spec: str) -> None:
    from ddpm_from_scratch import fileio
    from ddpm_from_scratch.trainer import checkpoints, export

    point, _, arg = spec.partition(":")
    n = int(arg)
    if point == "after_checkpoint":
        original = checkpoints.save_checkpoint

        def save_checkpoint(accelerator, output_dir, step, *a, **k):
            path = original(accelerator, output_dir, step, *a, **k)
            if step == n:
                pause(spec)
            return path

        checkpoints.save_checkpoint = save_checkpoint
    elif point == "during_save":
        original_fsync = fileio.fsync_tree

        def fsync_tree(root):
            original_fsync(root)
            if os.path.basename(root) == f"{checkpoints.TMP_PREFIX}{n}":
                pause(spec)

        fileio.fsync_tree = fsync_tree
    elif point in ("before_exchange", "after_exchange"):
        original_exchange = export._renameat2_exchange
        count = {"n": 0}

        def exchange(a, b):
            count["n"] += 1
            if point == "before_exchange" and count["n"] == n:
                pause(spec)
            original_exchange(a, b)
            if point == "after_exchange" and count["n"] == n:
                pause(spec)

        export._renameat2_exchange = exchange
    elif point == "mid_stage":
        from ddpm_from_scratch.scheduling_ddpm import ScratchDDPMScheduler

        original_save = ScratchDDPMScheduler.save_pretrained
        count = {"n": 0}

        def save_pretrained(self, *a, **k):
            count["n"] += 1
            if count["n"] == n:
                pause(spec)
            return original_save(self, *a, **k)

        ScratchDDPMScheduler.save_pretrained = save_pretrained
    elif point == "enospc":
        import torch

        original_torch_save = torch.save

        def full_disk_save(obj, f, *a, **k):
            if isinstance(f, (str, os.PathLike)) and f"{checkpoints.TMP_PREFIX}{n}" in os.fspath(f):
                with open(f, "wb") as fh:  # a partial file, as a real full disk leaves
                    fh.write(b"\0" * 100)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(f))
            return original_torch_save(obj, f, *a, **k)

        torch.save = full_disk_save
    elif point == "after_eval_start":
        from ddpm_from_scratch.trainer.evaluation import EvaluationCallback

        original_launch = EvaluationCallback._launch

        def launch(self, trainer, step):
            original_launch(self, trainer, step)
            if step == n:
                pause(spec)

        EvaluationCallback._launch = launch
    elif point == "nan_at":
        from ddpm_from_scratch import losses

        original_loss = losses.training_loss
        count = {"n": -1}

        def nan_loss(*a, **k):
            out = original_loss(*a, **k)
            count["n"] += 1
            if count["n"] == n:
                out = {**out, "loss": out["loss"] * float("nan")}
            return out

        losses.training_loss = nan_loss
    else:
        raise SystemExit(f"unknown fault point {spec!r}")


def kill_at_pause(pause_spec: str, train_flags: list, env: dict, log_path, timeout: float = 300) -> str:
    """Starts ``fault_injection.py pause_spec train_flags...``, waits until it prints "PAUSED <pause_spec>",
    SIGKILLs it there (a real kill, nothing flushed) and returns its log (stdout + stderr)."""
    import signal
    import subprocess

    with open(log_path, "w") as f:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), pause_spec, *map(str, train_flags)],
                                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while f"PAUSED {pause_spec}" not in open(log_path).read():
            assert proc.poll() is None, f"run ended ({proc.returncode}) before {pause_spec}:\n" + \
                open(log_path).read()[-4000:]
            assert time.monotonic() < deadline, f"no pause at {pause_spec}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    return open(log_path).read()


if __name__ == "__main__":
    install(sys.argv[1])
    sys.argv = [SCRIPT, *sys.argv[2:]]
    runpy.run_path(SCRIPT, run_name="__main__")

"""Nothing lost, nothing silently wrong: real processes, a real SIGKILL, corrupted files on disk.

Faults are injected from the tests (tests/fault_injection.py), never by production code."""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ddpm_from_scratch.trainer import CheckpointError
from ddpm_from_scratch.trainer import checkpoints as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from fault_injection import kill_at_pause  # noqa: E402
SCRIPT = os.path.join(ROOT, "training", "train.py")
FAULTS = os.path.join(ROOT, "tests", "fault_injection.py")
TINY = ["--unet_preset", "tiny", "--ddpm_num_steps", "20", "--train_batch_size", "8", "--ddpm_num_inference_steps",
        "3", "--eval_batch_size", "4", "--save_images_steps", "0", "--logging_steps", "1", "--lr_warmup_steps", "1",
        "--logger", "none"]


def _env(tmp_path):
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
                PYTHONUNBUFFERED="1")


def _run(tmp_path, out, *flags, fault=None, check=True):
    cmd = [sys.executable, *([FAULTS, fault] if fault else [SCRIPT]), "--output_dir", str(out), *TINY, *flags]
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    return proc


def _run_until_paused(tmp_path, out, pause, *flags, timeout=300):
    """Starts a run that blocks at ``pause`` (injected by tests/fault_injection.py), SIGKILLs it there, returns
    its log."""
    return kill_at_pause(pause, ["--output_dir", out, *TINY, *flags], _env(tmp_path),
                         tmp_path / f"log-{pause.replace(':', '-')}.txt", timeout)


def _last_error_line(proc):
    """The CLI's one error line (a progress bar left open by the stop may be printed after it)."""
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("train.py: error:")]
    assert len(lines) == 1, proc.stderr[-4000:]
    return lines[0]


def _unet(path):
    return load_file(os.path.join(path, "unet", "diffusion_pytorch_model.safetensors"))


def _pipeline_pair(out):
    """(scheduler T, UNet weights) of the pipeline folder, loaded as a user would."""
    from ddpm_from_scratch import ScratchDDPMPipeline

    pipe = ScratchDDPMPipeline.from_pretrained(str(out))
    return pipe.scheduler.config.num_train_timesteps, {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_during_export_leaves_the_old_or_the_new_pipeline_never_a_mix(tmp_path):
    out = tmp_path / "out"
    _run(tmp_path, out, "--max_train_steps", "2", "--checkpointing_steps", "0")
    old_T, old_w = _pipeline_pair(out)
    assert old_T == 20
    # a second run into the same folder, with another schedule: killed at each instant of its export
    new_flags = ["--max_train_steps", "2", "--checkpointing_steps", "0", "--overwrite_output_dir",
                 "--ddpm_num_steps", "30", "--seed", "5"]
    for pause in ("mid_stage:1", "before_exchange:1"):
        _run_until_paused(tmp_path, out, pause, *new_flags)
        T, w = _pipeline_pair(out)
        assert T == old_T and _same(w, old_w), pause  # still the previous complete pipeline
        assert json.loads((out / "run_info.json").read_text())["final_step"] == 2
    _run_until_paused(tmp_path, out, "after_exchange:1", *new_flags)
    T, w = _pipeline_pair(out)
    assert T == 30 and not _same(w, old_w)  # the new one, whole
    card = (out / "README.md").read_text()
    assert str(out) in card and ".tmp-" not in card  # the card points at the folder, not the staging area
    # a kill leaves only hidden leftovers, which the next run removes
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith((".tmp-out-", ".deleting-out-"))]
    assert leftovers
    _run(tmp_path, out, *new_flags)
    assert not [n for n in os.listdir(tmp_path) if n.startswith((".tmp-out-", ".deleting-out-"))]
    assert not [n for n in os.listdir(out) if n.startswith((".tmp-", ".deleting-"))]
    assert _pipeline_pair(out)[0] == 30


def test_journaled_fallback_export_is_finished_by_recover(tmp_path, monkeypatch):
    """Where the atomic exchange is unavailable, entries are swapped under a journal; an interrupted swap (simulated:
    the journal written, nothing moved yet) is rolled forward by recover_export, which every run calls first."""
    from ddpm_from_scratch.trainer import export

    out = tmp_path / "out"
    out.mkdir()
    (out / "model_index.json").write_text("old")
    (out / "unet").mkdir()
    (out / "unet" / "w").write_text("old")
    (out / "checkpoint-3").mkdir()
    stage = out / ".tmp-export-x"
    stage.mkdir()
    (stage / "model_index.json").write_text("new")
    (stage / "unet").mkdir()
    (stage / "unet" / "w").write_text("new")

    def no_exchange(a, b):
        raise OSError(errno.ENOSYS, "no renameat2")

    monkeypatch.setattr(export, "_renameat2_exchange", no_exchange)
    monkeypatch.setattr(export, "_roll_forward", lambda final: None)  # "killed" right after the journal
    export.swap_in(str(out), str(stage))
    assert (out / export.JOURNAL).is_file()
    monkeypatch.undo()
    assert export.recover_export(str(out))
    assert (out / "model_index.json").read_text() == "new" and (out / "unet" / "w").read_text() == "new"
    assert (out / "checkpoint-3").is_dir() and not (out / export.JOURNAL).exists() and not stage.exists()


def test_non_finite_loss_stops_naming_the_step_and_keeps_good_checkpoints(tmp_path):
    out = tmp_path / "out"
    flags = ["--max_train_steps", "8", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2"]
    proc = _run(tmp_path, out, *flags, fault="nan_at:5", check=False)  # micro-batch 5 = optimizer step 6
    assert proc.returncode == 2
    line = _last_error_line(proc)
    assert "non-finite loss at optimizer step 6" in line
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [2, 4]  # nothing saved over or rotated out
    for _, path in ckpt.list_checkpoints(str(out)):
        assert ckpt.checkpoint_problem(path) is None
        assert all(torch.isfinite(v).all() for v in load_file(os.path.join(path, "model.safetensors")).values())
    assert not (out / "model_index.json").exists() and not (out / "unet").exists()  # nothing exported
    # opt-in skip mode: the bad step is skipped (bounded), the run finishes with finite weights
    skip = tmp_path / "skip"
    _run(tmp_path, skip, *flags, "--nan_policy", "skip", "--max_nan_skips", "1", fault="nan_at:5")
    assert all(torch.isfinite(v).all() for v in _unet(skip).values())
    assert json.loads((skip / "checkpoint-8" / ckpt.STATE_FILE).read_text())["nan_skips"] == 1
    over = _run(tmp_path, tmp_path / "over", *flags, "--nan_policy", "skip", "--max_nan_skips", "0",
                fault="nan_at:5", check=False)
    assert over.returncode == 2 and "--max_nan_skips" in _last_error_line(over)


def test_full_disk_while_checkpointing_names_the_folder_and_leaves_no_temp(tmp_path):
    out = tmp_path / "out"
    proc = _run(tmp_path, out, "--max_train_steps", "6", "--checkpointing_steps", "2", fault="enospc:4",
                check=False)
    assert proc.returncode == 2
    line = _last_error_line(proc)
    assert "no space left" in line and str(out) in line
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [2]
    assert ckpt.checkpoint_problem(str(out / "checkpoint-2")) is None
    assert not (out / "model_index.json").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "out"
    _run(tmp, out, "--max_train_steps", "4", "--checkpointing_steps", "2")
    return tmp, out


def test_incompatible_resume_lists_every_difference(finished, tmp_path):
    _, out = finished
    proc = _run(tmp_path, out, "--max_train_steps", "6", "--checkpointing_steps", "2", "--resume_from_checkpoint",
                "latest", "--ddpm_num_steps", "40", "--prediction_type", "v_prediction", "--seed", "3",
                "--no-use_ema", check=False)
    assert proc.returncode == 2
    line = _last_error_line(proc)
    for difference in ("ddpm_num_steps: 20 -> 40", "prediction_type: 'epsilon' -> 'v_prediction'", "seed: 0 -> 3",
                       "use_ema: True -> False"):
        assert difference in line, line
    assert "checkpoint-4" in line
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [2, 4]


def test_corrupt_checkpoints(finished, tmp_path):
    import shutil

    _, src = finished
    out = tmp_path / "out"
    shutil.copytree(src, out)
    # the newest checkpoint damaged on disk: "latest" warns naming the file and resumes from the previous one
    weights = out / "checkpoint-4" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    proc = _run(tmp_path, out, "--max_train_steps", "5", "--checkpointing_steps", "0", "--resume_from_checkpoint",
                "latest")
    assert f"skipping checkpoint {out / 'checkpoint-4'}" in proc.stderr and str(weights) in proc.stderr
    assert "resumed from" in proc.stderr and str(out / "checkpoint-2") in proc.stderr
    assert json.loads((out / "run_info.json").read_text())["start_step"] == 2
    # a named corrupt checkpoint is an error naming the file
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ckpt.resolve_checkpoint(str(out), "checkpoint-4")
    named = _run(tmp_path, out, "--max_train_steps", "6", "--resume_from_checkpoint", "checkpoint-4", check=False)
    assert named.returncode == 2 and str(weights) in _last_error_line(named)
    # a truncated or missing RNG state is an error, never skipped
    rng = out / "checkpoint-2" / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="random_states_0.pkl"):
        ckpt.resolve_checkpoint(str(out), "checkpoint-2")
    rng.unlink()
    with pytest.raises(CheckpointError, match="random_states_0.pkl is missing"):
        ckpt.resolve_checkpoint(str(out), "checkpoint-2")
    # an older checkpoint without a manifest: a truncated RNG state is still caught
    state = json.loads((out / "checkpoint-2" / ckpt.STATE_FILE).read_text())
    state.pop("manifest")
    (out / "checkpoint-2" / ckpt.STATE_FILE).write_text(json.dumps(state))
    rng.write_bytes(b"\x80\x04 truncated")
    assert "random_states_0.pkl is unreadable" in ckpt.checkpoint_problem(str(out / "checkpoint-2"))
    # a 2-process resume needs the second process's RNG state too
    assert "random_states_1.pkl is missing" in ckpt.checkpoint_problem(str(src / "checkpoint-4"), num_processes=2)


def test_resume_with_changed_cadence_is_allowed_and_logged_and_metrics_are_trimmed(finished, tmp_path):
    import shutil

    _, src = finished
    out = tmp_path / "out"
    shutil.copytree(src, out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all({"loss", "lr", "grad_norm"} <= set(r) for r in records)
    proc = _run(tmp_path, out, "--max_train_steps", "6", "--checkpointing_steps", "3", "--resume_from_checkpoint",
                "checkpoint-2")
    assert "resume: changed setting max_train_steps: 4 -> 6" in proc.stderr
    assert "resume: changed setting checkpointing_steps: 2 -> 3" in proc.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the old run's 3 and 4 were dropped before the resumed run wrote its own

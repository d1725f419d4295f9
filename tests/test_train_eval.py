"""--eval_steps / --keep_best / --export / the end-of-run report, through training/train.py in real subprocesses:
metrics at the expected steps, the same values after a SIGKILL + resume, the best weights surviving the rotation and
exported when asked, and a real 2-process run sharing the evaluation."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "training", "train.py")
FAULTS = os.path.join(ROOT, "tests", "fault_injection.py")

# the tiny preset on the digits, T = 20; evaluation: 8 samples of 4 steps, the bound on a 3-step chain, chunks of 4
FAST = ["--unet_preset", "tiny", "--train_batch_size", "8", "--ddpm_num_steps", "20", "--ddpm_num_inference_steps",
        "4", "--eval_batch_size", "4", "--eval_num_samples", "8", "--eval_bound_steps", "3", "--save_images_steps", "0",
        "--logging_steps", "2", "--lr_warmup_steps", "2", "--seed", "5", "--report", "false"]


def _env(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONUNBUFFERED="1")
    return env


def _train(tmp_path, out, *flags, launcher=None, check=True):
    cmd = (launcher or [sys.executable]) + [SCRIPT, "--output_dir", str(out), *FAST, *flags]
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=ROOT)
    if check:
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    return proc


def _evals(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if any(k.startswith("eval/") for k in r)]


def _kill_after_checkpoint(tmp_path, out, step, *flags):
    log = tmp_path / "killed.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, FAULTS, f"after_checkpoint:{step}", "--output_dir", str(out), *FAST,
                                 *flags], cwd=ROOT, env=_env(tmp_path), stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    try:
        while f"PAUSED after_checkpoint:{step}" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_metrics_at_the_expected_steps_and_the_same_after_a_kill_and_resume(tmp_path):
    # in the training process (the background path has its own kill tests below)
    flags = ["--max_train_steps", "10", "--eval_steps", "4", "--checkpointing_steps", "4", "--eval_async", "false"]
    ref = tmp_path / "ref"
    _train(tmp_path, ref, *flags)
    evals = _evals(ref)
    assert [r["step"] for r in evals] == [4, 8, 10]  # every 4 steps and at the end
    for r in evals:
        assert set(r) == {"step", "eval/fdd", "eval/bits_per_dim"} and all(v > 0 for k, v in r.items())
    info = json.loads((ref / "run_info.json").read_text())
    assert info["evaluations"] == evals and info["eval_settings"]["eval_num_samples"] == 8
    from ddpm_from_scratch.report import read_tensorboard_scalars

    tb = read_tensorboard_scalars(str(ref / "logs"))
    assert tb["eval/fdd"].steps.tolist() == [4, 8, 10]
    assert tb["eval/fdd"].values.tolist() == pytest.approx([r["eval/fdd"] for r in evals], rel=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = []
    for path in (ref / "logs").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path), size_guidance={"images": 0})
        acc.Reload()
        if "eval/samples" in acc.Tags().get("images", []):
            images += [e.step for e in acc.Images("eval/samples")]
    assert sorted(images) == [4, 8, 10]
    # killed right after checkpoint-8 (before its evaluation), then resumed: the same records, bit for bit
    run = tmp_path / "run"
    _kill_after_checkpoint(tmp_path, run, 8, *flags)
    assert [r["step"] for r in _evals(run)] == [4]
    _train(tmp_path, run, *flags, "--resume_from_checkpoint", "latest")
    assert _evals(run) == evals


def test_best_weights_survive_the_rotation_and_are_exported_when_asked(tmp_path):
    flags = ["--max_train_steps", "8", "--eval_steps", "2", "--checkpointing_steps", "2", "--checkpoints_total_limit",
             "1", "--keep_best", "fdd", "--learning_rate", "0.05", "--lr_scheduler", "constant"]
    out = tmp_path / "out"
    _train(tmp_path, out, *flags, "--export", "best")
    evals = _evals(out)
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    best_record = min(evals, key=lambda r: r["eval/fdd"])
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["step"] == best_record["step"] and best["value"] == best_record["eval/fdd"] and best["metric"] == "fdd"
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == ["checkpoint-8"]  # rotation ran
    exported = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    kept = load_file(str(out / "best" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert exported.keys() == kept.keys() and all(torch.equal(exported[k], kept[k]) for k in kept)
    card = (out / "README.md").read_text()
    assert f"best by fdd ({best['value']:.4f} at step {best['step']} of 8" in card
    # --export last (the default): the last EMA weights, and the card says so
    last = tmp_path / "last"
    _train(tmp_path, last, *flags)
    assert "last (step 8, --export last)" in (last / "README.md").read_text()
    assert json.loads((last / "best" / "best.json").read_text()) == best
    assert best["step"] < 8  # with this seed the best came early: its checkpoint was rotated out, best/ was not


def test_bad_eval_settings_are_refused_before_training(tmp_path):
    cases = [(["--eval_steps", "-1"], "--eval_steps"), (["--keep_best", "fdd"], "--keep_best"),
             (["--export", "best"], "--export best"), (["--eval_steps", "2", "--eval_num_samples", "1"],
                                                       "--eval_num_samples"),
             (["--eval_steps", "2", "--keep_best", "fdd", "--eval_num_samples", "0"], "--keep_best fdd"),
             (["--eval_steps", "2", "--eval_bound_steps", "21"], "--eval_bound_steps")]
    for flags, needle in cases:
        proc = _train(tmp_path, tmp_path / "bad", "--max_train_steps", "4", *flags, check=False)
        assert proc.returncode == 2, (flags, proc.stderr[-2000:])
        assert needle in proc.stderr and "Traceback" not in proc.stderr, (flags, proc.stderr[-2000:])
        assert not (tmp_path / "bad").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_run_shares_the_evaluation(tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]
    out = tmp_path / "two"
    flags = ["--max_train_steps", "4", "--eval_steps", "2", "--checkpointing_steps", "0", "--train_batch_size", "4"]
    proc = _train(tmp_path, out, *flags, launcher=launcher)
    info = json.loads((out / "run_info.json").read_text())
    assert info["num_processes"] == 2
    assert [r["step"] for r in info["evaluations"]] == [2, 4]
    # each process sampled and scored its share (8 samples, 359 held-out digits, chunks of 4)
    assert info["eval_work"] == [{"rank": 0, "samples": 4, "bound_images": 180},
                                 {"rank": 1, "samples": 4, "bound_images": 179}]
    assert proc.stderr.count("evaluation at step 2") == 1  # logged once, by the main process


# ---- --eval_async: the same evaluations from a background worker process --------------------------------------------
# 4 steps, evaluated at 2 (a worker when async) and 4 (the last one: in the training process), checkpoints at 2 and 4
ASYNC = ["--max_train_steps", "4", "--eval_steps", "2", "--checkpointing_steps", "2", "--keep_best", "fdd",
         "--export", "best", "--learning_rate", "0.05", "--lr_scheduler", "constant"]
PENDING = ".eval-pending"


@pytest.fixture(scope="module")
def sync_reference(tmp_path_factory):
    """The in-process run of ASYNC: its evaluation records and its folder."""
    tmp = tmp_path_factory.mktemp("sync")
    _train(tmp, tmp / "out", *ASYNC, "--eval_async", "false")
    return _evals(tmp / "out"), tmp / "out"


def _weights(path):
    return load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _worker_pid(log_text, step):
    marker = f"evaluation of step {step} started in a background worker (pid "
    return int(log_text.split(marker, 1)[1].split(",", 1)[0]) if marker in log_text else None


def test_async_and_sync_evaluations_record_the_same(tmp_path, sync_reference):
    ref_evals, ref = sync_reference
    out = tmp_path / "async"
    proc = _train(tmp_path, out, *ASYNC, "--eval_async", "true")
    assert "evaluation at step 2 (" in proc.stderr and "in a background worker): {" in proc.stderr
    assert [r["step"] for r in ref_evals] == [2, 4]
    assert _evals(out) == ref_evals  # bit for bit
    info, ref_info = (json.loads((p / "run_info.json").read_text()) for p in (out, ref))
    assert info["eval_async"] is True and ref_info["eval_async"] is False
    assert info["evaluations"] == ref_info["evaluations"] and info["eval_worker_seconds"] > 0
    assert json.loads((out / "best" / "best.json").read_text()) == json.loads((ref / "best" / "best.json").read_text())
    assert _same_weights(_weights(out / "best"), _weights(ref / "best"))
    assert _same_weights(_weights(out), _weights(ref))  # --export best: the same exported weights
    assert not (out / PENDING).exists()  # cleaned up after recording
    from ddpm_from_scratch.report import read_tensorboard_scalars

    tb = read_tensorboard_scalars(str(out / "logs"))
    assert tb["eval/fdd"].steps.tolist() == [2, 4]  # at the evaluated step, not at the step it was recorded
    assert tb["eval/fdd"].values.tolist() == pytest.approx([r["eval/fdd"] for r in ref_evals], rel=1e-6)


def _run_until(tmp_path, out, needle_of, *flags, fault=None):
    """Starts train.py (through fault_injection.py with ``fault``) and waits until ``needle_of(log)`` is not None;
    returns (process, log path, that value)."""
    log = tmp_path / f"{out.name}.log"
    cmd = [sys.executable, *([FAULTS, fault] if fault else [SCRIPT]), "--output_dir", str(out), *FAST, *flags]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp_path), stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while (value := needle_of(log.read_text())) is None:
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return proc, log, value


def test_a_killed_worker_stops_training_naming_the_step_and_resume_redoes_it(tmp_path, sync_reference):
    """The worker dies: an error, its weights kept; the resumed run evaluates them in a new worker."""
    out = tmp_path / "run"
    proc, log, pid = _run_until(tmp_path, out, lambda text: _worker_pid(text, 2), *ASYNC, "--eval_async", "true")
    os.kill(pid, signal.SIGKILL)  # the worker dies mid-evaluation (it needs seconds just to import torch)
    assert proc.wait(timeout=240) == 2
    text = log.read_text()
    assert "train.py: error: the background evaluation of step 2 failed (killed by signal 9)" in text, text[-3000:]
    assert "Traceback" not in text
    assert (out / PENDING / "step-2" / "unet" / "diffusion_pytorch_model.safetensors").is_file()  # kept
    assert not os.path.exists(out / "model_index.json")  # nothing exported
    resumed = _train(tmp_path, out, *ASYNC, "--eval_async", "true", "--resume_from_checkpoint", "latest")
    assert "evaluating the pending step 2 of the killed run from its weights" in resumed.stderr
    assert _evals(out) == sync_reference[0]
    assert not (out / PENDING).exists()
    assert _same_weights(_weights(out / "best"), _weights(sync_reference[1] / "best"))


def test_a_run_killed_while_its_worker_is_pending_resumes_and_records_it_once(tmp_path, sync_reference):
    out = tmp_path / "run"
    fault = "after_eval_start:2"
    proc, log, _ = _run_until(tmp_path, out, lambda text: True if f"PAUSED {fault}" in text else None, *ASYNC,
                              "--eval_async", "true", fault=fault)
    pid = _worker_pid(log.read_text(), 2)
    proc.send_signal(signal.SIGKILL)  # the training process dies; its orphaned worker finishes and writes its result
    proc.wait(timeout=30)
    result = out / PENDING / "step-2" / "result.json"
    deadline = time.monotonic() + 120
    while not result.is_file():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    while os.path.exists(f"/proc/{pid}") and "zombie" not in open(f"/proc/{pid}/status").read().lower():
        time.sleep(0.05)
    assert _evals(out) == []  # nobody recorded it
    resumed = _train(tmp_path, out, *ASYNC, "--eval_async", "true", "--resume_from_checkpoint", "latest")
    assert "recording the pending step 2 that the killed run's worker finished" in resumed.stderr
    assert _evals(out) == sync_reference[0]  # step 2 once, the same values as the uninterrupted run
    assert not (out / PENDING).exists()
    assert _same_weights(_weights(out), _weights(sync_reference[1]))


def test_bad_eval_async_settings_are_refused(tmp_path):
    proc = _train(tmp_path, tmp_path / "bad", "--max_train_steps", "4", "--eval_steps", "2", "--eval_async", "maybe",
                  check=False)
    assert proc.returncode == 2 and "--eval_async" in proc.stderr and "Traceback" not in proc.stderr
    # a launcher's several processes: 'true' cannot put one evaluation on one free core
    cmd = [sys.executable, SCRIPT, "--output_dir", str(tmp_path / "bad"), *FAST, "--max_train_steps", "4",
           "--eval_steps", "2", "--eval_async", "true"]
    proc = subprocess.run(cmd, env=dict(_env(tmp_path), WORLD_SIZE="2"), capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--eval_async true" in proc.stderr and "single-process" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_eval_async_setting_is_resolved_as_documented(monkeypatch):
    from ddpm_from_scratch.trainer import ConfigError, TrainConfig
    from ddpm_from_scratch.trainer.evaluation import resolve_eval_async

    # auto: on only for one CPU process with a core that torch leaves free
    assert resolve_eval_async("auto", 1, "cpu", 1, 2)[0] is True
    assert resolve_eval_async("auto", 1, "cpu", 2, 2)[0] is False
    assert resolve_eval_async("auto", 2, "cpu", 1, 4)[0] is False
    assert resolve_eval_async("auto", 1, "cuda", 1, 8)[0] is False
    assert resolve_eval_async("false", 1, "cpu", 1, 8)[0] is False
    assert resolve_eval_async("true", 1, "cpu", 2, 2)[0] is True  # asked for: even without a free core
    for processes, device in ((2, "cpu"), (1, "cuda")):
        with pytest.raises(ConfigError, match="--eval_async true .* single-process CPU run"):
            resolve_eval_async("true", processes, device, 1, 8)
    # a config file's JSON booleans are accepted; anything else names the flag and its choices
    TrainConfig(eval_steps=2, eval_async=True).validate()
    TrainConfig(eval_steps=2, eval_async=False).validate()
    with pytest.raises(ConfigError, match=r"--eval_async must be one of \['auto', 'true', 'false'\], got 'yes'"):
        TrainConfig(eval_steps=2, eval_async="yes").validate()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--eval_async true .* this one has 2 processes"):
        TrainConfig(eval_steps=2, eval_async="true").validate()
    TrainConfig(eval_steps=2, eval_async="auto").validate()

"""training/train.py run for real in subprocesses: crash + resume bit-exactness, atomic checkpoints, a real
2-process gloo run, the exported pipeline and card, bad input, and a push to the local Hub server."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ddpm_from_scratch.trainer import checkpoints as ckpt
from ddpm_from_scratch.trainer.ema import EMA, EMA_FILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "training", "train.py")
FAULTS = os.path.join(ROOT, "tests", "fault_injection.py")
sys.path.insert(0, os.path.join(ROOT, "tests"))
from fault_injection import kill_at_pause  # noqa: E402

# tiny, fast settings shared by every run: the digits, 12 optimizer steps, a 5-step sampler for the grids
FAST = ["--train_batch_size", "8", "--ddpm_num_inference_steps", "4", "--eval_batch_size", "4",
        "--save_images_steps", "0", "--logging_steps", "2", "--lr_warmup_steps", "2", "--seed", "7"]


def _env(tmp_path, **extra):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
               HF_DATASETS_CACHE=str(tmp_path / "hf_home" / "datasets"), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _train(tmp_path, out, *flags, env=None, launcher=None, check=True, timeout=240):
    cmd = (launcher or [sys.executable]) + [SCRIPT, "--output_dir", str(out), *FAST, *flags]
    proc = subprocess.run(cmd, env=env or _env(tmp_path), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _train_until_paused(tmp_path, out, pause, *flags, timeout=240):
    """Starts a run that blocks at ``pause`` (injected by tests/fault_injection.py), SIGKILLs it there, returns
    its log."""
    return kill_at_pause(pause, ["--output_dir", out, *FAST, *flags], _env(tmp_path),
                         tmp_path / f"log-{pause.replace(':', '-')}.txt", timeout)


def _weights(path):
    return load_file(os.path.join(path, "unet", "diffusion_pytorch_model.safetensors"))


def _assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: 12 steps of the `digits` preset (dropout 0.1: the RNG states matter), EMA on."""
    tmp = tmp_path_factory.mktemp("ref")
    out = tmp / "out"
    _train(tmp, out, "--max_train_steps", "12", "--checkpointing_steps", "4", "--checkpoints_total_limit", "2")
    return tmp, out


def test_kill_after_checkpoint_and_during_save_then_resume_is_bit_identical(tmp_path, uninterrupted):
    _, ref = uninterrupted
    out = tmp_path / "out"
    flags = ["--max_train_steps", "12", "--checkpointing_steps", "4", "--checkpoints_total_limit", "2"]
    # 1) SIGKILL right after checkpoint-4 is complete
    _train_until_paused(tmp_path, out, "after_checkpoint:4", *flags)
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [4]
    # foreign and incomplete dirs that the checkpoint limit must never delete
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-notes").mkdir()
    # 2) resume, then SIGKILL while checkpoint-8 is written (after save_state, before the rename)
    log = _train_until_paused(tmp_path, out, "during_save:8", *flags, "--resume_from_checkpoint", "latest")
    assert "resumed from" in log and "checkpoint-4" in log
    assert os.path.isdir(out / f"{ckpt.TMP_PREFIX}8") and not os.path.exists(out / "checkpoint-8")
    assert ckpt.resolve_checkpoint(str(out), "latest") == str(out / "checkpoint-4")  # previous one still usable
    # 3) resume again (from 4: 8 never completed) and finish
    _train(tmp_path, out, *flags, "--resume_from_checkpoint", "latest")
    _assert_bit_identical(_weights(out), _weights(ref))  # exported EMA weights
    _assert_bit_identical(load_file(str(out / "checkpoint-12" / "model.safetensors")),
                          load_file(str(ref / "checkpoint-12" / "model.safetensors")))  # raw weights
    # limit 2: 4 went, 8 and 12 stay; the incomplete/foreign dirs were not touched; the temp dir was replaced
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [8, 12]
    assert os.path.isdir(out / "checkpoint-2") and os.path.isdir(out / "checkpoint-notes")
    assert not os.path.exists(out / f"{ckpt.TMP_PREFIX}8")
    info = json.loads((out / "run_info.json").read_text())
    assert info["start_step"] == 4 and info["final_step"] == 12
    ref_info = json.loads((ref / "run_info.json").read_text())
    assert info["last_losses"] == ref_info["last_losses"] and len(info["last_losses"]) == 12


def test_output_dir_is_a_loadable_pipeline_with_card_and_grid(uninterrupted):
    from ddpm_from_scratch.pipeline_ddpm import ScratchDDPMPipeline

    _, out = uninterrupted
    pipe = ScratchDDPMPipeline.from_pretrained(str(out))
    assert pipe.unet.config.in_channels == 1 and pipe.unet.config.sample_size == 8
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 1)
    # the saved UNet holds the EMA weights (as in the last checkpoint), not the raw ones
    ema = load_file(str(out / "checkpoint-12" / EMA_FILE))
    raw = load_file(str(out / "checkpoint-12" / "model.safetensors"))
    exported = dict(pipe.unet.state_dict())
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    for k in ema:
        assert torch.equal(exported[k], ema[k]), k
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "![samples](samples.png)" in card
    assert "sklearn.datasets.load_digits" in card and "max_train_steps" in card and "final training loss" in card
    assert "datasets:" not in card.split("---")[1]  # the built-in digits are no Hub dataset id
    assert (out / "samples.png").is_file() and (out / "samples" / "step_12.png").is_file()
    from PIL import Image

    assert Image.open(out / "samples.png").size[0] >= 64
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "logs" / "train"))
    acc.Reload()
    assert {"loss", "lr", "grad_norm", "steps_per_second", "ema_decay"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [2, 4, 6, 8, 10, 12]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_matches_one_process_and_pushes(tmp_path):
    from hub_server import HubServer

    tiny = ["--unet_preset", "tiny", "--max_train_steps", "6", "--checkpointing_steps", "3",
            "--gradient_accumulation_steps", "2", "--max_grad_norm", "0.5", "--ema_max_decay", "0.5"]
    # 2 processes x batch 4 (gloo, MULTI_CPU)
    two = tmp_path / "two"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]
    flags2 = [f if f != "8" else "4" for f in FAST]
    cmd = launcher + [SCRIPT, "--output_dir", str(two), *flags2, *tiny]
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    info = json.loads((two / "run_info.json").read_text())
    assert info["distributed_type"] == "DistributedType.MULTI_CPU" and info["num_processes"] == 2
    assert info["global_batch"] == 8
    # EMA: one update per optimizer step (6), not per micro-batch (12) or per process
    from safetensors import safe_open

    with safe_open(str(two / "checkpoint-6" / EMA_FILE), "pt") as f:
        assert f.metadata()["num_updates"] == "6"
    assert proc.stdout.count("Done:") == 1  # only the main process reports (and writes)
    events = list((two / "logs").rglob("events.out.tfevents.*"))  # name: ...tfevents.<time>.<host>.<pid>.<n>
    assert events and len({e.name.split(".")[-2] for e in events}) == 1  # written by one process
    assert sorted(os.listdir(two / "checkpoint-6")).count("model.safetensors") == 1
    # 1 process x batch 8, pushed to the local Hub with a token that must not leak
    one = tmp_path / "one"
    token = "hf_abcdefghijklmnopqrstuvwxyz0123"
    with HubServer(root=str(tmp_path / "hub")) as hub:
        env = hub.client_env(str(tmp_path / "hf_home_push"), token=token)
        env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.pop("HF_HUB_OFFLINE", None)
        _train(tmp_path, one, *tiny, "--push_to_hub", "--hub_model_id", "tester/tiny-ddpm", env=env)
        files = hub.read_files("tester/tiny-ddpm")
    info1 = json.loads((one / "run_info.json").read_text())
    assert info1["distributed_type"] == "DistributedType.NO" and info1["num_processes"] == 1
    # Same images, t and eps in every global batch: the step-1 loss (same initial weights) agrees to float
    # rounding; later ones and the weights drift only by reduction order (DDP averages two half-batch gradients),
    # which Adam amplifies for near-zero gradient entries: 1e-4 is 5% of one step of lr 2e-3.
    l1, l2 = info1["last_losses"], info["last_losses"]
    assert len(l1) == len(l2) == 6
    assert l2[0] == pytest.approx(l1[0], rel=1e-6)
    assert l2 == pytest.approx(l1, rel=1e-4)
    for ckpt_file in ("model.safetensors", EMA_FILE):  # raw and EMA weights
        w1 = load_file(str(one / "checkpoint-6" / ckpt_file))
        w2 = load_file(str(two / "checkpoint-6" / ckpt_file))
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-4)
    w1, w2 = _weights(one), _weights(two)  # the exported (EMA) UNet
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-4)
    assert any(not torch.equal(w1[k], load_file(str(one / "checkpoint-3" / "model.safetensors"))[k]) for k in w1)
    # the push: the pipeline, card and grid went up; checkpoints and logs did not; no token anywhere
    assert {"model_index.json", "README.md", "samples.png", "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json"} <= set(files)
    assert not any(p.startswith(("checkpoint-", "logs/", ".tmp")) for p in files)
    assert all(token.encode() not in data for data in files.values())
    assert "tester/tiny-ddpm" in files["README.md"].decode()


def test_bad_data_stops_before_any_model_with_a_clear_message(tmp_path):
    proc = _train(tmp_path, tmp_path / "out", "--train_data_dir", str(tmp_path / "missing"), check=False)
    assert proc.returncode != 0
    assert "--train_data_dir" in proc.stderr and "does not exist" in proc.stderr
    assert "training " not in proc.stderr  # no model was built
    assert not os.path.exists(tmp_path / "out" / "run_info.json")
    # one unreadable file among good ones: stops naming it, or trains without it with --on_bad_image skip
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(8):
        Image.new("RGB", (10 + i, 9), (30 * i, 0, 0)).save(imgs / f"img{i}.png")
    (imgs / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    proc = _train(tmp_path, tmp_path / "out", "--train_data_dir", str(imgs), "--unet_preset", "tiny", check=False)
    assert proc.returncode != 0 and "corrupt.jpg" in proc.stderr and "--on_bad_image skip" in proc.stderr
    assert not os.path.exists(tmp_path / "out" / "run_info.json")
    _train(tmp_path, tmp_path / "out", "--train_data_dir", str(imgs), "--unet_preset", "tiny", "--on_bad_image",
           "skip", "--max_train_steps", "2", "--checkpointing_steps", "0")
    info = json.loads((tmp_path / "out" / "run_info.json").read_text())
    assert info["skipped_images"] == 1 and info["num_images"] == 8 and info["image_channels"] == 3


def test_help_documents_the_flags():
    proc = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--dataset_name", "--train_data_dir", "--resolution", "--center_crop", "--random_flip",
                 "--train_batch_size", "--eval_batch_size", "--num_epochs", "--max_train_steps",
                 "--gradient_accumulation_steps", "--learning_rate", "--lr_scheduler", "--lr_warmup_steps",
                 "--adam_beta1", "--adam_beta2", "--adam_weight_decay", "--adam_epsilon", "--max_grad_norm",
                 "--use_ema", "--ema_max_decay", "--ema_inv_gamma", "--ema_power", "--mixed_precision",
                 "--checkpointing_steps", "--checkpoints_total_limit", "--resume_from_checkpoint", "--output_dir",
                 "--logger", "--logging_dir", "--push_to_hub", "--hub_model_id", "--hub_private_repo",
                 "--hub_token", "--seed", "--prediction_type", "--ddpm_num_steps", "--ddpm_beta_schedule",
                 "--ddpm_num_inference_steps", "--save_images_steps", "--unet_preset", "--variance_type", "--loss",
                 "--snr_gamma", "--dataset_config_name", "--cache_dir"):
        assert flag in proc.stdout, flag


# ---- trainer modules in-process: EMA against its closed form, checkpoint housekeeping ----

def test_ema_matches_closed_form_float64():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, max_decay=0.9, power=0.75, inv_gamma=1.0)
    ref = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    for n in range(1, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        used = ema.update(model)
        k = n - 1  # updates counted after the first
        expected = 0.0 if k <= 0 else min(0.9, 1 - (1 + k) ** -0.75)
        assert used == pytest.approx(expected, abs=1e-15)
        for name, p in model.named_parameters():
            ref[name] = expected * ref[name] + (1 - expected) * p.detach().double()
    for (name, _), s in zip(model.named_parameters(), ema.shadow):
        torch.testing.assert_close(s.double(), ref[name], rtol=1e-6, atol=1e-6)


def test_ema_save_load_roundtrip(tmp_path):
    model = torch.nn.Linear(3, 2)
    ema = EMA(model)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
    ema.save(str(tmp_path / "e.safetensors"))
    other = EMA(torch.nn.Linear(3, 2))
    other.load(str(tmp_path / "e.safetensors"))
    assert other.num_updates == 3 and all(torch.equal(a, b) for a, b in zip(ema.shadow, other.shadow))


def test_checkpoint_listing_and_pruning(tmp_path):
    for step in (1, 5, 10, 20):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / ckpt.STATE_FILE).write_text(json.dumps({"step": step}))
        torch.save({"step": step}, str(d / "random_states_0.pkl"))
    (tmp_path / "checkpoint-30").mkdir()  # incomplete
    (tmp_path / f"{ckpt.TMP_PREFIX}40").mkdir()  # being written
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [1, 5, 10, 20]
    assert ckpt.resolve_checkpoint(str(tmp_path), "latest") == str(tmp_path / "checkpoint-20")
    assert ckpt.resolve_checkpoint(str(tmp_path), "checkpoint-5") == str(tmp_path / "checkpoint-5")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.resolve_checkpoint(str(tmp_path), str(tmp_path / "checkpoint-30"))
    with pytest.raises(ValueError, match="does not exist"):
        ckpt.resolve_checkpoint(str(tmp_path), "checkpoint-99")
    removed = ckpt.prune_checkpoints(str(tmp_path), 2)
    assert sorted(os.path.basename(r) for r in removed) == ["checkpoint-1", "checkpoint-5"]
    assert sorted(os.listdir(tmp_path)) == sorted([f"{ckpt.TMP_PREFIX}40", "checkpoint-10", "checkpoint-20",
                                                   "checkpoint-30"])
    assert ckpt.resolve_checkpoint(str(tmp_path / "nowhere"), "latest") is None


def test_eval_at_end_puts_the_held_out_bound_and_fdd_on_the_card(tmp_path):
    from ddpm_from_scratch.metrics import digits_report
    from ddpm_from_scratch.pipeline_ddpm import ScratchDDPMPipeline

    out = tmp_path / "out"
    _train(tmp_path, out, "--unet_preset", "tiny", "--ddpm_num_steps", "20", "--max_train_steps", "4",
           "--checkpointing_steps", "0", "--eval_at_end", "--eval_num_samples", "32")
    info = json.loads((out / "run_info.json").read_text())["eval"]
    pipe = ScratchDDPMPipeline.from_pretrained(str(out))
    expected = digits_report(pipe.unet, pipe.scheduler, num_inference_steps=4, num_samples=32, batch_size=4,
                             generator=torch.Generator().manual_seed(7))
    assert info["num_images"] == 359 and info["num_steps"] == 4
    assert info["bits_per_dim"] == pytest.approx(expected["bits_per_dim"], rel=1e-5)
    assert info["fdd"] == pytest.approx(expected["fdd"], rel=1e-4)
    card = (out / "README.md").read_text()
    assert "bits/dim (held-out digits)" in card and "FDD (32 samples, 4 steps)" in card


def test_importance_sampled_vlb_training_resumes_bit_identically(tmp_path):
    """--loss vlb --importance_sampling: the sampler's loss history is checkpointed with the run (T = 5 steps so
    that it leaves its uniform warm-up within the run), so a killed and resumed run equals an uninterrupted one."""
    flags = ["--unet_preset", "tiny", "--ddpm_num_steps", "5", "--loss", "vlb", "--importance_sampling",
             "--variance_type", "learned_range", "--max_train_steps", "12", "--checkpointing_steps", "6"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    _train(tmp_path, ref, *flags)
    _train_until_paused(tmp_path, out, "after_checkpoint:6", *flags)
    _train(tmp_path, out, *flags, "--resume_from_checkpoint", "latest")
    _assert_bit_identical(load_file(str(out / "checkpoint-12" / "model.safetensors")),
                          load_file(str(ref / "checkpoint-12" / "model.safetensors")))
    state = torch.load(str(ref / "checkpoint-12" / "custom_checkpoint_1.pkl"), weights_only=False)
    assert int(state["counts"].sum()) == 12 * 8 and bool((state["counts"] >= 10).all())  # past the warm-up
    bad = _train(tmp_path, tmp_path / "bad", "--importance_sampling", check=False)
    assert bad.returncode != 0 and "--importance_sampling" in bad.stderr and "--loss vlb" in bad.stderr


def test_a_new_run_never_mixes_with_or_deletes_an_earlier_runs_checkpoints(tmp_path):
    """A killed first run leaves checkpoints; a plain rerun refuses (it would replace checkpoint-4), and
    --overwrite_output_dir moves them to previous-checkpoints-1/ instead of deleting them."""
    out = tmp_path / "out"
    flags = ["--unet_preset", "tiny", "--ddpm_num_steps", "20", "--max_train_steps", "4", "--checkpointing_steps", "4"]
    _train_until_paused(tmp_path, out, "after_checkpoint:4", *flags)
    first = load_file(str(out / "checkpoint-4" / "model.safetensors"))
    again = _train(tmp_path, out, *flags, "--seed", "8", check=False)
    assert again.returncode != 0 and "earlier run" in again.stderr and "--resume_from_checkpoint latest" in again.stderr
    _train(tmp_path, out, *flags, "--seed", "8", "--overwrite_output_dir")
    _assert_bit_identical(load_file(str(out / "previous-checkpoints-1" / "checkpoint-4" / "model.safetensors")), first)
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [4]  # the new run's own
    assert not torch.equal(next(iter(first.values())),
                           next(iter(load_file(str(out / "checkpoint-4" / "model.safetensors")).values())))

"""diffusers' own command lines for ``examples/unconditional_image_generation/train_unconditional.py`` (tag v0.40.0:
the example's test file and its README) run against ``training/train.py`` as real subprocesses.

Each command line is diffusers' own, with two substitutions that keep the run offline: ``--dataset_name`` points at
a local image folder written here (datasets' ``imagefolder`` layout, as the Hub test set is), and
``--model_config_name_or_path`` at a local folder with a tiny ``UNet2DModel`` ``config.json`` (in place of the Hub
repo ``diffusers/ddpm_dummy``). The README command line runs unchanged apart from flags appended to cut its length,
and pushes to the local Hub server (tests/hub_server.py, 127.0.0.1). The record of these runs is docs/compat.md.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "training", "train.py")
sys.path.insert(0, os.path.join(ROOT, "tests"))

# A UNet2DModel small enough for a CPU: 2 levels of 16/32 channels, attention in the second (as diffusers' dummy).
TINY_UNET = {
    "_class_name": "UNet2DModel", "sample_size": 64, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
    "block_out_channels": [16, 32], "norm_num_groups": 8, "attention_head_dim": 8,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}
# The UNet of diffusers' example when no model config is given (train_unconditional.py, v0.40.0).
EXAMPLE_BLOCK_OUT_CHANNELS = [128, 128, 256, 256, 512, 512]


def _image_folder(root, n: int, seed: int = 0) -> str:
    """``n`` RGB PNGs of assorted sizes (not square, some smaller than 64 px) in two class subfolders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = os.path.join(root, f"class_{i % 2}")
        os.makedirs(folder, exist_ok=True)
        h, w = 40 + 7 * i, 48 + 5 * (i % 3)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, f"img{i}.png"))
    return str(root)


def _env(tmp_path, **extra) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONUNBUFFERED="1",
               HF_DATASETS_CACHE=str(tmp_path / "hf_home" / "datasets"))
    env.update(extra)
    return env


def _run(argv, env, cwd=ROOT, timeout=600) -> subprocess.CompletedProcess:
    """``python training/train.py *argv`` exactly as given (no flags added)."""
    return subprocess.run([sys.executable, SCRIPT, *argv], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _checkpoint_dirs(out) -> set[str]:
    """What diffusers' test compares: every entry of the output folder whose name contains 'checkpoint'."""
    return {name for name in os.listdir(out) if "checkpoint" in name}


def _card_arguments(out) -> dict[str, str]:
    """The model card's "Training arguments" table: {argument: value as printed}."""
    text = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    table = text.split("## Training arguments", 1)[1]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] not in ("argument", "---"):
            rows[cells[0]] = cells[1]
    return rows


def _test_command(data, model, out, *lines: str) -> list[str]:
    """The common part of the command lines in diffusers' test_unconditional.py, then ``lines``."""
    return ["--dataset_name", data, "--model_config_name_or_path", model, "--resolution", "64",
            "--output_dir", str(out), "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
            "--lr_warmup_steps", "5", *lines]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """(image folder of 6 images, as many as diffusers' test dataset; folder with the tiny UNet config)."""
    root = tmp_path_factory.mktemp("local")
    data = _image_folder(root / "images", 6)
    model = root / "tiny-unet"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_UNET))
    return data, str(model)


# ---- diffusers' test_unconditional.py ----

def test_basic_run_exports_a_pipeline_with_the_folders_unet(tmp_path, local):
    from ddpm_from_scratch import ScratchDDPMPipeline

    data, model = local
    out = tmp_path / "out"
    _ok(_run(_test_command(data, model, out, "--train_batch_size", "2", "--num_epochs", "1",
                           "--ddpm_num_inference_steps", "2"), _env(tmp_path)))
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    pipe = ScratchDDPMPipeline.from_pretrained(str(out))
    for key, value in TINY_UNET.items():
        if not key.startswith("_"):
            got = pipe.unet.config[key]
            assert (list(got) if isinstance(got, (list, tuple)) else got) == value, key
    info = json.loads((out / "run_info.json").read_text())
    assert info["num_images"] == 6 and info["final_step"] == 3  # one epoch of 6 images in batches of 2
    assert info["recipe"] == "diffusers"
    args = _card_arguments(out)
    assert args["learning_rate"] == "0.001" and args["lr_warmup_steps"] == "5" and args["use_ema"] == "False"
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_checkpoints_total_limit_keeps_the_newest(tmp_path, local):
    data, model = local
    out = tmp_path / "out"
    _ok(_run(_test_command(data, model, out, "--train_batch_size", "1", "--num_epochs", "1",
                           "--ddpm_num_inference_steps", "2", "--checkpointing_steps=2", "--checkpoints_total_limit=2"),
             _env(tmp_path)))
    assert _checkpoint_dirs(out) == {"checkpoint-4", "checkpoint-6"}


def test_resume_with_a_new_total_limit_continues_from_the_checkpoint_and_prunes(tmp_path, local):
    from ddpm_from_scratch.trainer import checkpoints as ckpt

    data, model = local
    out = tmp_path / "out"
    common = ("--train_batch_size", "1", "--ddpm_num_inference_steps", "1", "--checkpointing_steps=2")
    _ok(_run(_test_command(data, model, out, *common, "--num_epochs", "1"), _env(tmp_path)))
    assert _checkpoint_dirs(out) == {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    first = json.loads((out / "run_info.json").read_text())
    assert first["start_step"] == 0 and first["final_step"] == 6

    resumed = _ok(_run(_test_command(data, model, out, *common, "--num_epochs", "2",
                                     "--resume_from_checkpoint=checkpoint-6", "--checkpoints_total_limit=2"),
                       _env(tmp_path)))
    assert _checkpoint_dirs(out) == {"checkpoint-10", "checkpoint-12"}
    info = json.loads((out / "run_info.json").read_text())
    assert info["resumed_from"] == str(out / "checkpoint-6")
    assert info["start_step"] == 6 and info["final_step"] == 12 and info["max_train_steps"] == 12
    assert ckpt.read_training_state(str(out / "checkpoint-12"))["step"] == 12
    assert "at step 6" in resumed.stderr
    # the loss log continues the first run's: one record per logged step, none repeated
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 12


# ---- diffusers' README ----

def test_readme_flowers_command_trains_exports_and_pushes(tmp_path):
    """The README's "Unconditional Flowers" command line, word for word, with --dataset_name at a local folder of 16
    images (one batch). Appended, to cut the length only: --max_train_steps 1 (one optimizer step of the 100
    epochs), --ddpm_num_inference_steps 2 (the final sample grid) and --report false (our end-of-run report,
    which diffusers does not write; with it, the run took 119 s here instead of 37 s, docs/compat.md)."""
    from hub_server import HubServer

    from ddpm_from_scratch import ScratchDDPMPipeline

    data = _image_folder(tmp_path / "flowers", 16, seed=1)
    readme = [f"--dataset_name={data}", "--resolution=64", "--center_crop", "--random_flip",
              '--output_dir=ddpm-ema-flowers-64', "--train_batch_size=16", "--num_epochs=100",
              "--gradient_accumulation_steps=1", "--use_ema", "--learning_rate=1e-4", "--lr_warmup_steps=500",
              "--mixed_precision=no", "--push_to_hub"]
    cut = ["--max_train_steps", "1", "--ddpm_num_inference_steps", "2", "--report", "false"]
    work = tmp_path / "work"
    work.mkdir()
    token = "hf_readmeflowerstesttoken0123456"
    with HubServer(root=str(tmp_path / "hub")) as hub:
        env = hub.client_env(str(tmp_path / "hf_home"), token=token)
        env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_DATASETS_CACHE=str(tmp_path / "datasets"))
        _ok(_run(readme + cut, env, cwd=str(work)))
        # no --hub_model_id: like diffusers, the repo is the output folder's name in the token owner's namespace
        files = hub.read_files(f"{hub.user}/ddpm-ema-flowers-64")
    out = work / "ddpm-ema-flowers-64"
    for name in ("model_index.json", "README.md", "samples.png", "unet/config.json",
                 "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        assert files[name] == (out / name).read_bytes(), name
    assert not any(p.startswith(("checkpoint-", "logs/")) for p in files)
    assert all(token.encode() not in content for content in files.values())

    pipe = ScratchDDPMPipeline.from_pretrained(str(out))
    assert list(pipe.unet.config.block_out_channels) == EXAMPLE_BLOCK_OUT_CHANNELS
    assert pipe.unet.config.sample_size == 64 and pipe.unet.config.in_channels == 3
    info = json.loads((out / "run_info.json").read_text())
    assert info["ema"] is True and info["global_batch"] == 16 and info["final_step"] == 1
    args = _card_arguments(out)
    for key, value in {"learning_rate": "0.0001", "lr_warmup_steps": "500", "use_ema": "True", "center_crop": "True",
                       "random_flip": "True", "train_batch_size": "16", "num_epochs": "100",
                       "mixed_precision": "no", "unet_preset": "diffusers-example", "adam_beta1": "0.95",
                       "adam_weight_decay": "1e-06", "ema_max_decay": "0.9999"}.items():
        assert args[key] == value, (key, args.get(key))


# ---- a dataset smaller than one batch, launcher flags, refusals ----

def test_dataset_smaller_than_one_batch_is_refused_at_start_with_the_largest_batch_that_works(tmp_path, local):
    """5 images with the default batch of 16: refused before any model is built, naming the batch size that works;
    with that batch size the same command trains."""
    _, model = local
    data = _image_folder(tmp_path / "five", 5)
    out = tmp_path / "out"
    base = ["--dataset_name", data, "--output_dir", str(out), "--model_config_name_or_path", model,
            "--max_train_steps", "1", "--ddpm_num_inference_steps", "1", "--report", "false"]
    proc = _run(base, _env(tmp_path))
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1
    assert "--train_batch_size 16" in errors[0] and "5 images" in errors[0]
    assert "--train_batch_size 5 or smaller" in errors[0]
    assert "training " not in proc.stderr  # no model was built
    assert not (out / "run_info.json").exists() and not (out / "model_index.json").exists()

    _ok(_run(base + ["--train_batch_size", "5"], _env(tmp_path)))
    info = json.loads((out / "run_info.json").read_text())
    assert info["num_images"] == 5 and info["global_batch"] == 5 and info["final_step"] == 1


def test_local_rank_is_accepted_and_an_epoch_is_its_full_batches(tmp_path, local):
    """--local_rank 0 as a launcher passes it. Two epochs of 6 images in batches of 4 are 2 optimizer steps here: each
    epoch trains its full batches (a new permutation each epoch) and leaves the remainder to later epochs, where
    diffusers' DataLoader would also train a partial batch of 2 (4 steps); docs/compat.md gives the reason."""
    data, model = local
    out = tmp_path / "out"
    _ok(_run(["--local_rank", "0", "--dataset_name", data, "--model_config_name_or_path", model, "--output_dir",
              str(out), "--train_batch_size", "4", "--num_epochs", "2", "--ddpm_num_inference_steps", "1",
              "--report", "false"], _env(tmp_path)))
    info = json.loads((out / "run_info.json").read_text())
    assert info["num_processes"] == 1 and info["final_step"] == 2 and info["max_train_steps"] == 2


@pytest.mark.parametrize("flags, flag, reason", [
    (["--logger", "wandb"], "--logger wandb", "wandb package"),
    (["--enable_xformers_memory_efficient_attention"], "--enable_xformers_memory_efficient_attention", "CUDA GPU"),
])
def test_what_cannot_apply_here_is_refused_in_one_line_with_exit_2(tmp_path, local, flags, flag, reason):
    if flag == "--logger wandb" and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    if flag.startswith("--enable_xformers") and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    data, model = local
    out = tmp_path / "out"
    proc = _run(["--dataset_name", data, "--model_config_name_or_path", model, "--output_dir", str(out),
                 "--max_train_steps", "1", *flags], _env(tmp_path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("train.py: error:"), proc.stderr[-3000:]
    assert flag in errors[0] and reason in errors[0]
    assert not out.exists()  # refused before anything was written

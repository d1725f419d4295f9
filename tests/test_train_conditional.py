"""Class-conditional training (--class_conditional): real training runs in subprocesses (1 and 2 Accelerate
processes, a resume from a checkpoint), the label dropout keyed to the data position, and the model card."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ddpm_from_scratch import guidance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "training", "train.py")

FAST = ["--class_conditional", "--unet_preset", "tiny", "--ddpm_num_steps", "50", "--ddpm_num_inference_steps", "4",
        "--eval_batch_size", "20", "--save_images_steps", "0", "--logging_steps", "1", "--lr_warmup_steps", "2",
        "--seed", "3", "--logger", "none", "--class_dropout_prob", "0.3"]


def _env(tmp_path):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
               HF_DATASETS_CACHE=str(tmp_path / "hf_home" / "datasets"), PYTHONUNBUFFERED="1")
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(tmp_path, out, *flags, processes=1):
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                     "--main_process_port", str(_free_port())]
    cmd = launcher + [SCRIPT, "--output_dir", str(out), *FAST, *flags]
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((out / "run_info.json").read_text())


def _unet_weights(path):
    return load_file(os.path.join(path, "unet", "diffusion_pytorch_model.safetensors"))


# ----------------------------------------------------------------------------------------------
# Label dropout: a pure function of (seed, micro-batch), sliced per process
# ----------------------------------------------------------------------------------------------
def test_label_dropout_is_keyed_to_the_position_and_split_over_processes():
    labels = torch.arange(8) % 3
    one = guidance.drop_labels(labels, 0.4, 3, seed=5, micro_batch=11, global_batch=8)
    again = guidance.drop_labels(labels, 0.4, 3, seed=5, micro_batch=11, global_batch=8)
    assert torch.equal(one, again)
    halves = [guidance.drop_labels(labels[4 * r:4 * (r + 1)], 0.4, 3, seed=5, micro_batch=11, global_batch=8,
                                   process_index=r) for r in range(2)]
    assert torch.equal(torch.cat(halves), one)  # 2 processes x 4 == 1 process x 8
    kept = one != 3
    assert torch.equal(one[kept], labels[kept])  # a label is kept or becomes the null class, nothing else
    # the rate: over many micro-batches the null fraction is p (binomial, 6 sigma)
    n, p = 400, 0.1
    drops = torch.stack([guidance.drop_labels(torch.zeros(64, dtype=torch.int64), p, 10, 0, m, 64) == 10
                         for m in range(n)]).double()
    sigma = (p * (1 - p) / (n * 64)) ** 0.5
    assert abs(drops.mean().item() - p) < 6 * sigma
    assert not torch.equal(drops[0], drops[1])  # micro-batches differ
    with pytest.raises(ValueError, match="class_dropout_prob"):
        guidance.drop_labels(labels, 1.0, 3, 0, 0, 8)


# ----------------------------------------------------------------------------------------------
# Real runs
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """8 optimizer steps, 1 process, batch 8, checkpoints at 4 and 8."""
    tmp = tmp_path_factory.mktemp("cond_ref")
    out = tmp / "out"
    info = _train(tmp, out, "--train_batch_size", "8", "--max_train_steps", "8", "--checkpointing_steps", "4")
    return tmp, out, info


def test_conditional_output_folder_card_and_grid(reference):
    from PIL import Image

    from ddpm_from_scratch.pipeline_ddpm import ScratchDDPMPipeline

    _, out, info = reference
    assert info["class_names"] == [str(i) for i in range(10)]
    pipe = ScratchDDPMPipeline.from_pretrained(str(out))
    assert pipe.class_names == [str(i) for i in range(10)] and pipe.unet.config.num_class_embeds == 11
    images = pipe(class_labels=["7", 3], guidance_scale=2.0, num_inference_steps=3, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 8, 8, 1)
    card = (out / "README.md").read_text()
    assert "class-conditional" in card.split("---")[1]  # a tag in the metadata
    assert "A class-conditional image diffusion model" in card and "10 classes" in card
    assert "| 9 | 9 |" in card and "One row per class (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)" in card
    assert "class_labels=[\"0\"] * 4, guidance_scale=2" in card
    # the grid: 10 rows (one per class) of eval_batch_size // 10 = 2 samples
    grid = Image.open(out / "samples.png")
    assert grid.size[1] / grid.size[0] == pytest.approx((10 * 10 + 2) / (2 * 10 + 2), rel=1e-6)


def test_resume_from_a_checkpoint_is_bit_identical_with_labels(tmp_path, reference):
    _, ref, ref_info = reference
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(ref / "checkpoint-4", out / "checkpoint-4")
    info = _train(tmp_path, out, "--train_batch_size", "8", "--max_train_steps", "8", "--checkpointing_steps", "4",
                  "--resume_from_checkpoint", "latest")
    assert info["start_step"] == 4
    assert info["last_losses"] == ref_info["last_losses"]  # per-step losses: same data, labels, drops and noise
    for a, b in ((_unet_weights(out), _unet_weights(ref)),
                 (load_file(str(out / "checkpoint-8" / "model.safetensors")),
                  load_file(str(ref / "checkpoint-8" / "model.safetensors")))):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_conditional_run_matches_one_process(tmp_path, reference):
    _, ref, ref_info = reference
    out = tmp_path / "two"
    info = _train(tmp_path, out, "--train_batch_size", "4", "--max_train_steps", "8", "--checkpointing_steps", "4",
                  processes=2)
    assert info["num_processes"] == 2 and info["distributed_type"] == "DistributedType.MULTI_CPU"
    assert info["global_batch"] == 8 and info["class_names"] == ref_info["class_names"]
    # the same images, labels, dropped labels, t and eps in each global batch: equal first loss (same initial
    # weights), later ones and the weights only drift by the reduction order of the two half-batch gradients
    assert info["last_losses"][0] == pytest.approx(ref_info["last_losses"][0], rel=1e-6)
    assert info["last_losses"] == pytest.approx(ref_info["last_losses"], rel=1e-4)
    w1, w2 = _unet_weights(ref), _unet_weights(out)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-4)


def test_conditional_flags_are_checked_before_any_work(tmp_path):
    for flags, words in ((["--label_column", "label"], "--label_column is only used with --class_conditional"),
                         (["--class_conditional", "--class_dropout_prob", "0"], "--class_dropout_prob must be in"),
                         (["--class_conditional", "--class_dropout_prob", "1.5"], "--class_dropout_prob must be in")):
        proc = subprocess.run([sys.executable, SCRIPT, "--output_dir", str(tmp_path / "x"), *flags], cwd=ROOT,
                              env=_env(tmp_path), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "x").exists()

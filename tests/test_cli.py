"""The console entry point: evaluate / sample on a tiny saved pipeline, against the library calls it wires."""

import json

import numpy as np

import pytest
import torch
from PIL import Image

from ddpm_from_scratch import ScratchDDPMScheduler
from ddpm_from_scratch import cli
from ddpm_from_scratch import likelihood as L
from ddpm_from_scratch.metrics import digits_images
from ddpm_from_scratch.unet_presets import build_unet


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from ddpm_from_scratch.pipeline_ddpm import ScratchDDPMPipeline

    torch.manual_seed(0)
    unet = build_unet("tiny", in_channels=1).eval()
    sched = ScratchDDPMScheduler(num_train_timesteps=20)
    folder = tmp_path_factory.mktemp("model")
    ScratchDDPMPipeline(unet=unet, scheduler=sched).save_pretrained(folder)
    return str(folder), unet, sched


def test_evaluate_reports_the_library_bound(model_dir, tmp_path, capsys):
    folder, unet, sched = model_dir
    out_json = tmp_path / "r.json"
    res = cli.run(["evaluate", "--model", folder, "--num_images", "6", "--steps", "5", "--device", "cpu",
                    "--seed", "3", "--json", str(out_json), "--no_progress"])
    images, _ = digits_images(8, "test")
    expected = L.bits_per_dim(unet, sched, images[:6], num_inference_steps=5, batch_size=128,
                              generator=torch.Generator().manual_seed(3))
    assert res["bits_per_dim"] == pytest.approx(expected.total, rel=1e-6)
    saved = json.loads(out_json.read_text())
    assert saved["bits_per_dim"] == pytest.approx(expected.total, rel=1e-6)
    assert saved["num_steps"] == 5 and len(saved["terms_bpd"]) == 5
    assert "bits/dim" in capsys.readouterr().out


def test_evaluate_with_fdd(model_dir):
    folder, _, _ = model_dir
    res = cli.run(["evaluate", "--model", folder, "--num_images", "4", "--steps", "3", "--device", "cpu",
                    "--fdd", "--num_samples", "140", "--no_progress"])
    assert res["fdd"] > 0 and res["num_samples"] == 140


def test_sample_writes_a_grid(model_dir, tmp_path):
    folder, unet, sched = model_dir
    out = tmp_path / "grid.png"
    cli.main(["sample", "--model", folder, "--num_images", "5", "--steps", "4", "--out", str(out), "--device", "cpu",
              "--no_progress"])
    img = Image.open(out)
    assert img.size == (3 * 9 + 1, 2 * 9 + 1) and img.mode == "L"
    # the tiles are the library's samples
    expected = L.sample_images(unet, sched, 5, 4, generator=torch.Generator().manual_seed(0))
    tile = torch.from_numpy(np.asarray(img.crop((1, 1, 9, 9)), dtype=np.float32))
    torch.testing.assert_close(tile, ((expected[0, 0].clamp(-1, 1) + 1) * 127.5).round(), atol=1.0, rtol=0)


def test_bad_arguments(model_dir, tmp_path):
    folder, _, _ = model_dir
    with pytest.raises(SystemExit):
        cli.main(["sample", "--model", folder, "--num_images", "0", "--out", str(tmp_path / "g.png")])
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--model", str(tmp_path / "missing")])
    with pytest.raises(SystemExit):
        cli.main(["sample", "--model", folder, "--out", str(tmp_path / "g.txt"), "--steps", "2", "--no_progress"])
    existing = tmp_path / "keep.png"
    existing.write_bytes(b"precious")
    with pytest.raises(SystemExit):  # analytic variance without a gamma in the config: fails before writing
        cli.main(["sample", "--model", folder, "--out", str(existing), "--variance_type", "analytic", "--no_progress"])
    assert existing.read_bytes() == b"precious"


def test_estimate_variance_stores_gamma_and_enables_analytic_sampling(model_dir, tmp_path):
    import shutil

    folder = str(tmp_path / "model")
    shutil.copytree(model_dir[0], folder)
    cli.main(["estimate-variance", "--model", folder, "--num_images", "16", "--device", "cpu", "--no_progress"])
    loaded = ScratchDDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    unet = model_dir[1]
    train, _ = digits_images(8, "train")
    expected = L.estimate_analytic_gamma(unet, model_dir[2], train[:16], batch_size=128,
                                         generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(loaded.config.analytic_gamma, expected.numpy(), rtol=1e-6)
    assert loaded.config.variance_type == "fixed_small"  # the default sampler is unchanged
    out = tmp_path / "grid.png"
    cli.main(["sample", "--model", folder, "--num_images", "4", "--steps", "5", "--variance_type", "analytic",
              "--out", str(out), "--device", "cpu", "--no_progress"])
    assert out.exists()


def test_console_entry_point_exits_zero(model_dir, tmp_path):
    """The installed `ddpm-from-scratch` command, run for real: status 0 on success, 2 with a message on bad input."""
    import shutil
    import subprocess

    exe = shutil.which("ddpm-from-scratch")
    assert exe is not None, "the console script is not installed (pip install -e .)"
    out = tmp_path / "grid.png"
    ok = subprocess.run([exe, "sample", "--model", model_dir[0], "--num_images", "2", "--steps", "2", "--out", str(out),
                         "--device", "cpu", "--no_progress"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert out.exists()
    bad = subprocess.run([exe, "sample", "--model", str(tmp_path / "missing"), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--model" in bad.stderr


@pytest.fixture(scope="module")
def conditional_dir(tmp_path_factory):
    from ddpm_from_scratch.pipeline_ddpm import ScratchDDPMPipeline

    torch.manual_seed(0)
    unet = build_unet("tiny", in_channels=1, num_classes=3).eval()
    sched = ScratchDDPMScheduler(num_train_timesteps=20)
    folder = tmp_path_factory.mktemp("conditional")
    ScratchDDPMPipeline(unet=unet, scheduler=sched, class_names=["ant", "bee", "cow"]).save_pretrained(folder)
    return str(folder), unet, sched


def test_sample_chosen_classes_one_row_each(conditional_dir, tmp_path):
    folder, unet, sched = conditional_dir
    out = tmp_path / "grid.png"
    cli.main(["sample", "--model", folder, "--num_images", "6", "--steps", "3", "--out", str(out), "--device", "cpu",
              "--class_labels", "cow", "0", "--guidance_scale", "2", "--no_progress"])
    img = Image.open(out)
    assert img.size == (3 * 9 + 1, 2 * 9 + 1)  # 2 rows (one per label) of 3
    expected = L.sample_images(unet, sched, 6, 3, class_labels=[2, 2, 2, 0, 0, 0], guidance_scale=2.0,
                               generator=torch.Generator().manual_seed(0))
    for i in (0, 4):  # first tile of row 1 (cow), second tile of row 2 (ant)
        r, c = divmod(i, 3)
        tile = torch.from_numpy(np.asarray(img.crop((1 + 9 * c, 1 + 9 * r, 9 + 9 * c, 9 + 9 * r)), dtype=np.float32))
        torch.testing.assert_close(tile, ((expected[i, 0].clamp(-1, 1) + 1) * 127.5).round(), atol=1.0, rtol=0)


@pytest.mark.parametrize(
    "which,extra,words",
    [
        ("cond", ["--class_labels", "emu"], "unknown class name 'emu'"),
        ("cond", ["--class_labels", "3"], "label 3 is out of range"),
        ("cond", ["--class_labels", "0", "1", "--num_images", "3"], "multiple of the 2 --class_labels"),
        ("cond", ["--class_labels", "0", "--guidance_scale", "-1"], "guidance_scale must be a finite number >= 0"),
        ("cond", ["--guidance_scale", "2"], "--guidance_scale needs --class_labels"),
        ("plain", ["--class_labels", "0"], "class_labels needs a class-conditional UNet"),
    ],
)
def test_bad_conditioning_exits_2_with_one_line(model_dir, conditional_dir, tmp_path, capsys, which, extra, words):
    folder = (conditional_dir if which == "cond" else model_dir)[0]
    out = tmp_path / "g.png"
    with pytest.raises(SystemExit) as info:
        cli.main(["sample", "--model", folder, "--out", str(out), "--steps", "2", "--num_images", "2",
                  "--no_progress", *extra])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (diffusers' loading bar may come before it)
    assert info.value.code == 2 and last.startswith("ddpm-from-scratch sample: error: ") and words in last
    assert "Traceback" not in err and err.count("error:") == 1
    assert not out.exists()

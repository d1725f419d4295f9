"""The console entry point: evaluate / sample on a tiny saved pipeline, against the library calls it wires."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np

import pytest
import torch
from PIL import Image

from ddpm_from_scratch import ScratchDDPMScheduler
from ddpm_from_scratch import cli, images
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


def _library_samples(unet, sched, n, steps, seed=0):
    """What the CLI must write: the library's samples, (N, C, H, W) in [-1, 1], as uint8 pixels (N, H, W)."""
    x = L.sample_images(unet, sched, n, steps, generator=torch.Generator().manual_seed(seed))
    return ((x[:, 0].clamp(-1, 1) + 1) * 127.5).round().numpy()


def test_sample_writes_a_grid_people_can_see(model_dir, tmp_path):
    folder, unet, sched = model_dir
    out = tmp_path / "grid.png"
    cli.main(["sample", "--model", folder, "--num_images", "5", "--steps", "4", "--out", str(out), "--device", "cpu",
              "--no_progress"])
    img = Image.open(out)
    # 3 per row, 8 px tiles with 2 px gaps = 32 px, enlarged 16x (the smallest scale giving >= 512 px)
    assert img.size == (512, 352) and img.mode == "L"
    assert img.size == images.image_grid(torch.zeros(5, 1, 8, 8)).size  # the one grid routine
    expected = _library_samples(unet, sched, 5, 4)
    grid = np.asarray(img, dtype=np.float32)
    for i in (0, 4):  # tile i at row i // 3, column i % 3; every tile pixel is a 16x16 block
        r, c = divmod(i, 3)
        y, x = 16 * (2 + r * 10), 16 * (2 + c * 10)
        tile = grid[y:y + 128, x:x + 128]
        np.testing.assert_allclose(tile[::16, ::16], expected[i], atol=1.0, rtol=0)
        assert (tile == np.repeat(np.repeat(tile[::16, ::16], 16, 0), 16, 1)).all()


def test_sample_scale_and_out_dir(model_dir, tmp_path):
    folder, unet, sched = model_dir
    out, out_dir = tmp_path / "grid.png", tmp_path / "samples"
    written = cli.run(["sample", "--model", folder, "--num_images", "3", "--steps", "3", "--out", str(out), "--scale",
                       "3", "--out_dir", str(out_dir), "--device", "cpu", "--no_progress"])
    assert Image.open(out).size == (3 * (2 * 10 + 2), 3 * (2 * 10 + 2))
    names = sorted(os.listdir(out_dir))
    assert names == ["0000.png", "0001.png", "0002.png"] and written[1:] == [str(out_dir / n) for n in names]
    expected = _library_samples(unet, sched, 3, 3)
    for name, pixels in zip(names, expected):  # one PNG per image, at the model's resolution, as the pipeline's PIL
        im = Image.open(out_dir / name)
        assert im.size == (8, 8) and im.mode == "L"
        np.testing.assert_allclose(np.asarray(im, dtype=np.float32), pixels, atol=1.0, rtol=0)


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


# ----------------------------------------------------------------------------------------------
# Errors: one line, exit status 2, no traceback, before any work (issue 10)
# ----------------------------------------------------------------------------------------------
def _one_line_error(capsys, argv) -> str:
    """Runs the CLI expecting a usage error; returns its only stderr line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("argv,words", [
    (["sample", "--model", "{model}", "--device", "bogus", "--out", "{tmp}/g.png"], ["--device", "'bogus'"]),
    (["sample", "--model", "{model}", "--device", "cuda:7", "--out", "{tmp}/g.png"], ["--device", "cuda:7"]),
    (["sample", "--model", "{model}"], ["--out", "--out_dir"]),
    (["sample", "--model", "{model}", "--out_dir", "{tmp}/d", "--scale", "2"], ["--scale", "--out"]),
    (["sample", "--model", "{model}", "--out", "{tmp}/no/such/g.png"], ["--out", "does not exist"]),
    (["sample", "--model", "{model}", "--out", "{tmp}"], ["--out", "is a folder"]),
    (["sample", "--model", "{model}", "--out", "{tmp}/g.txt"], ["--out", ".png"]),
    (["sample", "--model", "{model}", "--out_dir", "{tmp}/file.txt"], ["--out_dir", "is a file"]),
    (["sample", "--model", "{model}", "--out_dir", "{tmp}/no/such"], ["--out_dir", "does not exist"]),
    (["sample", "--model", "{model}", "--revision", "main", "--out", "{tmp}/g.png"], ["--revision", "local folder"]),
    (["sample", "--model", "{tmp}/missing", "--out", "{tmp}/g.png"], ["--model", "neither"]),
    (["sample", "--model", "{tmp}/file.txt", "--out", "{tmp}/g.png"], ["--model", "is a file"]),
    (["sample", "--model", "{tmp}", "--out", "{tmp}/g.png"], ["--model", "not a saved pipeline"]),
    (["sample", "--model", "{model}", "--steps", "21", "--out", "{tmp}/g.png", "--no_progress"],
     ["num_inference_steps=21", "num_train_timesteps=20"]),
    (["sample", "--model", "{model}", "--variance_type", "analytic", "--out", "{tmp}/g.png", "--no_progress"],
     ["--variance_type analytic", "estimate-variance --model"]),
    (["evaluate", "--model", "{model}", "--num_samples", "5"], ["--num_samples", "--fdd"]),
    (["evaluate", "--model", "{model}", "--json", "{tmp}/no/r.json"], ["--json", "does not exist"]),
    (["estimate-variance", "--model", "{model}", "--variance_type", "fixed_large"], ["--variance_type"]),
    (["estimate-variance", "--model", "{model}", "--revision", "main"], ["--revision"]),
    (["estimate-variance", "--model", "user/repo"], ["--model", "local"]),
    (["sample", "--model", "{model}", "--num_images", "0", "--out", "{tmp}/g.png"], ["--num_images"]),
])
def test_every_error_is_one_line_with_status_2(model_dir, tmp_path, capsys, argv, words):
    (tmp_path / "file.txt").write_text("x")
    argv = [a.format(model=model_dir[0], tmp=tmp_path) for a in argv]
    line = _one_line_error(capsys, argv)
    assert line.startswith("ddpm-from-scratch") and "error:" in line
    for word in words:
        assert word in line, line
    assert not (tmp_path / "g.png").exists()


@pytest.fixture
def no_work(monkeypatch):
    """Any model loading, sampling, bound or estimate fails the test loudly (its message names 'WORK STARTED')."""
    from ddpm_from_scratch import metrics

    def forbidden(*args, **kwargs):
        raise AssertionError("WORK STARTED before the arguments were checked")

    for owner, name in ((cli, "load_model"), (L, "sample_images"), (L, "estimate_analytic_gamma"),
                        (metrics, "digits_report")):
        monkeypatch.setattr(owner, name, forbidden)


@pytest.mark.parametrize("argv,word", [
    (["sample", "--model", "{model}", "--out", "{tmp}/no/g.png"], "--out"),
    (["sample", "--model", "{model}", "--out", "{tmp}/g.png", "--out_dir", "{tmp}/no/d"], "--out_dir"),
    (["evaluate", "--model", "{model}", "--json", "{tmp}/no/r.json"], "--json"),
    (["evaluate", "--model", "{model}", "--json", "{tmp}"], "--json"),
    (["estimate-variance", "--model", "{tmp}/m"], "not a saved pipeline"),
])
def test_paths_are_checked_before_any_work(model_dir, tmp_path, capsys, no_work, argv, word):
    (tmp_path / "m").mkdir()
    line = _one_line_error(capsys, [a.format(model=model_dir[0], tmp=tmp_path) for a in argv])
    assert word in line and "WORK STARTED" not in line, line


def _checkpoint_script(run_dir: str) -> str:
    """A real training checkpoint: Accelerate's save_state of a UNet + AdamW, as training/train.py writes it."""
    return f'''
import json, os, torch
from accelerate import Accelerator
from ddpm_from_scratch.unet_presets import build_unet
acc = Accelerator(cpu=True)
unet = build_unet("tiny", in_channels=1)
opt = torch.optim.AdamW(unet.parameters())
unet, opt = acc.prepare(unet, opt)
acc.save_state({os.path.join(run_dir, "checkpoint-10")!r})
json.dump({{"global_step": 10}}, open({os.path.join(run_dir, "checkpoint-10", "training_state.json")!r}, "w"))
'''


def test_training_checkpoint_as_model_names_the_folder_to_use(model_dir, tmp_path, capsys):
    finished, unfinished = tmp_path / "finished", tmp_path / "unfinished"
    shutil.copytree(model_dir[0], finished)
    unfinished.mkdir()
    for run in (finished, unfinished):
        proc = subprocess.run([sys.executable, "-c", _checkpoint_script(str(run))], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert (finished / "checkpoint-10" / "optimizer.bin").exists()
    line = _one_line_error(capsys, ["sample", "--model", str(finished / "checkpoint-10"), "--out",
                                    str(tmp_path / "g.png")])
    assert "training checkpoint" in line and line.endswith(f"--model {finished}"), line
    line = _one_line_error(capsys, ["evaluate", "--model", str(unfinished / "checkpoint-10")])
    assert "training checkpoint" in line and "--resume_from_checkpoint latest" in line and f"--model {unfinished}" in line
    # what the message says works
    cli.main(["sample", "--model", str(finished), "--num_images", "1", "--steps", "2", "--out",
              str(tmp_path / "g.png"), "--device", "cpu", "--no_progress"])
    assert (tmp_path / "g.png").exists()


def _pickle_only(src, dest, with_index=True):
    from safetensors.torch import load_file

    shutil.copytree(src, dest)
    weights = dest / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), dest / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    if not with_index:
        (dest / "model_index.json").unlink()
    return dest


@pytest.mark.parametrize("with_index", [True, False])
def test_pickle_only_model_is_refused(model_dir, tmp_path, capsys, with_index):
    pickled = _pickle_only(model_dir[0], tmp_path / "pickled", with_index)
    line = _one_line_error(capsys, ["sample", "--model", str(pickled), "--out", str(tmp_path / "g.png"),
                                    "--no_progress"])
    assert "only pickle weights" in line and "'unet'" in line


def test_nan_model_fails_and_keeps_the_old_grid(tmp_path, capsys):
    from ddpm_from_scratch.pipeline_ddpm import ScratchDDPMPipeline

    unet = build_unet("tiny", in_channels=1).eval()
    with torch.no_grad():
        unet.conv_out.bias.fill_(float("nan"))
    ScratchDDPMPipeline(unet=unet, scheduler=ScratchDDPMScheduler(num_train_timesteps=20)).save_pretrained(tmp_path / "m")
    old = tmp_path / "grid.png"
    old.write_bytes(b"precious")
    line = _one_line_error(capsys, ["sample", "--model", str(tmp_path / "m"), "--out", str(old), "--out_dir",
                                    str(tmp_path / "d"), "--steps", "2", "--no_progress"])
    assert "NaN" in line and "conv_out.bias" in line
    assert old.read_bytes() == b"precious" and not (tmp_path / "d").exists()


def test_estimate_variance_honours_steps(model_dir, tmp_path):
    folder = str(tmp_path / "model")
    shutil.copytree(model_dir[0], folder)
    cli.main(["estimate-variance", "--model", folder, "--num_images", "8", "--steps", "4", "--device", "cpu",
              "--no_progress", "--seed", "2"])
    stored = np.asarray(ScratchDDPMScheduler.from_pretrained(folder, subfolder="scheduler").config.analytic_gamma)
    unet, sched = model_dir[1], model_dir[2]
    train, _ = digits_images(8, "train")
    visited = L.visited_timesteps(sched, 4)
    expected = L.estimate_analytic_gamma(unet, sched, train[:8], timesteps=visited, batch_size=128,
                                         generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(stored, expected.numpy(), rtol=1e-6)
    every = L.estimate_analytic_gamma(unet, sched, train[:8], batch_size=128, generator=torch.Generator().manual_seed(2))
    assert np.abs(stored - every.numpy()).max() > 1e-3  # --steps changed what was estimated
    assert sorted(os.listdir(os.path.join(folder, "scheduler"))) == ["scheduler_config.json"]  # no temporaries


HUB_CLIENT = r'''
import contextlib, io, json, sys, torch
from huggingface_hub import HfApi
from ddpm_from_scratch import ScratchDDPMScheduler, cli
from ddpm_from_scratch.pipeline_ddpm import ScratchDDPMPipeline
from ddpm_from_scratch.unet_presets import build_unet

work = sys.argv[1]
api = HfApi()
api.create_repo("user/cli-pipe")
shas = []
for seed in (0, 1):  # two commits with different weights
    torch.manual_seed(seed)
    pipe = ScratchDDPMPipeline(build_unet("tiny", in_channels=1).eval(), ScratchDDPMScheduler(num_train_timesteps=20))
    pipe.save_pretrained(f"{work}/v{seed}")
    shas.append(api.upload_folder(repo_id="user/cli-pipe", folder_path=f"{work}/v{seed}").oid)
common = ["--num_images", "2", "--steps", "3", "--device", "cpu", "--no_progress"]
for name, extra in (("main", []), ("first", ["--revision", shas[0]])):
    cli.main(["sample", "--model", "user/cli-pipe", *extra, "--out_dir", f"{work}/hub_{name}", *common])
errors = {}
for name, argv in (("revision", ["--model", "user/cli-pipe", "--revision", "no-such-branch"]),
                   ("repo", ["--model", "user/no-such-repo"])):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            cli.main(["sample", *argv, "--out", f"{work}/never.png", *common])
            code = 0
        except SystemExit as e:
            code = e.code
    errors[name] = [code, err.getvalue()]
json.dump({"shas": shas, "errors": errors}, open(f"{work}/hub.json", "w"))
'''


def test_model_from_the_hub_with_revision(tmp_path):
    """--model user/name [--revision REV] over real HTTP against tests/hub_server.py, as from_pretrained resolves it."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from hub_server import HubServer

    with HubServer(root=str(tmp_path / "server")) as hub:
        env = hub.client_env(str(tmp_path / "home"))
        env.update(OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONPATH=os.pathsep.join(sys.path))
        proc = subprocess.run([sys.executable, "-c", HUB_CLIENT, str(tmp_path)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert {r.client for r in hub.requests} == {"127.0.0.1"}
    result = json.loads((tmp_path / "hub.json").read_text())
    common = ["--num_images", "2", "--steps", "3", "--device", "cpu", "--no_progress"]
    for version, name in ((1, "main"), (0, "first")):  # the same PNGs as from the local folder of that commit
        cli.main(["sample", "--model", str(tmp_path / f"v{version}"), "--out_dir", str(tmp_path / f"local{version}"),
                  *common])
        for png in ("0000.png", "0001.png"):
            assert (tmp_path / f"hub_{name}" / png).read_bytes() == (tmp_path / f"local{version}" / png).read_bytes()
    assert (tmp_path / "hub_main" / "0000.png").read_bytes() != (tmp_path / "hub_first" / "0000.png").read_bytes()
    for name, (code, err) in result["errors"].items():
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert "--model 'user/" in lines[0] and "as a Hub repo id" in lines[0]
    assert "no-such-branch" in result["errors"]["revision"][1]
    assert not (tmp_path / "never.png").exists()


def test_console_errors_have_no_traceback(model_dir, tmp_path):
    """The installed command, for the errors that raised tracebacks before: --device bogus, a bad --out folder."""
    exe = shutil.which("ddpm-from-scratch")
    for argv in (["--device", "bogus", "--out", str(tmp_path / "g.png")],
                 ["--out", str(tmp_path / "no" / "g.png"), "--steps", "2"]):
        proc = subprocess.run([exe, "sample", "--model", model_dir[0], *argv], capture_output=True, text=True,
                              timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_digits_classifier_script_writes_atomically(tmp_path, monkeypatch):
    """training/train_digits_classifier.py goes through fileio.atomic_write: a failed rename keeps the old file
    and leaves no temporary behind."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training", "train_digits_classifier.py")
    spec = importlib.util.spec_from_file_location("train_digits_classifier", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "net.safetensors"
    script.main(["--out", str(out), "--epochs", "1", "--min_accuracy", "0"])
    from safetensors.torch import load_file

    first = load_file(out)
    assert first and os.listdir(tmp_path) == ["net.safetensors"]

    def failing_replace(src, dst):
        raise OSError("disk full (test)")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        script.main(["--out", str(out), "--epochs", "1", "--min_accuracy", "0", "--seed", "1"])
    assert os.listdir(tmp_path) == ["net.safetensors"]
    assert all(torch.equal(v, load_file(out)[k]) for k, v in first.items())


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
              "--class_labels", "cow", "0", "--guidance_scale", "2", "--scale", "1", "--no_progress"])
    img = Image.open(out)
    pad, tile = 2, 8 + 2  # images.image_grid's default gap; tiles of 8 px
    assert img.size == (3 * tile + pad, 2 * tile + pad)  # 2 rows (one per label) of 3
    expected = L.sample_images(unet, sched, 6, 3, class_labels=[2, 2, 2, 0, 0, 0], guidance_scale=2.0,
                               generator=torch.Generator().manual_seed(0))
    for i in (0, 4):  # first tile of row 1 (cow), second tile of row 2 (ant)
        r, c = divmod(i, 3)
        x, y = pad + tile * c, pad + tile * r
        crop = torch.from_numpy(np.asarray(img.crop((x, y, x + 8, y + 8)), dtype=np.float32))
        torch.testing.assert_close(crop, ((expected[i, 0].clamp(-1, 1) + 1) * 127.5).round(), atol=1.0, rtol=0)


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

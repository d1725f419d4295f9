"""The report of a real tiny training run: every panel drawn from the run's folder, the logs read back as written,
the trajectory's values against float64 closed forms and the pipeline, and the CLI's errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_from_scratch import report as rp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "training", "train.py")
T = 50


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """12 steps of the `tiny` preset on the digits, grids every 4 steps, end-of-run evaluation on the card."""
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, SCRIPT, "--output_dir", str(out), "--unet_preset", "tiny", "--max_train_steps", "12",
           "--train_batch_size", "8", "--ddpm_num_steps", str(T), "--ddpm_num_inference_steps", "5",
           "--eval_batch_size", "4", "--save_images_steps", "4", "--logging_steps", "2", "--lr_warmup_steps", "2",
           "--checkpointing_steps", "0", "--eval_at_end", "--eval_num_samples", "16", "--seed", "3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _is_png(path, min_side=200):
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= min_side, (path, img.format, img.size)
        return np.asarray(img.convert("L")).std() > 0  # not a blank canvas


def test_every_panel_renders_from_a_tiny_runs_folder(run_dir):
    result = rp.write_report(str(run_dir), num_inference_steps=10, seeds=(0, 1), num_points=5,
                             bound_num_images=16, bound_num_inference_steps=5, gamma_num_images=16, device="cpu")
    assert result.skipped == {}
    assert set(result.figures) == {"overview", *rp.PANELS}
    for path in result.figures.values():
        assert _is_png(path)
    page = (run_dir / "report" / "report.md").read_text()
    for panel in ("overview", *rp.PANELS):
        assert f"({panel}.png)" in page
    assert "fixed_small" in page and "fixed_large" in page and "analytic" in page
    assert "Dashed: the FDD of real training digits" in page  # the floor at the run's 16 samples
    assert not [n for n in os.listdir(run_dir) if n.startswith(".tmp")]  # written beside, then swapped in
    # a second report replaces the first as a whole
    again = rp.write_report(str(run_dir), panels=("training",), device="cpu")
    assert sorted(os.listdir(again.folder)) == ["overview.png", "report.md", "training.png"]
    assert "Not drawn: not asked for" in (run_dir / "report" / "report.md").read_text()


def test_scalars_read_back_as_the_run_logged_them(run_dir):
    info = json.loads((run_dir / "run_info.json").read_text())
    scalars = rp.read_scalars(str(run_dir))  # no metrics.jsonl yet: TensorBoard + run_info
    loss = scalars["loss"]
    assert loss.steps.tolist() == [2, 4, 6, 8, 10, 12]
    # the logged loss at step s is that step's loss; run_info keeps every step's (12 <= 100)
    np.testing.assert_allclose(loss.values, [info["last_losses"][s - 1] for s in loss.steps], rtol=1e-6)
    assert scalars["eval/fdd"].steps.tolist() == [12]
    assert scalars["eval/fdd"].values[0] == pytest.approx(info["eval"]["fdd"])
    assert [s for s, _ in rp.sample_grids(str(run_dir))] == [4, 8, 12]


def test_metrics_jsonl_keeps_the_last_value_per_step_and_names_bad_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n{"step": 2, "loss": 1.0}\n{"step": 2, "eval/fdd": 30.5}\n'
                    '{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # resumed run re-logged step 2; torn last line
    scalars = rp.read_metrics_jsonl(str(path))
    assert scalars["loss"].steps.tolist() == [1, 2] and scalars["loss"].values.tolist() == [2.0, 1.5]
    assert scalars["eval/fdd"].values.tolist() == [30.5] and scalars["lr"].steps.tolist() == [1]
    path.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="line 2"):
        rp.read_metrics_jsonl(str(path))
    path.write_text('{"loss": 2.0}\n')
    with pytest.raises(ValueError, match="integer 'step'"):
        rp.read_metrics_jsonl(str(path))


def _abar(T):
    beta = np.linspace(1e-4, 0.02, T, dtype=np.float64)  # the linear schedule, float64
    return np.cumprod(1.0 - beta)


def test_trajectory_values_match_the_closed_forms_and_the_pipeline(run_dir):
    from ddpm_from_scratch import ScratchDDPMPipeline

    pipe = ScratchDDPMPipeline.from_pretrained(str(run_dir))
    unet, sched = pipe.unet.eval(), pipe.scheduler
    traj = rp.denoising_trajectory(unet, sched, seeds=(5, 9), num_inference_steps=10, num_points=4)
    chain = [k * (T // 10) for k in range(9, -1, -1)]  # "leading" spacing, offset 0: 45, 40, ..., 0
    assert traj.timesteps.tolist() == [45, 30, 15, 0]  # 4 points spread evenly, first and last included
    abar = _abar(T)
    for p, t in enumerate(traj.timesteps.tolist()):
        i = chain.index(t)
        a, a_prev = abar[t], (abar[chain[i + 1]] if i + 1 < len(chain) else 1.0)
        b = 1 - a / a_prev
        assert traj.coef_x0[p] == pytest.approx(np.sqrt(a_prev) * b / (1 - a), rel=1e-9)
        assert traj.coef_xt[p] == pytest.approx(np.sqrt(1 - b) * (1 - a_prev) / (1 - a), rel=1e-9, abs=1e-12)
        x_t = traj.x_t[:, p]
        with torch.no_grad():
            eps = unet(x_t, torch.tensor(t)).sample.double()
        x0 = ((x_t.double() - np.sqrt(1 - a) * eps) / np.sqrt(a)).clamp(-1, 1)  # Eq. 15, clipped (clip_sample)
        torch.testing.assert_close(traj.x0_pred[:, p].double(), x0, rtol=1e-4, atol=1e-4)
        mean = traj.coef_x0[p] * x0 + traj.coef_xt[p] * x_t.double()
        torch.testing.assert_close(traj.mean[:, p].double(), mean, rtol=1e-4, atol=1e-4)
    assert traj.coef_x0[-1] == pytest.approx(1.0) and traj.coef_xt[-1] == pytest.approx(0.0, abs=1e-12)
    # x_T is each seed's own draw, and the chain ends where the pipeline ends with the same generators
    for s, seed in enumerate((5, 9)):
        torch.testing.assert_close(traj.x_t[s, 0], torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(seed)))
    images = pipe(batch_size=2, generator=[torch.Generator().manual_seed(s) for s in (5, 9)], num_inference_steps=10,
                  output_type="pt").images
    torch.testing.assert_close(((traj.final + 1) / 2).clamp(0, 1), images, rtol=0, atol=1e-5)


def test_learned_variance_model_gets_its_own_bound_curve_and_missing_logs_are_named(tmp_path):
    from ddpm_from_scratch import ScratchDDPMPipeline, ScratchDDPMScheduler
    from ddpm_from_scratch.unet_presets import build_unet

    torch.manual_seed(0)
    unet = build_unet("tiny", variance_type="learned_range")
    sched = ScratchDDPMScheduler(num_train_timesteps=20, variance_type="learned_range")
    assert rp.supported_variance_types(unet, sched) == ["fixed_small", "fixed_large", "analytic", "learned_range"]
    assert rp.supported_variance_types(build_unet("tiny"), ScratchDDPMScheduler()) == ["fixed_small", "fixed_large",
                                                                                         "analytic"]
    ScratchDDPMPipeline(unet=unet, scheduler=sched).save_pretrained(str(tmp_path / "model"))
    result = rp.write_report(str(tmp_path / "model"), num_inference_steps=5, seeds=(0,), num_points=3,
                             bound_num_images=8, bound_num_inference_steps=4, gamma_num_images=8, device="cpu")
    assert set(result.figures) == {"trajectory", "bound", "overview"}
    assert "loss" in result.skipped["training"] and "eval/" in result.skipped["metrics"]
    assert "samples/step_" in result.skipped["samples"]
    page = open(result.page).read()
    assert "learned_range" in page and "Not drawn: no 'loss' scalar" in page


def test_report_cli_writes_the_page_and_errors_are_one_line_exit_2(run_dir, tmp_path, capsys):
    from ddpm_from_scratch import cli

    page = cli.run(["report", str(run_dir), "--steps", "5", "--seeds", "0", "--bound_steps", "3",
                    "--bound_num_images", "8", "--device", "cpu"])
    assert page == str(run_dir / "report" / "report.md") and os.path.isfile(page)
    capsys.readouterr()
    for bad in (tmp_path / "missing", tmp_path):  # not a folder; a folder with no run in it
        with pytest.raises(SystemExit) as exc:
            cli.run(["report", str(bad)])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ddpm-from-scratch report: error: OUTPUT_DIR") and "\n" not in err


def test_bad_report_settings_are_refused_before_any_work(run_dir):
    with pytest.raises(ValueError, match="panels must be among"):
        rp.write_report(str(run_dir), panels=("loss",))
    with pytest.raises(ValueError, match="num_points"):
        rp.write_report(str(run_dir), num_points=0)
    with pytest.raises(ValueError, match="bound_num_images"):
        rp.write_report(str(run_dir), bound_num_images=-1)

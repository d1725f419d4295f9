"""A training run drawn as pictures: PNG figures (matplotlib, Agg) of an output folder, gathered in ``report.md``.

    from ddpm_from_scratch.report import write_report
    write_report("output/digits")          # -> output/digits/report/{overview,training,metrics,...}.png + report.md
    ddpm-from-scratch report output/digits  # the same from the shell

Panels:
- ``training.png``: loss, learning rate (and gradient norm) against the optimizer step;
- ``metrics.png``: every evaluation metric (``eval/<name>``) against the step;
- ``samples.png``: the sample grids ``samples/step_<N>.png`` over training;
- ``trajectory.png``: the reverse chain for a few seeds: x_t, the predicted x_0 (the scheduler's
  ``pred_original_sample``) and the posterior mean mu~ = coef_x0 x_0 + coef_xt x_t that the step moves to,
  with both coefficients printed above each column (the mean slides from x_t towards x_0 as t falls);
- ``bound.png``: the variational bound's terms L_t per timestep on held-out digits, one curve per variance type
  the model supports (fixed_small, fixed_large, analytic, and the learned one when the UNet has it);
- ``overview.png``: the main figure (loss, metrics, last samples, one trajectory), embedded by the model card.

Data read from the folder: ``metrics.jsonl`` (one JSON object a line: ``{"step": N, "loss": ..., "lr": ...}`` and
``{"step": N, "eval/<name>": value}``), else the TensorBoard event files under ``logs/``; ``run_info.json``'s
end-of-run ``eval``; ``samples/step_<N>.png``; the exported pipeline (``model_index.json``) for the two panels that
run the model. A panel whose data is missing is left out and ``report.md`` says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field

import numpy as np
import torch

REPORT_DIRNAME = "report"
METRICS_FILE = "metrics.jsonl"
EVAL_PREFIX = "eval/"
MAIN_FIGURE = "overview.png"
PANELS = ("training", "metrics", "samples", "trajectory", "bound")
_STEP_GRID = re.compile(r"^step_(\d+)\.png$")
REPORT_TRAJECTORY_STEPS = 100  # the denoising trajectory's default chain


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:  # pragma: no cover - matplotlib is a dependency of the train/test/report extras
        raise RuntimeError("the report needs matplotlib: pip install 'ddpm-from-scratch[report]'") from err
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def _new_figure(figsize):
    """A matplotlib Figure on the Agg canvas (no pyplot, no global state, no display needed)."""
    Figure, Canvas = _require_matplotlib()
    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    Canvas(fig)
    return fig


def _save_figure(fig, path: str) -> str:
    from .fileio import atomic_write

    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), durable=False)


# ----------------------------------------------------------------------------------------------
# Scalars: metrics.jsonl, else TensorBoard
# ----------------------------------------------------------------------------------------------
@dataclass
class Series:
    """One scalar against the step: steps (N,) int64 ascending, values (N,) float64."""

    steps: np.ndarray
    values: np.ndarray


def _to_series(points: dict[int, float]) -> Series:
    steps = np.array(sorted(points), dtype=np.int64)
    return Series(steps, np.array([points[s] for s in steps], dtype=np.float64))


def read_metrics_jsonl(path: str) -> dict[str, Series]:
    """{name: Series} from a metrics.jsonl file. A step logged twice (a resumed run redoing steps after its last
    checkpoint) keeps its last value. A torn last line (a kill mid-write) is ignored; any other bad line is an error
    naming the file and line."""
    points: dict[str, dict[int, float]] = {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no trailing newline: the write was cut
                continue
            raise ValueError(f"{path}, line {number}: not a JSON object") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}, line {number}: expected a JSON object with an integer 'step'")
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                points.setdefault(name, {})[record["step"]] = float(value)
    return {name: _to_series(p) for name, p in points.items()}


def read_tensorboard_scalars(log_dir: str) -> dict[str, Series]:
    """{tag: Series} from every TensorBoard event file under ``log_dir`` (later writes win for a repeated step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []
    for root, _, files in os.walk(log_dir):
        for name in files:
            if name.startswith("events.out.tfevents"):
                acc = EventAccumulator(os.path.join(root, name), size_guidance={"scalars": 0})
                acc.Reload()
                for tag in acc.Tags().get("scalars", []):
                    events.extend((e.wall_time, tag, e.step, e.value) for e in acc.Scalars(tag))
    points: dict[str, dict[int, float]] = {}
    for _, tag, step, value in sorted(events):
        points.setdefault(tag, {})[int(step)] = float(value)
    return {tag: _to_series(p) for tag, p in points.items()}


def _run_info(output_dir: str) -> dict:
    path = os.path.join(output_dir, "run_info.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_scalars(output_dir: str, run_info: dict | None = None) -> dict[str, Series]:
    """Every scalar of a run: metrics.jsonl first; tags only TensorBoard has are added; the end-of-run evaluation
    in run_info (default: run_info.json; ``eval``: bits_per_dim, fdd at final_step) fills metrics no log holds."""
    scalars: dict[str, Series] = {}
    jsonl = os.path.join(output_dir, METRICS_FILE)
    if os.path.isfile(jsonl):
        scalars.update(read_metrics_jsonl(jsonl))
    log_dir = os.path.join(output_dir, "logs")
    if os.path.isdir(log_dir):
        for tag, series in read_tensorboard_scalars(log_dir).items():
            scalars.setdefault(tag, series)
    info = _run_info(output_dir) if run_info is None else run_info
    final = info.get("eval") or {}
    if "final_step" in info:
        for key in ("fdd", "bits_per_dim"):
            if isinstance(final.get(key), (int, float)) and EVAL_PREFIX + key not in scalars:
                scalars[EVAL_PREFIX + key] = Series(np.array([info["final_step"]]), np.array([float(final[key])]))
    return scalars


def sample_grids(output_dir: str) -> list[tuple[int, str]]:
    """[(step, path)] of ``samples/step_<N>.png``, ascending step."""
    folder = os.path.join(output_dir, "samples")
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, n)) for n in os.listdir(folder) if (m := _STEP_GRID.match(n))]
    return sorted(found)


# ----------------------------------------------------------------------------------------------
# Panels from the logs
# ----------------------------------------------------------------------------------------------
def _plot_series(ax, series: Series, label: str, log: bool = False):
    ax.plot(series.steps, series.values, marker="o" if len(series.steps) < 30 else None, ms=3, label=label)
    if log and (series.values > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_title(label)
    ax.grid(alpha=0.3)


def plot_training(scalars: dict[str, Series], path: str) -> str:
    """Loss (log scale), learning rate and, when logged, the gradient norm against the step."""
    names = [n for n in ("loss", "lr", "grad_norm") if n in scalars]
    if "loss" not in names:
        raise ValueError("no 'loss' scalar in the run's logs")
    fig = _new_figure((4.2 * len(names), 3.2))
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        _plot_series(ax, scalars[name], {"loss": "training loss", "lr": "learning rate",
                                         "grad_norm": "gradient norm (before clipping)"}[name], log=name != "lr")
    return _save_figure(fig, path)


def metric_names(scalars: dict[str, Series]) -> list[str]:
    return sorted(n for n in scalars if n.startswith(EVAL_PREFIX))


def plot_metrics(scalars: dict[str, Series], path: str, floors: dict | None = None) -> str:
    """Every ``eval/<name>`` scalar against the step, one axis each; ``floors`` {name: (value, label)} draws a
    dashed reference line (e.g. the FDD real data scores at the same sample size)."""
    names = metric_names(scalars)
    if not names:
        raise ValueError("no evaluation metrics (eval/<name>) in the run's logs")
    fig = _new_figure((4.2 * len(names), 3.2))
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        _draw_metric(ax, scalars[name], name, (floors or {}).get(name))
    return _save_figure(fig, path)


def _draw_metric(ax, series: Series, name: str, floor=None):
    _plot_series(ax, series, name.removeprefix(EVAL_PREFIX))
    if floor is not None:
        ax.axhline(floor[0], color="gray", ls="--", lw=1, label=floor[1])
        ax.legend(fontsize=7)


def eval_sample_count(info: dict) -> int | None:
    """The number of samples behind the run's FDD: run_info's ``eval_settings`` (training-time evaluation), else its
    end-of-run ``eval``."""
    n = (info.get("eval_settings") or {}).get("eval_num_samples") or (info.get("eval") or {}).get("num_samples")
    return int(n) if isinstance(n, int) and n >= 2 else None


def fdd_floor(info: dict) -> dict:
    """{"eval/fdd": (mean FDD of real train digits vs the held-out split at the run's sample count, label)}, or {}."""
    from .evaluation import digits_fdd_floor

    n = eval_sample_count(info)
    if n is None or info.get("dataset", "sklearn-digits") != "sklearn-digits" or n > 1438:
        return {}
    floor = digits_fdd_floor(n, resolution=int(info.get("resolution", 8)))
    return {"eval/fdd": (floor["mean"], f"real digits, {n} samples: {floor['mean']:.1f}")}


def _pick(items: list, count: int) -> list:
    """At most ``count`` items evenly spread over ``items``, first and last included."""
    if len(items) <= count:
        return list(items)
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, count).round().astype(int))]


def plot_sample_grids(grids: list[tuple[int, str]], path: str, max_grids: int = 6) -> str:
    """The sample grids of the run, side by side, each titled with its step."""
    from PIL import Image

    if not grids:
        raise ValueError("no sample grids (samples/step_<N>.png) in the run's folder")
    chosen = _pick(grids, max_grids)
    fig = _new_figure((3.2 * len(chosen), 3.5))
    for ax, (step, grid_path) in zip(fig.subplots(1, len(chosen), squeeze=False)[0], chosen):
        with Image.open(grid_path) as img:
            ax.imshow(np.asarray(img.convert("RGB")), interpolation="nearest")
        ax.set_title(f"step {step}")
        ax.axis("off")
    return _save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Panels that run the model
# ----------------------------------------------------------------------------------------------
@dataclass
class Trajectory:
    """Snapshots of the reverse chain at P points for S seeds.

    timesteps (P,): the t of each snapshot; x_t, x0_pred, mean: (S, P, C, H, W) float32: the chain's state x_t, the
    scheduler's pred_original_sample at that step, and the posterior mean coef_x0 * x0_pred + coef_xt * x_t (the
    point the step moves to before noise is added); coef_x0, coef_xt (P,) float64; final (S, C, H, W): the sample."""

    timesteps: np.ndarray
    x_t: torch.Tensor
    x0_pred: torch.Tensor
    mean: torch.Tensor
    coef_x0: np.ndarray
    coef_xt: np.ndarray
    final: torch.Tensor
    seeds: tuple = field(default=())


@torch.no_grad()
def denoising_trajectory(unet, scheduler, seeds=(0, 1, 2), num_inference_steps: int | None = None,
                         num_points: int = 10, variance_type: str | None = None) -> Trajectory:
    """Runs the reverse chain (``num_inference_steps``, default all T) for each seed, x_T from a CPU generator
    seeded with it, and records ``num_points`` evenly spread steps (the first and the last included)."""
    from . import diffusion_math as dm
    from . import likelihood

    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
        raise ValueError(f"num_points must be a positive integer, got {num_points!r}")
    sched = likelihood.sampling_scheduler(scheduler, variance_type)
    T = int(sched.config.num_train_timesteps)
    steps = min(num_inference_steps or T, T)
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    sched.set_timesteps(steps)
    timesteps = sched.timesteps.detach().cpu().long()
    keep = _pick(list(range(len(timesteps))), num_points)
    tab = likelihood.chain(sched, timesteps)
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    shape = (cfg.in_channels, size, size)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device, dtype)
    xs, x0s, means = [], [], []
    for i, t in enumerate(timesteps):
        out = unet(x, t.to(device), return_dict=False)[0]
        res = sched.step(out, t, x, generator=gens if len(gens) > 1 else gens[0])
        if i in keep:
            x0 = res.pred_original_sample.detach().double().cpu()
            xt = x.detach().double().cpu()
            xs.append(xt.float())
            x0s.append(x0.float())
            means.append(dm.posterior_mean(x0, xt, tab.coef_x0[i], tab.coef_xt[i]).float())
        x = res.prev_sample
    keep_t = torch.tensor(keep)
    return Trajectory(timesteps=timesteps[keep_t].numpy(), x_t=torch.stack(xs, 1), x0_pred=torch.stack(x0s, 1),
                      mean=torch.stack(means, 1), coef_x0=tab.coef_x0[keep_t].numpy(),
                      coef_xt=tab.coef_xt[keep_t].numpy(), final=x.detach().float().cpu(), seeds=seeds)


def _show(ax, image: torch.Tensor):
    """Draws one (C, H, W) image in [-1, 1] (values outside are clipped, as a saved sample would be)."""
    img = ((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_trajectory(traj: Trajectory, path: str) -> str:
    """Rows per seed: x_t, predicted x_0, posterior mean; columns: the chain's snapshots, noisiest first."""
    S, P = traj.x_t.shape[:2]
    fig = _new_figure((1.25 * P + 1.2, 1.35 * 3 * S + 0.8))
    axes = fig.subplots(3 * S, P, squeeze=False)
    rows = (("x_t", traj.x_t), ("x̂_0", traj.x0_pred), ("μ̃", traj.mean))
    for s in range(S):
        for r, (label, data) in enumerate(rows):
            for p in range(P):
                ax = axes[3 * s + r, p]
                _show(ax, data[s, p])
                if s == 0 and r == 0:
                    ax.set_title(f"t={int(traj.timesteps[p])}\n{traj.coef_x0[p]:.2f}·x̂_0+{traj.coef_xt[p]:.2f}·x_t",
                                 fontsize=7)
                if p == 0:
                    ax.set_ylabel(f"seed {traj.seeds[s]}\n{label}" if r == 0 else label, fontsize=8)
    fig.suptitle("denoising trajectory: x_t, predicted x_0, posterior mean μ̃ = a·x̂_0 + b·x_t", fontsize=9)
    return _save_figure(fig, path)


def supported_variance_types(unet, scheduler) -> list[str]:
    """The reverse variances this model can be scored with: the fixed two and analytic always, plus the
    scheduler's learned type when the UNet outputs a variance (2C channels)."""
    from .diffusion_math import VARIANCE_TYPES

    types = ["fixed_small", "fixed_large", "analytic"]
    learned = unet.config.out_channels == 2 * unet.config.in_channels
    own = scheduler.config.variance_type
    if learned:
        types.append(own if own not in types else next(v for v in VARIANCE_TYPES if v.startswith("learned")))
    return types


@torch.no_grad()
def bound_by_variance(unet, scheduler, images: torch.Tensor, gamma_images: torch.Tensor,
                      num_inference_steps: int | None = None, variance_types=None, batch_size: int = 128,
                      seed: int = 0) -> dict:
    """{variance_type: likelihood.BoundResult} of ``images`` (held-out) on the respaced chain; analytic uses the
    scheduler's stored Gamma_t, else one estimated on ``gamma_images`` (training images) at the visited steps."""
    from . import likelihood

    variance_types = list(variance_types or supported_variance_types(unet, scheduler))
    if num_inference_steps is not None:
        num_inference_steps = min(num_inference_steps, int(scheduler.config.num_train_timesteps))
    gamma = scheduler.config.get(likelihood.ANALYTIC_CONFIG_KEY) if hasattr(scheduler.config, "get") else None
    results = {}
    for vt in variance_types:
        kwargs = {}
        if vt == "analytic":
            if gamma is None:
                gamma = likelihood.estimate_analytic_gamma(
                    unet, scheduler, gamma_images, timesteps=likelihood.visited_timesteps(scheduler, num_inference_steps),
                    batch_size=batch_size, generator=torch.Generator().manual_seed(seed))
            kwargs["analytic_gamma"] = gamma
        results[vt] = likelihood.bits_per_dim(unet, scheduler, images, num_inference_steps=num_inference_steps,
                                              batch_size=batch_size, generator=torch.Generator().manual_seed(seed),
                                              variance_type=vt, **kwargs)
    return results


def plot_bound(bounds: dict, path: str) -> str:
    """L_t (bits/dim) against t for each variance type (log scale); the legend gives each total."""
    fig = _new_figure((7.5, 4.2))
    ax = fig.subplots()
    for vt, res in bounds.items():
        ax.plot(res.timesteps.numpy(), res.terms.numpy(), marker=".", ms=3,
                label=f"{vt}: {res.total:.3f} bits/dim (L_0 {res.decoder:.3f})")
    ax.set_yscale("log")
    ax.set_xlabel("timestep t (L_0: the decoder term at the last step)")
    ax.set_ylabel("L_t, bits/dim")
    ax.set_title(f"variational bound per timestep, held-out digits, {len(next(iter(bounds.values())).timesteps)}-step chain")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save_figure(fig, path)


def plot_overview(scalars: dict[str, Series], grids: list[tuple[int, str]], traj: Trajectory | None, path: str,
                  title: str = "", floors: dict | None = None) -> str:
    """The main figure: loss; each metric; the last sample grid; one seed's predicted x_0 along the chain."""
    from PIL import Image

    names = metric_names(scalars)
    top = ["loss"] * ("loss" in scalars) + names
    fig = _new_figure((max(9.0, 3.6 * max(len(top), 1)), 7.0))
    gs = fig.add_gridspec(2, max(len(top), 2))
    for j, name in enumerate(top):
        ax = fig.add_subplot(gs[0, j])
        if name == "loss":
            _plot_series(ax, scalars[name], "training loss", log=True)
        else:
            _draw_metric(ax, scalars[name], name, (floors or {}).get(name))
    if grids:
        ax = fig.add_subplot(gs[1, 0])
        with Image.open(grids[-1][1]) as img:
            ax.imshow(np.asarray(img.convert("RGB")), interpolation="nearest")
        ax.set_title(f"samples at step {grids[-1][0]}")
        ax.axis("off")
    if traj is not None:
        from .images import image_grid

        ax = fig.add_subplot(gs[1, 1:])
        P = traj.x_t.shape[1]
        strip = image_grid(torch.cat([traj.x_t[0], traj.x0_pred[0]]), nrow=P, pad=1, scale=1)
        ax.imshow(np.asarray(strip.convert("RGB")), interpolation="nearest")
        ax.set_title(f"seed {traj.seeds[0]}: x_t (top) and predicted x_0 (bottom), t = "
                     f"{int(traj.timesteps[0])} ... {int(traj.timesteps[-1])}", fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# The whole report
# ----------------------------------------------------------------------------------------------
@dataclass
class ReportResult:
    """folder: the report folder; figures {panel: path}; skipped {panel: why}; page: report.md."""

    folder: str
    page: str
    figures: dict
    skipped: dict


@contextlib.contextmanager
def _new_dir(path: str):
    """A new folder that is removed again when the block fails (nothing half-drawn is left for the caller's swap)."""
    os.makedirs(path)
    try:
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def _load_pipeline(output_dir: str, device):
    from .pipeline_ddpm import ScratchDDPMPipeline

    pipe = ScratchDDPMPipeline.from_pretrained(output_dir)
    return pipe.unet.to(device).eval(), pipe.scheduler


def _page(output_dir: str, info: dict, figures: dict, skipped: dict, notes: dict) -> str:
    lines = [f"# Training report: `{os.path.basename(os.path.normpath(os.path.abspath(output_dir)))}`", ""]
    if info:
        facts = [f"{k.replace('_', ' ')}: {info[k]}" for k in ("dataset", "final_step", "global_batch", "num_processes")
                 if k in info]
        if isinstance(info.get("final_loss"), (int, float)):
            facts.append(f"final loss: {info['final_loss']:.4f}")
        lines += ["; ".join(facts) + ".", ""]
    titles = {"overview": "Overview", "training": "Loss and learning rate", "metrics": "Metrics against the step",
              "samples": "Samples over training", "trajectory": "Denoising trajectory",
              "bound": "Variational bound per timestep"}
    for panel in ("overview",) + PANELS:
        lines.append(f"## {titles[panel]}")
        if panel in figures:
            lines += ["", f"![{panel}]({os.path.basename(figures[panel])})"]
            if panel in notes:
                lines += ["", notes[panel]]
        else:
            lines += ["", f"Not drawn: {skipped.get(panel, 'no data')}."]
        lines.append("")
    return "\n".join(lines)


def write_report(output_dir: str, *, num_inference_steps: int | None = REPORT_TRAJECTORY_STEPS, seeds=(0, 1, 2),
                 num_points: int = 10,
                 bound_num_images: int | None = 128, bound_num_inference_steps: int | None = 50,
                 gamma_num_images: int = 256, device=None, panels=None, dest: str | None = None,
                 pipeline=None, run_info: dict | None = None) -> ReportResult:
    """Draws the report of a training output folder into ``output_dir/report/`` (figures + report.md), replacing
    an earlier report as a whole (written beside, then swapped). Returns what was drawn and what was skipped.

    num_inference_steps: the trajectory's chain (None: all T); bound_num_images / bound_num_inference_steps: the
    held-out digits and the respaced chain of the bound panel (None: all); gamma_num_images: train digits for the
    analytic variance's Gamma_t when the scheduler has none stored; panels: a subset of PANELS to draw.
    For the Trainer's export: ``dest`` (a new folder, written directly: the caller swaps it in), ``pipeline``
    ((unet, scheduler) in memory instead of the folder's exported one), ``run_info`` (instead of run_info.json)."""
    from .fileio import atomic_dir, atomic_write_text, sweep_discarded

    if not os.path.isdir(output_dir):
        raise ValueError(f"OUTPUT_DIR {output_dir!r} is not a folder")
    panels = tuple(PANELS if panels is None else panels)
    unknown = sorted(set(panels) - set(PANELS))
    if unknown:
        raise ValueError(f"panels must be among {list(PANELS)}, got {unknown}")
    for name, value in (("num_points", num_points), ("gamma_num_images", gamma_num_images)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("num_inference_steps", num_inference_steps), ("bound_num_images", bound_num_images),
                        ("bound_num_inference_steps", bound_num_inference_steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    has_model = pipeline is not None or os.path.isfile(os.path.join(output_dir, "model_index.json"))
    info = _run_info(output_dir) if run_info is None else run_info
    scalars = read_scalars(output_dir, info)
    grids = sample_grids(output_dir)
    if not scalars and not grids and not has_model:
        raise ValueError(f"OUTPUT_DIR {output_dir!r} holds no training run: no {METRICS_FILE}, logs/, samples/ or "
                         "exported pipeline (model_index.json)")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    final = dest or os.path.join(output_dir, REPORT_DIRNAME)
    if dest is None:
        sweep_discarded(output_dir)
    figures, notes = {}, {}
    skipped = {p: "not asked for" for p in PANELS if p not in panels}
    traj = None
    with (atomic_dir(final, durable=False) if dest is None else _new_dir(dest)) as tmp:
        def attempt(panel, draw):
            if panel not in panels:
                return
            try:
                figures[panel] = draw(os.path.join(tmp, f"{panel}.png"))
            except ValueError as err:
                skipped[panel] = str(err)

        attempt("training", lambda p: plot_training(scalars, p))
        floors = fdd_floor(info) if "eval/fdd" in scalars else {}
        attempt("metrics", lambda p: plot_metrics(scalars, p, floors))
        if floors:
            notes["metrics"] = ("Dashed: the FDD of real training digits against the held-out split at the same sample "
                                "count (mean of 20 draws), the floor a perfect model would score; FDD is measured "
                                "against the held-out digits, never the training ones.")
        attempt("samples", lambda p: plot_sample_grids(grids, p))
        unet = scheduler = None
        if has_model and ({"trajectory", "bound"} & set(panels)):
            unet, scheduler = pipeline if pipeline is not None else _load_pipeline(output_dir, device)
        for panel in ("trajectory", "bound"):
            if panel in panels and unet is None:
                skipped[panel] = "no exported pipeline (model_index.json) in the folder"
        if unet is not None and "trajectory" in panels:
            traj = denoising_trajectory(unet, scheduler, seeds, num_inference_steps, num_points)
            figures["trajectory"] = plot_trajectory(traj, os.path.join(tmp, "trajectory.png"))
            notes["trajectory"] = (f"{len(traj.x_t[0])} snapshots of a {num_inference_steps or 'full'}-step chain "
                                   "(EMA weights of the exported pipeline). The column titles are the posterior-mean "
                                   "coefficients: μ̃ = a·x̂_0 + b·x_t moves from x_t towards the predicted x_0 as t falls.")
        if unet is not None and "bound" in panels:
            if info.get("dataset", "sklearn-digits") != "sklearn-digits":
                skipped["bound"] = "the bound is scored on held-out data, which only the built-in digits have"
            else:
                from .metrics import digits_for_unet

                held_out = digits_for_unet(unet, "test")[:bound_num_images]
                bounds = bound_by_variance(unet, scheduler, held_out, digits_for_unet(unet, "train")[:gamma_num_images],
                                           bound_num_inference_steps)
                figures["bound"] = plot_bound(bounds, os.path.join(tmp, "bound.png"))
                notes["bound"] = (f"{held_out.shape[0]} held-out digits, "
                                  f"{len(next(iter(bounds.values())).timesteps)} steps. Totals: " + ", ".join(
                                      f"{vt} {r.total:.3f} ± {r.stderr:.3f}" for vt, r in bounds.items()) + " bits/dim.")
        if not figures:
            raise ValueError(f"nothing to draw in {output_dir!r}: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        figures["overview"] = plot_overview(scalars, grids, traj, os.path.join(tmp, MAIN_FIGURE),
                                            title=os.path.basename(os.path.normpath(os.path.abspath(output_dir))),
                                            floors=floors)
        atomic_write_text(os.path.join(tmp, "report.md"), _page(output_dir, info, figures, skipped, notes), durable=False)
    figures = {k: os.path.join(final, os.path.basename(v)) for k, v in figures.items()}
    return ReportResult(folder=final, page=os.path.join(final, "report.md"), figures=figures, skipped=skipped)

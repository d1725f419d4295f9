"""Evaluation during training (``--eval_steps``), the best weights kept outside the rotation (``--keep_best``) and
the choice of the exported weights (``--export best|last``): a Trainer callback over ``ddpm_from_scratch.evaluation``.

Every ``eval_steps`` optimizer steps and at the last step, on every process (collective): the EMA weights sample
``eval_num_samples`` images with ``ddpm_num_inference_steps`` steps and are scored (digits: FDD against the held-out
split; the held-out bits/dim on an ``eval_bound_steps``-step respaced chain), each process taking its share. The
main process writes ``{"step": N, "eval/fdd": ..., "eval/bits_per_dim": ...}`` to metrics.jsonl, the same scalars
and the sample grid (``eval/samples``) to TensorBoard, and the history to run_info.json (``evaluations``). The noise
of an evaluation depends only on the seed, so a resumed run records the same values.

``--keep_best METRIC``: when an evaluation improves METRIC (lower is better for every metric here), its EMA weights
are saved as a pipeline in ``output_dir/best/`` with ``best.json`` ({metric, value, step, settings}), written beside
and swapped in. ``best/`` is not a ``checkpoint-<N>`` folder, so the rotation never removes it. ``--export best``
exports those weights at the end instead of the last ones; the card says which and why.
"""

import json
import logging
import os
import time

from .. import fileio

logger = logging.getLogger("ddpm_from_scratch.train")

BEST_DIR = "best"
BEST_FILE = "best.json"
PREVIOUS_BEST_PREFIX = "previous-best-"
SCORES = ("fdd", "fid", "bits_per_dim")  # every one: lower is better
EVAL_PREFIX = "eval/"


def eval_settings(config) -> dict:
    """The settings an evaluation's value depends on (a best.json recorded under others is not comparable)."""
    return {"eval_num_samples": config.eval_num_samples, "ddpm_num_inference_steps": config.ddpm_num_inference_steps,
            "eval_bound_steps": config.eval_bound_steps, "eval_batch_size": config.eval_batch_size,
            "seed": config.seed, "metric": config.keep_best}


def read_best(output_dir: str) -> dict | None:
    """best/best.json, or None when there is no (complete) best/."""
    path = os.path.join(output_dir, BEST_DIR, BEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def set_aside_best(output_dir: str, why: str) -> str | None:
    """Moves best/ to previous-best-<n>/ (never deleted); returns the new path, or None when there was none."""
    src = os.path.join(output_dir, BEST_DIR)
    if not os.path.isdir(src):
        return None
    n = 1
    while os.path.exists(os.path.join(output_dir, f"{PREVIOUS_BEST_PREFIX}{n}")):
        n += 1
    dst = os.path.join(output_dir, f"{PREVIOUS_BEST_PREFIX}{n}")
    os.rename(src, dst)
    logger.info("moved %s to %s: %s", src, dst, why)
    return dst


def eval_history(output_dir: str) -> list[dict]:
    """[{"step": N, "eval/<name>": value, ...}] from metrics.jsonl, ascending step (the last record of a step wins)."""
    from ..report import METRICS_FILE, read_metrics_jsonl

    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    by_step: dict[int, dict] = {}
    for name, series in read_metrics_jsonl(path).items():
        if name.startswith(EVAL_PREFIX):
            for step, value in zip(series.steps.tolist(), series.values.tolist()):
                by_step.setdefault(step, {"step": step})[name] = value
    return [by_step[s] for s in sorted(by_step)]


class EvaluationCallback:
    """The Trainer attaches one when ``config.eval_steps`` > 0 (module docstring)."""

    def __init__(self):
        self.checked_best = False
        self.seconds = 0.0

    def due(self, trainer, step: int) -> bool:
        every = trainer.config.eval_steps
        return bool(every) and (step % every == 0 or step == trainer.max_steps)

    def on_train_begin(self, trainer) -> None:
        """A resumed run whose checkpoint step was due but has no record (killed after the checkpoint, before or
        during its evaluation; the checkpoint is saved first) evaluates it now, with exactly those weights."""
        step = trainer.global_step
        if step and self.due(trainer, step):
            done = trainer.accelerator.is_main_process and any(r["step"] == step for r in eval_history(
                trainer.config.output_dir))
            from accelerate.utils import broadcast_object_list

            done = broadcast_object_list([done])[0] if trainer.accelerator.num_processes > 1 else done
            if not done:
                self.evaluate(trainer, step)

    def on_step_end(self, trainer, step: int, logs: dict) -> None:
        if self.due(trainer, step):
            self.evaluate(trainer, step)

    def _check_best_once(self, trainer) -> None:
        """A best/ this run cannot compare against is set aside: another run's (a fresh start), one recorded after
        the resumed step (those steps are redone) or under other evaluation settings."""
        if self.checked_best:
            return
        self.checked_best = True
        c = trainer.config
        best = read_best(c.output_dir)
        if best is None:
            return
        resumed = trainer.run_info.get("resumed_from") is not None
        start = int(trainer.run_info.get("start_step", 0))
        if not resumed:
            set_aside_best(c.output_dir, "it belongs to an earlier run")
        elif best.get("step", 0) > start:
            set_aside_best(c.output_dir, f"it was recorded at step {best.get('step')}, after the resumed step {start}")
        elif best.get("settings") != eval_settings(c):
            set_aside_best(c.output_dir, "it was recorded under other evaluation settings")

    def evaluate(self, trainer, step: int) -> dict:
        """One evaluation of the EMA weights at ``step`` (collective); returns the record (on every process)."""
        from ..evaluation import evaluate_model
        from .ema import ema_model_copy

        import torch

        c, acc = trainer.config, trainer.accelerator
        start = time.perf_counter()
        model = ema_model_copy(acc.unwrap_model(trainer.unet), trainer.ema)
        # The evaluation draws only from its own seeded generators; fork_rng guarantees that training after it sees
        # the global RNG states it would have seen without it (a resumed run restores them from the checkpoint).
        with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []):
            result = evaluate_model(model, trainer.noise_scheduler, num_samples=c.eval_num_samples,
                                    num_inference_steps=c.ddpm_num_inference_steps, seed=c.seed,
                                    bound_num_inference_steps=c.eval_bound_steps or None,
                                    bound_num_images=None if c.eval_bound_steps else 0,
                                    batch_size=c.eval_batch_size, accelerator=acc)
        record = {"step": step, **{EVAL_PREFIX + k: result.metrics[k] for k in SCORES if k in result.metrics}}
        if acc.is_main_process:
            trainer.log_metrics(record)
            scalars = {k: v for k, v in record.items() if k != "step"}
            if c.logger != "none":
                acc.log(scalars, step=step)
                self._log_grid(trainer, result.samples, step)
            if c.keep_best:
                self._check_best_once(trainer)
                self._keep_if_best(trainer, model, record, step)
        self.seconds += time.perf_counter() - start
        if acc.is_main_process:
            trainer.run_info["evaluations"] = eval_history(c.output_dir)
            trainer.run_info["eval_settings"] = eval_settings(c)
            trainer.run_info["eval_work"] = result.work  # what each process sampled and scored itself
            trainer.run_info["eval_seconds"] = round(self.seconds, 3)  # this session's, for the overhead figure
            logger.info("evaluation at step %d (%.1f s, %d process(es)): %s", step, time.perf_counter() - start,
                        acc.num_processes, {k: round(v, 4) for k, v in scalars.items()})
        acc.wait_for_everyone()
        return record

    @staticmethod
    def _log_grid(trainer, samples, step: int) -> None:
        if trainer.config.logger != "tensorboard" or samples.shape[0] == 0:
            return
        import numpy as np

        from ..images import image_grid

        writer = trainer.accelerator.get_tracker("tensorboard", unwrap=True)
        grid = np.asarray(image_grid(samples, pad=1).convert("RGB"))
        writer.add_image("eval/samples", grid, step, dataformats="HWC")

    @staticmethod
    def _keep_if_best(trainer, model, record: dict, step: int) -> None:
        from .export import save_pipeline

        c = trainer.config
        key = EVAL_PREFIX + c.keep_best
        value = record[key]
        best = read_best(c.output_dir)
        if best is not None and not value < best["value"]:
            return
        with fileio.atomic_dir(os.path.join(c.output_dir, BEST_DIR)) as tmp:
            save_pipeline(model, trainer.noise_scheduler, tmp)
            fileio.atomic_write_json(os.path.join(tmp, BEST_FILE), {
                "metric": c.keep_best, "value": value, "step": step, "settings": eval_settings(c)})
        logger.info("new best %s %.4f at step %d: kept in %s", c.keep_best, value, step,
                    os.path.join(c.output_dir, BEST_DIR))


def weights_to_export(trainer, model):
    """(model holding the weights to export, a sentence for the card saying which and why). With --export best the
    EMA weights kept in best/ are loaded into ``model`` (same architecture)."""
    c = trainer.config
    if c.export != "best":
        return model, f"last (step {trainer.global_step}, --export last)"
    best = read_best(c.output_dir)
    if best is None:
        raise FileNotFoundError(f"--export best: no {os.path.join(c.output_dir, BEST_DIR, BEST_FILE)}; the run never "
                                "evaluated (--eval_steps) with --keep_best")
    import copy

    from safetensors.torch import load_file

    if trainer.ema is None:  # then ``model`` is the training model itself: load into a copy
        model = copy.deepcopy(model)
    weights = load_file(os.path.join(c.output_dir, BEST_DIR, "unet", "diffusion_pytorch_model.safetensors"))
    model.load_state_dict(weights)
    return model, (f"best by {best['metric']} ({best['value']:.4f} at step {best['step']} of {trainer.global_step}; "
                   f"--keep_best {best['metric']} --export best)")

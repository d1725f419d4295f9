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

One evaluation routine, two ways of running it (``--eval_async``). ``evaluation_record`` turns (model, scheduler,
the run's ``eval_arguments``) into a record; ``EvaluationCallback._record`` writes a record wherever it goes. In the
training process (``--eval_async false``, several processes, a GPU) both run at the due step. In the background
(``--eval_async true``, or ``auto`` on a single-process CPU run with a core that torch does not use): at a due step
the main process writes the EMA weights as a pipeline plus ``request.json`` into ``output_dir/.eval-pending/step-<N>/``
(``fileio.atomic_dir``) and starts ``python -m ddpm_from_scratch.trainer.eval_worker <folder>`` (1 thread, PASSIVE
OpenMP waits). The worker runs ``evaluation_record`` on those weights and writes ``samples.safetensors`` (the first
64 samples, for the grid), then ``result.json`` (the marker), each atomically; its output goes to ``worker.log``.
Training polls the worker at every step end (``Popen.poll``) and records a finished one exactly as the in-process
path does (``--keep_best`` copies the pending pipeline into best/), then removes the folder. At most one worker
runs: at the next due step training first waits for the previous one. The last step is evaluated in the training
process (nothing is left to overlap with it), after waiting for any worker, so best/ and run_info are complete
before the export. A worker that exits non-zero or writes no result stops training with EvaluationError naming the
step and the worker's last output line; its folder stays. On resume, a pending folder at or before the resumed step
whose step has no record is evaluated (its result when the worker finished, else a worker run on its weights, waited
for) before training continues; later ones (those steps are redone) and those of an earlier run are removed.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import time

from .. import fileio

logger = logging.getLogger("ddpm_from_scratch.train")

BEST_DIR = "best"
BEST_FILE = "best.json"
PREVIOUS_BEST_PREFIX = "previous-best-"
SCORES = ("fdd", "fid", "bits_per_dim")  # every one: lower is better
EVAL_PREFIX = "eval/"
PENDING_DIR = ".eval-pending"  # output_dir/.eval-pending/step-<N>/ while a background evaluation is under way
PENDING_PREFIX = "step-"
REQUEST_FILE, RESULT_FILE, SAMPLES_FILE, WORKER_LOG = "request.json", "result.json", "samples.safetensors", "worker.log"
WORKER_MODULE = "ddpm_from_scratch.trainer.eval_worker"


class EvaluationError(RuntimeError):
    """A background evaluation failed (the worker died, or its samples were not finite)."""


def eval_arguments(config) -> dict:
    """The ``evaluate_model`` keyword arguments of a run's evaluations (besides model, scheduler, accelerator)."""
    return {"num_samples": config.eval_num_samples, "num_inference_steps": config.ddpm_num_inference_steps,
            "seed": config.seed, "bound_num_inference_steps": config.eval_bound_steps or None,
            "bound_num_images": None if config.eval_bound_steps else 0, "batch_size": config.eval_batch_size}


def evaluation_record(model, scheduler, arguments: dict, step: int, accelerator=None):
    """THE evaluation of both paths: ``evaluate_model(model, scheduler, **arguments)`` -> (record {"step": N,
    "eval/<score>": value, ...}, EvalResult). The global RNG states are left as they were (fork_rng): the evaluation
    draws only from its own seeded generators, so training after it sees what it would have seen without it."""
    import torch

    from ..evaluation import evaluate_model

    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        result = evaluate_model(model, scheduler, accelerator=accelerator, **arguments)
    record = {"step": step, **{EVAL_PREFIX + k: result.metrics[k] for k in SCORES if k in result.metrics}}
    return record, result


def pending_root(output_dir: str) -> str:
    return os.path.join(output_dir, PENDING_DIR)


def pending_steps(output_dir: str) -> list[tuple[int, str]]:
    """[(step, folder)] of the complete pending folders, ascending step."""
    root = pending_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        if name.startswith(PENDING_PREFIX) and name[len(PENDING_PREFIX):].isdigit():
            found.append((int(name[len(PENDING_PREFIX):]), os.path.join(root, name)))
    return sorted(found)


def write_pending(model, scheduler, arguments: dict, step: int, output_dir: str) -> str:
    """output_dir/.eval-pending/step-<step>/: the model as a pipeline (safetensors) + request.json, in one swap."""
    from .export import save_pipeline

    folder = os.path.join(pending_root(output_dir), f"{PENDING_PREFIX}{step}")
    with fileio.atomic_dir(folder) as tmp:
        save_pipeline(model, scheduler, tmp)
        fileio.atomic_write_json(os.path.join(tmp, REQUEST_FILE), {"step": step, "arguments": arguments})
    return folder


def run_pending(folder: str) -> dict:
    """The worker's job: evaluates the pipeline in ``folder`` as its request.json says; writes samples.safetensors
    (the first samples, (K, C, H, W)) and then result.json ({record, work, seconds}); returns the result."""
    import torch
    from safetensors.torch import save_file

    from ..pipeline_ddpm import ScratchDDPMPipeline

    start = time.perf_counter()
    with open(os.path.join(folder, REQUEST_FILE), encoding="utf-8") as f:
        request = json.load(f)
    pipe = ScratchDDPMPipeline.from_pretrained(folder)
    record, result = evaluation_record(pipe.unet.to(torch.float32), pipe.scheduler, request["arguments"],
                                       int(request["step"]))
    samples = result.samples.contiguous()
    fileio.atomic_write(os.path.join(folder, SAMPLES_FILE), lambda tmp: save_file({"samples": samples}, tmp))
    out = {"record": record, "work": result.work, "seconds": round(time.perf_counter() - start, 3)}
    fileio.atomic_write_json(os.path.join(folder, RESULT_FILE), out)
    return out


def read_pending_result(folder: str):
    """(result.json dict, samples (K, C, H, W)) of a finished worker, or None when it wrote no result."""
    path = os.path.join(folder, RESULT_FILE)
    if not os.path.isfile(path):
        return None
    from safetensors.torch import load_file

    with open(path, encoding="utf-8") as f:
        out = json.load(f)
    return out, load_file(os.path.join(folder, SAMPLES_FILE))["samples"]


def start_worker(folder: str) -> subprocess.Popen:
    """``python -m ddpm_from_scratch.trainer.eval_worker folder``: 1 torch thread, idle OpenMP threads sleep, output
    to folder/worker.log; this package first on the child's path."""
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p))
    with open(os.path.join(folder, WORKER_LOG), "wb") as log:
        return subprocess.Popen([sys.executable, "-m", WORKER_MODULE, folder], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def last_line(path: str) -> str:
    """The last non-empty line of a text file ('' when none)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_eval_async(setting: str, num_processes: int, device_type: str, torch_threads: int,
                       cores: int) -> tuple[bool, str]:
    """(run the evaluations in a background worker?, why). ConfigError for 'true' where it cannot run."""
    from .config import ConfigError

    where = f"{num_processes} process(es) on {device_type}, {torch_threads} torch thread(s), {cores} core(s)"
    if setting == "true":
        if num_processes > 1 or device_type != "cpu":
            raise ConfigError(f"--eval_async true evaluates in one background process on a free CPU core: it needs a "
                              f"single-process CPU run, this one has {where}; use --eval_async auto or false")
        return True, f"--eval_async true ({where})"
    if setting == "false":
        return False, f"--eval_async false ({where})"
    on = num_processes == 1 and device_type == "cpu" and cores > torch_threads
    return on, f"--eval_async auto: {'on' if on else 'off'} ({where})"


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
        self.seconds = 0.0  # time the training process spent on evaluations (waiting included)
        self.worker_seconds = 0.0  # time the background workers spent evaluating
        self.background = False
        self.worker = None  # (step, Popen, folder) of the running background evaluation

    def due(self, trainer, step: int) -> bool:
        every = trainer.config.eval_steps
        return bool(every) and (step % every == 0 or step == trainer.max_steps)

    def on_train_begin(self, trainer) -> None:
        """Chooses where evaluations run; records a killed run's pending evaluations; a resumed run whose checkpoint
        step was due but has no record (killed after the checkpoint, before or during its evaluation; the
        checkpoint is saved first) evaluates it now, with exactly those weights."""
        import torch

        from .config import eval_async_setting

        acc = trainer.accelerator
        self.background, why = resolve_eval_async(eval_async_setting(trainer.config.eval_async), acc.num_processes,
                                                  acc.device.type, torch.get_num_threads(), usable_cores())
        if acc.is_main_process:
            logger.info("evaluations run %s: %s", "in a background worker" if self.background else
                        "in the training process", why)
            trainer.run_info["eval_async"] = self.background
            self._recover_pending(trainer)
        acc.wait_for_everyone()
        step = trainer.global_step
        if step and self.due(trainer, step):
            done = acc.is_main_process and self._recorded(trainer, step)
            from accelerate.utils import broadcast_object_list

            done = broadcast_object_list([done])[0] if acc.num_processes > 1 else done
            if not done:
                self.evaluate(trainer, step)

    def on_step_end(self, trainer, step: int, logs: dict) -> None:
        if self.worker is not None and self.worker[1].poll() is not None:
            self._collect(trainer)
        if not self.due(trainer, step):
            return
        if self.background and step != trainer.max_steps:
            self._launch(trainer, step)
        else:
            self.wait(trainer)
            self.evaluate(trainer, step)

    def on_loop_end(self, trainer) -> None:
        self.wait(trainer)

    @staticmethod
    def _recorded(trainer, step: int) -> bool:
        return any(r["step"] == step for r in eval_history(trainer.config.output_dir))

    # ---- in the training process ----------------------------------------------------------------------------
    def evaluate(self, trainer, step: int) -> dict:
        """One evaluation of the EMA weights at ``step`` in the training process(es) (collective); returns the
        record (on every process)."""
        from .ema import ema_model_copy
        from .export import save_pipeline

        c, acc = trainer.config, trainer.accelerator
        start = time.perf_counter()
        model = ema_model_copy(acc.unwrap_model(trainer.unet), trainer.ema)
        record, result = evaluation_record(model, trainer.noise_scheduler, eval_arguments(c), step, accelerator=acc)
        if acc.is_main_process:
            self._record(trainer, record, result.samples, result.work, start,
                         lambda tmp: save_pipeline(model, trainer.noise_scheduler, tmp))
        acc.wait_for_everyone()
        return record

    # ---- in a background worker -----------------------------------------------------------------------------
    def _launch(self, trainer, step: int) -> None:
        """Writes the EMA weights of ``step`` into a pending folder and starts its worker (after the previous one
        finished: at most one at a time). Single process only."""
        from .ema import ema_model_copy

        self.wait(trainer)
        start = time.perf_counter()
        c = trainer.config
        model = ema_model_copy(trainer.accelerator.unwrap_model(trainer.unet), trainer.ema)
        folder = write_pending(model, trainer.noise_scheduler, eval_arguments(c), step, c.output_dir)
        self.worker = (step, start_worker(folder), folder)
        self.seconds += time.perf_counter() - start
        logger.info("evaluation of step %d started in a background worker (pid %d, %s)", step, self.worker[1].pid,
                    folder)

    def wait(self, trainer) -> None:
        """Waits for the running worker, if any, and records its result."""
        if self.worker is None:
            return
        start = time.perf_counter()
        self.worker[1].wait()
        self.seconds += time.perf_counter() - start
        self._collect(trainer)

    def _collect(self, trainer) -> None:
        """Records the finished worker's result and removes its folder; EvaluationError when it failed."""
        step, proc, folder = self.worker
        self.worker = None
        self._record_pending(trainer, step, folder, proc.returncode)

    def _record_pending(self, trainer, step: int, folder: str, returncode: int) -> None:
        start = time.perf_counter()
        found = read_pending_result(folder) if returncode == 0 else None
        if found is None:
            how = (f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}") if returncode \
                else "it exited without writing a result"
            raise EvaluationError(
                f"the background evaluation of step {step} failed ({how}); its last output line: "
                f"{last_line(os.path.join(folder, WORKER_LOG)) or '(none)'} (log: {os.path.join(folder, WORKER_LOG)}). "
                f"Training stopped; --resume_from_checkpoint latest evaluates the weights kept in {folder} again "
                f"(--eval_async false evaluates in the training process)")
        out, samples = found
        self.worker_seconds += float(out.get("seconds", 0.0))

        def copy_pipeline(tmp):
            for name in os.listdir(folder):
                if name in (REQUEST_FILE, RESULT_FILE, SAMPLES_FILE, WORKER_LOG):
                    continue
                src, dst = os.path.join(folder, name), os.path.join(tmp, name)
                shutil.copytree(src, dst) if os.path.isdir(src) else shutil.copyfile(src, dst)

        self._record(trainer, out["record"], samples, out["work"], start, copy_pipeline, background=True)
        fileio.discard_dir(folder)
        root = os.path.dirname(folder)
        if not os.listdir(root):
            os.rmdir(root)

    def _recover_pending(self, trainer) -> None:
        """Main process, at the start: the pending folders a killed run left (module docstring)."""
        c = trainer.config
        root = pending_root(c.output_dir)
        fileio.sweep_discarded(root)
        resumed = trainer.run_info.get("resumed_from") is not None
        start = int(trainer.run_info.get("start_step", 0))
        for step, folder in pending_steps(c.output_dir):
            if not resumed or step > start or self._recorded(trainer, step):
                why = ("it belongs to an earlier run" if not resumed else
                       f"step {step} comes after the resumed step {start} and is redone" if step > start else
                       f"step {step} is already recorded")
                logger.info("removed the pending evaluation %s: %s", folder, why)
                fileio.discard_dir(folder)
                continue
            with open(os.path.join(folder, REQUEST_FILE), encoding="utf-8") as f:
                asked = json.load(f)["arguments"]
            stale = asked != eval_arguments(c)  # a resume with other evaluation settings: evaluate again
            if stale or read_pending_result(folder) is None:
                if stale:
                    fileio.atomic_write_json(os.path.join(folder, REQUEST_FILE),
                                             {"step": step, "arguments": eval_arguments(c)})
                for name in (RESULT_FILE, SAMPLES_FILE):
                    if os.path.exists(os.path.join(folder, name)):
                        os.remove(os.path.join(folder, name))
                logger.info("evaluating the pending step %d of the killed run from its weights in %s", step, folder)
                self.worker = (step, start_worker(folder), folder)
                self.wait(trainer)  # the same waiting, timing and recording as a worker of this run
            else:
                logger.info("recording the pending step %d that the killed run's worker finished", step)
                self._record_pending(trainer, step, folder, 0)
        if os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)

    # ---- recording: the same for both ------------------------------------------------------------------------
    def _record(self, trainer, record: dict, samples, work, start: float, write_best, background=False) -> None:
        """Main process: one evaluation's record to metrics.jsonl, the trackers (scalars + grid at its step), best/
        (``write_best(tmp)`` writes its pipeline) and run_info."""
        c, acc = trainer.config, trainer.accelerator
        step = record["step"]
        trainer.log_metrics(record)
        scalars = {k: v for k, v in record.items() if k != "step"}
        if c.logger != "none":
            acc.log(scalars, step=step)
            self._log_grid(trainer, samples, step)
        if c.keep_best:
            self._check_best_once(trainer)
            self._keep_if_best(trainer, write_best, record, step)
        self.seconds += time.perf_counter() - start
        trainer.run_info["evaluations"] = eval_history(c.output_dir)
        trainer.run_info["eval_settings"] = eval_settings(c)
        trainer.run_info["eval_work"] = work  # what each process sampled and scored itself
        trainer.run_info["eval_seconds"] = round(self.seconds, 3)  # the training process's, for the overhead figure
        if self.background or self.worker_seconds:
            trainer.run_info["eval_worker_seconds"] = round(self.worker_seconds, 3)
        logger.info("evaluation at step %d (%.1f s, %d process(es)%s): %s", step, time.perf_counter() - start,
                    acc.num_processes, ", in a background worker" if background else "",
                    {k: round(v, 4) for k, v in scalars.items()})

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
    def _keep_if_best(trainer, write_best, record: dict, step: int) -> None:
        c = trainer.config
        key = EVAL_PREFIX + c.keep_best
        value = record[key]
        best = read_best(c.output_dir)
        if best is not None and not value < best["value"]:
            return
        with fileio.atomic_dir(os.path.join(c.output_dir, BEST_DIR)) as tmp:
            write_best(tmp)
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

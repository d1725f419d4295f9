"""Trainer(config).train(): the training loop of Algorithm 1 under Accelerate; its parts live in their own modules.

    from ddpm_from_scratch.trainer import TrainConfig, Trainer
    result = Trainer(TrainConfig(output_dir="out", max_train_steps=200)).train()

The output folder is a ``ScratchDDPMPipeline`` (``model_index.json``, ``unet/``, ``scheduler/``), its model card
(``README.md``, ``samples.png``), ``run_info.json``, ``metrics.jsonl``, ``samples/``, ``logs/`` (TensorBoard) and
``checkpoint-<step>/`` folders.

Callbacks (``Trainer(config, callbacks=[...])``) are objects with any of these optional methods, called on the main
process *and* on every other process (check ``trainer.accelerator.is_main_process`` before writing files):

- ``on_train_begin(trainer)`` after the resume, before the first step;
- ``on_step_end(trainer, step, logs)`` after every optimizer step; ``logs`` holds ``"loss"``, ``"lr"`` and
  ``"grad_norm"`` (floats) on logging steps and is ``{}`` otherwise;
- ``on_save(trainer, step, path)`` after checkpoint ``path`` is complete;
- ``on_loop_end(trainer)`` after the last step, before the export (background work must be finished by then);
- ``on_train_end(trainer)`` after the export, before trackers close.

``output_dir/metrics.jsonl``: one JSON object per line, ``{"step": N, "loss": ..., "lr": ..., "grad_norm": ...}``
for every logging step, flushed as written; evaluation records ``{"step": N, "eval/<name>": value}`` go to the same
file through ``trainer.log_metrics``. On resume, lines with ``step`` above the resumed step are dropped first.

A batch from the data loader is a dict: ``{"pixel_values": (B, C, H, W) float in [-1, 1]}``, and ``"labels"``
(B,) when the dataset yields ``(image, label)`` or dicts with labels.
"""

import json
import logging
import math
import os
import time

from .. import fileio
from . import checkpoints as ckpt
from .config import ConfigError, TrainConfig
from .steps import NonFiniteError

logger = logging.getLogger("ddpm_from_scratch.train")
METRICS_FILE = "metrics.jsonl"
RUN_INFO_FILE = "run_info.json"


def as_batch(item) -> dict:
    """A data-loader item (tensor, (image, label) tuple, or dict) -> {"pixel_values": ..., ["labels": ...]}."""
    if isinstance(item, dict):
        return item if "pixel_values" in item else {"pixel_values": item["image"], **{k: v for k, v in item.items()
                                                                                          if k != "image"}}
    if isinstance(item, (tuple, list)):
        return {"pixel_values": item[0], "labels": item[1]}
    return {"pixel_values": item}


class Trainer:
    """One training run of a validated TrainConfig (see the module docstring for outputs and callbacks).

    Attributes available to callbacks: ``config`` (resolved), ``accelerator``, ``unet`` (prepared), ``ema``,
    ``noise_scheduler``, ``optimizer``, ``lr_scheduler``, ``global_step``, ``max_steps``, ``run_info``."""

    def __init__(self, config: TrainConfig, callbacks=None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.recipe_filled = config.recipe_values()
        self.config = config.validate()
        self.callbacks = list(callbacks or [])
        if self.config.eval_steps:
            from .evaluation import EvaluationCallback

            self.callbacks.append(EvaluationCallback())
        self.accelerator = None
        self.global_step = 0

    # ------------------------------------------------------------------------------------------------------
    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, *args)

    def log_metrics(self, record: dict) -> None:
        """Appends one JSON line ``{"step": ..., ...}`` to output_dir/metrics.jsonl (main process; flushed)."""
        if self.accelerator is not None and not self.accelerator.is_main_process:
            return
        with open(os.path.join(self.config.output_dir, METRICS_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def _truncate_metrics(self, step: int) -> None:
        path = os.path.join(self.config.output_dir, METRICS_FILE)
        if not os.path.isfile(path):
            return
        kept = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    if int(json.loads(line).get("step", 0)) <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, AttributeError):
                    continue  # a torn last line of a killed run
        fileio.atomic_write_text(path, "".join(kept))

    # ------------------------------------------------------------------------------------------------------
    def _setup(self):
        import torch
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        c = self.config
        torch.set_num_threads(c.num_threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or
                              torch.get_num_threads())
        project = ProjectConfiguration(project_dir=c.output_dir, logging_dir=os.path.join(c.output_dir, c.logging_dir))
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            gradient_accumulation_steps=c.gradient_accumulation_steps,
            mixed_precision=c.mixed_precision,
            log_with=None if c.logger == "none" else c.logger,
            project_config=project,
        )
        if self.accelerator.is_main_process:
            for key, value in sorted(self.recipe_filled.items()):
                logger.info("default (%s recipe): %s = %r", c.recipe, key, value)

    def _prepare_output_dir(self):
        """Refuse to silently replace a finished model or mix with an earlier run's checkpoints; returns the
        checkpoint to resume from (or None)."""
        from . import export

        c, acc = self.config, self.accelerator
        if acc.is_main_process and os.path.isdir(c.output_dir):
            export.recover_export(c.output_dir)
        acc.wait_for_everyone()
        resume = ckpt.resolve_checkpoint(c.output_dir, c.resume_from_checkpoint, acc.num_processes,
                                         warn=lambda m: logger.warning(m) if acc.is_main_process else None)
        if (not c.overwrite_output_dir and resume is None
                and os.path.exists(os.path.join(c.output_dir, "model_index.json"))):
            found = " and no loadable checkpoint to resume from" if c.resume_from_checkpoint else ""
            raise ConfigError(f"--output_dir {c.output_dir!r} already holds a trained pipeline{found}; pass "
                              "--overwrite_output_dir to train into it, or --resume_from_checkpoint latest")
        earlier = [os.path.basename(p) for _, p in ckpt.list_checkpoints(c.output_dir)] if resume is None else []
        if earlier and not c.overwrite_output_dir:
            raise ConfigError(f"--output_dir {c.output_dir!r} holds checkpoints of an earlier run "
                              f"({', '.join(earlier)}): pass --resume_from_checkpoint latest to continue it, or "
                              f"--overwrite_output_dir to start a new run (they are then moved to "
                              f"{ckpt.PREVIOUS_PREFIX}<n>/, not deleted)")
        acc.wait_for_everyone()
        return resume

    def _build_data(self):
        from ..data import build_training_data
        from .model import default_resolution, model_channels

        c, acc = self.config, self.accelerator
        resolution = default_resolution(c)
        fixed = model_channels(c)
        channels = c.image_channels if c.image_channels != "auto" or fixed is None else str(fixed)
        dataset, prepared, source = build_training_data(
            c.dataset_name, c.dataset_config_name, c.train_data_dir, c.cache_dir, resolution, c.center_crop,
            c.random_flip, channels, c.on_bad_image, c.seed, digits_split=c.digits_split,
            class_conditional=c.class_conditional, label_column=c.label_column)
        world, per_proc = acc.num_processes, c.train_batch_size
        global_batch = per_proc * world
        if len(dataset) < global_batch:
            largest = len(dataset) // world
            fix = (f"use --train_batch_size {largest} or smaller" if largest >= 1
                   else f"use fewer than {len(dataset) + 1} processes")
            raise ConfigError(f"--train_batch_size {per_proc}: the dataset has {len(dataset)} images, fewer than one "
                              f"global batch ({per_proc} x {world} process(es)); {fix}")
        micro_per_epoch = len(dataset) // global_batch
        steps_per_epoch = max(1, micro_per_epoch // c.gradient_accumulation_steps)
        if c.max_train_steps is not None:
            max_steps = c.max_train_steps
        else:
            max_steps = c.num_epochs * steps_per_epoch
        self.dataset, self.prepared, self.source = dataset, prepared, source
        self.class_names = prepared.class_names  # None unless class_conditional
        self.resolution, self.global_batch, self.steps_per_epoch, self.max_steps = (
            resolution, global_batch, steps_per_epoch, max_steps)
        self.sample_shape = (prepared.channels, resolution, resolution)

    def _build_model(self):
        import torch
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler

        from ..losses import ImportanceTimestepSampler
        from ..scheduling_ddpm import ScratchDDPMScheduler
        from .ema import EMA, register_ema
        from .model import build_model

        c, acc = self.config, self.accelerator
        set_seed(c.seed)  # model init and dropout use the global RNGs; load_state restores them on resume
        unet = build_model(c, self.prepared.channels, self.resolution, logger=logger,
                           num_classes=len(self.class_names) if self.class_names else None)
        if c.enable_xformers_memory_efficient_attention:
            unet.enable_xformers_memory_efficient_attention()
        self.noise_scheduler = ScratchDDPMScheduler(num_train_timesteps=c.ddpm_num_steps,
                                                    beta_schedule=c.ddpm_beta_schedule,
                                                    prediction_type=c.prediction_type, variance_type=c.variance_type)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2),
                                      weight_decay=c.adam_weight_decay, eps=c.adam_epsilon)
        # Stepped once per optimizer step by us (not prepared: Accelerate would step it once per process) and
        # checkpointed through register_for_checkpointing.
        self.lr_scheduler = get_scheduler(c.lr_scheduler, optimizer=optimizer, num_warmup_steps=c.lr_warmup_steps,
                                          num_training_steps=self.max_steps)
        self.ema = None
        if c.use_ema:
            self.ema = EMA(unet, max_decay=c.ema_max_decay, min_decay=c.ema_min_decay, use_warmup=True,
                           inv_gamma=c.ema_inv_gamma, power=c.ema_power, update_after_step=c.ema_update_after_step)
        self.unet, self.optimizer = acc.prepare(unet, optimizer)
        acc.register_for_checkpointing(self.lr_scheduler)
        self.timestep_sampler = None
        if c.importance_sampling:
            self.timestep_sampler = ImportanceTimestepSampler(c.ddpm_num_steps)
            acc.register_for_checkpointing(self.timestep_sampler)
        if self.ema is not None:
            self.ema.to(acc.device)
            register_ema(acc, self.ema)

    def recorded_config(self) -> dict:
        """What a checkpoint records about this run (compared on resume: checkpoints.MUST_MATCH)."""
        from ..hub import public_training_args

        rec = public_training_args(self.config)
        rec.update(resolution=self.resolution, image_channels=self.prepared.channels, global_batch=self.global_batch,
                   resume_from_checkpoint=None, overwrite_output_dir=None)
        return {k: v for k, v in rec.items() if v is not None or k in ckpt.MUST_MATCH}

    def _resume(self, resume):
        c, acc = self.config, self.accelerator
        self.global_step, self.recent, self.nan_skips = 0, [], 0
        if c.resume_from_checkpoint and resume is None:
            logger.info("no loadable checkpoint in %s; starting a new run", c.output_dir)
        if resume is None:
            return
        state = ckpt.read_training_state(resume)
        recorded = state.get("config")
        if recorded is None:
            if state.get("global_batch") != self.global_batch:
                raise ckpt.CheckpointError(
                    f"{resume} was trained with global batch {state.get('global_batch')}, this run has "
                    f"{self.global_batch}; the data position cannot be continued")
            logger.warning("%s records no config (an older checkpoint): only the global batch was compared", resume)
        else:
            blocking, changed = ckpt.compare_configs(recorded, self.recorded_config())
            if blocking:
                raise ckpt.CheckpointError(f"cannot resume from {resume}: this run differs in settings that define "
                                           f"the model, schedule or data order: {'; '.join(blocking)}")
            for line in changed:
                logger.info("resume: changed setting %s", line)
        acc.load_state(resume)
        self.global_step = int(state["step"])
        self.recent = [float(v) for v in state.get("recent_losses", [])]
        self.nan_skips = int(state.get("nan_skips", 0))
        if acc.is_main_process:
            self._truncate_metrics(self.global_step)
        logger.info("resumed from %s at step %d", resume, self.global_step)

    # ------------------------------------------------------------------------------------------------------
    def save_samples(self, step: int, model=None) -> str:
        """samples/step_<step>.png from ``model`` (default: the EMA, or raw, weights); returns its path (main
        process only)."""
        from .ema import ema_model_copy
        from .sampling import class_grid_labels, generate_samples, save_sample_grid

        c = self.config
        if model is None:
            model = ema_model_copy(self.accelerator.unwrap_model(self.unet), self.ema)
        labels, nrow, scale = None, None, None
        if self.class_names:  # one row per class
            labels, nrow = class_grid_labels(len(self.class_names), c.eval_batch_size)
            scale = c.eval_guidance_scale
        images = generate_samples(model, self.noise_scheduler, len(labels) if labels else c.eval_batch_size,
                                  c.ddpm_num_inference_steps, seed=c.seed, device=self.accelerator.device,
                                  class_labels=labels, guidance_scale=scale)
        return save_sample_grid(images, os.path.join(c.output_dir, "samples", f"step_{step}.png"), nrow=nrow)

    def _check_finite(self, losses, grad_norms, steps) -> None:
        """NonFiniteError naming the first optimizer step whose (process-mean) loss or gradient norm is not finite."""
        for step, loss, norm in zip(steps, losses, grad_norms):
            if not (math.isfinite(loss) and (norm is None or math.isfinite(norm))):
                what = "loss" if not math.isfinite(loss) else "gradient norm"
                raise NonFiniteError(
                    f"non-finite {what} at optimizer step {step} (loss {loss}, gradient norm {norm}): training "
                    f"stopped; nothing was saved or exported after step {step - 1}. Lower --learning_rate, set "
                    f"--max_grad_norm, or pass --nan_policy skip; resume with --resume_from_checkpoint latest")

    def _checkpoint_state(self, micro: int) -> dict:
        return {"micro_batch": micro, "global_batch": self.global_batch,
                "epoch": self.batch_sampler.position(micro)[0], "recent_losses": self.recent,
                "nan_skips": self.nan_skips, "config": self.recorded_config()}

    def _loop(self):
        import torch
        from tqdm.auto import tqdm

        from ..data import PositionBatchSampler
        from ..guidance import drop_labels
        from .steps import step_noise, train_micro_step

        c, acc = self.config, self.accelerator
        world, rank, per_proc = acc.num_processes, acc.process_index, c.train_batch_size
        self.batch_sampler = PositionBatchSampler(len(self.dataset), per_proc, world, rank, seed=c.seed,
                                                  start=self.global_step * c.gradient_accumulation_steps)
        # A private generator: creating the iterator would otherwise draw from the global RNG after load_state and
        # shift every later dropout mask of a resumed run.
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=self.batch_sampler,
                                             num_workers=c.dataloader_num_workers,
                                             pin_memory=acc.device.type == "cuda",
                                             generator=torch.Generator().manual_seed(c.seed))
        main = acc.is_main_process
        progress = tqdm(total=self.max_steps, initial=self.global_step, disable=not main, desc="steps",
                        dynamic_ncols=True)
        micro = self.global_step * c.gradient_accumulation_steps
        data_iter = iter(loader)
        window_t, window_steps, accum_loss = time.perf_counter(), 0, 0.0
        pending, pending_norms, pending_from = [], [], self.global_step + 1  # device tensors: no per-step sync
        skip_mode, skipped_steps = c.nan_policy == "skip", set()
        step_loss, grad_norm = float("nan"), None
        self.unet.train()
        try:  # the bar is closed on any stop, so that an error message starts on its own line
            while self.global_step < self.max_steps:
                batch = as_batch(next(data_iter))
                x0 = batch["pixel_values"].to(acc.device, non_blocking=True)
                labels = None
                if self.class_names:  # null class with probability p, keyed to (seed, micro-batch) like the noise
                    labels = drop_labels(batch["labels"].to(acc.device), c.class_dropout_prob, len(self.class_names),
                                         c.seed, micro, self.global_batch, rank)
                t, eps, w = step_noise(c.seed, micro, self.global_batch, self.sample_shape, c.ddpm_num_steps, rank,
                                       per_proc, device=acc.device, dtype=x0.dtype, timestep_sampler=self.timestep_sampler)
                loss, grad_norm, skipped = train_micro_step(
                    acc, self.unet, self.optimizer, self.noise_scheduler, x0, t, eps, loss_type=c.loss,
                    snr_gamma=c.snr_gamma, max_grad_norm=c.max_grad_norm, timestep_weights=w,
                    timestep_sampler=self.timestep_sampler, skip_non_finite=skip_mode,
                    class_labels=labels)
                micro += 1
                accum_loss = accum_loss + loss.detach().float() / c.gradient_accumulation_steps
                if not acc.sync_gradients:
                    continue
                if skipped:
                    self.nan_skips += 1
                    logger.warning("non-finite gradient at step %d: optimizer step skipped (%d of at most %d)",
                                   self.global_step + 1, self.nan_skips, c.max_nan_skips)
                    if self.nan_skips > c.max_nan_skips:
                        raise NonFiniteError(f"more than --max_nan_skips {c.max_nan_skips} optimizer steps had a "
                                             f"non-finite gradient (last at step {self.global_step + 1}); training "
                                             "stopped, nothing was saved or exported after it")
                else:
                    if not acc.optimizer_step_was_skipped:
                        self.lr_scheduler.step()
                    if self.ema is not None:
                        self.ema.update(acc.unwrap_model(self.unet))
                self.global_step += 1
                step = self.global_step
                window_steps += 1
                if skipped:  # a skipped step is left out of the losses and the finite check (it did not train)
                    skipped_steps.add(step)
                    grad_norm = None
                pending.append(accum_loss)
                pending_norms.append(None if grad_norm is None else grad_norm.detach().float().reshape(()))
                accum_loss = 0.0
                progress.update(1)
                checkpoint_now = bool(c.checkpointing_steps) and step % c.checkpointing_steps == 0
                epoch_end = step % self.steps_per_epoch == 0
                epoch = step // self.steps_per_epoch  # epochs completed
                images_now = (bool(c.save_images_steps) and step % c.save_images_steps == 0) or (
                    epoch_end and bool(c.save_images_epochs) and epoch % c.save_images_epochs == 0)
                export_now = epoch_end and bool(c.save_model_epochs) and epoch % c.save_model_epochs == 0
                logging_now = step % c.logging_steps == 0 or step == self.max_steps
                logs = {}
                if logging_now or checkpoint_now or images_now or export_now:
                    losses = torch.stack(pending)
                    norms = [n if n is not None else torch.full((), float("nan"), device=acc.device)
                             for n in pending_norms]
                    present = [n is not None for n in pending_norms]
                    if world > 1:
                        losses = acc.reduce(losses, "mean")
                    host_losses = losses.float().cpu().tolist()
                    host_norms = [v if p else None for v, p in zip(torch.stack(norms).cpu().tolist(), present)]
                    kept = [i for i in range(len(host_losses)) if pending_from + i not in skipped_steps]
                    self._check_finite([host_losses[i] for i in kept], [host_norms[i] for i in kept],
                                       [pending_from + i for i in kept])
                    self.recent = (self.recent + [host_losses[i] for i in kept])[-100:]
                    pending, pending_norms, pending_from = [], [], step + 1
                    step_loss = self.recent[-1] if self.recent else float("nan")
                    if main:
                        progress.set_postfix(loss=f"{step_loss:.4f}", step=step)
                    if logging_now:
                        now = time.perf_counter()
                        last_norm = next((v for v in reversed(host_norms) if v is not None), float("nan"))
                        logs = {"loss": step_loss, "lr": self.lr_scheduler.get_last_lr()[0], "grad_norm": last_norm}
                        scalars = {**logs, "steps_per_second": window_steps / max(now - window_t, 1e-9)}
                        if self.ema is not None:
                            scalars["ema_decay"] = self.ema.current_decay()
                        acc.log(scalars, step=step)
                        self.log_metrics({"step": step, **logs})
                        window_t, window_steps = now, 0
                if checkpoint_now:
                    path = ckpt.save_checkpoint(acc, c.output_dir, step, self._checkpoint_state(micro),
                                                c.checkpoints_total_limit)
                    logger.info("saved %s", path)
                    self._call("on_save", step, path)
                if images_now and step != self.max_steps:
                    if main:
                        self.save_samples(step)
                    acc.wait_for_everyone()
                if export_now and step != self.max_steps:
                    self.export(final=False)
                self._call("on_step_end", step, logs)
        finally:
            progress.close()

    # ------------------------------------------------------------------------------------------------------
    def export(self, final: bool = True):
        """Writes the pipeline, card, samples.png and run_info.json into output_dir as one atomic swap (export.py).
        Collective; the main process writes. Returns the exported pipeline on the main process (else None)."""
        import shutil

        from .. import hub
        from .ema import ema_model_copy
        from .export import save_pipeline, staged_export

        c, acc = self.config, self.accelerator
        acc.wait_for_everyone()
        pipe = None
        if acc.is_main_process:
            final_loss = self.final_loss()
            model = ema_model_copy(acc.unwrap_model(self.unet), self.ema)
            exported = None
            if final:
                from .evaluation import weights_to_export

                model, exported = weights_to_export(self, model)  # --export best|last
            grid = self.save_samples(self.global_step, model)
            with staged_export(c.output_dir) as stage:
                pipe = save_pipeline(model, self.noise_scheduler, stage, class_names=self.class_names)
                shutil.copyfile(grid, os.path.join(stage, "samples.png"))  # beside README.md, for the card
                card_metrics = {"loss": final_loss}
                if final and c.eval_at_end:
                    eval_metrics, self.run_info["eval"] = self._evaluate(pipe.unet)
                    card_metrics.update(eval_metrics)
                    logger.info("held-out evaluation: %s", eval_metrics)
                self.run_info.update(final_step=self.global_step, final_loss=final_loss, last_losses=self.recent,
                                     ema=self.ema is not None)
                if exported:
                    self.run_info["exported"] = exported
                fileio.atomic_write_json(os.path.join(stage, RUN_INFO_FILE), self.run_info)
                report_figure = self._write_report(stage, pipe) if final and c.report else None
                repo_id = self.repo_id()
                hub.write_model_card(
                    stage, repo_id=repo_id if c.push_to_hub else c.output_dir, sample_grid="samples.png",
                    dataset_name=self.source if self.source != "sklearn-digits"
                    else "scikit-learn digits (sklearn.datasets.load_digits)",
                    training_args=self.effective_settings(), metrics=card_metrics,
                    details={"UNet": c.model_config_name_or_path or c.unet_preset, "resolution": self.resolution,
                             "channels": self.prepared.channels, "training steps": self.global_step,
                             "global batch": self.global_batch * c.gradient_accumulation_steps,
                             "EMA weights": self.ema is not None,
                             **({"exported weights": exported} if exported else {}),
                             **({"class dropout (null class)": c.class_dropout_prob} if self.class_names else {})},
                    num_inference_steps=c.ddpm_num_inference_steps, token=c.hub_token, report_figure=report_figure,
                    class_names=self.class_names,
                    guidance_scale=c.eval_guidance_scale if self.class_names else None)
        acc.wait_for_everyone()
        return pipe

    def _write_report(self, stage: str, pipe) -> str | None:
        """The run's report (report.write_report) into ``stage``/report/, swapped in with the pipeline; returns the
        main figure's path relative to the card, or None (with a warning) when it could not be drawn."""
        from ..report import MAIN_FIGURE, REPORT_DIRNAME, REPORT_TRAJECTORY_STEPS, write_report

        unet = pipe.unet
        was_training = unet.training
        unet.eval()
        try:
            # the trajectory runs the run's own sampler, capped at the report's default 100 steps
            steps = min(REPORT_TRAJECTORY_STEPS, self.config.ddpm_num_inference_steps)
            write_report(self.config.output_dir, dest=os.path.join(stage, REPORT_DIRNAME),
                         pipeline=(unet, pipe.scheduler), run_info=self.run_info, device=self.accelerator.device,
                         num_inference_steps=steps, bound_num_images=64, gamma_num_images=64)
        except (ValueError, RuntimeError) as exc:  # the model is fine; only a figure is missing
            logger.warning("the training report was not written (%s); draw it later with `ddpm-from-scratch "
                           "report %s`", exc, self.config.output_dir)
            return None
        finally:
            unet.train(was_training)
        return f"{REPORT_DIRNAME}/{MAIN_FIGURE}"

    def final_loss(self) -> float:
        """The mean of the last (up to 100) optimizer steps' losses: the card's and the result's final loss."""
        return sum(self.recent) / len(self.recent) if self.recent else float("nan")

    def repo_id(self) -> str:
        """The Hub repo of --push_to_hub: --hub_model_id, else the output folder's name (as diffusers does)."""
        c = self.config
        return c.hub_model_id or os.path.basename(os.path.normpath(os.path.abspath(c.output_dir)))

    def effective_settings(self) -> dict:
        """Every effective setting (recipe defaults filled in, derived values added), secrets removed: the card's
        table and the trackers' config."""
        from ..hub import public_training_args

        rec = public_training_args(self.config)
        rec.update(resolution=self.resolution, image_channels=self.prepared.channels, max_train_steps=self.max_steps,
                   recipe=self.config.recipe)
        return rec

    def _evaluate(self, unet):
        """metrics.digits_report on the held-out digits -> (card metrics {label: value}, summary for run_info)."""
        import torch

        from ..metrics import digits_report

        c = self.config
        T = int(self.noise_scheduler.config.num_train_timesteps)
        steps = None if c.ddpm_num_inference_steps >= T else c.ddpm_num_inference_steps
        report = digits_report(unet.eval(), self.noise_scheduler, num_inference_steps=steps,
                               num_samples=c.eval_num_samples, batch_size=c.eval_batch_size,
                               generator=torch.Generator().manual_seed(c.seed), progress=True)
        card = {"bits/dim (held-out digits)": report["bits_per_dim"]}
        if "fdd" in report:
            card[f"FDD ({report['num_samples']} samples, {report['num_steps']} steps)"] = report["fdd"]
        return card, {k: v for k, v in report.items() if k not in ("timesteps", "terms_bpd")}

    # ------------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Runs the whole training; returns {"final_step", "final_loss", "output_dir",
        "is_main_process"}. Raises ConfigError /
        CheckpointError / NonFiniteError with a message naming the setting, file or step."""
        import torch

        from ..hub import public_training_args

        c = self.config
        for noisy in ("accelerate", "diffusers", "datasets", "httpx"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self._setup()
        acc = self.accelerator
        resume = self._prepare_output_dir()
        if resume is None and acc.is_main_process and ckpt.list_checkpoints(c.output_dir):
            logger.info("moved the earlier run's checkpoints to %s", ckpt.set_aside_checkpoints(c.output_dir))
        acc.wait_for_everyone()
        self._build_data()  # before any model: a bad dataset costs seconds
        self._build_model()
        self._resume(resume)
        if acc.is_main_process:
            os.makedirs(c.output_dir, exist_ok=True)
            if c.logger != "none":
                acc.init_trackers("train", config={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                   for k, v in public_training_args(self.effective_settings()).items()})
            self.run_info = {
                "distributed_type": str(acc.distributed_type), "num_processes": acc.num_processes,
                "train_batch_size": c.train_batch_size, "global_batch": self.global_batch,
                "gradient_accumulation_steps": c.gradient_accumulation_steps, "max_train_steps": self.max_steps,
                "num_images": len(self.dataset), "skipped_images": len(self.prepared.skipped),
                "image_channels": self.prepared.channels, "resolution": self.resolution, "dataset": self.source,
                "resumed_from": resume, "start_step": self.global_step, "torch_threads": torch.get_num_threads(),
                "recipe": c.recipe, "class_names": self.class_names}
            logger.info("training %s on %s: %d images (%d skipped), %d process(es) [%s], global batch %d, %d steps",
                        c.model_config_name_or_path or c.unet_preset, self.source, len(self.dataset),
                        len(self.prepared.skipped), acc.num_processes, acc.distributed_type,
                        self.global_batch * c.gradient_accumulation_steps, self.max_steps)
        else:
            self.run_info = {}
        self._call("on_train_begin")
        self._loop()
        self._call("on_loop_end")
        self.export(final=True)
        final_loss = self.final_loss()
        if acc.is_main_process and c.push_to_hub:
            from .. import hub

            repo_id = self.repo_id()
            commit = hub.push_folder(c.output_dir, repo_id, private=c.hub_private_repo, token=c.hub_token,
                                     ignore_patterns=(*hub.DEFAULT_PUSH_IGNORE, METRICS_FILE, "best/*",
                                                      "previous-best-*"))
            logger.info("pushed %s to %s", c.output_dir, commit)
        self._call("on_train_end")
        acc.end_training()
        return {"final_step": self.global_step, "final_loss": final_loss, "output_dir": os.path.abspath(c.output_dir),
                "is_main_process": acc.is_main_process}


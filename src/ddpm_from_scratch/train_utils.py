"""Reusable training machinery: EMA of the weights, atomic checkpoints, per-step noise, sample grids, export.

Checkpoint layout (``output_dir/checkpoint-<step>/``): everything ``accelerator.save_state`` writes (model
safetensors, optimizer, LR scheduler, RNG states of every process), ``ema.safetensors`` (through a save hook)
and ``training_state.json`` (step and data position), written last. A checkpoint is first written under
``.tmp-checkpoint-<step>`` and renamed when complete, so a directory named ``checkpoint-<step>`` is always whole.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid

import numpy as np
import torch

from .data import mix_seed

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "training_state.json"
EMA_FILE = "ema.safetensors"
# Fault injection for the crash tests: "during_save:<step>" or "after_checkpoint:<step>" makes the process print
# a marker and wait (for the test's SIGKILL) at that point of save_checkpoint.
FAULT_ENV = "DDPM_FROM_SCRATCH_TEST_PAUSE"


def _pause_point(point: str, step: int) -> None:
    """Blocks forever at ``point`` of checkpoint ``step`` when FAULT_ENV asks for it (tests only)."""
    if os.environ.get(FAULT_ENV) == f"{point}:{step}":
        import sys
        import time

        print(f"PAUSED {point}:{step}", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)


# ----------------------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------------------

def ema_decay(num_updates: int, max_decay: float = 0.9999, min_decay: float = 0.0, use_warmup: bool = True,
              inv_gamma: float = 1.0, power: float = 0.75, update_after_step: int = 0) -> float:
    """Decay used at update number ``num_updates`` (1-based): warm-up 1 - (1 + n / inv_gamma)^-power
    (Karras-style; n counts updates after ``update_after_step``), or (1 + n) / (10 + n), clamped to
    [min_decay, max_decay]; 0 (copy the weights) before the first counted update."""
    n = num_updates - update_after_step - 1
    if n <= 0:
        return 0.0
    value = 1.0 - (1.0 + n / inv_gamma) ** -power if use_warmup else (1.0 + n) / (10.0 + n)
    return float(min(max(value, min_decay), max_decay))


class EMA:
    """Exponential moving average of a model's floating-point parameters, kept in float32 on the model's device.

    ``update(model)`` once per optimizer step: shadow <- decay * shadow + (1 - decay) * param.
    """

    def __init__(self, model: torch.nn.Module, max_decay: float = 0.9999, min_decay: float = 0.0,
                 use_warmup: bool = True, inv_gamma: float = 1.0, power: float = 0.75, update_after_step: int = 0):
        if not 0.0 <= min_decay <= max_decay < 1.0:
            raise ValueError(f"EMA decays must satisfy 0 <= ema_min_decay <= ema_max_decay < 1, "
                             f"got min {min_decay}, max {max_decay}")
        self.names = [n for n, p in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for p in model.parameters()]
        self.hparams = dict(max_decay=max_decay, min_decay=min_decay, use_warmup=use_warmup, inv_gamma=inv_gamma,
                            power=power, update_after_step=update_after_step)
        self.num_updates = 0

    def current_decay(self) -> float:
        """Decay the next update will use."""
        return ema_decay(self.num_updates + 1, **self.hparams)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> float:
        """One EMA step from ``model``'s parameters; returns the decay used."""
        decay = self.current_decay()
        params = [p.detach() for p in model.parameters()]
        if params and params[0].dtype == torch.float32:
            torch._foreach_lerp_(self.shadow, params, 1.0 - decay)
        else:
            torch._foreach_lerp_(self.shadow, [p.float() for p in params], 1.0 - decay)
        self.num_updates += 1
        return decay

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Writes the averaged weights into ``model`` (same architecture)."""
        for p, s in zip(model.parameters(), self.shadow):
            p.copy_(s.to(dtype=p.dtype, device=p.device))

    def state_dict(self) -> dict:
        return {"shadow": dict(zip(self.names, self.shadow)), "num_updates": self.num_updates, **self.hparams}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        missing = [n for n in self.names if n not in shadow]
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(shadow[n])
        self.num_updates = int(state["num_updates"])

    def save(self, path: str) -> None:
        """Shadow weights as safetensors; update count and hyper-parameters in its metadata."""
        from safetensors.torch import save_file

        meta = {"num_updates": str(self.num_updates), "hparams": json.dumps(self.hparams)}
        save_file({n: s.contiguous().cpu() for n, s in zip(self.names, self.shadow)}, path, metadata=meta)

    def load(self, path: str) -> None:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            self.load_state_dict({"shadow": {k: f.get_tensor(k) for k in f.keys()},
                                  "num_updates": int(meta.get("num_updates", 0))})


def register_ema(accelerator, ema: EMA):
    """Makes ``accelerator.save_state``/``load_state`` carry the EMA as ``ema.safetensors`` (main writes)."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            ema.save(os.path.join(output_dir, EMA_FILE))

    def load_hook(models, input_dir):
        path = os.path.join(input_dir, EMA_FILE)
        if not os.path.exists(path):
            raise ValueError(f"checkpoint {input_dir} has no {EMA_FILE}; it was saved without --use_ema")
        ema.load(path)

    return accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(load_hook)


# ----------------------------------------------------------------------------------------------------------
# Per-step randomness (a pure function of the position: exact resume, process-count independent)
# ----------------------------------------------------------------------------------------------------------

def step_noise(seed: int, micro_batch: int, global_batch: int, sample_shape, num_train_timesteps: int,
               process_index: int = 0, per_process: int | None = None, device=None, dtype=torch.float32,
               timestep_sampler=None):
    """Timesteps int64 (B,), noise (B, C, H, W) and importance weights (B,) or None for this process's slice of
    global micro-batch ``micro_batch``.

    Drawn on the CPU for the whole global batch from a generator seeded by (seed, micro_batch), then sliced, so
    that 1 process with batch 2B and 2 processes with batch B each see the same t and eps (Algorithm 1, l. 3-4).
    With a ``timestep_sampler`` (losses.ImportanceTimestepSampler, identical on every process) t ~ p_t instead.
    """
    from .losses import uniform_timesteps

    per_process = global_batch if per_process is None else per_process
    gen = torch.Generator().manual_seed(mix_seed(seed, 3, micro_batch))
    if timestep_sampler is None:
        t, w = uniform_timesteps(global_batch, num_train_timesteps, generator=gen), None
    else:
        t, w = timestep_sampler.sample(global_batch, generator=gen)
    eps = torch.randn((global_batch, *sample_shape), generator=gen)
    sl = slice(process_index * per_process, (process_index + 1) * per_process)
    return t[sl].to(device), eps[sl].to(device=device, dtype=dtype), (None if w is None else w[sl].to(device))


def update_timestep_sampler(accelerator, sampler, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
    """Feed every process's (t, L_t) of a micro-batch to the sampler, in process order, so that all copies of the
    sampler stay identical (and equal to a 1-process run with the same global batch)."""
    both = accelerator.gather(torch.stack([timesteps.double(), losses.double()]).T.contiguous())  # (global B, 2)
    sampler.update(both[:, 0].round().long(), both[:, 1])


def train_micro_step(accelerator, unet, optimizer, noise_scheduler, x_start, timesteps, noise, *,
                     loss_type: str = "simple", snr_gamma: float | None = None, max_grad_norm: float = 0.0,
                     timestep_weights=None, timestep_sampler=None, class_labels=None):
    """One micro-batch of Algorithm 1 under Accelerate: loss (losses.training_loss), backward, and on the last
    micro-batch of an accumulation the gradient clip and optimizer step. x_start (B, C, H, W) in [-1, 1].
    With a timestep_sampler its loss history gets this micro-batch's bound terms from every process.
    Returns (detached loss, total gradient norm before clipping or None when no optimizer step happened)."""
    import math

    from .losses import training_loss

    with accelerator.accumulate(unet):
        with accelerator.autocast():
            out = training_loss(unet, noise_scheduler, x_start, loss_type=loss_type, snr_gamma=snr_gamma,
                                timesteps=timesteps, noise=noise, timestep_weights=timestep_weights,
                                class_labels=class_labels)
            loss = out["loss"]
        accelerator.backward(loss)
        grad_norm = None
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(unet.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if timestep_sampler is not None:
        update_timestep_sampler(accelerator, timestep_sampler, timesteps, out["vlb"])
    return loss.detach(), grad_norm


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------

def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``output_dir`` as sorted (step, path); temp and unfinished dirs are ignored."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


PREVIOUS_PREFIX = "previous-checkpoints-"


def set_aside_checkpoints(output_dir: str) -> str | None:
    """Move an earlier run's complete checkpoints into ``previous-checkpoints-<n>/`` (nothing is deleted), so that a
    new run's "latest" and rotation never mix two runs. Returns that folder, or None when there were none."""
    found = list_checkpoints(output_dir)
    if not found:
        return None
    n = 1
    while os.path.exists(os.path.join(output_dir, f"{PREVIOUS_PREFIX}{n}")):
        n += 1
    dest = os.path.join(output_dir, f"{PREVIOUS_PREFIX}{n}")
    os.makedirs(dest)
    for _, path in found:
        os.rename(path, os.path.join(dest, os.path.basename(path)))
    return dest


def resolve_checkpoint(output_dir: str, spec: str | None) -> str | None:
    """Path of the checkpoint to resume from: None for no spec, newest complete one for "latest" (None when
    there is none), else ``spec`` as a path or as a name inside ``output_dir`` (ValueError if incomplete)."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    for path in (spec, os.path.join(output_dir, os.path.basename(os.path.normpath(spec)))):
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, STATE_FILE)):
                raise ValueError(f"--resume_from_checkpoint {spec!r}: {path} is not a complete checkpoint "
                                 f"(no {STATE_FILE})")
            return path
    raise ValueError(f"--resume_from_checkpoint {spec!r} does not exist (give a checkpoint path or 'latest')")


def read_training_state(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, STATE_FILE)) as f:
        return json.load(f)


def _fsync_tree(root: str) -> None:
    """Flushes every file under ``root`` and the directory itself to disk (durability before the rename)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


DELETING_PREFIX = ".deleting-"


def _doomed_name(path: str) -> str:
    """A unique ``.deleting-*`` sibling name for ``path``: rename there first, then delete, so that a kill at any
    moment never leaves a half-deleted folder under a checkpoint's name (sweep_discarded removes leftovers)."""
    return os.path.join(os.path.dirname(path), f"{DELETING_PREFIX}{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")


def _discard_dir(path: str) -> None:
    doomed = _doomed_name(path)
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def sweep_discarded(output_dir: str) -> None:
    """Finish deletions that a killed run left as ``.deleting-*`` folders."""
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith(DELETING_PREFIX):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def prune_checkpoints(output_dir: str, total_limit: int | None, keep: str | None = None) -> list[str]:
    """Deletes the oldest complete checkpoints so that at most ``total_limit`` remain (``keep`` always stays);
    temp dirs and foreign files are never touched. Returns the removed paths."""
    if total_limit is None:
        return []
    if total_limit < 1:
        raise ValueError(f"checkpoints_total_limit must be >= 1 or None, got {total_limit}")
    found = [p for _, p in list_checkpoints(output_dir)]
    excess = found[:max(0, len(found) - total_limit)]
    removed = []
    for path in excess:
        if keep is not None and os.path.abspath(path) == os.path.abspath(keep):
            continue
        _discard_dir(path)
        removed.append(path)
    return removed


def save_checkpoint(accelerator, output_dir: str, step: int, state: dict, total_limit: int | None = None) -> str:
    """Atomic ``accelerator.save_state``: write to ``.tmp-checkpoint-<step>``, add ``training_state.json``,
    fsync, rename to ``checkpoint-<step>``, then prune older complete checkpoints. Collective: call on every
    process. Returns the final path."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f"{TMP_PREFIX}{step}")
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        sweep_discarded(output_dir)
        if os.path.exists(tmp):  # left by a run killed while saving this same step
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({**state, "step": step}, f, indent=2, sort_keys=True)
        _fsync_tree(tmp)
        _pause_point("during_save", step)
        if os.path.exists(final):  # re-saving a step (e.g. a resumed run ends on it): swap, never lose both
            old = _doomed_name(final)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        dir_fd = os.open(output_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        removed = prune_checkpoints(output_dir, total_limit, keep=final)
        if removed:
            logger.info("removed old checkpoints: %s", ", ".join(os.path.basename(r) for r in removed))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _pause_point("after_checkpoint", step)
    return final


# ----------------------------------------------------------------------------------------------------------
# Samples and export
# ----------------------------------------------------------------------------------------------------------

def image_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2, scale: int = 1):
    """(N, H, W, C) float in [0, 1] or uint8 -> one PIL image, ``nrow`` images per row, ``pad`` px white gaps,
    each pixel enlarged ``scale`` times (nearest)."""
    from PIL import Image

    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    if images.dtype != np.uint8:
        images = np.rint(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)
    n, h, w, c = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
    img = Image.fromarray(grid[:, :, 0] if c == 1 else grid, mode="L" if c == 1 else "RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def pipeline_class():
    """ScratchDDPMPipeline (ours)."""
    from .pipeline_ddpm import ScratchDDPMPipeline

    return ScratchDDPMPipeline


def generate_samples(unet, scheduler, num_images: int, num_inference_steps: int, seed: int, device=None,
                     class_labels=None, guidance_scale=None):
    """(N, H, W, C) float in [0, 1] from the pipeline with ``unet`` (EMA weights or not) and ``scheduler``
    (``class_labels``: one per image, for a class-conditional UNet)."""
    pipe = pipeline_class()(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    was_training = unet.training
    unet.eval()
    try:
        out = pipe(batch_size=num_images, num_inference_steps=num_inference_steps, generator=gen, output_type="np",
                   class_labels=class_labels, guidance_scale=guidance_scale)
    finally:
        unet.train(was_training)
    return np.asarray(out.images)


def save_sample_grid(images: np.ndarray, path: str, scale: int | None = None) -> str:
    """Writes the grid PNG (nearest-upscaled so that each image is at least 64 px wide)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    scale = scale or max(1, 64 // images.shape[2])
    image_grid(images, scale=scale).save(path)
    return path


def ema_model_copy(unet: torch.nn.Module, ema: EMA | None) -> torch.nn.Module:
    """A detached copy of ``unet`` holding the EMA weights (the model itself when ``ema`` is None)."""
    if ema is None:
        return unet
    import copy

    model = copy.deepcopy(unet)
    ema.copy_to(model)
    return model


def write_json_atomically(path: str, obj) -> None:
    """json.dump via a temporary file + rename: a crash never leaves a half-written file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def evaluate_for_card(unet, scheduler, *, num_inference_steps: int, num_samples: int, batch_size: int, seed: int):
    """metrics.digits_report on the held-out digits -> (model-card metrics {label: value}, summary for run_info)."""
    from .metrics import digits_report

    T = int(scheduler.config.num_train_timesteps)
    report = digits_report(unet.eval(), scheduler, num_inference_steps=None if num_inference_steps >= T else num_inference_steps,
                           num_samples=num_samples, batch_size=batch_size,
                           generator=torch.Generator().manual_seed(seed), progress=True)
    card = {"bits/dim (held-out digits)": report["bits_per_dim"]}
    if "fdd" in report:
        card[f"FDD ({report['num_samples']} samples, {report['num_steps']} steps)"] = report["fdd"]
    return card, {k: v for k, v in report.items() if k not in ("timesteps", "terms_bpd")}


def export_pipeline(unet, scheduler, output_dir: str, ema: EMA | None = None, class_names=None):
    """Saves a pipeline loadable with ``ScratchDDPMPipeline.from_pretrained(output_dir)`` (safetensors);
    the UNet holds the EMA weights when ``ema`` is given. Returns the pipeline."""
    model = ema_model_copy(unet, ema)
    pipe = pipeline_class()(unet=model, scheduler=scheduler, class_names=class_names)
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return pipe

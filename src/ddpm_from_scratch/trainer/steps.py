"""One optimizer step's worth of work: the per-step randomness (a pure function of the position, so that a resumed
or multi-process run sees the same t and eps) and the micro-step under Accelerate, with the non-finite guard."""

import math

import torch

from ..data import mix_seed


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient: training stops naming the step; nothing is saved or exported after it."""


def step_noise(seed: int, micro_batch: int, global_batch: int, sample_shape, num_train_timesteps: int,
               process_index: int = 0, per_process: int | None = None, device=None, dtype=torch.float32,
               timestep_sampler=None):
    """Timesteps int64 (B,), noise (B, C, H, W) and importance weights (B,) or None for this process's slice of
    global micro-batch ``micro_batch``.

    Drawn on the CPU for the whole global batch from a generator seeded by (seed, micro_batch), then sliced, so
    that 1 process with batch 2B and 2 processes with batch B each see the same t and eps (Algorithm 1, l. 3-4).
    With a ``timestep_sampler`` (losses.ImportanceTimestepSampler, identical on every process) t ~ p_t instead.
    """
    from ..losses import uniform_timesteps

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
                     loss_type: str = "simple", snr_gamma: float | None = None, max_grad_norm: float | None = 0.0,
                     timestep_weights=None, timestep_sampler=None, skip_non_finite: bool = False,
                     class_labels=None):
    """One micro-batch of Algorithm 1 under Accelerate: loss (losses.training_loss), backward, and on the last
    micro-batch of an accumulation the gradient clip and optimizer step. x_start (B, C, H, W) in [-1, 1].
    With a timestep_sampler its loss history gets this micro-batch's bound terms from every process.
    With ``skip_non_finite`` a non-finite gradient norm (the same on every process: gradients are all-reduced)
    skips the optimizer step (one host sync per step).
    class_labels: (B,) labels of a class-conditional UNet (after guidance.drop_labels).
    Returns (detached loss, total gradient norm before clipping or None when no optimizer step happened,
    True when the optimizer step was skipped as non-finite)."""
    from ..losses import training_loss

    skipped = False
    with accelerator.accumulate(unet):
        with accelerator.autocast():
            out = training_loss(unet, noise_scheduler, x_start, loss_type=loss_type, snr_gamma=snr_gamma,
                                timesteps=timesteps, noise=noise, timestep_weights=timestep_weights,
                                class_labels=class_labels)
            loss = out["loss"]
        accelerator.backward(loss)
        grad_norm = None
        if accelerator.sync_gradients:
            clip = max_grad_norm if max_grad_norm else math.inf
            grad_norm = accelerator.clip_grad_norm_(unet.parameters(), clip)
            skipped = skip_non_finite and not bool(torch.isfinite(grad_norm))
        if not skipped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if timestep_sampler is not None and not skipped:
        update_timestep_sampler(accelerator, timestep_sampler, timesteps, out["vlb"])
    return loss.detach(), grad_norm, skipped

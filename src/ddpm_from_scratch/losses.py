"""Training objectives (DDPM Eq. 14 'simple' loss and its variants) and timestep samplers."""

from __future__ import annotations

import torch

from . import diffusion_math as dm


def uniform_timesteps(batch_size: int, num_train_timesteps: int, device=None, generator=None) -> torch.Tensor:
    """t ~ Uniform{0, ..., T-1}, int64 (B,) (Algorithm 1, line 3)."""
    return torch.randint(0, num_train_timesteps, (batch_size,), device=device, generator=generator, dtype=torch.long)


def simple_target(prediction_type: str, x_start, noise, sqrt_abar, sqrt_one_minus_abar):
    """What the network regresses: eps (Eq. 14), x_0, or v."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x_start
    if prediction_type == "v_prediction":
        return dm.velocity(x_start, noise, sqrt_abar, sqrt_one_minus_abar)
    raise ValueError(f"prediction_type must be one of {list(dm.PREDICTION_TYPES)}, got {prediction_type!r}")


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, Eq. 9) expressed for the chosen regression target."""
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "sample":
        return clipped
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"prediction_type must be one of {list(dm.PREDICTION_TYPES)}, got {prediction_type!r}")


LOSS_TYPES = ("simple",)


def training_loss(model, scheduler, x_start: torch.Tensor, *, loss_type: str = "simple", snr_gamma: float | None = None,
                  timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None, generator=None) -> dict:
    """One DDPM training objective on a batch x_start (B, C, H, W) in [-1, 1] (Algorithm 1).

    Draws t ~ U{0..T-1} and eps ~ N(0, I) unless given, forms x_t by the forward closed form (Eq. 4),
    runs ``model(x_t, t).sample`` and returns a dict with ``loss`` (scalar mean, what to backpropagate),
    ``per_sample`` (B,) and ``timesteps`` (B,).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")
    cfg = scheduler.config
    batch = x_start.shape[0]
    if timesteps is None:
        timesteps = uniform_timesteps(batch, cfg.num_train_timesteps, device=x_start.device, generator=generator)
    if noise is None:
        noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
    abar = scheduler.alphas_cumprod.to(device=x_start.device, dtype=torch.float32)[timesteps]
    shape = (batch,) + (1,) * (x_start.dim() - 1)
    sqrt_abar = abar.sqrt().view(shape).to(x_start.dtype)
    sqrt_one_minus = (1.0 - abar).sqrt().view(shape).to(x_start.dtype)
    x_t = dm.q_sample(x_start, noise, sqrt_abar, sqrt_one_minus)
    model_output = model(x_t, timesteps).sample
    channels = x_start.shape[1]
    if model_output.shape[1] == 2 * channels:
        model_output = model_output[:, :channels]
    target = simple_target(cfg.prediction_type, x_start, noise, sqrt_abar, sqrt_one_minus)
    per_sample = ((model_output.float() - target.float()) ** 2).mean(dim=tuple(range(1, x_start.dim())))
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weight(abar / (1.0 - abar), snr_gamma, cfg.prediction_type)
    return {"loss": per_sample.mean(), "per_sample": per_sample, "timesteps": timesteps}

"""The DDPM variational bound term by term (Ho et al. 2020, Eq. 5), in bits per dimension, and the
analytic reverse variance of Analytic-DPM (Bao et al. 2022).

For a chain visiting timesteps t_N > ... > t_1 (all T training steps, or a respaced subset; the forward
process restricted to the visited steps is Markov with effective beta = 1 - abar_t / abar_prev), the bound is

    L = L_T + sum_{i=2..N} L_{t_i} + L_0
    L_T     = KL(q(x_{t_N} | x_0) || N(0, I))                                  (prior term)
    L_{t_i} = KL(q(x_{t_{i-1}} | x_{t_i}, x_0) || p_theta(x_{t_{i-1}} | x_{t_i}))  (Gaussian KLs)
    L_0     = -log p_theta(x_0 | x_{t_1})   (discretized Gaussian decoder, 256 bins on [-1, 1], Eq. 13)

Each L_{t_i} is estimated with one draw x_{t_i} ~ q(x_{t_i} | x_0) per image. Every formula comes from
``diffusion_math``; this module only gathers table rows, calls the model and sums.

Variance types (the ``variance_type`` of the scheduler, or an override): fixed_small (beta~_t, clipped at the
last step), fixed_large (beta_t), learned (the model's second half of channels IS log sigma^2), learned_range
(v in [-1, 1] interpolating log beta~_t (clipped) and log beta_t), analytic (Bao et al. 2022; needs
``analytic_gamma``, see :func:`estimate_analytic_gamma`).

Shapes: images (N, C, H, W) in [-1, 1]; ``rows`` are ``dm.ChainCoefficients`` of float64 tensors shaped (B, 1, 1, 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from . import diffusion_math as dm

VARIANCE_CHOICES = dm.SCHEDULER_VARIANCE_TYPES
LEARNED_VARIANCES = dm.LEARNED_VARIANCE_TYPES
ANALYTIC_CONFIG_KEY = "analytic_gamma"
_F64 = torch.float64
_LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------
# Chain tables
# ----------------------------------------------------------------------------------------------
def full_alphas_cumprod(scheduler) -> torch.Tensor:
    """abar_t for t = 0..T-1, float64 (T,): our scheduler's float64 chain, else the float32 table upcast."""
    chain = getattr(scheduler, "full_chain", None)
    if isinstance(chain, dm.ChainCoefficients):
        return chain.abar.to(_F64).cpu()
    return scheduler.alphas_cumprod.to(_F64).cpu()


def visited_timesteps(scheduler, num_inference_steps: int | None = None) -> torch.Tensor:
    """The descending int64 (N,) timesteps of the chain: all T, or those a copy of the scheduler visits after
    set_timesteps(num_inference_steps) (the scheduler passed in is not modified)."""
    T = int(scheduler.config.num_train_timesteps)
    if num_inference_steps is None:
        return torch.arange(T - 1, -1, -1, dtype=torch.long)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= T:
        raise ValueError(f"num_inference_steps must be None or an integer in [1, num_train_timesteps={T}], "
                         f"got {num_inference_steps!r}")
    from .scheduling_ddpm import ScratchDDPMScheduler

    # our spacing even for a diffusers scheduler (its "trailing" can end in t = -1)
    probe = ScratchDDPMScheduler.from_config(scheduler.config)
    probe.set_timesteps(num_inference_steps)
    return probe.timesteps.detach().cpu().long()


def chain(scheduler, timesteps: torch.Tensor, analytic_gamma=None) -> dm.ChainCoefficients:
    """The float64 (N,) coefficients of the reverse chain over ``timesteps`` (descending), with Analytic-DPM's
    variance when analytic_gamma ((T,) Gamma_t) is given."""
    timesteps = torch.as_tensor(timesteps, dtype=torch.long).cpu()
    T = int(scheduler.config.num_train_timesteps)
    if timesteps.ndim != 1 or timesteps.numel() == 0 or bool((timesteps.diff() >= 0).any()) \
            or int(timesteps.min()) < 0 or int(timesteps.max()) >= T:
        raise ValueError(f"timesteps must be a strictly descending 1-D sequence in [0, {T - 1}], got {timesteps.tolist()[:8]}...")
    gamma = None if analytic_gamma is None else _check_gamma(analytic_gamma, T)[timesteps]
    return dm.chain_coefficients(full_alphas_cumprod(scheduler)[timesteps], gamma)


def full_chain(scheduler, analytic_gamma=None) -> dm.ChainCoefficients:
    """chain() over all T steps, in the order of t (row t is training timestep t): our scheduler's own."""
    own = getattr(scheduler, "full_chain", None)
    if analytic_gamma is None and isinstance(own, dm.ChainCoefficients):
        return own
    T = int(scheduler.config.num_train_timesteps)
    return chain(scheduler, torch.arange(T - 1, -1, -1, dtype=torch.long), analytic_gamma).reversed()


def _check_gamma(gamma, num_train_timesteps: int) -> torch.Tensor:
    from .scheduling_ddpm import check_analytic_gamma

    return torch.from_numpy(check_analytic_gamma(gamma, num_train_timesteps))


def _check_variance_type(variance_type: str) -> None:
    if variance_type not in VARIANCE_CHOICES:
        raise ValueError(f"variance_type must be one of {list(VARIANCE_CHOICES)}, got {variance_type!r}")


# ----------------------------------------------------------------------------------------------
# p_theta(x_{t-1} | x_t) and the terms of the bound
# ----------------------------------------------------------------------------------------------
def split_model_output(model_output: torch.Tensor, channels: int, variance_type: str):
    """(prediction (B, C, ...), variance output (B, C, ...) or None); see scheduling_ddpm.split_model_output."""
    from .scheduling_ddpm import split_model_output as split

    _check_variance_type(variance_type)
    return split(model_output, channels, variance_type)


def clip_x0(x0: torch.Tensor, config) -> torch.Tensor:
    """The scheduler's x_0 post-processing per its config (None: no clipping)."""
    from .scheduling_ddpm import clip_predicted_x0

    return x0 if config is None else clip_predicted_x0(x0, config)


def p_mean_log_variance(model_output, x_t, rows, *, prediction_type: str, variance_type: str, clip_config=None):
    """(mean, log sigma^2, x0_pred) of p_theta(x_{t-1}|x_t) in float64, each (B, C, ...).

    mean = mu~_t(x_t, x0_pred) (Eq. 7 with x_0 from the model output); sigma^2 per variance_type.
    clip_config: a scheduler config whose clip_sample / thresholding is applied to x0_pred (None: no clipping).
    """
    channels = x_t.shape[1]
    pred, var_out = split_model_output(model_output, channels, variance_type)
    x_t = x_t.to(_F64)
    pred = pred.to(_F64)
    x0 = clip_x0(dm.x0_from_model_output(prediction_type, pred, x_t, rows), clip_config)
    mean = dm.posterior_mean(x0, x_t, rows.coef_x0, rows.coef_xt)
    if variance_type == "analytic" and bool(torch.isnan(rows.log_analytic_variance).any()):
        raise ValueError("variance_type='analytic' needs analytic_gamma (see estimate_analytic_gamma)")
    log_var = dm.reverse_log_variance(variance_type, rows, None if var_out is None else var_out.to(_F64))
    return mean, log_var.expand_as(mean), x0


def _mean_over_dims(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


def prior_bpd(x_start: torch.Tensor, abar_last) -> torch.Tensor:
    """L_T = KL(q(x_T|x_0) || N(0, I)) per image, bits/dim (B,)."""
    x_start = x_start.to(_F64)
    abar = torch.as_tensor(abar_last, dtype=_F64, device=x_start.device)
    kl = dm.normal_kl(abar.sqrt() * x_start, torch.log1p(-abar).expand_as(x_start), torch.zeros_like(x_start),
                      torch.zeros_like(x_start))
    return _mean_over_dims(kl) / _LN2


def vb_terms(model_output, x_start, x_t, rows, *, prediction_type: str, variance_type: str, clip_config=None) -> torch.Tensor:
    """One term of the bound per image, bits/dim (B,): KL(q(x_{t-1}|x_t,x_0) || p_theta) (Eq. 5), or on the step to
    x_0 (rows.not_last = 0) the decoder NLL -log p_theta(x_0|x_t) (Eq. 13). Differentiable."""
    mean, log_var, _ = p_mean_log_variance(model_output, x_t, rows, prediction_type=prediction_type,
                                           variance_type=variance_type, clip_config=clip_config)
    x_start64 = x_start.to(_F64)
    true_mean = dm.posterior_mean(x_start64, x_t.to(_F64), rows.coef_x0, rows.coef_xt)
    true_log_var = rows.posterior_log_variance_clipped.expand_as(true_mean)
    is_last = (rows.not_last == 0).to(mean.device).reshape(-1, *([1] * (mean.dim() - 1))).expand_as(mean)
    # Each branch sees harmless constants where the other one is used, so no inf/NaN gradient leaks through where.
    kl = dm.normal_kl(true_mean, true_log_var, torch.where(is_last, true_mean, mean), torch.where(is_last, true_log_var, log_var))
    log_lik = dm.discretized_gaussian_log_likelihood(x_start64, torch.where(is_last, mean, x_start64),
                                                     torch.where(is_last, 0.5 * log_var, torch.zeros_like(log_var)))
    return torch.where(is_last.reshape(is_last.shape[0], -1)[:, 0], -_mean_over_dims(log_lik), _mean_over_dims(kl)) / _LN2


# ----------------------------------------------------------------------------------------------
# Model plumbing
# ----------------------------------------------------------------------------------------------
def _model_device_dtype(unet, device=None):
    params = list(unet.parameters()) if hasattr(unet, "parameters") else []
    dtype = params[0].dtype if params else torch.float32
    if device is None:
        device = params[0].device if params else torch.device("cpu")
    return torch.device(device), dtype


def call_model(unet, x_t: torch.Tensor, timesteps: torch.Tensor, dtype) -> torch.Tensor:
    """unet(x_t, t) -> its ``.sample`` (or a plain tensor / tuple), in float64. A class-conditional UNet is given
    the null class (guidance.py): the bound is that of its unconditional model."""
    from . import guidance

    config = getattr(unet, "config", None)
    k = guidance.num_classes_of(config) if config is not None else None
    if k is None:
        out = unet(x_t.to(dtype), timesteps)
    else:
        null = torch.full((x_t.shape[0],), guidance.null_label(k), dtype=torch.int64, device=x_t.device)
        out = unet(x_t.to(dtype), timesteps, class_labels=null)
    if hasattr(out, "sample"):
        out = out.sample
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out.to(_F64)


def _check_images(images, check_range: bool = True) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() < 2 or images.shape[0] == 0:
        raise TypeError("images must be a non-empty torch.Tensor (N, C, H, W) with values in [-1, 1]")
    if not torch.is_floating_point(images):
        raise TypeError(f"images must be a floating tensor in [-1, 1], got dtype {images.dtype}")
    if check_range and (float(images.min()) < -1.0 - 1e-4 or float(images.max()) > 1.0 + 1e-4):
        raise ValueError(f"images must lie in [-1, 1], got range [{float(images.min()):.3f}, {float(images.max()):.3f}]")
    return images


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """Round [-1, 1] images to the 256-level grid the discretized decoder scores."""
    return torch.round((images.to(_F64).clamp(-1, 1) + 1.0) * 127.5) / 127.5 - 1.0


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step")


def _resolve_variance(scheduler, variance_type, analytic_gamma):
    variance_type = variance_type or scheduler.config.variance_type
    _check_variance_type(variance_type)
    if variance_type == "analytic":
        if analytic_gamma is None:
            analytic_gamma = scheduler.config.get(ANALYTIC_CONFIG_KEY) if hasattr(scheduler.config, "get") else None
        if analytic_gamma is None:
            raise ValueError("variance_type='analytic' needs analytic_gamma (argument or scheduler.config['analytic_gamma']); "
                             "estimate it with estimate_analytic_gamma")
    return variance_type, analytic_gamma


# ----------------------------------------------------------------------------------------------
# The bound
# ----------------------------------------------------------------------------------------------
@dataclass
class BoundResult:
    """The bound in bits/dim: total = prior + terms.sum(); terms[i] is the term of the step from timesteps[i]
    (descending), so terms[-1] is the decoder term L_0. per_image: (N,) totals for error bars."""

    total: float
    prior: float
    decoder: float
    terms: torch.Tensor
    timesteps: torch.Tensor
    per_image: torch.Tensor = field(repr=False)
    variance_type: str = "fixed_small"

    @property
    def stderr(self) -> float:
        """Standard error of ``total`` over images."""
        n = self.per_image.numel()
        return float(self.per_image.std() / math.sqrt(n)) if n > 1 else float("nan")

    def to_dict(self) -> dict:
        return {"bits_per_dim": self.total, "stderr": self.stderr, "prior_bpd": self.prior, "decoder_bpd": self.decoder,
                "variance_type": self.variance_type, "num_steps": int(self.timesteps.numel()),
                "timesteps": self.timesteps.tolist(), "terms_bpd": self.terms.tolist()}


@torch.no_grad()
def bits_per_dim(unet, scheduler, images: torch.Tensor, num_inference_steps: int | None = None, batch_size: int = 64,
                 generator: torch.Generator | None = None, progress: bool = False, variance_type: str | None = None,
                 analytic_gamma=None, device=None, quantize: bool = True) -> BoundResult:
    """The variational bound (Eq. 5) of ``images`` (N, C, H, W) in [-1, 1] under ``unet`` + ``scheduler``, bits/dim.

    num_inference_steps: None for the full T-step chain, else the respaced chain the scheduler visits.
    variance_type: overrides the scheduler's; "analytic" uses analytic_gamma or scheduler.config['analytic_gamma'].
    generator: a CPU generator for the x_t draws (results do not depend on the device). quantize: round the
    images to the 8-bit grid first (the decoder is a distribution over 256 levels).
    """
    images = _check_images(images)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    variance_type, analytic_gamma = _resolve_variance(scheduler, variance_type, analytic_gamma)
    device, dtype = _model_device_dtype(unet, device)
    cfg = scheduler.config
    timesteps = visited_timesteps(scheduler, num_inference_steps)
    tab = chain(scheduler, timesteps, analytic_gamma if variance_type == "analytic" else None)
    n_steps = len(timesteps)
    data = quantize_8bit(images) if quantize else images.to(_F64)
    per_image_terms = torch.zeros(data.shape[0], n_steps, dtype=_F64)
    prior = torch.zeros(data.shape[0], dtype=_F64)
    bar = _progress(n_steps * math.ceil(data.shape[0] / batch_size), progress, "bits/dim")
    for start in range(0, data.shape[0], batch_size):
        x0 = data[start:start + batch_size].to(device)
        b = x0.shape[0]
        prior[start:start + b] = prior_bpd(x0, tab.abar[0]).cpu()
        for i in range(n_steps):
            rows = tab.at(torch.full((b,), i), x0.dim(), device)
            noise = torch.randn(x0.shape, generator=generator, dtype=_F64).to(device)
            x_t = dm.q_sample(x0, noise, rows.sqrt_abar, rows.sqrt_one_minus_abar)
            t = torch.full((b,), int(timesteps[i]), dtype=torch.long, device=device)
            out = call_model(unet, x_t, t, dtype)
            per_image_terms[start:start + b, i] = vb_terms(out, x0, x_t, rows, prediction_type=cfg.prediction_type,
                                                           variance_type=variance_type, clip_config=cfg).cpu()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    terms = per_image_terms.mean(0)
    return BoundResult(total=float(prior.mean() + terms.sum()), prior=float(prior.mean()), decoder=float(terms[-1]),
                       terms=terms, timesteps=timesteps, per_image=prior + per_image_terms.sum(1), variance_type=variance_type)


# ----------------------------------------------------------------------------------------------
# Analytic variance (Bao et al. 2022)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def estimate_analytic_gamma(unet, scheduler, images: torch.Tensor, timesteps=None, batch_size: int = 64,
                            generator: torch.Generator | None = None, progress: bool = False, device=None) -> torch.Tensor:
    """Gamma_t = E_{x_0, eps} ||eps_theta(x_t, t)||^2 / d by Monte Carlo over ``images`` (one draw each), (T,) float64.

    Estimated at ``timesteps`` (default: all T); other t are linearly interpolated in t. The model's output is
    converted to epsilon for any prediction_type (eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar)).
    """
    images = _check_images(images, check_range=False)
    T = int(scheduler.config.num_train_timesteps)
    ts = torch.arange(T, dtype=torch.long) if timesteps is None else torch.as_tensor(timesteps, dtype=torch.long).cpu()
    if ts.ndim != 1 or ts.numel() == 0 or int(ts.min()) < 0 or int(ts.max()) >= T:
        raise ValueError(f"timesteps must be a non-empty 1-D set of integers in [0, {T - 1}]")
    ts = torch.unique(ts)
    device, dtype = _model_device_dtype(unet, device)
    tab = full_chain(scheduler)
    cfg = scheduler.config
    estimates = torch.zeros(ts.numel(), dtype=_F64)
    data = images.to(_F64)
    bar = _progress(ts.numel() * math.ceil(data.shape[0] / batch_size), progress, "analytic variance")
    for j, t_val in enumerate(ts.tolist()):
        total = 0.0
        for start in range(0, data.shape[0], batch_size):
            x0 = data[start:start + batch_size].to(device)
            b = x0.shape[0]
            rows = tab.at(torch.full((b,), t_val), x0.dim(), device)
            noise = torch.randn(x0.shape, generator=generator, dtype=_F64).to(device)
            x_t = dm.q_sample(x0, noise, rows.sqrt_abar, rows.sqrt_one_minus_abar)
            out = call_model(unet, x_t, torch.full((b,), t_val, dtype=torch.long, device=device), dtype)
            pred, _ = split_model_output(out, x0.shape[1], "fixed_small")
            x0_pred = dm.x0_from_model_output(cfg.prediction_type, pred, x_t, rows)
            eps = dm.eps_from_x0(x_t, x0_pred, rows.sqrt_abar, rows.sqrt_one_minus_abar)
            total += float((eps**2).sum())
            if bar is not None:
                bar.update(1)
        estimates[j] = total / data.numel()
    if bar is not None:
        bar.close()
    full = np.interp(np.arange(T), ts.numpy(), estimates.numpy())
    return torch.from_numpy(full)


def with_analytic_variance(scheduler, analytic_gamma):
    """A ScratchDDPMScheduler with ``scheduler``'s config plus ``analytic_gamma`` ((T,) list): saved by
    save_pretrained, used by step / bits_per_dim / sample_images with variance_type='analytic'."""
    from .scheduling_ddpm import ScratchDDPMScheduler

    gamma = _check_gamma(analytic_gamma, int(scheduler.config.num_train_timesteps))
    return ScratchDDPMScheduler.from_config(scheduler.config, **{ANALYTIC_CONFIG_KEY: gamma.tolist()})


# ----------------------------------------------------------------------------------------------
# Ancestral sampling with any variance (Algorithm 2): ScratchDDPMScheduler.step does each step
# ----------------------------------------------------------------------------------------------
def sampling_scheduler(scheduler, variance_type=None, analytic_gamma=None):
    """A ScratchDDPMScheduler with ``scheduler``'s config and the given reverse variance (incl. 'analytic')."""
    from .scheduling_ddpm import ScratchDDPMScheduler

    variance_type, analytic_gamma = _resolve_variance(scheduler, variance_type, analytic_gamma)
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    config["variance_type"] = variance_type
    if analytic_gamma is not None:
        config[ANALYTIC_CONFIG_KEY] = [float(g) for g in _check_gamma(analytic_gamma, int(config["num_train_timesteps"]))]
    return ScratchDDPMScheduler.from_config(config)


@torch.no_grad()
def sample_images(unet, scheduler, num_images: int, num_inference_steps: int | None = None, *, variance_type=None,
                  analytic_gamma=None, batch_size: int = 64, generator: torch.Generator | None = None,
                  progress: bool = False, class_labels=None, guidance_scale: float | None = None,
                  class_names: list[str] | None = None) -> torch.Tensor:
    """Draw num_images (N, C, H, W) float32 samples in [-1, 1] (Algorithm 2) with the reverse variance of
    ``variance_type`` (incl. 'analytic'): ScratchDDPMPipeline in batches of ``batch_size`` on the UNet's device,
    noise from ``generator`` (the initial x_T, then one z per step except the last).
    class_labels / guidance_scale / class_names: as ScratchDDPMPipeline.__call__ (one label or num_images of them)."""
    from . import guidance
    from .pipeline_ddpm import ScratchDDPMPipeline

    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    sched = sampling_scheduler(scheduler, variance_type, analytic_gamma)
    pipe = ScratchDDPMPipeline(unet=unet, scheduler=sched, class_names=class_names)
    pipe.set_progress_bar_config(disable=not progress)
    steps = num_inference_steps or int(sched.config.num_train_timesteps)
    if class_labels is not None:  # checked whole before any sampling; then sliced per batch
        k = guidance.num_classes_of(unet.config)
        if k is None:
            raise ValueError("class_labels needs a class-conditional UNet; this one is unconditional "
                             "(unet.config.num_class_embeds is None)")
        class_labels = guidance.resolve_class_labels(class_labels, num_images, k, pipe.class_names)
    results = []
    for start in range(0, num_images, batch_size):
        b = min(batch_size, num_images - start)
        labels = None if class_labels is None else class_labels[start:start + b]
        images = pipe(batch_size=b, generator=generator, num_inference_steps=steps, output_type="pt",
                      class_labels=labels, guidance_scale=guidance_scale).images
        results.append(images.float().cpu() * 2.0 - 1.0)
    return torch.cat(results)

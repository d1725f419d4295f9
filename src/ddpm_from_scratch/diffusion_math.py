"""The formulas of DDPM (Ho et al. 2020) as small pure functions.

Every table here is computed in float64 once; callers cast to the sample's dtype and device.
Equation numbers refer to the DDPM paper (arXiv:2006.11239) unless another paper is named.

Shapes: ``T`` is the number of training timesteps; image tensors are ``(B, C, H, W)`` but every
function here is elementwise and broadcasts, so coefficients may be Python floats, 0-d tensors or
tensors shaped ``(B, 1, 1, 1)``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")  # the model outputs (B, 2C, ...): prediction, variance
# Ours beyond diffusers: Analytic-DPM's optimal variance (needs the per-timestep Gamma_t, see likelihood.py).
SCHEDULER_VARIANCE_TYPES = VARIANCE_TYPES + ("analytic",)

_F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# Beta schedules -> (T,) float64
# ----------------------------------------------------------------------------------------------
def betas_from_alpha_bar(alpha_bar, num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """beta_t = min(1 - abar(t+1/T) / abar(t/T), max_beta) for a continuous abar on [0, 1] -> (T,)."""
    grid = torch.arange(num_timesteps + 1, dtype=_F64) / num_timesteps
    abar = torch.tensor([alpha_bar(float(s)) for s in grid], dtype=_F64)
    return (1.0 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def _cosine_alpha_bar(s: float) -> float:
    """abar(s) = cos^2((s + 0.008) / 1.008 * pi / 2): Nichol & Dhariwal 2021, Eq. 17."""
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def _laplace_alpha_bar(s: float) -> float:
    """abar(s) for a Laplace-shaped log-SNR, lambda(s) = -sign(0.5-s) log(1 - 2|0.5-s| + 1e-6) / 2."""
    log_snr = -0.5 * math.copysign(1.0, 0.5 - s) * math.log(1.0 - 2.0 * abs(0.5 - s) + 1e-6)
    snr = math.exp(log_snr)
    return math.sqrt(snr / (1.0 + snr))


def beta_schedule(name: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The named schedule of betas, float64, shape (T,)."""
    if name == "linear":  # DDPM Sec. 4: betas linear from 1e-4 to 0.02
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=_F64)
    if name == "scaled_linear":  # linear in sqrt(beta) (latent diffusion)
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=_F64) ** 2
    if name == "squaredcos_cap_v2":
        return betas_from_alpha_bar(_cosine_alpha_bar, num_timesteps)
    if name == "laplace":
        return betas_from_alpha_bar(_laplace_alpha_bar, num_timesteps)
    if name == "sigmoid":  # GeoDiff: sigmoid(linspace(-6, 6)) rescaled to [beta_start, beta_end]
        return torch.sigmoid(torch.linspace(-6.0, 6.0, num_timesteps, dtype=_F64)) * (beta_end - beta_start) + beta_start
    raise ValueError(f"beta_schedule must be one of {list(BETA_SCHEDULES)}, got {name!r}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(abar) so that sqrt(abar_T) = 0 and sqrt(abar_1) is unchanged (Lin et al. 2024, Alg. 1)."""
    sqrt_abar = torch.cumprod(1.0 - betas.to(_F64), 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s), the forward process' signal level (Eq. 4), float64 (T,)."""
    return torch.cumprod(1.0 - betas.to(_F64), 0)


# ----------------------------------------------------------------------------------------------
# Forward process q(x_t | x_0) (Eq. 4) and the parametrisations of the model output
# ----------------------------------------------------------------------------------------------
def axpy(a, x, y):
    """y + a x for tensors x, y; a single fused kernel when the coefficient a is a Python number."""
    if isinstance(a, (float, int)) and isinstance(y, torch.Tensor) and isinstance(x, torch.Tensor):
        return torch.add(y, x, alpha=a)
    return y + a * x


def q_sample(x_start, noise, sqrt_abar, sqrt_one_minus_abar):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps: a draw from q(x_t|x_0) (Eq. 4)."""
    return axpy(sqrt_one_minus_abar, noise, sqrt_abar * x_start)


def velocity(x_start, noise, sqrt_abar, sqrt_one_minus_abar):
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, Sec. 4)."""
    return sqrt_abar * noise - sqrt_one_minus_abar * x_start


def x0_from_eps(x_t, eps, sqrt_recip_abar, sqrt_one_minus_abar):
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (Eq. 15); subtracting first keeps float32 error lowest."""
    return axpy(-sqrt_one_minus_abar, eps, x_t) * sqrt_recip_abar


def x0_from_v(x_t, v, sqrt_abar, sqrt_one_minus_abar):
    """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
    return sqrt_abar * x_t - sqrt_one_minus_abar * v


def eps_from_x0(x_t, x_start, sqrt_abar, sqrt_one_minus_abar):
    """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t), the inverse of Eq. 15."""
    return (x_t - sqrt_abar * x_start) / sqrt_one_minus_abar


def x0_from_model_output(prediction_type: str, model_output, x_t, c):
    """x_0 recovered from an epsilon (Eq. 15) / sample / v prediction, with the step's coefficients ``c`` (a
    ChainCoefficients row: floats, or tensors that broadcast over x_t)."""
    if prediction_type == "epsilon":
        return x0_from_eps(x_t, model_output, c.sqrt_recip_abar, c.sqrt_one_minus_abar)
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return x0_from_v(x_t, model_output, c.sqrt_abar, c.sqrt_one_minus_abar)
    raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")


# ----------------------------------------------------------------------------------------------
# Posterior q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I)  (Eqs. 6-7), for any pair of visited steps
# ----------------------------------------------------------------------------------------------
def step_beta(abar_t, abar_prev):
    """Effective beta of the step prev -> t: 1 - abar_t / abar_prev (= beta_t on the full chain)."""
    return 1.0 - abar_t / abar_prev


def posterior_mean_coefficients(abar_t, abar_prev):
    """(coef_x0, coef_xt) of mu~_t = coef_x0 x_0 + coef_xt x_t (Eq. 7).

    coef_x0 = sqrt(abar_{t-1}) beta_t / (1 - abar_t), coef_xt = sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t),
    with alpha_t = abar_t / abar_{t-1} and beta_t = 1 - alpha_t.
    """
    beta = step_beta(abar_t, abar_prev)
    alpha = abar_t / abar_prev
    return abar_prev**0.5 * beta / (1.0 - abar_t), alpha**0.5 * (1.0 - abar_prev) / (1.0 - abar_t)


def posterior_variance(abar_t, abar_prev):
    """beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (Eq. 7); 0 on the last step (abar_prev = 1)."""
    return (1.0 - abar_prev) / (1.0 - abar_t) * step_beta(abar_t, abar_prev)


def posterior_mean(x_start, x_t, coef_x0, coef_xt):
    """mu~_t(x_t, x_0) = coef_x0 x_0 + coef_xt x_t (Eq. 7)."""
    return axpy(coef_xt, x_t, coef_x0 * x_start)


class ChainCoefficients(NamedTuple):
    """The per-timestep coefficients of a reverse chain, one field per quantity.

    Every consumer (the scheduler's step, the bound in likelihood.py, the training losses) reads these fields by
    name. A field holds (N,) float64 tensors for a whole chain (noisiest step first, or indexed by t for the full
    chain), Python floats for one step, or tensors shaped (B, 1, ..., 1) for one step per sample.
    """

    abar: Any  # abar_t = prod_{s<=t} (1 - beta_s)                               Eq. 4
    abar_prev: Any  # abar of the step it goes to; 1 on the step to x_0
    beta: Any  # effective beta_t = 1 - abar_t / abar_prev                     Eq. 4 on a respaced chain
    sqrt_abar: Any  # sqrt(abar_t)                                           Eq. 4, v-prediction
    sqrt_one_minus_abar: Any  # sqrt(1 - abar_t)                             Eq. 4, Eq. 15
    sqrt_recip_abar: Any  # 1 / sqrt(abar_t)                                 Eq. 15
    coef_x0: Any  # sqrt(abar_prev) beta_t / (1 - abar_t)                     Eq. 7
    coef_xt: Any  # sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t)              Eq. 7
    posterior_variance: Any  # beta~_t = (1 - abar_prev) / (1 - abar_t) beta_t, 0 on the step to x_0   Eq. 7
    posterior_log_variance_clipped: Any  # log beta~_t, the previous step's value on the step to x_0  (Improved DDPM)
    log_beta: Any  # log beta_t                                              Sec. 3.2, sigma^2 = beta
    log_analytic_variance: Any  # log sigma*^2 of Analytic-DPM (Bao et al. 2022, Thm. 1); NaN without Gamma
    not_last: Any  # 1.0, but 0.0 on the step to x_0, which adds no noise    Algorithm 2, line 3

    def stack(self) -> torch.Tensor:
        """The chain as one (N, K) float64 table, columns in field order."""
        return torch.stack([torch.as_tensor(f, dtype=_F64) for f in self], dim=1)

    @classmethod
    def from_table(cls, table: torch.Tensor) -> "ChainCoefficients":
        """The inverse of stack for a (..., K) table: one field per last-dim column."""
        return cls(*table.unbind(-1))

    def at(self, index, ndim: int = 1, device=None) -> "ChainCoefficients":
        """The rows at integer positions index (B,), each field shaped (B, 1, ..., 1) with ndim dims, on device."""
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        shape = (index.shape[0],) + (1,) * (ndim - 1)
        return ChainCoefficients(*(torch.as_tensor(f)[index].view(shape).to(device) for f in self))

    def reversed(self) -> "ChainCoefficients":
        """The same chain in the other order (flip every field)."""
        return ChainCoefficients(*(f.flip(0) for f in self))


def chain_coefficients(abar_visited: torch.Tensor, gamma=None) -> ChainCoefficients:
    """Float64 (N,) coefficients of a reverse chain over signal levels abar_visited[0] < abar_visited[1] < ... (descending t).

    abar_visited: (N,) signal levels of the visited timesteps, noisiest first. The step from entry i goes to entry
    i+1; the last entry steps to x_0 (abar_prev = 1). gamma: (N,) Gamma_t = E||eps_theta||^2 / d at the visited
    timesteps for Analytic-DPM's variance (None: that field is NaN).
    """
    abar = torch.as_tensor(abar_visited, dtype=_F64)
    abar_prev = torch.cat([abar[1:], abar.new_ones(1)])
    beta = step_beta(abar, abar_prev)
    coef_x0, coef_xt = posterior_mean_coefficients(abar, abar_prev)
    var = posterior_variance(abar, abar_prev)
    # log beta~ is -inf on the last step; "clipped" replaces it by the previous step's value (Improved DDPM).
    var_clipped = torch.cat([var[:-1], var[-2:-1] if var.numel() > 1 else beta[-1:]])
    not_last = torch.ones_like(abar)
    not_last[-1] = 0.0
    if gamma is None:
        log_analytic = torch.full_like(abar, float("nan"))
    else:
        sigma2 = analytic_variance(torch.as_tensor(gamma, dtype=_F64), abar, var, coef_x0)
        log_analytic = sigma2.clamp(min=1e-20).log()
    return ChainCoefficients(
        abar=abar, abar_prev=abar_prev, beta=beta, sqrt_abar=abar.sqrt(), sqrt_one_minus_abar=(1.0 - abar).sqrt(),
        sqrt_recip_abar=abar.rsqrt(), coef_x0=coef_x0, coef_xt=coef_xt, posterior_variance=var,
        posterior_log_variance_clipped=var_clipped.log(), log_beta=beta.log(), log_analytic_variance=log_analytic,
        not_last=not_last,
    )


def reverse_log_variance(variance_type: str, c: ChainCoefficients, model_var=None):
    """log sigma_t^2 of p_theta(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I) for each variance type: the one home of
    this choice, used by the sampler (ScratchDDPMScheduler.step) and the bound (likelihood.p_mean_log_variance).

    fixed_small: sigma^2 = beta~_t (Sec. 3.2; clipped on the step to x_0, Improved DDPM); fixed_large: beta_t
    (Sec. 3.2); analytic: Analytic-DPM's sigma*^2; learned: the model's variance channels ARE log sigma^2 (Improved
    DDPM's convention); learned_range: v in [-1, 1] interpolates log beta_t and log beta~_t (Improved DDPM Eq. 15).
    "*_log" names are diffusers' spellings of the same variances. Returns a float or a tensor like its inputs.
    """
    if variance_type in ("fixed_small", "fixed_small_log"):
        return c.posterior_log_variance_clipped
    if variance_type in ("fixed_large", "fixed_large_log"):
        return c.log_beta
    if variance_type == "analytic":
        return c.log_analytic_variance
    if variance_type == "learned":
        return model_var
    if variance_type == "learned_range":
        return learned_range_log_variance(model_var, c.posterior_log_variance_clipped, c.log_beta)
    raise ValueError(f"variance_type must be one of {list(SCHEDULER_VARIANCE_TYPES)}, got {variance_type!r}")


def std_from_log_variance(log_var):
    """sigma = exp(log sigma^2 / 2) for a Python float or a tensor."""
    if isinstance(log_var, float):
        return math.exp(0.5 * log_var)
    return torch.exp(0.5 * log_var)


def analytic_variance(gamma, abar, posterior_variance, coef_x0, half_range: float = 1.0):
    """Optimal reverse variance given Gamma_t = E||eps_theta(x_t, t)||^2 / d (Bao et al. 2022, Thm. 1 and Thm. 2).

    sigma*^2 = beta~ + coef_x0^2 (1/abar - 1)(1 - Gamma), clipped to [beta~, beta~ + coef_x0^2 half_range^2]
    (the bounds for data in an interval of half-width half_range). All arguments broadcast, float64.
    """
    var = posterior_variance + coef_x0**2 * (1.0 / abar - 1.0) * (1.0 - gamma)
    lower = posterior_variance
    upper = posterior_variance + coef_x0**2 * half_range**2
    return torch.minimum(torch.maximum(var, lower), upper)


def learned_range_log_variance(v, min_log, max_log):
    """log sigma^2 = frac log beta_t + (1 - frac) log beta~_t with frac = (v + 1) / 2 (Nichol & Dhariwal 2021, Eq. 15)."""
    frac = (v + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


# ----------------------------------------------------------------------------------------------
# Gaussian KL and the discretized decoder (the terms of the bound, Eq. 5)
# ----------------------------------------------------------------------------------------------
def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(x, mean, log_scale, num_bins: int = 256):
    """log P(x) for x on a grid of num_bins values in [-1, 1] under N(mean, e^{2 log_scale}) (Eq. 13).

    Each bin is [x - 1/(num_bins-1), x + 1/(num_bins-1)]; the edge bins extend to -inf / +inf.
    Computed in float64; returns the dtype of ``mean``.
    """
    out_dtype = mean.dtype
    x, mean, log_scale = (torch.as_tensor(a, dtype=_F64) for a in (x, mean, log_scale))
    half_bin = 1.0 / (num_bins - 1)
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + half_bin)
    lower = inv_std * (x - mean - half_bin)
    # log(Phi(u) - Phi(l)) computed on the side where it does not cancel.
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    mid = torch.where(
        lower > 0,
        log_sf_lower + torch.log1p(-torch.exp(torch.special.log_ndtr(-upper) - log_sf_lower)),
        log_cdf_upper + torch.log1p(-torch.exp(torch.special.log_ndtr(lower) - log_cdf_upper)),
    )
    edge = 1.0 - 1e-9
    log_probs = torch.where(x < -edge, log_cdf_upper, torch.where(x > edge, log_sf_lower, mid))
    return log_probs.to(out_dtype)


def dynamic_threshold(x_start, ratio: float, max_value: float):
    """Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3): s = clamp(quantile(|x_0|, ratio), 1, max_value)
    per sample, then x_0 <- clamp(x_0, -s, s) / s. x_start: (B, ...)."""
    batch = x_start.shape[0]
    flat = x_start.reshape(batch, -1)
    work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    s = torch.quantile(work.abs(), ratio, dim=1, keepdim=True).clamp(min=1.0, max=max_value)
    return (torch.maximum(torch.minimum(work, s), -s) / s).to(x_start.dtype).reshape(x_start.shape)

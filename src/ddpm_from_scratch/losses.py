"""Training objectives (DDPM Eq. 14 'simple' loss and its variants) and timestep samplers."""

from __future__ import annotations

import torch

from . import diffusion_math as dm
from . import likelihood


def uniform_timesteps(batch_size: int, num_train_timesteps: int, device=None, generator=None) -> torch.Tensor:
    """t ~ Uniform{0, ..., T-1}, int64 (B,) (Algorithm 1, line 3)."""
    return torch.randint(0, num_train_timesteps, (batch_size,), device=device, generator=generator, dtype=torch.long)


def simple_target(prediction_type: str, scheduler, x_start, noise, timesteps):
    """What the network regresses: eps (Eq. 14), x_0, or v = sqrt(abar) eps - sqrt(1 - abar) x_0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x_start
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x_start, noise, timesteps)
    raise ValueError(f"prediction_type must be one of {list(dm.PREDICTION_TYPES)}, got {prediction_type!r}")


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, Eq. 9) expressed for the chosen regression target."""
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":  # min(snr, gamma) / snr, whose limit at snr = 0 (zero terminal SNR) is 1
        return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    if prediction_type == "sample":
        return clipped
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"prediction_type must be one of {list(dm.PREDICTION_TYPES)}, got {prediction_type!r}")


LOSS_TYPES = ("simple", "vlb", "hybrid")
HYBRID_VLB_WEIGHT = 0.001  # lambda of Improved DDPM Eq. 16: L_hybrid = L_simple + lambda L_vlb


class ImportanceTimestepSampler:
    """Importance sampling of t for the vlb term (Nichol & Dhariwal 2021, Sec. 3.3, Eq. 18).

    p_t is proportional to sqrt(E[L_t^2]) over the last ``history`` losses seen at each t, mixed with
    ``uniform_prob`` of the uniform distribution; t is uniform until every t has ``history`` losses.
    ``sample`` returns importance weights 1 / (T p_t), so E_{t~p}[w_t L_t] = E_{t~U}[L_t] (unbiased).
    Hold one per training run; ``state_dict`` / ``load_state_dict`` go in the checkpoint.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        for name, value, low in (("num_timesteps", num_timesteps, 1), ("history", history, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must be in [0, 1], got {uniform_prob!r}")
        self.num_timesteps = num_timesteps
        self.history = history
        self.uniform_prob = float(uniform_prob)
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64)  # ring buffer per t
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)  # losses seen per t

    @property
    def warmed_up(self) -> bool:
        """True once every timestep has ``history`` losses."""
        return bool((self.counts >= self.history).all())

    def probabilities(self) -> torch.Tensor:
        """p_t, float64 (T,): uniform before warm-up, else (1 - u) sqrt(E[L_t^2]) / sum + u / T."""
        T = self.num_timesteps
        if not self.warmed_up:
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        rms = (self.losses**2).mean(dim=1).sqrt()
        if not bool(rms.sum() > 0):
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        return (1.0 - self.uniform_prob) * rms / rms.sum() + self.uniform_prob / T

    def sample(self, batch_size: int, device=None, generator: torch.Generator | None = None):
        """(timesteps int64 (B,), weights float32 (B,) = 1 / (T p_t)) on ``device``."""
        probs = self.probabilities()
        gen_device = generator.device if generator is not None else torch.device("cpu")
        t = torch.multinomial(probs.to(gen_device), batch_size, replacement=True, generator=generator).cpu()
        weights = 1.0 / (self.num_timesteps * probs[t])
        return t.to(device), weights.float().to(device)

    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-sample losses (B,) observed at timesteps (B,) (oldest dropped beyond ``history``)."""
        timesteps = torch.as_tensor(timesteps).detach().long().cpu().reshape(-1)
        losses = torch.as_tensor(losses).detach().to(torch.float64).cpu().reshape(-1)
        if timesteps.shape != losses.shape:
            raise ValueError(f"timesteps and losses must have the same length, got {timesteps.shape} and {losses.shape}")
        for t, loss in zip(timesteps.tolist(), losses.tolist()):
            self.losses[t, self.counts[t] % self.history] = loss
            self.counts[t] += 1

    def state_dict(self) -> dict:
        return {"losses": self.losses.clone(), "counts": self.counts.clone(), "history": self.history,
                "uniform_prob": self.uniform_prob}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["losses"].shape) != (self.num_timesteps, self.history):
            raise ValueError(f"state is for {tuple(state['losses'].shape)} losses, this sampler holds "
                             f"{(self.num_timesteps, self.history)}")
        self.losses = state["losses"].to(torch.float64).clone()
        self.counts = state["counts"].long().clone()
        self.uniform_prob = float(state["uniform_prob"])


def _full_chain_rows(scheduler, timesteps: torch.Tensor, ndim: int, device) -> dm.ChainCoefficients:
    """The full chain's coefficients at training timesteps (B,), each field shaped (B, 1, ...) float64."""
    return likelihood.full_chain(scheduler).at(timesteps.cpu(), ndim, device)


def training_loss(model, scheduler, x_start: torch.Tensor, *, loss_type: str = "simple", snr_gamma: float | None = None,
                  timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None, generator=None,
                  timestep_sampler: ImportanceTimestepSampler | None = None,
                  timestep_weights: torch.Tensor | None = None,
                  vlb_weight: float = HYBRID_VLB_WEIGHT, class_labels: torch.Tensor | None = None) -> dict:
    """One DDPM training objective on a batch x_start (B, C, H, W) in [-1, 1] (Algorithm 1).

    Draws t ~ U{0..T-1} (or from ``timestep_sampler``) and eps ~ N(0, I) unless given, forms x_t by the forward
    closed form (Eq. 4), runs ``model(x_t, t).sample`` and returns a dict with ``loss`` (scalar mean, what to
    backpropagate), ``per_sample`` (B,) and ``timesteps`` (B,); with vlb/hybrid also ``vlb`` (B,), the detached
    bound term in bits/dim (likelihood.vb_terms; as in Improved DDPM the training term uses the unclipped x_0
    prediction, while bits_per_dim applies the scheduler's clip_sample / thresholding like sampling does).

    loss_type: "simple" = MSE on the prediction target (Eq. 14; x_0 / v per prediction_type), optionally min-SNR
    weighted (``snr_gamma``); "vlb" = the bound's term L_t at t (L_{t-1} KL, decoder NLL at t = 0), bits/dim;
    "hybrid" = simple + vlb_weight * T * L_t with the mean's gradient stopped in L_t, so the vlb trains only the
    variance (Improved DDPM Eq. 16, lambda = 0.001; T * L_t estimates L_vlb = sum_t L_t). vlb/hybrid need a
    (B, 2C, ...) output under variance_type learned / learned_range (vlb also works with a fixed variance).
    timestep_sampler: draws t (when ``timesteps`` is None), multiplies per_sample by its importance weights and is
    updated with the vlb terms (the simple MSE for loss_type "simple").
    timestep_weights: (B,) importance weights 1 / (T p_t) of timesteps drawn elsewhere (e.g. by a sampler shared
    across processes, see trainer.steps.step_noise); multiplies per_sample.
    class_labels: (B,) int64 labels of a class-conditional model (guidance.py; the null class included), passed
    as ``model(x_t, t, class_labels=...)``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")
    cfg = scheduler.config
    if loss_type == "hybrid" and cfg.variance_type not in likelihood.LEARNED_VARIANCES:
        raise ValueError(f"loss_type='hybrid' trains a learned variance: the scheduler's variance_type must be one of "
                         f"{list(likelihood.LEARNED_VARIANCES)}, got {cfg.variance_type!r}")
    if loss_type == "vlb" and snr_gamma is not None:
        raise ValueError("snr_gamma weights the simple loss; it must be None with loss_type='vlb' (a weighted bound is no bound)")
    batch = x_start.shape[0]
    weights = timestep_weights
    if timesteps is None:
        if timestep_sampler is not None:
            timesteps, weights = timestep_sampler.sample(batch, device=x_start.device, generator=generator)
        else:
            timesteps = uniform_timesteps(batch, cfg.num_train_timesteps, device=x_start.device, generator=generator)
    if noise is None:
        noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
    x_t = scheduler.add_noise(x_start, noise, timesteps)  # Eq. 4, from the scheduler's cached device table
    if class_labels is None:
        model_output = model(x_t, timesteps).sample
    else:
        model_output = model(x_t, timesteps, class_labels=class_labels).sample
    channels = x_start.shape[1]
    prediction = model_output[:, :channels] if model_output.shape[1] == 2 * channels else model_output
    target = simple_target(cfg.prediction_type, scheduler, x_start, noise, timesteps)
    mse = ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, x_start.dim())))
    if snr_gamma is not None:
        abar = scheduler.alphas_cumprod.to(device=x_start.device, dtype=torch.float32)[timesteps]
        mse = mse * min_snr_weight(abar / (1.0 - abar), snr_gamma, cfg.prediction_type)
    vlb = None
    if loss_type in ("vlb", "hybrid"):
        vb_output = model_output
        if loss_type == "hybrid":  # stop the mean's gradient: the bound trains only the variance channels
            vb_output = torch.cat([prediction.detach(), model_output[:, channels:]], dim=1)
        rows = _full_chain_rows(scheduler, timesteps, x_start.dim(), x_start.device)
        # x_t is recomputed in float64 from the same noise so that the bound's posterior matches exactly.
        x_t64 = dm.q_sample(x_start.double(), noise.double(), rows.sqrt_abar, rows.sqrt_one_minus_abar)
        vlb = likelihood.vb_terms(vb_output, x_start, x_t64, rows, prediction_type=cfg.prediction_type,
                                  variance_type=cfg.variance_type).float()
    if loss_type == "simple":
        per_sample = mse
    elif loss_type == "vlb":
        per_sample = vlb
    else:
        per_sample = mse + vlb_weight * cfg.num_train_timesteps * vlb
    if weights is not None:
        per_sample = per_sample * weights
    if timestep_sampler is not None:
        timestep_sampler.update(timesteps, (vlb if vlb is not None else mse).detach())
    out = {"loss": per_sample.mean(), "per_sample": per_sample, "timesteps": timesteps}
    if vlb is not None:
        out["vlb"] = vlb.detach()
    return out

"""ScratchDDPMScheduler: DDPM's reverse process on the posterior q(x_{t-1}|x_t, x_0), for diffusers.

A drop-in for ``diffusers.DDPMScheduler`` (same config keys, defaults and results), written from the
formulas in :mod:`ddpm_from_scratch.diffusion_math`. All coefficients are float64 tables computed
once per ``set_timesteps`` and cast to the sample's dtype/device where used.

Where it differs from diffusers 0.42.1 it is on purpose (see tests/test_scheduler_diffusers_bugs.py):
``fixed_large_log`` gives sqrt(beta_t) instead of NaN; "trailing" spacing always has exactly n timesteps;
"leading" + ``steps_offset`` past the last training timestep, 0 steps, and zero-terminal-SNR with
epsilon prediction at abar=0 are clear errors; for ``variance_type="learned"`` the model's extra
channels are a log variance (Improved DDPM's convention), not a raw variance.

Beyond diffusers: ``variance_type="analytic"`` with ``analytic_gamma`` (T values of E||eps_theta||^2/d)
samples with Analytic-DPM's optimal reverse variance (Bao et al. 2022) at any number of steps.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from . import diffusion_math as dm

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")

# Columns of the per-step coefficient table, in order.
_COLUMNS = (
    "sqrt_recip_abar",  # 1 / sqrt(abar_t)                      Eq. 15
    "sqrt_abar",  # sqrt(abar_t)                                 v-prediction
    "sqrt_one_minus_abar",  # sqrt(1 - abar_t)                   Eq. 15, v-prediction
    "coef_x0",  # sqrt(abar_{t-1}) beta_t / (1 - abar_t)         Eq. 7
    "coef_xt",  # sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)  Eq. 7
    "std_small",  # sqrt(beta~_t), 0 on the last step            Sec. 3.2, sigma^2 = beta~
    "std_large",  # sqrt(beta_t), 0 on the last step             Sec. 3.2, sigma^2 = beta
    "log_var_min",  # log beta~_t (clipped at the last step)     Improved DDPM Eq. 15
    "log_var_max",  # log beta_t
    "std_analytic",  # Analytic-DPM optimal sigma (Bao et al. 2022, Thm. 1), 0 on the last step / without Gamma
    "not_last",  # 1.0 except on the step to x_0, where no noise is added (Algorithm 2, line 3)
)
_C = {name: i for i, name in enumerate(_COLUMNS)}


@dataclass
class ScratchDDPMSchedulerOutput(BaseOutput):
    """Output of :meth:`ScratchDDPMScheduler.step`.

    prev_sample: x_{t-1}, shape of the sample (B, C, H, W); feed it to the next step.
    pred_original_sample: the x_0 predicted from the model output (after clipping/thresholding).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _short(values) -> str:
    values = list(values)
    return str(values) if len(values) <= 8 else f"[{', '.join(map(str, values[:4]))}, ..., {', '.join(map(str, values[-2:]))}] ({len(values)} values)"


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def spaced_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int = 0) -> np.ndarray:
    """The n visited timesteps, descending, int64 (Lin et al. 2024, Table 2 spacings)."""
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(n) * (T // n))[::-1] + steps_offset
        if ts[0] >= T:
            raise ValueError(
                f"timestep_spacing='leading' with steps_offset={steps_offset} and num_inference_steps={n} reaches "
                f"t={int(ts[0])}, past the last training timestep {T - 1}: lower steps_offset or num_inference_steps, "
                f"or use timestep_spacing='trailing'"
            )
    elif spacing == "trailing":
        ts = np.round(T - np.arange(n) * (T / n)) - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {list(TIMESTEP_SPACINGS)}, got {spacing!r}")
    return np.ascontiguousarray(ts, dtype=np.int64)


def check_analytic_gamma(gamma, num_train_timesteps: int) -> np.ndarray:
    """Gamma_t = E||eps_theta(x_t, t)||^2 / d for t = 0..T-1 as float64 (T,), or a ValueError."""
    g = np.asarray(gamma, dtype=np.float64)
    if g.shape != (num_train_timesteps,) or not np.all(np.isfinite(g)):
        raise ValueError(
            f"analytic_gamma must be a finite 1-D sequence of num_train_timesteps={num_train_timesteps} values "
            f"(E||eps_theta(x_t, t)||^2 / d per t; see likelihood.estimate_analytic_gamma), got shape {g.shape}"
        )
    return g


def split_model_output(model_output: torch.Tensor, channels: int, variance_type: str):
    """(prediction (B, C, ...), variance output (B, C, ...) or None) of a (B, C or 2C, ...) model output.

    A 2C output under a fixed variance type is a learned-variance model sampled with a fixed variance: its
    variance half is ignored. A learned variance type needs the 2C output."""
    learned = variance_type in dm.LEARNED_VARIANCE_TYPES
    if model_output.shape[1] == 2 * channels:
        return model_output[:, :channels], (model_output[:, channels:] if learned else None)
    if learned or model_output.shape[1] != channels:
        expected = f"2C = {2 * channels} channels (prediction, variance)" if learned else f"C = {channels} (or 2C = {2 * channels})"
        raise ValueError(f"model_output has {model_output.shape[1]} channels; variance_type={variance_type!r} with "
                         f"{channels}-channel samples needs {expected}")
    return model_output, None


def clip_predicted_x0(x0: torch.Tensor, config) -> torch.Tensor:
    """Dynamic thresholding or static clipping of a predicted x_0, as the scheduler ``config`` asks."""
    if config.thresholding:
        return dm.dynamic_threshold(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    if config.clip_sample:
        return x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    return x0


def _to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """Host tensor -> device without blocking the host: through pinned memory, non_blocking, for CUDA."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _randn_like(sample: torch.Tensor, generator) -> torch.Tensor:
    """N(0, I) noise shaped like sample, drawn exactly as diffusers' randn_tensor draws it (same generator, same numbers)."""
    if generator is None or (isinstance(generator, torch.Generator) and generator.device == sample.device):
        return torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
    return randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)


class ScratchDDPMScheduler(SchedulerMixin, ConfigMixin):
    """DDPM ancestral sampler (Ho et al. 2020, Algorithm 2) on precomputed float64 posterior tables.

    Config keys, defaults and meaning are those of ``diffusers.DDPMScheduler``.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        analytic_gamma=None,
    ):
        self._validate_config()
        if trained_betas is not None:
            betas = torch.as_tensor(np.asarray(trained_betas, dtype=np.float64))
        else:
            betas = dm.beta_schedule(beta_schedule, num_train_timesteps, beta_start, beta_end)
        if rescale_betas_zero_snr:
            betas = dm.rescale_zero_terminal_snr(betas)
        abar = dm.alphas_cumprod(betas)
        # Float64 tables of the full chain, indexed by t (ascending).
        self.tables = {k: v.flip(0) for k, v in dm.chain_tables(abar.flip(0)).items()}
        # Public float32 views, as diffusers exposes them.
        self.betas = betas.float()
        self.alphas = (1.0 - betas).float()
        self.alphas_cumprod = abar.float()
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(num_train_timesteps)[::-1].copy())
        self._begin_index = None
        self._steps = None  # host table: list of per-step coefficient tuples, set by set_timesteps
        self._index_of = {}  # timestep value -> step index
        self._device_cache = {}  # (device, dtype) -> (table (n+1, K), index_of_t (T,), prev_t (T,))
        self._noise_cache = {}  # (device, dtype) -> (T, 2) [sqrt(abar_t), sqrt(1 - abar_t)]

    # ------------------------------------------------------------------------------------------
    # Validation
    # ------------------------------------------------------------------------------------------
    def _validate_config(self) -> None:
        c = self.config
        if not _is_int(c.num_train_timesteps) or c.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {c.num_train_timesteps!r}")
        _choice("variance_type", c.variance_type, dm.SCHEDULER_VARIANCE_TYPES)
        if c.get("analytic_gamma") is not None:
            check_analytic_gamma(c.analytic_gamma, c.num_train_timesteps)
        elif c.variance_type == "analytic":
            raise ValueError(
                "variance_type='analytic' needs analytic_gamma (estimate it with "
                "ddpm_from_scratch.likelihood.estimate_analytic_gamma)"
            )
        _choice("prediction_type", c.prediction_type, dm.PREDICTION_TYPES)
        _choice("timestep_spacing", c.timestep_spacing, TIMESTEP_SPACINGS)
        if c.trained_betas is not None:
            betas = np.asarray(c.trained_betas, dtype=np.float64)
            if betas.ndim != 1 or betas.shape[0] != c.num_train_timesteps:
                raise ValueError(
                    f"trained_betas must be a 1-D sequence of num_train_timesteps={c.num_train_timesteps} values, "
                    f"got shape {betas.shape}"
                )
            if not np.all((betas > 0) & (betas < 1)):
                raise ValueError("trained_betas must all lie in the open interval (0, 1)")
        else:
            _choice("beta_schedule", c.beta_schedule, dm.BETA_SCHEDULES)
            for name in ("beta_start", "beta_end"):
                value = getattr(c, name)
                if not isinstance(value, numbers.Real) or not 0.0 < value < 1.0:
                    raise ValueError(f"{name} must be a number in the open interval (0, 1), got {value!r}")
        if not _is_int(c.steps_offset) or c.steps_offset < 0:
            raise ValueError(f"steps_offset must be a non-negative integer, got {c.steps_offset!r}")
        if not 0.0 < c.dynamic_thresholding_ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {c.dynamic_thresholding_ratio!r}")
        for name in ("clip_sample_range", "sample_max_value"):
            if not getattr(c, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(c, name)!r}")

    # ------------------------------------------------------------------------------------------
    # Timesteps
    # ------------------------------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """DDPM feeds x_t to the model unscaled."""
        return sample

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Record where a pipeline starts in ``timesteps`` (img2img); DDPM's step does not depend on it."""
        self._begin_index = begin_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None) -> None:
        """Choose the visited timesteps and precompute the reverse chain on them (respacing: beta_t = 1 - abar_t/abar_prev)."""
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("pass either num_inference_steps or timesteps to set_timesteps, not both")
        if timesteps is not None:
            ts = np.asarray(timesteps.cpu() if isinstance(timesteps, torch.Tensor) else timesteps)
            if ts.ndim != 1 or ts.size == 0 or not np.issubdtype(ts.dtype, np.integer):
                raise ValueError(f"timesteps must be a non-empty 1-D sequence of integers, got {timesteps!r}")
            ts = ts.astype(np.int64)
            if np.any(np.diff(ts) >= 0):
                raise ValueError(f"timesteps must be strictly descending, got {_short(ts.tolist())}")
            if ts[0] >= T or ts[-1] < 0:
                raise ValueError(f"timesteps must lie in [0, num_train_timesteps - 1] = [0, {T - 1}], got {_short(ts.tolist())}")
            self.custom_timesteps = True
            self.num_inference_steps = len(ts)
        else:
            if num_inference_steps is None:
                raise ValueError("set_timesteps needs num_inference_steps (an integer in [1, num_train_timesteps]) or timesteps")
            if not _is_int(num_inference_steps) or not 1 <= num_inference_steps <= T:
                raise ValueError(
                    f"num_inference_steps must be an integer in [1, num_train_timesteps={T}], got {num_inference_steps!r}"
                )
            ts = spaced_timesteps(self.config.timestep_spacing, T, int(num_inference_steps), self.config.steps_offset)
            self.custom_timesteps = False
            self.num_inference_steps = int(num_inference_steps)

        abar = self.tables["abar"][torch.from_numpy(ts)]
        if self.config.prediction_type == "epsilon" and bool((abar == 0).any()):
            raise ValueError(
                "prediction_type='epsilon' cannot recover x_0 at a timestep with zero signal (abar_t = 0), which "
                "rescale_betas_zero_snr=True gives at t = num_train_timesteps - 1: use prediction_type="
                "'v_prediction' (recommended with zero terminal SNR) or timestep_spacing='leading'"
            )
        tab = dm.chain_tables(abar)
        not_last = torch.ones(len(ts), dtype=torch.float64)
        not_last[-1] = 0.0  # the step to x_0 adds no noise
        columns = {
            "sqrt_recip_abar": tab["sqrt_recip_abar"],
            "sqrt_abar": tab["sqrt_abar"],
            "sqrt_one_minus_abar": tab["sqrt_one_minus_abar"],
            "coef_x0": tab["coef_x0"],
            "coef_xt": tab["coef_xt"],
            "std_small": tab["posterior_variance"].clamp(min=0).sqrt() * not_last,
            "std_large": tab["beta"].sqrt() * not_last,
            "log_var_min": tab["posterior_log_variance_clipped"],
            "log_var_max": tab["log_beta"],
            "not_last": not_last,
        }
        gamma = self.config.get("analytic_gamma")
        if gamma is not None:
            gamma = torch.as_tensor(np.asarray(gamma, dtype=np.float64))[torch.from_numpy(ts)]
            var = dm.analytic_variance(gamma, tab["abar"], tab["posterior_variance"], tab["coef_x0"])
            columns["std_analytic"] = var.sqrt() * not_last
        else:
            columns["std_analytic"] = torch.zeros_like(not_last)
        table = torch.stack([columns[name] for name in _COLUMNS], dim=1)  # (n, K) float64
        self._table64 = table
        self._steps = [tuple(row) for row in table.tolist()]
        self._index_of = {int(t): i for i, t in enumerate(ts.tolist())}
        self._prev_of = {int(t): (int(ts[i + 1]) if i + 1 < len(ts) else -1) for i, t in enumerate(ts.tolist())}
        self._device_cache = {}
        self.timesteps = torch.from_numpy(ts).to(device)

    def previous_timestep(self, timestep):
        """The timestep visited after ``timestep`` (-1 after the last); t - 1 before set_timesteps."""
        if self._steps is None:
            return timestep - 1
        if isinstance(timestep, torch.Tensor):
            _, _, prev_t = self._device_tables(timestep.device, torch.float32)
            return prev_t.index_select(0, timestep.long().reshape(-1)).reshape(timestep.shape)
        return self._prev_of[int(timestep)]

    # ------------------------------------------------------------------------------------------
    # Coefficient lookup: host floats when the timestep is readable without a device sync,
    # a gather on the device otherwise (no .item(), no nonzero(), no Python branch on values).
    # ------------------------------------------------------------------------------------------
    def _device_tables(self, device, dtype):
        key = (torch.device(device), dtype)
        if key not in self._device_cache:
            T = self.config.num_train_timesteps
            nan_row = torch.full((1, len(_COLUMNS)), float("nan"), dtype=torch.float64)
            table = _to_device(torch.cat([self._table64, nan_row]).to(dtype), device)
            index_of_t = torch.full((T,), len(self._steps), dtype=torch.long)  # unknown t -> the NaN row
            prev_t = torch.full((T,), -1, dtype=torch.long)
            for t, i in self._index_of.items():
                index_of_t[t] = i
                prev_t[t] = self._prev_of[t]
            self._device_cache[key] = (table, _to_device(index_of_t, device), _to_device(prev_t, device))
        return self._device_cache[key]

    def _host_timestep(self, timestep):
        """The timestep as a Python int when it can be read without a device sync, else None."""
        if isinstance(timestep, torch.Tensor):
            if timestep.device.type == "cpu" and timestep.numel() == 1 and self._host_lookup:
                value = timestep.numpy().ravel()[0]  # reads CPU memory: no dispatch, no sync
                if not float(value).is_integer():
                    raise ValueError(f"timestep must be an integer timestep of the schedule, got {float(value)}")
                return int(value)
            return None
        if _is_int(timestep):
            return int(timestep)
        if isinstance(timestep, float) and timestep.is_integer():
            return int(timestep)
        raise TypeError(f"timestep must be an int or an integer torch.Tensor, got {type(timestep).__name__}")

    _host_lookup = True  # tests switch it off to exercise the device path on CPU

    def _coefficients(self, timestep, sample: torch.Tensor):
        """Per-step coefficients as a tuple in _COLUMNS order: Python floats, or tensors broadcastable to sample."""
        if self._steps is None:
            raise ValueError("call set_timesteps(num_inference_steps or timesteps) before step()")
        t = self._host_timestep(timestep)
        if t is not None:
            if t not in self._index_of:
                raise ValueError(
                    f"timestep {t} is not in the schedule set by set_timesteps; it must be one of "
                    f"scheduler.timesteps (e.g. {list(self._index_of)[:5]}...)"
                )
            return self._steps[self._index_of[t]]
        table, index_of_t, _ = self._device_tables(sample.device, sample.dtype)
        # index_select, not tensor[t]: indexing with a 0-d tensor reads its value on the host.
        t = _to_device(timestep, sample.device).long().clamp(0, index_of_t.shape[0] - 1)
        rows = table.index_select(0, index_of_t.index_select(0, t.reshape(-1)))  # (B or 1, K)
        if t.dim() == 0:
            return rows[0].unbind(-1)
        # one timestep per sample: columns shaped (B, 1, 1, 1)
        return rows.view(rows.shape[0], *([1] * (sample.dim() - 1)), rows.shape[1]).unbind(-1)

    # ------------------------------------------------------------------------------------------
    # The reverse step: x_0 from the prediction, posterior mean, posterior variance, sample.
    # ------------------------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, return_dict: bool = True):
        """One ancestral step x_t -> x_{t-1} ~ p_theta(x_{t-1}|x_t) (Algorithm 2, line 4).

        model_output: (B, C, H, W) prediction (epsilon / x_0 / v per ``prediction_type``), or (B, 2C, H, W)
        with a variance output when ``variance_type`` is learned / learned_range. sample: x_t, (B, C, H, W).
        """
        cfg = self.config
        model_output, model_var = self._split_variance(model_output, sample)
        c = self._coefficients(timestep, sample)

        # x_0 from the model's prediction (Eq. 15 for epsilon; x_0 directly; or from v).
        if cfg.prediction_type == "epsilon":
            x0 = dm.x0_from_eps(sample, model_output, c[_C["sqrt_recip_abar"]], c[_C["sqrt_one_minus_abar"]])
        elif cfg.prediction_type == "sample":
            x0 = model_output
        else:
            x0 = dm.x0_from_v(sample, model_output, c[_C["sqrt_abar"]], c[_C["sqrt_one_minus_abar"]])
        x0 = self._clip_x0(x0)

        # Posterior mean mu~_t(x_t, x_0) (Eq. 7).
        mean = dm.posterior_mean(x0, sample, c[_C["coef_x0"]], c[_C["coef_xt"]])

        # Reverse-process standard deviation sigma_t (Sec. 3.2: sigma^2 = beta~_t or beta_t; learned: Improved DDPM).
        std = self._std(c, model_var)

        # Sample x_{t-1} = mu~ + sigma z, z ~ N(0, I); no noise on the step to x_0 (Algorithm 2, lines 3-4).
        not_last = c[_C["not_last"]]
        if isinstance(not_last, float) and not_last == 0.0:
            prev_sample = mean
        else:
            noise = _randn_like(sample, generator)
            prev_sample = dm.axpy(std, noise, mean)

        if not return_dict:
            return (prev_sample, x0)
        return ScratchDDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def _split_variance(self, model_output: torch.Tensor, sample: torch.Tensor):
        """(prediction, variance output or None), checking the model output's shape against the sample's."""
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
            raise TypeError("model_output and sample must be torch.Tensor")
        if sample.dim() < 2 or model_output.shape[:1] + model_output.shape[2:] != sample.shape[:1] + sample.shape[2:]:
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)}, but sample has shape {tuple(sample.shape)}: "
                f"model_output must have the shape of sample except for the channels (C, or 2C with a variance output)"
            )
        return split_model_output(model_output, sample.shape[1], self.config.variance_type)

    def _clip_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding or static clipping of the predicted x_0, read from the config at call time."""
        return clip_predicted_x0(x0, self.config)

    def _std(self, c, model_var):
        """sigma_t for the configured variance_type; zero on the last step."""
        vt = self.config.variance_type
        if vt in ("fixed_small", "fixed_small_log"):
            return c[_C["std_small"]]
        if vt in ("fixed_large", "fixed_large_log"):
            return c[_C["std_large"]]
        if vt == "analytic":
            return c[_C["std_analytic"]]
        if vt == "learned":
            log_var = model_var
        else:
            log_var = dm.learned_range_log_variance(model_var, c[_C["log_var_min"]], c[_C["log_var_max"]])
        return torch.exp(0.5 * log_var) * c[_C["not_last"]]

    # ------------------------------------------------------------------------------------------
    # Forward process
    # ------------------------------------------------------------------------------------------
    def _forward_coefficients(self, timesteps, like: torch.Tensor):
        """sqrt(abar_t), sqrt(1 - abar_t) gathered at timesteps, shaped to broadcast over ``like``."""
        key = (like.device, like.dtype)
        if key not in self._noise_cache:
            both = torch.stack([self.tables["sqrt_abar"], self.tables["sqrt_one_minus_abar"]], dim=1)
            self._noise_cache[key] = _to_device(both.to(like.dtype), like.device)
        table = self._noise_cache[key]
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.as_tensor(timesteps)
        if timesteps.is_floating_point():
            raise TypeError(f"timesteps must be integers, got a tensor of dtype {timesteps.dtype}")
        if timesteps.device.type == "cpu":
            values = timesteps.detach().numpy()
            if values.size and (values.min() < 0 or values.max() >= table.shape[0]):
                raise ValueError(f"timesteps must lie in [0, num_train_timesteps - 1] = [0, {table.shape[0] - 1}]")
        coef = table.index_select(0, _to_device(timesteps, like.device).long().reshape(-1))  # (B, 2)
        shape = (-1,) + (1,) * (like.dim() - 1)
        return coef[:, 0].view(shape), coef[:, 1].view(shape)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, a draw from q(x_t|x_0) (Eq. 4)."""
        sqrt_abar, sqrt_one_minus = self._forward_coefficients(timesteps, original_samples)
        return dm.q_sample(original_samples, noise, sqrt_abar, sqrt_one_minus)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, the v-prediction target."""
        sqrt_abar, sqrt_one_minus = self._forward_coefficients(timesteps, sample)
        return dm.velocity(sample, noise, sqrt_abar, sqrt_one_minus)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

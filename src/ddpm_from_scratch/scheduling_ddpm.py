"""ScratchDDPMScheduler: DDPM's reverse process on the posterior q(x_{t-1}|x_t, x_0), for diffusers.

A drop-in for ``diffusers.DDPMScheduler`` (same config keys, defaults and results; without ``set_timesteps`` it
steps on the full training chain T-1..0, as diffusers does), written from the formulas in
:mod:`ddpm_from_scratch.diffusion_math`. The coefficients of the visited chain are one
``dm.ChainCoefficients`` of float64 tables, computed once per chain and cast to the sample's dtype/device where used.

Where it differs from diffusers it is on purpose (docs/compat.md; tests/test_scheduler_diffusers_bugs.py):
``fixed_large_log`` gives sqrt(beta_t) instead of NaN; "trailing" spacing always has exactly n timesteps;
"leading" + ``steps_offset`` past the last training timestep, 0 steps, betas outside (0, 1), an unknown
variance_type, out-of-schedule timesteps and zero-terminal-SNR with epsilon prediction at abar=0 are clear errors;
for ``variance_type="learned"`` the model's extra channels are a log variance (Improved DDPM's convention).

Beyond diffusers: ``variance_type="analytic"`` with ``analytic_gamma`` (T values of E||eps_theta||^2/d)
samples with Analytic-DPM's optimal reverse variance (Bao et al. 2022) at any number of steps.
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from . import diffusion_math as dm

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")

# Bounds checked before anything is allocated. T = 10^6 training steps is 250x the longest chain in use (4000,
# Improved DDPM); at the bound the float64 tables (13 columns, ~100 MB) take ~0.8 GB peak and ~6 s to build on one
# CPU core, past it they grow without limit. A continuous-time model is better served by a continuous-time scheduler.
MAX_TRAIN_TIMESTEPS = 1_000_000
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000  # diffusers' default, written into every saved DDPMScheduler config
BOOLEAN_KEYS = ("clip_sample", "thresholding", "rescale_betas_zero_snr")


@dataclass
class ScratchDDPMSchedulerOutput(BaseOutput):
    """Output of :meth:`ScratchDDPMScheduler.step`.

    prev_sample: x_{t-1}, shape of the sample (B, C, H, W); feed it to the next step.
    pred_original_sample: the x_0 predicted from the model output (after clipping/thresholding).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # The same keys BaseOutput's generic field scan would set (non-None fields, in order), at a tenth of its cost.
        OrderedDict.__setitem__(self, "prev_sample", self.prev_sample)
        if self.pred_original_sample is not None:
            OrderedDict.__setitem__(self, "pred_original_sample", self.pred_original_sample)


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _short(values) -> str:
    values = list(values)
    return str(values) if len(values) <= 8 else f"[{', '.join(map(str, values[:4]))}, ..., {', '.join(map(str, values[-2:]))}] ({len(values)} values)"


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def parse_flag(name: str, value) -> bool:
    """A config boolean: True/False, or the strings "true"/"false" (any case) of a hand-edited JSON; else a ValueError.

    Python's truth value would read the string "false" as True, so nothing else is accepted."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{name} must be a boolean (true or false, or the string 'true' / 'false'), got {value!r}")


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
    if parse_flag("thresholding", config.thresholding):
        return dm.dynamic_threshold(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    if parse_flag("clip_sample", config.clip_sample):
        return x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    return x0


def _to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """Host tensor -> device without blocking the host: through pinned memory, non_blocking, for CUDA."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _device_assert(condition: torch.Tensor, message: str) -> None:
    """Stop with ``message`` unless the 0-d bool ``condition`` holds. On CUDA a device-side assert (no host sync;
    the error surfaces at the next synchronisation); a device without asynchronous asserts checks on the host."""
    try:
        torch._assert_async(condition, message)
    except NotImplementedError:
        if not bool(condition):
            raise ValueError(message) from None


def _native_generator(generator, device) -> bool:
    """True when torch can draw on ``device`` from ``generator`` directly (None, or one generator on that device)."""
    return generator is None or (isinstance(generator, torch.Generator) and generator.device == device)


def _randn_like(sample: torch.Tensor, generator) -> torch.Tensor:
    """N(0, I) noise shaped like sample, drawn exactly as diffusers' randn_tensor draws it (same generator, same numbers)."""
    if _native_generator(generator, sample.device):
        return torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
    return randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)


def _gaussian_draw(mean: torch.Tensor, std, generator) -> torch.Tensor:
    """mean + std z with z ~ N(0, I) drawn as _randn_like draws it; one fused kernel for a Python-float std
    (torch.normal makes the same draws from the generator and the same sums)."""
    if isinstance(std, float) and _native_generator(generator, mean.device):
        return torch.normal(mean, std, generator=generator)
    return dm.axpy(std, _randn_like(mean, generator), mean)


class _Lookup:
    """Host-side view of the visited chain: its coefficients, one ChainCoefficients of Python floats per step
    (made on first use), and the step index of each training timestep t (-1 where t is not visited or unusable)."""

    __slots__ = ("chain", "table", "rows", "index", "index_np", "prev_np")

    def __init__(self, chain: dm.ChainCoefficients, index_np: np.ndarray, prev_np: np.ndarray):
        self.chain = chain  # (N,) float64 fields
        self.table = chain.stack().numpy()  # (N, K) float64, columns in field order
        self.rows = [None] * self.table.shape[0]
        self.index_np = index_np  # (T,) int64, -1 = not in the schedule
        self.index = index_np.tolist()
        self.prev_np = prev_np  # (T,) int64: the timestep visited after t (-1 after the last)

    def row(self, i: int) -> dm.ChainCoefficients:
        """Step i's coefficients as Python floats."""
        r = self.rows[i]
        if r is None:  # tuple.__new__: a NamedTuple from a row without its constructor's keyword parsing
            r = self.rows[i] = tuple.__new__(dm.ChainCoefficients, self.table[i].tolist())
        return r


class ScratchDDPMScheduler(SchedulerMixin, ConfigMixin):
    """DDPM ancestral sampler (Ho et al. 2020, Algorithm 2) on precomputed float64 posterior coefficients.

    Config keys, defaults and meaning are those of ``diffusers.DDPMScheduler``.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    _host_lookup = True  # tests switch it off to exercise the device path on CPU

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS,
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
        self._validate_config()  # everything checked (and T fixed) before any table is allocated
        c = self.config
        T = c.num_train_timesteps
        if c.trained_betas is not None:
            betas = torch.as_tensor(np.asarray(c.trained_betas, dtype=np.float64))
        else:
            betas = dm.beta_schedule(c.beta_schedule, T, c.beta_start, c.beta_end)
        if c.rescale_betas_zero_snr:
            betas = dm.rescale_zero_terminal_snr(betas)
        abar = dm.alphas_cumprod(betas)
        gamma = None if c.analytic_gamma is None else check_analytic_gamma(c.analytic_gamma, T)
        # The full chain T-1 -> ... -> 0, row t = training timestep t (abar_prev = abar_{t-1}).
        self.full_chain = dm.chain_coefficients(abar.flip(0), None if gamma is None else gamma[::-1].copy()).reversed()
        self._abar_np = abar.numpy()
        # Public float32 views, as diffusers exposes them.
        self.betas = betas.float()
        self.alphas = (1.0 - betas).float()
        self.alphas_cumprod = abar.float()
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(T)[::-1].copy())
        self._begin_index = None
        self._visited = None  # None: the full training chain (no set_timesteps yet); else (N,) int64, descending
        self._lookup = None  # _Lookup of the visited chain, built on first use
        self._device_cache = {}  # (device, dtype) -> (table (N+1, K), index_of_t (T+2,), prev_t (T,))
        self._noise_cache = {}  # (device, dtype) -> (T, 2) [sqrt(abar_t), sqrt(1 - abar_t)]

    # ------------------------------------------------------------------------------------------
    # Validation: cheap checks only, before anything is allocated
    # ------------------------------------------------------------------------------------------
    def _validate_config(self) -> None:
        c = self.config
        for name in BOOLEAN_KEYS:
            value = parse_flag(name, c[name])
            if value is not c[name]:
                self.register_to_config(**{name: value})
        if c.trained_betas is not None:
            self._adopt_trained_betas_length()
        T = c.num_train_timesteps
        if not _is_int(T) or not 1 <= T <= MAX_TRAIN_TIMESTEPS:
            raise ValueError(f"num_train_timesteps must be an integer in [1, {MAX_TRAIN_TIMESTEPS}], got {T!r}")
        if c.rescale_betas_zero_snr and T < 2:
            raise ValueError("rescale_betas_zero_snr=True needs num_train_timesteps >= 2 (it pins abar_{T-1} to 0 while "
                             f"keeping abar_0), got {T}")
        _choice("variance_type", c.variance_type, dm.SCHEDULER_VARIANCE_TYPES)
        if c.get("analytic_gamma") is not None:
            check_analytic_gamma(c.analytic_gamma, T)
        elif c.variance_type == "analytic":
            raise ValueError(
                "variance_type='analytic' needs analytic_gamma (estimate it with "
                "ddpm_from_scratch.likelihood.estimate_analytic_gamma)"
            )
        _choice("prediction_type", c.prediction_type, dm.PREDICTION_TYPES)
        _choice("timestep_spacing", c.timestep_spacing, TIMESTEP_SPACINGS)
        if c.trained_betas is not None:
            betas = np.asarray(c.trained_betas, dtype=np.float64)
            if betas.ndim != 1:
                raise ValueError(f"trained_betas must be a 1-D sequence, got shape {betas.shape}")
            if not np.all((betas > 0) & (betas < 1)):
                raise ValueError("trained_betas must all lie in the open interval (0, 1)")
        else:
            _choice("beta_schedule", c.beta_schedule, dm.BETA_SCHEDULES)
            for name in ("beta_start", "beta_end"):
                value = getattr(c, name)
                if not isinstance(value, numbers.Real) or not 0.0 < value < 1.0:
                    raise ValueError(f"{name} must be a number in the open interval (0, 1) (a beta > 1 makes "
                                     f"alpha_t = 1 - beta_t negative), got {value!r}")
        if not _is_int(c.steps_offset) or c.steps_offset < 0:
            raise ValueError(f"steps_offset must be a non-negative integer, got {c.steps_offset!r}")
        if not 0.0 < c.dynamic_thresholding_ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {c.dynamic_thresholding_ratio!r}")
        for name in ("clip_sample_range", "sample_max_value"):
            if not getattr(c, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(c, name)!r}")

    def _adopt_trained_betas_length(self) -> None:
        """diffusers' convention: trained_betas sets the chain's length. A num_train_timesteps left at its default
        (which every saved config carries) follows it; any other value that disagrees is an error."""
        c = self.config
        betas = c.trained_betas
        if not hasattr(betas, "__len__") or isinstance(betas, (str, bytes)):
            raise ValueError(f"trained_betas must be a 1-D sequence of betas in (0, 1), got {type(betas).__name__}")
        n = len(betas)
        if not 1 <= n <= MAX_TRAIN_TIMESTEPS:
            raise ValueError(f"trained_betas must hold between 1 and {MAX_TRAIN_TIMESTEPS} values, got {n}")
        if n != c.num_train_timesteps:
            if c.num_train_timesteps != DEFAULT_NUM_TRAIN_TIMESTEPS:
                raise ValueError(
                    f"trained_betas has {n} values but num_train_timesteps={c.num_train_timesteps!r}: leave "
                    f"num_train_timesteps out (trained_betas sets the length) or make them agree"
                )
            self.register_to_config(num_train_timesteps=n)

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
        """Choose the visited timesteps (respacing: beta_t = 1 - abar_t/abar_prev); the chain's coefficients are
        computed on the first step that needs them."""
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
            custom, n = True, len(ts)
        else:
            if num_inference_steps is None:
                raise ValueError("set_timesteps needs num_inference_steps (an integer in [1, num_train_timesteps]) or timesteps")
            if not _is_int(num_inference_steps) or not 1 <= num_inference_steps <= T:
                raise ValueError(
                    f"num_inference_steps must be an integer in [1, num_train_timesteps={T}], got {num_inference_steps!r}"
                )
            n = int(num_inference_steps)
            ts = spaced_timesteps(self.config.timestep_spacing, T, n, self.config.steps_offset)
            custom = False
        if self.config.prediction_type == "epsilon" and not self._abar_np[ts].all():
            raise ValueError(
                "prediction_type='epsilon' cannot recover x_0 at a timestep with zero signal (abar_t = 0), which "
                "rescale_betas_zero_snr=True gives at t = num_train_timesteps - 1: use prediction_type="
                "'v_prediction' (recommended with zero terminal SNR) or timestep_spacing='leading'"
            )
        self.custom_timesteps, self.num_inference_steps = custom, n
        self._visited, self._lookup, self._device_cache = ts, None, {}
        self.timesteps = torch.from_numpy(ts).to(device) if device is not None else torch.from_numpy(ts)

    def _chain_lookup(self) -> _Lookup:
        """The visited chain's coefficients and timestep index, built once per chain."""
        if self._lookup is None:
            T = self.config.num_train_timesteps
            if self._visited is None:  # the full chain, as DDPMScheduler steps before set_timesteps
                chain = self.full_chain
                index = np.arange(T, dtype=np.int64)
                prev = index - 1
                if self.config.prediction_type == "epsilon":
                    index[self._abar_np == 0] = -1  # zero signal: x_0 cannot be recovered from epsilon
            else:
                ts = self._visited
                gamma = self.config.get("analytic_gamma")
                gamma = None if gamma is None else np.asarray(gamma, dtype=np.float64)[ts]
                chain = dm.chain_coefficients(torch.from_numpy(self._abar_np[ts]), gamma)
                index = np.full(T, -1, dtype=np.int64)
                index[ts] = np.arange(len(ts))
                prev = np.full(T, -1, dtype=np.int64)
                prev[ts[:-1]] = ts[1:]
            self._lookup = _Lookup(chain, index, prev)
        return self._lookup

    def _timestep_error(self, values) -> ValueError:
        """The error for timesteps that are not steps of the visited chain: names them and the valid ones."""
        values = sorted({int(v) if float(v).is_integer() else float(v) for v in np.asarray(values).ravel().tolist()})
        T = self.config.num_train_timesteps
        shown = _short(values)
        if self._visited is None:
            zero = [v for v in values if isinstance(v, int) and 0 <= v < T and self._abar_np[v] == 0]
            if zero and self.config.prediction_type == "epsilon":
                return ValueError(
                    f"timestep {shown}: abar_t = 0 there (zero terminal SNR, or a signal that underflows), so prediction_type='epsilon' "
                    f"cannot recover x_0; use prediction_type='v_prediction', or set_timesteps with 'leading' spacing"
                )
            return ValueError(f"timestep {shown} is outside the schedule: without set_timesteps the valid timesteps "
                              f"are the integers in [0, {T - 1}]")
        return ValueError(
            f"timestep {shown} is not in the schedule set by set_timesteps: it must be one of the "
            f"{len(self._visited)} values of scheduler.timesteps, {_short(self._visited.tolist())}"
        )

    def previous_timestep(self, timestep):
        """The timestep visited after ``timestep`` (-1 after the last); t - 1 on the full chain."""
        if self._visited is None:
            return timestep - 1
        if isinstance(timestep, torch.Tensor):
            if timestep.device.type == "cpu":
                self._check_host_timesteps(timestep)
                prev = self._chain_lookup().prev_np[timestep.numpy().astype(np.int64).reshape(-1)]
                return torch.from_numpy(prev).reshape(timestep.shape)
            _, _, prev_t = self._device_tables(timestep.device, torch.float32)
            return prev_t.index_select(0, timestep.long().reshape(-1)).reshape(timestep.shape)
        t = self._host_timestep(timestep)
        self._check_host_timesteps(np.asarray([t]))
        return int(self._chain_lookup().prev_np[t])

    # ------------------------------------------------------------------------------------------
    # Coefficient lookup: host floats when the timestep is readable without a device sync, a gather on the
    # device otherwise (no .item(), no nonzero(), no Python branch on device values).
    # ------------------------------------------------------------------------------------------
    def _device_tables(self, device, dtype):
        key = (torch.device(device), dtype)
        if key not in self._device_cache:
            lk = self._chain_lookup()
            n = lk.table.shape[0]
            nan_row = torch.full((1, len(dm.ChainCoefficients._fields)), float("nan"), dtype=torch.float64)
            table = _to_device(torch.cat([torch.from_numpy(lk.table), nan_row]).to(dtype), device)
            # position t + 1 holds the step index of t; positions 0 and T + 1 catch t < 0 and t >= T
            index = np.concatenate([[-1], lk.index_np, [-1]])
            index_of_t = torch.from_numpy(np.where(index < 0, n, index))
            prev_t = torch.from_numpy(lk.prev_np)
            self._device_cache[key] = (table, _to_device(index_of_t, device), _to_device(prev_t, device))
        return self._device_cache[key]

    def _host_timestep(self, timestep):
        """The timestep as a Python int when it can be read without a device sync, else None."""
        if isinstance(timestep, torch.Tensor):
            if timestep.is_cpu and timestep.numel() == 1 and self._host_lookup:
                value = timestep.tolist()  # reads CPU memory: no dispatch, no sync
                while isinstance(value, list):
                    value = value[0]
                if isinstance(value, float):
                    if not value.is_integer():
                        raise ValueError(f"timestep must be an integer timestep of the schedule, got {value}")
                    value = int(value)
                return value
            return None
        if _is_int(timestep):
            return int(timestep)
        if isinstance(timestep, float) and timestep.is_integer():
            return int(timestep)
        raise TypeError(f"timestep must be an int or an integer torch.Tensor, got {type(timestep).__name__}")

    def _check_host_timesteps(self, values) -> None:
        """Raise naming the values unless every one is a step of the visited chain (values: host ints/array)."""
        v = (values.numpy() if isinstance(values, torch.Tensor) else np.asarray(values)).reshape(-1)
        index = self._chain_lookup().index_np
        if v.dtype.kind == "f":
            if not np.all(v == np.round(v)):
                raise self._timestep_error(v[v != np.round(v)])
            v = v.astype(np.int64)
        bad = (v < 0) | (v >= index.shape[0])
        bad[~bad] = index[v[~bad]] < 0
        if bad.any():
            raise self._timestep_error(v[bad])

    def _coefficients(self, timestep, sample: torch.Tensor) -> dm.ChainCoefficients:
        """The step's coefficients: Python floats, or tensors broadcastable to sample (one row per sample)."""
        t = self._host_timestep(timestep)
        lk = self._chain_lookup()
        if t is not None:
            i = lk.index[t] if 0 <= t < len(lk.index) else -1
            if i < 0:
                raise self._timestep_error([t])
            return lk.row(i)
        on_host = timestep.is_cpu
        if on_host:  # CPU values are read without a sync: a clear error before any work
            self._check_host_timesteps(timestep)
        table, index_of_t, _ = self._device_tables(sample.device, sample.dtype)
        # index_select, not tensor[t]: indexing with a 0-d tensor reads its value on the host.
        t = _to_device(timestep, sample.device).long().reshape(-1)
        index = index_of_t.index_select(0, (t + 1).clamp(0, index_of_t.shape[0] - 1))
        if not on_host:  # accelerator values: checked on the device, no host sync; a failure stops the stream
            _device_assert((index < table.shape[0] - 1).all(),
                           "ScratchDDPMScheduler.step: a timestep is not in scheduler.timesteps")
        rows = table.index_select(0, index)  # (B or 1, K)
        if timestep.dim() == 0:
            return dm.ChainCoefficients.from_table(rows[0])
        # one timestep per sample: fields shaped (B, 1, 1, 1)
        return dm.ChainCoefficients.from_table(rows.view(rows.shape[0], *([1] * (sample.dim() - 1)), rows.shape[1]))

    # ------------------------------------------------------------------------------------------
    # The reverse step: x_0 from the prediction, posterior mean, posterior variance, sample.
    # ------------------------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, return_dict: bool = True):
        """One ancestral step x_t -> x_{t-1} ~ p_theta(x_{t-1}|x_t) (Algorithm 2, line 4).

        model_output: (B, C, H, W) prediction (epsilon / x_0 / v per ``prediction_type``), or (B, 2C, H, W)
        with a variance output when ``variance_type`` is learned / learned_range. sample: x_t, (B, C, H, W).
        timestep: an int, a 0-d tensor, or a (B,) tensor of one timestep per sample, each in scheduler.timesteps.
        """
        model_output, model_var = self._split_variance(model_output, sample)
        c = self._coefficients(timestep, sample)

        # x_0 from the model's prediction (Eq. 15 for epsilon; x_0 directly; or from v), then clipping.
        x0 = self._clip_x0(dm.x0_from_model_output(self.config.prediction_type, model_output, sample, c))

        # Posterior mean mu~_t(x_t, x_0) (Eq. 7).
        mean = dm.posterior_mean(x0, sample, c.coef_x0, c.coef_xt)

        # Reverse-process standard deviation sigma_t (Sec. 3.2: sigma^2 = beta~_t or beta_t; learned: Improved DDPM).
        std = self._std(c, model_var)

        # Sample x_{t-1} = mu~ + sigma z, z ~ N(0, I); no noise on the step to x_0 (Algorithm 2, lines 3-4).
        if isinstance(c.not_last, float) and c.not_last == 0.0:
            prev_sample = mean
        else:
            prev_sample = _gaussian_draw(mean, std, generator)

        if not return_dict:
            return (prev_sample, x0)
        return ScratchDDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def _split_variance(self, model_output: torch.Tensor, sample: torch.Tensor):
        """(prediction, variance output or None), checking the model output's shape against the sample's."""
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
            raise TypeError("model_output and sample must be torch.Tensor")
        if model_output.shape == sample.shape and self.config.variance_type not in dm.LEARNED_VARIANCE_TYPES:
            return model_output, None  # the common case, checked in one comparison
        if sample.dim() < 2 or model_output.shape[:1] + model_output.shape[2:] != sample.shape[:1] + sample.shape[2:]:
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)}, but sample has shape {tuple(sample.shape)}: "
                f"model_output must have the shape of sample except for the channels (C, or 2C with a variance output)"
            )
        return split_model_output(model_output, sample.shape[1], self.config.variance_type)

    def _clip_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding or static clipping of the predicted x_0, read from the config at call time."""
        return clip_predicted_x0(x0, self.config)

    def _std(self, c: dm.ChainCoefficients, model_var, variance_type: str | None = None):
        """sigma_t of the step for the variance type (dm.reverse_log_variance); zero on the step to x_0."""
        log_var = dm.reverse_log_variance(variance_type or self.config.variance_type, c, model_var)
        return dm.std_from_log_variance(log_var) * c.not_last

    def _get_variance(self, t, predicted_variance: torch.Tensor | None = None, variance_type: str | None = None):
        """diffusers' ``DDPMScheduler._get_variance``: the variance step() uses at timestep t, in diffusers' form.

        That form is sigma_t^2 for fixed_small, fixed_large and learned (ours: exp of the log-variance channels),
        sigma_t for fixed_small_log, and log sigma_t^2 for fixed_large_log and learned_range; sigma_t^2 is clamped
        at 1e-20, so the step to x_0 (no noise) reports 1e-20. predicted_variance: the model's variance channels
        (B, C, ...) for the learned types. Returns a float32 tensor (or one like predicted_variance).
        """
        variance_type = variance_type or self.config.variance_type
        _choice("variance_type", variance_type, dm.SCHEDULER_VARIANCE_TYPES)
        if variance_type in dm.LEARNED_VARIANCE_TYPES and predicted_variance is None:
            raise ValueError(f"variance_type={variance_type!r} needs predicted_variance, the model's variance channels")
        like = predicted_variance if isinstance(predicted_variance, torch.Tensor) else torch.zeros((), dtype=torch.float32)
        if isinstance(t, torch.Tensor) and t.dim() == 1:
            like = like.expand(t.shape[0], *([1] * max(like.dim() - 1, 1)))
        std = self._std(self._coefficients(t, like), predicted_variance, variance_type)
        var = torch.as_tensor(std, dtype=like.dtype) ** 2
        var = var.clamp(min=1e-20)
        if variance_type == "fixed_small_log":
            return var.sqrt()
        if variance_type in ("fixed_large_log", "learned_range"):
            return var.log()
        return var

    # ------------------------------------------------------------------------------------------
    # Forward process
    # ------------------------------------------------------------------------------------------
    def _forward_coefficients(self, timesteps, like: torch.Tensor):
        """sqrt(abar_t), sqrt(1 - abar_t) gathered at timesteps, shaped to broadcast over ``like``."""
        key = (like.device, like.dtype)
        if key not in self._noise_cache:
            both = torch.stack([self.full_chain.sqrt_abar, self.full_chain.sqrt_one_minus_abar], dim=1)
            self._noise_cache[key] = _to_device(both.to(like.dtype), like.device)
        table = self._noise_cache[key]
        T = table.shape[0]
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.as_tensor(timesteps)
        if timesteps.is_floating_point():
            raise TypeError(f"timesteps must be integers, got a tensor of dtype {timesteps.dtype}")
        index = _to_device(timesteps, like.device).long().reshape(-1)
        if timesteps.device.type == "cpu":
            values = timesteps.detach().numpy().ravel()
            bad = values[(values < 0) | (values >= T)]
            if bad.size:
                raise ValueError(f"timesteps {_short(sorted(set(bad.tolist())))} are outside the training chain: they "
                                 f"must lie in [0, num_train_timesteps - 1] = [0, {T - 1}]")
        else:  # checked on the device, no host sync
            _device_assert(((index >= 0) & (index < T)).all(),
                           f"ScratchDDPMScheduler.add_noise: timesteps must lie in [0, {T - 1}]")
        coef = table.index_select(0, index)  # (B, 2)
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

"""ScratchDDPMScheduler against diffusers.DDPMScheduler (reference) and an independent float64 step.

Per step both schedulers get the same x_t, model output and noise. prev_sample, pred_original_sample and
add_noise must agree within 1e-5 relative (float32). Where they differ more, our float64 coefficient tables
are the reason: then both are compared with a float64 reference written here from the formulas, and ours
must be within 1e-5 of it and no worse than diffusers.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ddpm_from_scratch import ScratchDDPMScheduler

REL = 1e-5

CONFIGS = [
    {},
    {"variance_type": "fixed_large"},
    {"variance_type": "fixed_small_log", "clip_sample": False},
    {"prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"},
    {"prediction_type": "sample", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
     "timestep_spacing": "linspace", "clip_sample": False},
    {"beta_schedule": "sigmoid", "thresholding": True, "sample_max_value": 1.5, "dynamic_thresholding_ratio": 0.9},
    {"variance_type": "learned_range", "steps_offset": 1},
    {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
     "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False},
]


def _betas64(cfg):
    """The test's own float64 betas (independent of the package)."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        b = np.linspace(cfg.beta_start, cfg.beta_end, T)
    elif cfg.beta_schedule == "scaled_linear":
        b = np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T) ** 2
    elif cfg.beta_schedule == "sigmoid":
        b = 1 / (1 + np.exp(-np.linspace(-6, 6, T))) * (cfg.beta_end - cfg.beta_start) + cfg.beta_start
    elif cfg.beta_schedule == "squaredcos_cap_v2":
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        b = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
    if cfg.rescale_betas_zero_snr:
        s = np.sqrt(np.cumprod(1 - b))
        s = (s - s[-1]) * s[0] / (s[0] - s[-1])
        a = s**2
        b = 1 - np.concatenate([a[:1], a[1:] / a[:-1]])
    return b


def reference_step(cfg, abar, t, prev_t, model_output, x, noise):
    """Algorithm 2 in float64 numpy: x_0 from the prediction, Bayes posterior mean and variance, sample."""
    C = x.shape[1]
    out = model_output[:, :C]
    a_t, a_s = abar[t], (abar[prev_t] if prev_t >= 0 else 1.0)
    if cfg.prediction_type == "epsilon":
        x0 = (x - math.sqrt(1 - a_t) * out) / math.sqrt(a_t)
    elif cfg.prediction_type == "sample":
        x0 = out
    else:
        x0 = math.sqrt(a_t) * x - math.sqrt(1 - a_t) * out
    if cfg.thresholding:
        flat = np.abs(x0.reshape(x0.shape[0], -1))
        s = np.clip(np.quantile(flat, cfg.dynamic_thresholding_ratio, axis=1), 1, cfg.sample_max_value)
        s = s.reshape(-1, 1, 1, 1)
        x0 = np.clip(x0, -s, s) / s
    elif cfg.clip_sample:
        x0 = np.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
    alpha = a_t / a_s
    beta = 1 - alpha
    if prev_t < 0:
        return x0, x0
    prec = 1 / (1 - a_s) + alpha / beta
    mean = (math.sqrt(a_s) * x0 / (1 - a_s) + math.sqrt(alpha) * x / beta) / prec
    var_small, var_large = 1 / prec, beta
    if cfg.variance_type in ("fixed_small", "fixed_small_log"):
        std = math.sqrt(var_small)
    elif cfg.variance_type in ("fixed_large", "fixed_large_log"):
        std = math.sqrt(var_large)
    else:  # learned_range
        frac = (model_output[:, C:] + 1) / 2
        std = np.exp(0.5 * (frac * math.log(var_large) + (1 - frac) * math.log(var_small)))
    return mean + std * noise, x0


def rel(a, b, scale):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() / max(np.abs(scale).max(), 1e-12))


@pytest.mark.parametrize("steps", [None, 1000, 250, 50, 7])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_step_parity_with_diffusers(config, steps):
    """steps=None: no set_timesteps call, both step on the full training chain T-1..0."""
    if config.get("steps_offset") and steps == 1000:
        pytest.skip("diffusers fails here (t=1000, IndexError); see test_scheduler_diffusers_bugs.py")
    ref = DDPMScheduler(**config)
    ours = ScratchDDPMScheduler(**config)
    if steps is not None:
        ref.set_timesteps(steps)
        ours.set_timesteps(steps)
    assert ours.num_inference_steps == ref.num_inference_steps == steps
    assert torch.equal(ours.timesteps, ref.timesteps) and ours.timesteps.dtype == torch.int64
    abar64 = np.cumprod(1 - _betas64(ours.config))
    learned = config.get("variance_type") == "learned_range"
    timesteps = ref.timesteps.tolist()
    g = torch.Generator().manual_seed(steps or 0)
    fallbacks = 0
    errors = {"ours": [], "diffusers": []}
    for i, t in enumerate(timesteps):
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x = torch.randn(2, 3, 4, 4, generator=g)
        out = torch.randn(2, 6 if learned else 3, 4, 4, generator=g)
        if learned:
            out[:, 3:] = out[:, 3:].tanh()
        seed = 1000 + i
        a = ref.step(out, torch.tensor(t), x, generator=torch.Generator().manual_seed(seed))
        b = ours.step(out, torch.tensor(t), x, generator=torch.Generator().manual_seed(seed))
        noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed)).double().numpy()
        prev64, x064 = reference_step(ours.config, abar64, t, prev_t, out.double().numpy(), x.double().numpy(), noise)
        for mine, theirs, exact in [(b.prev_sample, a.prev_sample, prev64), (b.pred_original_sample, a.pred_original_sample, x064)]:
            assert mine.dtype == torch.float32 and mine.shape == x.shape
            err_ours, err_diffusers = rel(mine, exact, exact), rel(theirs, exact, exact)
            errors["ours"].append(err_ours)
            errors["diffusers"].append(err_diffusers)
            if rel(mine, theirs, exact) > REL:
                fallbacks += 1
                assert err_ours <= REL, (t, err_ours, err_diffusers)
    # fallbacks are the exception, not the rule; and on average the float64 tables are closer to exact
    assert fallbacks <= max(3, 0.05 * 2 * len(timesteps)), fallbacks
    assert np.mean(errors["ours"]) <= np.mean(errors["diffusers"]) * 1.05 + 1e-9


@pytest.mark.parametrize("config", CONFIGS[:5], ids=str)
def test_add_noise_and_velocity_parity(config):
    ref, ours = DDPMScheduler(**config), ScratchDDPMScheduler(**config)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(16, 3, 4, 4, generator=g), torch.randn(16, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 2, 10, 100, 250, 400, 500, 600, 700, 800, 900, 990, 997, 998, 999])
    abar64 = np.cumprod(1 - _betas64(ours.config))[t.numpy()].reshape(-1, 1, 1, 1)
    exact_xt = np.sqrt(abar64) * x0.double().numpy() + np.sqrt(1 - abar64) * noise.double().numpy()
    exact_v = np.sqrt(abar64) * noise.double().numpy() - np.sqrt(1 - abar64) * x0.double().numpy()
    for mine, theirs, exact in [
        (ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), exact_xt),
        (ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t), exact_v),
    ]:
        if rel(mine, theirs, exact) > REL:
            assert rel(mine, exact, exact) <= min(REL, rel(theirs, exact, exact))


def test_add_noise_int32_timesteps_and_dtypes():
    ours = ScratchDDPMScheduler()
    x0 = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([5, 500, 999], dtype=torch.int32)
    out = ours.add_noise(x0, torch.zeros_like(x0), t)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[[5, 500, 999]]
    np.testing.assert_allclose(out.numpy(), np.sqrt(abar).reshape(-1, 1, 1, 1) * x0.numpy(), rtol=1e-12)
    assert out.dtype == torch.float64
    for dtype in (torch.float16, torch.bfloat16):
        assert ours.add_noise(x0.to(dtype), x0.to(dtype), t).dtype == dtype


def test_full_loop_matches_diffusers_with_shared_generator():
    """A whole 50-step loop with one generator: same draws, same images."""
    ref, ours = DDPMScheduler(), ScratchDDPMScheduler()
    results = []
    for sched in (ref, ours):
        sched.set_timesteps(50)
        g = torch.Generator().manual_seed(7)
        x = torch.randn(2, 3, 8, 8, generator=g)
        for t in sched.timesteps:
            eps = 0.1 * x  # a fixed deterministic "model"
            x = sched.step(eps, t, x, generator=g).prev_sample
        results.append(x)
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-5)

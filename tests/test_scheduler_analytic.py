"""Exactness with an analytic denoiser.

For data x_0 ~ N(m, s^2) (independent pixels) the optimal predictions are linear in x_t:
E[x_0|x_t] = m + sqrt(abar) s^2 (x_t - sqrt(abar) m) / D, E[eps|x_t] = sqrt(1-abar) (x_t - sqrt(abar) m) / D,
D = abar s^2 + 1 - abar, and v = sqrt(abar) eps - sqrt(1-abar) x_0. The reverse chain is then a linear
Gaussian recursion whose mean and variance we propagate exactly in float64 (Bayes' rule for the posterior,
written here independently of the package) and compare with many samples run through the scheduler.
"""

import math

import numpy as np
import pytest
import torch

from ddpm_from_scratch import ScratchDDPMScheduler

M, S = 0.3, 0.5
N = 50_000
T = 1000
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, T))


def optimal_prediction(kind, x, a):
    d = a * S**2 + 1 - a
    x0 = M + math.sqrt(a) * S**2 * (x - math.sqrt(a) * M) / d
    eps = math.sqrt(1 - a) * (x - math.sqrt(a) * M) / d
    return {"epsilon": eps, "sample": x0, "v_prediction": math.sqrt(a) * eps - math.sqrt(1 - a) * x0}[kind]


def exact_moments(timesteps, variance):
    """Mean and variance of the chain's output, propagated in closed form."""
    mu, var = 0.0, 1.0
    for i, t in enumerate(timesteps):
        a = ABAR[t]
        b = ABAR[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        d = a * S**2 + 1 - a
        k = math.sqrt(a) * S**2 / d  # x0_hat = k x + c
        c = M - k * math.sqrt(a) * M
        alpha, beta = a / b, 1 - a / b
        if i + 1 == len(timesteps):  # last step returns x0_hat
            mu, var = k * mu + c, k * k * var
            break
        prec = 1 / (1 - b) + alpha / beta  # Bayes: q(x_s|x_t,x_0) precision
        w0, wt = math.sqrt(b) / (1 - b) / prec, math.sqrt(alpha) / beta / prec
        A, B = w0 * k + wt, w0 * c
        sigma2 = 1 / prec if variance == "fixed_small" else beta
        mu, var = A * mu + B, A * A * var + sigma2
    return mu, var


def run_chain(sched, kind, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, 200, N // 200, generator=g, dtype=torch.float64)
    for t in sched.timesteps:
        out = optimal_prediction(kind, x, ABAR[int(t)])
        x = sched.step(out, t, x, generator=g).prev_sample
    return x.mean().item(), x.var().item()


def assert_moments_match(sample_mean, sample_var, mu, var):
    se_mean, se_var = math.sqrt(var / N), var * math.sqrt(2 / N)
    assert abs(sample_mean - mu) < 5 * se_mean, (sample_mean, mu)
    assert abs(sample_var - var) < 5 * se_var, (sample_var, var)


@pytest.mark.parametrize("steps", [1000, 250, 50])
@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_reverse_chain_matches_exact_moments(steps, kind, variance):
    sched = ScratchDDPMScheduler(prediction_type=kind, variance_type=variance, clip_sample=False)
    sched.set_timesteps(steps)
    mu, var = exact_moments(sched.timesteps.tolist(), variance)
    assert_moments_match(*run_chain(sched, kind, steps), mu, var)
    if steps == 1000 and variance == "fixed_small":
        # the optimal denoiser with the posterior variance recovers the data distribution
        assert mu == pytest.approx(M, abs=0.01) and var == pytest.approx(S**2, rel=0.05)


def reference_path(timesteps, variance, x, g):
    """The same chain in float64 numpy on the same noise draws: x_{t-1} = A x_t + B + sigma z."""
    x = x.numpy().copy()
    for i, t in enumerate(timesteps):
        a = ABAR[t]
        b = ABAR[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        d = a * S**2 + 1 - a
        k = math.sqrt(a) * S**2 / d
        x0 = k * x + (M - k * math.sqrt(a) * M)
        if i + 1 == len(timesteps):
            return x0
        alpha, beta = a / b, 1 - a / b
        prec = 1 / (1 - b) + alpha / beta
        mean = (math.sqrt(b) / (1 - b) * x0 + math.sqrt(alpha) / beta * x) / prec
        sigma = math.sqrt(1 / prec if variance == "fixed_small" else beta)
        x = mean + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64).numpy()


def run_path(sched, kind, seed=0, shape=(4, 1, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x_init = x.clone()
    for t in sched.timesteps:
        x = sched.step(optimal_prediction(kind, x, ABAR[int(t)]), t, x, generator=g).prev_sample
    return x.numpy(), x_init, g


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_sample_paths_match_float64_reference(kind, variance):
    """Same noise draws: the scheduler's path equals the float64 recursion to rounding."""
    sched = ScratchDDPMScheduler(prediction_type=kind, variance_type=variance, clip_sample=False)
    sched.set_timesteps(50)
    out, x_init, _ = run_path(sched, kind)
    g = torch.Generator().manual_seed(0)
    torch.randn(x_init.shape, generator=g, dtype=torch.float64)  # the initial draw
    ref = reference_path(sched.timesteps.tolist(), variance, x_init, g)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-10)


def mutant(steps, rows_for):
    """A scheduler whose coefficient rows come from other (wrong) timesteps."""
    m = ScratchDDPMScheduler(clip_sample=False)
    m.set_timesteps(steps)
    m._chain_lookup().rows = rows_for(m.timesteps.tolist())
    return m


def test_wrong_alpha_bar_index_or_variance_fails():
    """Mutants (abar index off by one, respacing ignored, wrong variance) must fail both checks above."""
    steps = 50
    good = ScratchDDPMScheduler(clip_sample=False)
    good.set_timesteps(steps)
    ts = good.timesteps.tolist()
    full = ScratchDDPMScheduler(clip_sample=False)
    full.set_timesteps(1000)
    shifted = ScratchDDPMScheduler(clip_sample=False)
    shifted.set_timesteps(timesteps=[t + 1 for t in ts])
    large = ScratchDDPMScheduler(clip_sample=False, variance_type="fixed_large")
    large.set_timesteps(steps)
    mutants = {
        "abar[t+1]": mutant(steps, lambda ts: [shifted._chain_lookup().row(i) for i in range(len(ts))]),
        "prev=t-1": mutant(steps, lambda ts: [full._chain_lookup().row(full._chain_lookup().index[t]) for t in ts]),
        "fixed_large instead of fixed_small": large,
    }
    g = torch.Generator().manual_seed(0)
    x_init = torch.randn(4, 1, 16, 16, generator=g, dtype=torch.float64)
    ref = reference_path(ts, "fixed_small", x_init, g)
    for name, m in mutants.items():
        out, _, _ = run_path(m, "epsilon")
        assert np.abs(out - ref).max() > 1e-4, name
    mu, var = exact_moments(ts, "fixed_small")
    with pytest.raises(AssertionError):
        assert_moments_match(*run_chain(mutants["prev=t-1"], "epsilon", steps), mu, var)


def test_learned_variance_conventions():
    """learned: extra channels are log sigma^2; learned_range: v in [-1, 1] between log beta~ and log beta."""
    steps = 50
    for vt in ("learned", "learned_range"):
        sched = ScratchDDPMScheduler(prediction_type="epsilon", variance_type=vt, clip_sample=False)
        sched.set_timesteps(steps)
        ts = sched.timesteps.tolist()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 1, 200, N // 200, generator=g, dtype=torch.float64)
        for i, t in enumerate(ts):
            a = ABAR[t]
            b = ABAR[ts[i + 1]] if i + 1 < len(ts) else 1.0
            beta = 1 - a / b
            small = (1 - b) / (1 - a) * beta
            target_var = 0.5 * (small + beta)  # a variance between the two fixed choices
            if vt == "learned":
                extra = torch.full_like(x, math.log(target_var))
            else:  # solve v from log var = frac log beta + (1-frac) log beta~
                frac = (math.log(target_var) - math.log(small)) / (math.log(beta) - math.log(small)) if i + 1 < len(ts) else 0.0
                extra = torch.full_like(x, 2 * frac - 1)
            out = torch.cat([optimal_prediction("epsilon", x, a), extra], dim=1)
            x = sched.step(out, t, x, generator=g).prev_sample
        # exact: same recursion with sigma^2 = target_var
        mu, var = 0.0, 1.0
        for i, t in enumerate(ts):
            a = ABAR[t]
            b = ABAR[ts[i + 1]] if i + 1 < len(ts) else 1.0
            d = a * S**2 + 1 - a
            k = math.sqrt(a) * S**2 / d
            c = M - k * math.sqrt(a) * M
            if i + 1 == len(ts):
                mu, var = k * mu + c, k * k * var
                break
            alpha, beta = a / b, 1 - a / b
            prec = 1 / (1 - b) + alpha / beta
            w0, wt = math.sqrt(b) / (1 - b) / prec, math.sqrt(alpha) / beta / prec
            mu, var = (w0 * k + wt) * mu + w0 * c, (w0 * k + wt) ** 2 * var + 0.5 * (1 / prec + beta)
        assert_moments_match(x.mean().item(), x.var().item(), mu, var)


@pytest.mark.parametrize("steps", [10, 50])
def test_analytic_variance_recovers_the_data_distribution_in_few_steps(steps):
    """With Gamma_t = E||E[eps|x_t]||^2 = (1 - abar)/D exact for Gaussian data, sigma^2 is the true reverse
    variance beta~ + c0^2 Var(x_0|x_t), Var(x_0|x_t) = S^2 (1 - abar) / D: each step is then the exact reverse
    conditional, so even a 10-step chain returns N(M, S^2), where the fixed variances do not."""
    gamma = (1 - ABAR) / (ABAR * S**2 + 1 - ABAR)
    sched = ScratchDDPMScheduler(variance_type="analytic", analytic_gamma=gamma.tolist(), clip_sample=False)
    sched.set_timesteps(steps)
    mean, var = run_chain(sched, "epsilon", steps)
    # x_T ~ N(0, 1) instead of q(x_T) = N(sqrt(abar_T) M, 1 - abar_T (1 - S^2)) moves the result by ~abar_T ~ 1e-4,
    # far below the tolerance
    assert_moments_match(mean, var, M, S**2)
    fixed = ScratchDDPMScheduler(clip_sample=False)
    fixed.set_timesteps(steps)
    with pytest.raises(AssertionError):
        assert_moments_match(*run_chain(fixed, "epsilon", steps), M, S**2)

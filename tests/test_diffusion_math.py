"""diffusion_math against independent float64 derivations (Bayes' rule, closed forms) and diffusers' tables."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ddpm_from_scratch import diffusion_math as dm

T = 1000


def bayes_posterior(abar_t, abar_s, x0, xt):
    """q(x_s | x_t, x_0) for s < t by multiplying the Gaussians q(x_t|x_s) and q(x_s|x_0) (completing the square)."""
    alpha = abar_t / abar_s  # q(x_t | x_s) = N(sqrt(alpha) x_s, 1 - alpha)
    beta = 1.0 - alpha
    prec = 1.0 / (1.0 - abar_s) + alpha / beta
    mean = (math.sqrt(abar_s) * x0 / (1.0 - abar_s) + math.sqrt(alpha) * xt / beta) / prec
    return mean, 1.0 / prec


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"])
def test_posterior_matches_bayes_rule_for_every_schedule(schedule):
    betas = dm.beta_schedule(schedule, T, 1e-4, 0.02)
    abar = dm.alphas_cumprod(betas)
    rng = np.random.default_rng(0)
    for t in [1, 2, 10, 500, 998, 999]:
        x0, xt = rng.normal(size=2)
        c0, ct = dm.posterior_mean_coefficients(abar[t].item(), abar[t - 1].item())
        var = dm.posterior_variance(abar[t].item(), abar[t - 1].item())
        mean_ref, var_ref = bayes_posterior(abar[t].item(), abar[t - 1].item(), x0, xt)
        assert c0 * x0 + ct * xt == pytest.approx(mean_ref, rel=1e-10, abs=1e-12)
        assert var == pytest.approx(var_ref, rel=1e-10)
        # the variance is beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t of the note
        assert var == pytest.approx((1 - abar[t - 1].item()) / (1 - abar[t].item()) * betas[t].item(), rel=1e-10)


def test_respaced_posterior_matches_bayes_rule_and_chain_coefficients():
    abar = dm.alphas_cumprod(dm.beta_schedule("linear", T))
    visited = torch.tensor([999, 700, 333, 40, 0])
    tab = dm.chain_coefficients(abar[visited])
    rng = np.random.default_rng(1)
    for i in range(len(visited) - 1):
        t, s = visited[i].item(), visited[i + 1].item()
        x0, xt = rng.normal(size=2)
        mean_ref, var_ref = bayes_posterior(abar[t].item(), abar[s].item(), x0, xt)
        mean = tab.coef_x0[i].item() * x0 + tab.coef_xt[i].item() * xt
        assert mean == pytest.approx(mean_ref, rel=1e-10, abs=1e-12)
        assert tab.posterior_variance[i].item() == pytest.approx(var_ref, rel=1e-10)
        assert tab.beta[i].item() == pytest.approx(1 - abar[t].item() / abar[s].item(), rel=1e-12)
    # last step goes to x_0 exactly: mean = x_0 coefficient 1 when abar_prev = 1, variance 0
    assert tab.posterior_variance[-1].item() == 0.0
    assert tab.coef_x0[-1].item() == pytest.approx(1.0)
    assert tab.coef_xt[-1].item() == pytest.approx(0.0, abs=1e-15)
    # the clipped log variance replaces -inf on the last step by the previous step's value
    assert tab.posterior_log_variance_clipped[-1] == tab.posterior_log_variance_clipped[-2]


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"])
def test_schedules_match_diffusers_tables(schedule):
    ref = DDPMScheduler(beta_schedule=schedule, beta_start=1e-4, beta_end=0.02)
    betas = dm.beta_schedule(schedule, T, 1e-4, 0.02)
    assert betas.dtype == torch.float64
    torch.testing.assert_close(betas.float(), ref.betas, rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(dm.alphas_cumprod(betas).float(), ref.alphas_cumprod, rtol=1e-4, atol=1e-8)


def test_linear_and_cosine_closed_forms():
    betas = dm.beta_schedule("linear", T, 1e-4, 0.02)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    np.testing.assert_allclose(np.diff(betas.numpy()), (0.02 - 1e-4) / (T - 1), rtol=1e-9)
    # cosine: abar_t = f((t+1)/T) / f(0) with f(s) = cos^2((s+0.008)/1.008 pi/2) wherever beta is not capped
    abar = dm.alphas_cumprod(dm.beta_schedule("squaredcos_cap_v2", T)).numpy()
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in [0, 10, 500, 900]:
        assert abar[t] == pytest.approx(f((t + 1) / T) / f(0.0), rel=1e-10)


def test_zero_terminal_snr_rescaling():
    betas = dm.beta_schedule("scaled_linear", T, 0.00085, 0.012)
    rescaled = dm.rescale_zero_terminal_snr(betas)
    abar, abar_new = dm.alphas_cumprod(betas), dm.alphas_cumprod(rescaled)
    assert abar_new[-1].item() == pytest.approx(0.0, abs=1e-20)
    assert abar_new[0].item() == pytest.approx(abar[0].item(), rel=1e-12)
    # sqrt(abar) is an affine map of the original sqrt(abar)
    a, b = np.polyfit(abar.sqrt().numpy(), abar_new.sqrt().numpy(), 1)
    np.testing.assert_allclose(a * abar.sqrt().numpy() + b, abar_new.sqrt().numpy(), atol=1e-12)
    # diffusers' own rescaling run in float64 is the reference (its float32 run differs by cancellation, ~2e-4 rel)
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale

    torch.testing.assert_close(rescaled, diffusers_rescale(betas.clone()), rtol=1e-10, atol=1e-14)


def test_prediction_conversions_are_consistent():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    for abar in [0.9999, 0.5, 1e-4]:
        sa, s1 = math.sqrt(abar), math.sqrt(1 - abar)
        xt = dm.q_sample(x0, eps, sa, s1)
        v = dm.velocity(x0, eps, sa, s1)
        torch.testing.assert_close(dm.x0_from_eps(xt, eps, 1 / sa, s1), x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(dm.x0_from_v(xt, v, sa, s1), x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(dm.eps_from_x0(xt, x0, sa, s1), eps, rtol=1e-7, atol=1e-7)
        for kind, out in [("epsilon", eps), ("sample", x0), ("v_prediction", v)]:
            row = dm.chain_coefficients(torch.tensor([abar, 0.99999], dtype=torch.float64))  # the step at abar, to a later one
            torch.testing.assert_close(dm.x0_from_model_output(kind, out, xt, row.at([0], xt.dim())), x0, rtol=1e-7, atol=1e-7)


def test_dynamic_threshold_matches_definition():
    x = torch.linspace(-3, 3, 2 * 100).reshape(2, 1, 10, 10)
    x[1] *= 0.5  # second sample mostly inside [-1, 1]
    out = dm.dynamic_threshold(x, 0.9, 2.5)
    for i in range(2):
        s = float(np.clip(np.quantile(np.abs(x[i].numpy()), 0.9), 1.0, 2.5))
        np.testing.assert_allclose(out[i].numpy(), np.clip(x[i].numpy(), -s, s) / s, rtol=1e-6)

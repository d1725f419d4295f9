"""The variational bound and the analytic variance against independent truth.

- Gaussian KL and the discretized decoder: numerical integration / scipy.stats.
- The bound: data on the 8-bit grid with an empirical marginal distribution P (1000 scalars), and the EXACT
  optimal denoiser for it (E[x_0|x_t] is a softmax over the 256 atoms). Every op of the bound is elementwise,
  so bits/dim is the 1-D bound of P; any 1-D model has E_P[-log p(x_0)] >= H(P), hence bound >= H(P) (up to
  the Monte Carlo error of the x_t draws only: the data expectation is exact). More steps must tighten it.
- Analytic variance: Gaussian data N(m, s^2), whose true reverse conditional q(x_{t-1}|x_t) is Gaussian with
  variance V_prev (1 - alpha) / V_t (V = abar s^2 + 1 - abar), computed from the joint covariance only.
- Sampling: our reverse chain against diffusers.DDPMScheduler step by step with the same noise.
"""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch import nn

from ddpm_from_scratch import ScratchDDPMScheduler
from ddpm_from_scratch import diffusion_math as dm
from ddpm_from_scratch import likelihood as L

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------
# Analytic models
# ----------------------------------------------------------------------------------------------
class AtomDenoiser(nn.Module):
    """Exact E[eps|x_t] for elementwise-independent data with marginal P over atoms (K,), float64."""

    def __init__(self, atoms, probs, abar):
        super().__init__()
        self.register_buffer("atoms", torch.as_tensor(atoms, dtype=torch.float64))
        self.register_buffer("log_p", torch.as_tensor(probs, dtype=torch.float64).log())
        self.register_buffer("abar", torch.as_tensor(abar, dtype=torch.float64))
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64), requires_grad=False)

    def forward(self, x_t, t):
        a = self.abar[t].view(-1, *([1] * (x_t.dim() - 1)))
        x = x_t.to(torch.float64)
        logits = self.log_p - (x.unsqueeze(-1) - a.sqrt().unsqueeze(-1) * self.atoms) ** 2 / (2 * (1 - a).unsqueeze(-1))
        x0 = (torch.softmax(logits, dim=-1) * self.atoms).sum(-1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()


class GaussianDenoiser(nn.Module):
    """Exact E[eps|x_t] for data N(m, s^2) per element: sqrt(1-a)(x_t - sqrt(a) m) / (a s^2 + 1 - a)."""

    def __init__(self, m, s, abar):
        super().__init__()
        self.m, self.s = m, s
        self.register_buffer("abar", torch.as_tensor(abar, dtype=torch.float64))
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64), requires_grad=False)

    def forward(self, x_t, t):
        a = self.abar[t].view(-1, *([1] * (x_t.dim() - 1)))
        return (1 - a).sqrt() * (x_t.double() - a.sqrt() * self.m) / (a * self.s**2 + 1 - a)


def _discrete_data(n=1000, m=0.1, s=0.3, seed=0):
    """n scalars of a discretized N(m, s^2) on the 8-bit grid, as images (n/4, 1, 2, 2); and their empirical P."""
    rng = np.random.default_rng(seed)
    x = np.clip(np.round((rng.normal(m, s, n) + 1) * 127.5), 0, 255) / 127.5 - 1
    atoms, counts = np.unique(x, return_counts=True)
    probs = counts / n
    entropy_bits = float(-(probs * np.log(probs)).sum() / LN2)
    return torch.tensor(x).view(-1, 1, 2, 2), atoms, probs, entropy_bits


# ----------------------------------------------------------------------------------------------
# The terms, against numerical integration
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m1,v1,m2,v2", [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 2.0), (1.5, 0.01, 1.4, 0.02)])
def test_normal_kl_matches_integration(m1, v1, m2, v2):
    p, q = stats.norm(m1, math.sqrt(v1)), stats.norm(m2, math.sqrt(v2))
    sd = math.sqrt(v1)
    expected, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), m1 - 12 * sd, m1 + 12 * sd,
                                 epsabs=1e-12, limit=200)
    got = dm.normal_kl(torch.tensor(m1, dtype=torch.float64), torch.tensor(math.log(v1), dtype=torch.float64),
                       torch.tensor(m2, dtype=torch.float64), torch.tensor(math.log(v2), dtype=torch.float64))
    assert float(got) == pytest.approx(expected, rel=1e-7, abs=1e-10)


@pytest.mark.parametrize("mean,std", [(0.0, 0.5), (0.7, 0.01), (-0.99, 0.003), (0.2, 3.0)])
def test_discretized_likelihood_matches_bin_integrals(mean, std):
    grid = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    got = dm.discretized_gaussian_log_likelihood(grid, torch.full_like(grid, mean), torch.full_like(grid, math.log(std))).exp()
    edges = np.concatenate([[-np.inf], (grid[:-1].numpy() + grid[1:].numpy()) / 2, [np.inf]])
    expected = np.array([integrate.quad(stats.norm(mean, std).pdf, lo, hi, points=[mean] if lo < mean < hi else None)[0]
                         if np.isfinite(lo) and np.isfinite(hi) else
                         stats.norm(mean, std).cdf(hi) - stats.norm(mean, std).cdf(lo) for lo, hi in zip(edges[:-1], edges[1:])])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-12)
    assert float(got.sum()) == pytest.approx(1.0, abs=1e-9)


def test_prior_term_is_kl_to_standard_normal():
    x0 = torch.tensor([[-1.0, 0.0, 0.5, 1.0]], dtype=torch.float64)
    abar = 0.01
    got = L.prior_bpd(x0, abar)
    expected = np.mean([integrate.quad(lambda x: stats.norm(math.sqrt(abar) * v, math.sqrt(1 - abar)).pdf(x)
                                       * (stats.norm(math.sqrt(abar) * v, math.sqrt(1 - abar)).logpdf(x) - stats.norm().logpdf(x)),
                                       -12, 12)[0] for v in x0[0].tolist()]) / LN2
    assert float(got) == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# The bound with the exact optimal denoiser
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def discrete_setup():
    images, atoms, probs, entropy = _discrete_data()
    sched = ScratchDDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    model = AtomDenoiser(atoms, probs, sched.full_chain.abar)
    return images, sched, model, entropy


@pytest.mark.parametrize("variance_type", ["fixed_large", "fixed_small"])
def test_bound_is_above_exact_nll_and_tightens_with_steps(discrete_setup, variance_type):
    """fixed_small is far looser on 8-bit data with short chains (its beta~ is tiny next to the x_0 uncertainty),
    fixed_large comes within a few tenths of a bit with 100 steps; both must be valid and tighten."""
    images, sched, model, entropy = discrete_setup
    images = images.repeat(2, 1, 1, 1)  # two x_t draws per scalar
    gaps, errs = [], []
    for steps in (4, 20, 100):
        res = L.bits_per_dim(model, sched, images, num_inference_steps=steps, batch_size=2000,
                             variance_type=variance_type, generator=torch.Generator().manual_seed(steps))
        assert res.total == pytest.approx(res.prior + float(res.terms.sum()), abs=1e-12)
        assert res.decoder == float(res.terms[-1])
        gaps.append(res.total - entropy)
        errs.append(res.stderr)
    # valid bound (the data expectation is exact; only x_t is sampled)
    assert all(g > -3 * e for g, e in zip(gaps, errs)), (gaps, errs)
    # tightens as the chain gets longer
    assert gaps[0] > gaps[1] + 3 * errs[1] and gaps[1] > gaps[2] + 3 * errs[2], (gaps, errs)
    if variance_type == "fixed_large":
        assert gaps[2] < 0.35, gaps


def test_respaced_chain_uses_scheduler_timesteps_and_effective_betas(discrete_setup):
    images, sched, model, _ = discrete_setup
    res = L.bits_per_dim(model, sched, images[:8], num_inference_steps=10, generator=torch.Generator().manual_seed(0))
    probe = ScratchDDPMScheduler(num_train_timesteps=1000)
    probe.set_timesteps(10)
    assert res.timesteps.tolist() == probe.timesteps.tolist()
    assert res.terms.shape == (10,)
    abar_T = sched.full_chain.abar[probe.timesteps[0]]
    assert res.prior == pytest.approx(float(L.prior_bpd(L.quantize_8bit(images[:8]), abar_T).mean()), rel=1e-12)
    tab = L.chain(sched, probe.timesteps)
    ab = sched.full_chain.abar[probe.timesteps]
    np.testing.assert_allclose(tab.beta[:-1].numpy(), (1 - ab[:-1] / ab[1:]).numpy(), rtol=1e-12)


def test_analytic_variance_gives_the_smallest_kl_terms(discrete_setup):
    """With the optimal mean, sigma*^2 minimises E KL(q(x_{t-1}|x_t,x_0) || p) (Bao et al. 2022): paired comparison."""
    images, sched, model, _ = discrete_setup
    gamma = L.estimate_analytic_gamma(model, sched, images.repeat(4, 1, 1, 1), timesteps=torch.arange(0, 1000, 50).tolist() + [999],
                                      batch_size=1000, generator=torch.Generator().manual_seed(1))
    kl = {}
    for vt in ("fixed_small", "fixed_large", "analytic"):
        res = L.bits_per_dim(model, sched, images, num_inference_steps=10, batch_size=1000, variance_type=vt,
                             analytic_gamma=gamma, generator=torch.Generator().manual_seed(2))
        kl[vt] = float(res.terms[:-1].sum())
    assert kl["analytic"] < kl["fixed_small"] and kl["analytic"] < kl["fixed_large"], kl


# ----------------------------------------------------------------------------------------------
# Analytic variance equals the exact optimal one (Gaussian data)
# ----------------------------------------------------------------------------------------------
def _exact_reverse_variance(abar_t, abar_prev, s):
    """Var(x_{t-1} | x_t) for x_0 ~ N(m, s^2): from the joint covariance of (x_{t-1}, x_t) only."""
    v_prev = abar_prev * s**2 + 1 - abar_prev
    v_t = abar_t * s**2 + 1 - abar_t
    alpha = abar_t / abar_prev
    return v_prev * (1 - alpha) / v_t


def test_analytic_variance_formula_with_exact_gamma_is_the_true_reverse_variance():
    s = 0.4  # the data std (its mean does not enter the reverse variance)
    sched = ScratchDDPMScheduler(num_train_timesteps=1000)
    abar = sched.full_chain.abar
    gamma = (1 - abar) / (abar * s**2 + 1 - abar)  # E||E[eps|x_t]||^2 / d for Gaussian data
    for steps in (None, 10):
        ts = L.visited_timesteps(sched, steps)
        tab = L.chain(sched, ts, analytic_gamma=gamma)
        exact = _exact_reverse_variance(tab.abar[:-1], tab.abar_prev[:-1], s)
        np.testing.assert_allclose(tab.log_analytic_variance.exp()[:-1].numpy(), exact.numpy(), rtol=1e-9)


def test_estimated_analytic_variance_matches_exact():
    """Monte Carlo Gamma from the exact Gaussian denoiser -> sigma*^2 within MC error of the true reverse variance.
    (Probe steps where 1 - Gamma is not tiny: there the relative MC error of sigma*^2 stays at a few percent.)"""
    m, s = 0.1, 0.8
    sched = ScratchDDPMScheduler(num_train_timesteps=1000)
    model = GaussianDenoiser(m, s, sched.full_chain.abar)
    x0 = (m + s * torch.randn(10000, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    probe = [299, 199, 99, 49, 9]
    gamma = L.estimate_analytic_gamma(model, sched, x0, timesteps=probe, batch_size=10000,
                                      generator=torch.Generator().manual_seed(1))
    abar = sched.full_chain.abar
    exact_gamma = (1 - abar) / (abar * s**2 + 1 - abar)
    np.testing.assert_allclose(gamma[probe].numpy(), exact_gamma[probe].numpy(), rtol=0.03)
    tab = L.chain(sched, torch.tensor(probe), analytic_gamma=gamma)
    exact = _exact_reverse_variance(tab.abar[:-1], tab.abar_prev[:-1], s)
    np.testing.assert_allclose(tab.log_analytic_variance.exp()[:-1].numpy(), exact.numpy(), rtol=0.03)
    # and it differs clearly from beta~ on these big steps (the estimate carries information)
    assert bool((exact > 1.5 * tab.posterior_variance[:-1]).all())


def test_analytic_gamma_travels_in_the_scheduler_config(tmp_path):
    sched = ScratchDDPMScheduler(num_train_timesteps=20)
    gamma = torch.linspace(0.1, 0.9, 20, dtype=torch.float64)
    with_g = L.with_analytic_variance(sched, gamma)
    with_g.save_pretrained(tmp_path)
    loaded = ScratchDDPMScheduler.from_pretrained(tmp_path)
    np.testing.assert_allclose(loaded.config[L.ANALYTIC_CONFIG_KEY], gamma.numpy())
    with pytest.raises(ValueError, match="analytic_gamma"):
        L.with_analytic_variance(sched, gamma[:5])


# ----------------------------------------------------------------------------------------------
# Reverse chain and variance types against diffusers / our scheduler
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range", "learned"])
def test_sampling_matches_scheduler_step_loop(variance_type):
    from diffusers import DDPMScheduler

    from ddpm_from_scratch.unet_presets import build_unet

    torch.manual_seed(0)
    unet = build_unet("tiny", in_channels=1, variance_type=variance_type).eval()
    if variance_type == "learned":  # our convention: a log variance; diffusers reads it differently
        ref = ScratchDDPMScheduler(num_train_timesteps=100, variance_type=variance_type)
    else:
        ref = DDPMScheduler(num_train_timesteps=100, variance_type=variance_type)
    ours = ScratchDDPMScheduler(num_train_timesteps=100, variance_type=variance_type)
    got = L.sample_images(unet, ours, 2, 5, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn((2, 1, 8, 8), generator=gen)
    ref.set_timesteps(5)
    with torch.no_grad():
        for t in ref.timesteps:
            out = unet(x, t).sample
            x = ref.step(out, t, x, generator=gen).prev_sample
    torch.testing.assert_close(got, x.clamp(-1, 1), atol=1e-4, rtol=1e-4)  # images in the data range


def test_learned_variance_bound_uses_model_log_variance():
    """'learned': the second half of the channels IS log sigma^2 -> the term equals the closed-form KL with it."""
    rows = L.full_chain(ScratchDDPMScheduler(num_train_timesteps=10)).at(torch.tensor([5]), 4)
    x0 = torch.full((1, 1, 1, 1), 0.3, dtype=torch.float64)
    x_t = torch.full((1, 1, 1, 1), 0.1, dtype=torch.float64)
    eps, log_var = 0.2, -3.0
    out = torch.tensor([eps, log_var], dtype=torch.float64).view(1, 2, 1, 1)
    got = L.vb_terms(out, x0, x_t, rows, prediction_type="epsilon", variance_type="learned")
    a, ap = float(rows.abar), float(rows.abar_prev)
    beta = 1 - a / ap
    x0_hat = (0.1 - math.sqrt(1 - a) * eps) / math.sqrt(a)
    mu = lambda z: math.sqrt(ap) * beta / (1 - a) * z + math.sqrt(1 - beta) * (1 - ap) / (1 - a) * 0.1  # noqa: E731
    var_true = (1 - ap) / (1 - a) * beta
    p, q = stats.norm(mu(0.3), math.sqrt(var_true)), stats.norm(mu(x0_hat), math.exp(0.5 * log_var))
    expected = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -3, 3, points=[mu(0.3)])[0] / LN2
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_bad_arguments_raise():
    sched = ScratchDDPMScheduler(num_train_timesteps=10)
    model = GaussianDenoiser(0.0, 0.5, sched.full_chain.abar)
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="variance_type"):
        L.bits_per_dim(model, sched, x, variance_type="wide")
    with pytest.raises(ValueError, match="analytic_gamma"):
        L.bits_per_dim(model, sched, x, variance_type="analytic")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        L.bits_per_dim(model, sched, x + 3)
    with pytest.raises(ValueError, match="num_inference_steps"):
        L.bits_per_dim(model, sched, x, num_inference_steps=11)
    with pytest.raises(TypeError, match="images"):
        L.bits_per_dim(model, sched, [x])
    with pytest.raises(ValueError, match="variance_type"):  # a learned variance needs a 2C output
        L.bits_per_dim(model, sched, x, variance_type="learned_range")


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned", "learned_range", "analytic"])
def test_sampler_and_bound_use_the_same_reverse_variance(variance_type):
    """dm.reverse_log_variance is the one home of the variance choice: the sigma_t^2 that step() draws with equals
    exp(log sigma^2) of the bound's p_theta, at every step but the last (where the sampler adds no noise)."""
    T = 50
    gamma = np.linspace(0.2, 1.0, T).tolist() if variance_type == "analytic" else None
    sched = ScratchDDPMScheduler(num_train_timesteps=T, variance_type=variance_type, analytic_gamma=gamma, clip_sample=False)
    sched.set_timesteps(7)
    ts = sched.timesteps
    tab = L.chain(sched, ts, analytic_gamma=gamma)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 3, 3, generator=g, dtype=torch.float64)
    learned = variance_type.startswith("learned")
    out = torch.cat([x, torch.rand(1, 1, 3, 3, generator=g, dtype=torch.float64) * 2 - 1], 1) if learned else x
    for i, t in enumerate(ts.tolist()[:-1]):
        _, log_var, _ = L.p_mean_log_variance(out, x, tab.at([i], 4), prediction_type="epsilon", variance_type=variance_type)
        std = sched._std(sched._coefficients(t, x), out[:, 1:] if learned else None)
        torch.testing.assert_close(torch.as_tensor(std, dtype=torch.float64).expand_as(log_var) ** 2, log_var.exp(),
                                   rtol=1e-10, atol=0)

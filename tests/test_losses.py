"""Training objectives: vlb / hybrid against closed-form KLs and the bound, and the importance sampler."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from ddpm_from_scratch import ScratchDDPMScheduler
from ddpm_from_scratch import likelihood as L
from ddpm_from_scratch import losses

LN2 = math.log(2.0)


class LinearEps(nn.Module):
    """eps_hat = k_t x_t (the exact denoiser for zero-mean Gaussian data of variance s^2), returned as ``.sample``."""

    def __init__(self, abar, s=0.5):
        super().__init__()
        self.register_buffer("k", ((1 - abar).sqrt() / (abar * s**2 + 1 - abar)).float())

    def forward(self, x_t, t):
        return SimpleNamespace(sample=self.k[t].view(-1, 1, 1, 1) * x_t)


class FreeOutput(nn.Module):
    """Ignores its input: the model output is a free parameter (B, 2C, H, W), to inspect gradients."""

    def __init__(self, shape):
        super().__init__()
        self.out = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.3)

    def forward(self, x_t, t):
        return SimpleNamespace(sample=self.out)


def test_vlb_loss_is_the_closed_form_kl_and_decoder_nll():
    sched = ScratchDDPMScheduler(num_train_timesteps=50, clip_sample=False)
    abar = sched.full_chain.abar
    model = LinearEps(abar)
    x0 = torch.round((torch.rand(3, 1, 2, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 127.5) / 127.5
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([30, 1, 0])
    out = losses.training_loss(model, sched, x0, loss_type="vlb", timesteps=t, noise=noise)
    for i, ti in enumerate(t.tolist()):
        a = float(abar[ti])
        ap = float(abar[ti - 1]) if ti > 0 else 1.0
        beta = 1 - a / ap
        x0i, ni = x0[i].double().numpy().ravel(), noise[i].double().numpy().ravel()
        xt = math.sqrt(a) * x0i + math.sqrt(1 - a) * ni
        eps_hat = float(model.k[ti]) * np.float32(xt)
        x0_hat = (xt - math.sqrt(1 - a) * eps_hat) / math.sqrt(a)
        c0, ct = math.sqrt(ap) * beta / (1 - a), math.sqrt(1 - beta) * (1 - ap) / (1 - a)
        if ti > 0:
            var = (1 - ap) / (1 - a) * beta
            kl = 0.5 * ((c0 * x0i - c0 * x0_hat) ** 2 / var)  # equal variances: only the mean term
            expected = kl.mean() / LN2
        else:
            var_dec = (1 - float(abar[0])) / (1 - float(abar[1])) * (1 - float(abar[1]) / float(abar[0]))  # beta~_1
            mean = c0 * x0_hat + ct * xt
            sd = math.sqrt(var_dec)
            lo = np.where(x0i < -0.999, -np.inf, x0i - 1 / 255)
            hi = np.where(x0i > 0.999, np.inf, x0i + 1 / 255)
            expected = -np.log(stats.norm.cdf(hi, mean, sd) - stats.norm.cdf(lo, mean, sd)).mean() / LN2
        assert float(out["per_sample"][i]) == pytest.approx(expected, rel=2e-4), ti
    assert torch.equal(out["vlb"], out["per_sample"].detach())


def test_vlb_loss_averages_to_the_bits_per_dim_terms():
    """E_eps[vlb loss at t] is the bound's term of the step from t: same concept, one function."""
    sched = ScratchDDPMScheduler(num_train_timesteps=8, clip_sample=False)
    model = LinearEps(sched.full_chain.abar)
    x0 = torch.round((torch.rand(1, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 127.5) / 127.5
    reps = 4000
    data = x0.repeat(reps, 1, 1, 1)
    res = L.bits_per_dim(model, sched, data, batch_size=reps, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    for i, t in enumerate(res.timesteps.tolist()):
        out = losses.training_loss(model, sched, data, loss_type="vlb", timesteps=torch.full((reps,), t), generator=gen)
        v = out["per_sample"].double()
        se = math.hypot(float(v.std()), float(res.per_image.std() if False else 0.0)) / math.sqrt(reps)
        assert float(v.mean()) == pytest.approx(float(res.terms[i]), abs=5 * se * math.sqrt(2) + 1e-6), t


def test_hybrid_trains_the_mean_by_mse_and_the_variance_by_the_bound():
    sched = ScratchDDPMScheduler(num_train_timesteps=100, variance_type="learned_range", clip_sample=False)
    x0 = torch.rand(4, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 10, 50, 99])
    model = FreeOutput((4, 2, 2, 2))
    hybrid = losses.training_loss(model, sched, x0, loss_type="hybrid", timesteps=t, noise=noise)
    simple = losses.training_loss(model, sched, x0, loss_type="simple", timesteps=t, noise=noise)
    vlb = losses.training_loss(model, sched, x0, loss_type="vlb", timesteps=t, noise=noise)
    torch.testing.assert_close(hybrid["per_sample"], simple["per_sample"] + 0.001 * 100 * vlb["per_sample"])
    g_h = torch.autograd.grad(hybrid["loss"], model.out)[0]
    g_s = torch.autograd.grad(simple["loss"], model.out)[0]
    g_v = torch.autograd.grad(vlb["loss"], model.out)[0]
    torch.testing.assert_close(g_h[:, :1], g_s[:, :1])  # the mean sees only the MSE
    torch.testing.assert_close(g_h[:, 1:], 0.1 * g_v[:, 1:])  # the variance sees only lambda T L_vlb
    assert float(g_v[:, :1].abs().sum()) > 0  # (whereas plain vlb trains the mean too)


def test_loss_argument_errors():
    fixed = ScratchDDPMScheduler(num_train_timesteps=10)
    model = LinearEps(fixed.full_chain.abar)
    x0 = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="loss_type"):
        losses.training_loss(model, fixed, x0, loss_type="kl")
    with pytest.raises(ValueError, match="variance_type"):
        losses.training_loss(model, fixed, x0, loss_type="hybrid")
    with pytest.raises(ValueError, match="snr_gamma"):
        losses.training_loss(model, fixed, x0, loss_type="vlb", snr_gamma=5.0)
    with pytest.raises(ValueError, match="history"):
        losses.ImportanceTimestepSampler(10, history=0)


def test_importance_sampler_uniform_until_filled_then_rms_weighted():
    T, hist, u = 5, 10, 0.001
    s = losses.ImportanceTimestepSampler(T, history=hist, uniform_prob=u)
    rng = np.random.default_rng(0)
    scale = np.array([0.1, 0.5, 1.0, 2.0, 4.0])
    seen = {t: [] for t in range(T)}
    for step in range(hist * T + 7):
        t = step % T if step < hist * T - 1 else (step % T if step < hist * T + 2 else 0)
        if step == hist * T - 1:  # last slot of the last t still empty: still uniform
            np.testing.assert_allclose(s.probabilities().numpy(), np.full(T, 1 / T))
            assert not s.warmed_up
        loss = float(scale[t] * rng.normal())
        seen[t].append(loss)
        s.update(torch.tensor([t]), torch.tensor([loss], dtype=torch.float64))
    assert s.warmed_up
    rms = np.array([np.sqrt(np.mean(np.square(seen[t][-hist:]))) for t in range(T)])  # only the last 10 count
    expected = (1 - u) * rms / rms.sum() + u / T
    np.testing.assert_allclose(s.probabilities().numpy(), expected, rtol=1e-12)
    t_draw, w = s.sample(40000, generator=torch.Generator().manual_seed(0))
    freq = np.bincount(t_draw.numpy(), minlength=T) / 40000
    np.testing.assert_allclose(freq, expected, atol=0.01)
    np.testing.assert_allclose(w.numpy(), 1 / (T * expected[t_draw.numpy()]), rtol=1e-6)
    # unbiased: E_{t~p}[w_t f(t)] = mean_t f(t)
    f = np.arange(T) ** 2.0
    assert float((expected * (1 / (T * expected)) * f).sum()) == pytest.approx(f.mean())
    # checkpointing round trip
    s2 = losses.ImportanceTimestepSampler(T, history=hist, uniform_prob=u)
    s2.load_state_dict(s.state_dict())
    np.testing.assert_allclose(s2.probabilities().numpy(), expected, rtol=1e-12)


def test_training_loss_with_sampler_weights_and_updates():
    sched = ScratchDDPMScheduler(num_train_timesteps=10, clip_sample=False)
    model = LinearEps(sched.full_chain.abar)
    sampler = losses.ImportanceTimestepSampler(10, history=1)
    x0 = torch.rand(64, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        out = losses.training_loss(model, sched, x0, loss_type="vlb", timestep_sampler=sampler, generator=gen)
    assert sampler.warmed_up
    probs = sampler.probabilities()
    assert float(probs.max() / probs.min()) > 1.5  # no longer uniform
    out = losses.training_loss(model, sched, x0, loss_type="vlb", timestep_sampler=sampler, generator=gen)
    w = 1 / (10 * probs[out["timesteps"]])
    torch.testing.assert_close(out["per_sample"], out["vlb"] * w.float())


def test_min_snr_weight_closed_form_and_zero_terminal_snr():
    """w = min(snr, gamma) / snr (eps), min(snr, gamma) (x_0), min(snr, gamma) / (snr + 1) (v); at snr = 0
    (zero terminal SNR) the epsilon weight is its limit 1, not 0/0."""
    from ddpm_from_scratch.losses import min_snr_weight

    snr = torch.tensor([0.0, 1.0, 10.0], dtype=torch.float64)
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "sample"), torch.tensor([0.0, 1.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v_prediction"),
                               torch.tensor([0.0, 0.5, 5.0 / 11.0], dtype=torch.float64))

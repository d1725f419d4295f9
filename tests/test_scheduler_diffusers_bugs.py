"""Where diffusers 0.42.1's DDPMScheduler is wrong, ScratchDDPMScheduler is right. Each test shows both.

If a future diffusers fixes one of these, its `diffusers_*` assertion fails: drop that half of the test then.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ddpm_from_scratch import ScratchDDPMScheduler


def test_fixed_large_log_is_sqrt_beta_not_nan():
    """diffusers issue 14569: fixed_large_log takes the square root of a log variance -> NaN."""
    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    ref = DDPMScheduler(variance_type="fixed_large_log")
    ref.set_timesteps(10)
    t = int(ref.timesteps[0])
    assert torch.isnan(ref.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample).any()

    ours, large = ScratchDDPMScheduler(variance_type="fixed_large_log"), ScratchDDPMScheduler(variance_type="fixed_large")
    for s in (ours, large):
        s.set_timesteps(10)
    a = ours.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    b = large.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b)  # exp(0.5 log beta) = sqrt(beta)


@pytest.mark.parametrize("n", [61, 103, 121])
def test_trailing_spacing_gives_exactly_n_timesteps(n):
    ref = DDPMScheduler(timestep_spacing="trailing")
    ref.set_timesteps(n)
    assert len(ref.timesteps) == n + 1 and ref.timesteps[-1].item() == -1  # diffusers' off-by-one

    ours = ScratchDDPMScheduler(timestep_spacing="trailing")
    ours.set_timesteps(n)
    ts = ours.timesteps.numpy()
    assert len(ts) == n and ts[0] == 999 and ts.min() >= 0 and np.all(np.diff(ts) < 0)
    # the first n entries agree with diffusers; the bogus -1 is gone
    assert ts.tolist() == ref.timesteps[:n].tolist()
    # trailing: within rounding of the exact T - i T / n - 1
    assert np.all(np.abs(ts - (1000 - np.arange(n) * 1000 / n - 1)) <= 0.5)


def test_leading_with_offset_past_last_timestep_is_a_clear_error():
    ref = DDPMScheduler(steps_offset=1)
    ref.set_timesteps(1000)
    assert ref.timesteps[0].item() == 1000  # past the table
    with pytest.raises(IndexError):
        ref.step(torch.zeros(1, 1, 2, 2), ref.timesteps[0], torch.zeros(1, 1, 2, 2))

    with pytest.raises(ValueError, match="steps_offset=1"):
        ScratchDDPMScheduler(steps_offset=1).set_timesteps(1000)
    ok = ScratchDDPMScheduler(steps_offset=1)
    ok.set_timesteps(500)
    assert ok.timesteps[0].item() == 999


def test_zero_inference_steps_is_rejected():
    ref = DDPMScheduler(timestep_spacing="linspace")
    ref.set_timesteps(0)  # accepted: an empty schedule ('leading' dies with ZeroDivisionError instead)
    assert len(ref.timesteps) == 0
    with pytest.raises(ValueError, match="num_inference_steps"):
        ScratchDDPMScheduler().set_timesteps(0)


def test_zero_terminal_snr_with_epsilon_is_an_error_not_nan():
    cfg = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False)
    ref = DDPMScheduler(**cfg)
    ref.set_timesteps(10)
    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    out = ref.step(eps, ref.timesteps[0], x, generator=torch.Generator().manual_seed(0)).pred_original_sample
    assert not torch.isfinite(out).all()  # x_0 = (x - eps) / 0

    with pytest.raises(ValueError, match="v_prediction"):
        ScratchDDPMScheduler(**cfg).set_timesteps(10)
    # v-prediction is well defined at zero SNR: x_0 = -v
    ours = ScratchDDPMScheduler(prediction_type="v_prediction", **cfg)
    ours.set_timesteps(10)
    res = ours.step(eps, ours.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.pred_original_sample, -eps)
    assert torch.isfinite(res.prev_sample).all()
    # and 'leading' never visits t = T-1, so epsilon stays usable there
    lead = ScratchDDPMScheduler(rescale_betas_zero_snr=True)
    lead.set_timesteps(10)
    assert lead.timesteps[0].item() < 999


def test_learned_variance_is_a_log_variance():
    """diffusers reads the 'learned' channels as a raw variance: a negative network output gives NaN.
    We follow Improved DDPM: the channels are log sigma^2, so any real output is a valid variance."""
    x = torch.zeros(1, 1, 64, 64)
    out = torch.cat([torch.zeros_like(x), torch.full_like(x, math.log(0.25))], dim=1)
    ref = DDPMScheduler(variance_type="learned")
    ref.set_timesteps(10)
    t = int(ref.timesteps[0])
    assert torch.isnan(ref.step(out, t, x, generator=torch.Generator().manual_seed(0)).prev_sample).all()
    ours = ScratchDDPMScheduler(variance_type="learned")
    ours.set_timesteps(10)
    prev = ours.step(out, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert prev.std().item() == pytest.approx(0.5, rel=0.05)  # sigma = exp(0.5 log 0.25)


def test_no_noise_on_the_last_step_even_when_it_starts_above_t0():
    """Algorithm 2 adds no noise on the step to x_0. With 'leading' spacing and steps_offset=1 (Stable Diffusion's
    config) the last visited timestep is t=1; diffusers decides by `t > 0` and adds noise there (fixed_large:
    std sqrt(1 - abar_1)), so its final images are noisy and its generator is one draw further along. Ours returns
    the posterior mean, which on the last step is the predicted x_0."""
    x, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    for cls in (DDPMScheduler, ScratchDDPMScheduler):
        s = cls(variance_type="fixed_large", steps_offset=1)
        s.set_timesteps(10)
        assert s.timesteps[-1].item() == 1
    ref = DDPMScheduler(variance_type="fixed_large", steps_offset=1)
    ref.set_timesteps(10)
    out = ref.step(eps, ref.timesteps[-1], x, generator=torch.Generator().manual_seed(0))
    assert (out.prev_sample - out.pred_original_sample).abs().max().item() > 1e-3  # noise added to x_0

    ours = ScratchDDPMScheduler(variance_type="fixed_large", steps_offset=1)
    ours.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    mine = ours.step(eps, ours.timesteps[-1], x, generator=g)
    torch.testing.assert_close(mine.prev_sample, mine.pred_original_sample)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())  # no draw


def test_betas_above_one_are_an_error_not_nan():
    """diffusers' test_betas uses beta_start=0.1, beta_end=2: betas > 1 make alpha_t < 0, abar changes sign, and every
    step past t ~ 300 is NaN (its test only steps at t = 0). Ours refuses the schedule, naming beta_end."""
    ref = DDPMScheduler(beta_start=0.1, beta_end=2)
    x = torch.ones(1, 1, 2, 2)
    assert torch.isfinite(ref.step(0.1 * x, 0, x, generator=torch.Generator().manual_seed(0)).prev_sample).all()
    assert torch.isnan(ref.step(0.1 * x, 999, x, generator=torch.Generator().manual_seed(0)).prev_sample).all()
    with pytest.raises(ValueError, match=r"beta_end must be a number in the open interval \(0, 1\)"):
        ScratchDDPMScheduler(beta_start=0.1, beta_end=2)


def test_unknown_variance_type_is_an_error_not_fixed_small():
    """diffusers' test_variance_type passes variance_type='other': diffusers silently samples with fixed_small."""
    x, eps = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    other, small = DDPMScheduler(variance_type="other"), DDPMScheduler()
    for t in (999, 500):
        torch.testing.assert_close(other.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample,
                                   small.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample)
    with pytest.raises(ValueError, match="variance_type must be one of .*fixed_small.*got 'other'"):
        ScratchDDPMScheduler(variance_type="other")


def test_trained_betas_length_is_carried_through():
    """diffusers takes the betas from trained_betas but keeps num_train_timesteps=1000: len() is 1000, timesteps
    start at 999, and the first step is an IndexError. Ours takes the length from trained_betas everywhere."""
    ref = DDPMScheduler(trained_betas=[0.1, 0.3])
    assert len(ref) == 1000 and ref.timesteps[0].item() == 999
    x = torch.ones(1, 1, 2, 2)
    with pytest.raises(IndexError):
        ref.step(x, ref.timesteps[0], x)
    ours = ScratchDDPMScheduler(trained_betas=[0.1, 0.3])
    assert len(ours) == 2 and ours.timesteps.tolist() == [1, 0]
    assert torch.isfinite(ours.step(0.1 * x, ours.timesteps[0], x).prev_sample).all()
    # an explicit, different num_train_timesteps cannot both hold: an error naming both
    with pytest.raises(ValueError, match="trained_betas has 2 values but num_train_timesteps=10"):
        ScratchDDPMScheduler(num_train_timesteps=10, trained_betas=[0.1, 0.3])


def test_zero_terminal_snr_with_epsilon_on_the_full_chain():
    """Without set_timesteps the full chain starts at t = T-1, where zero-SNR gives abar = 0: diffusers returns inf
    there (or, with clip_sample, the sign of x_t - eps as "x_0"); ours raises at that step (host or device path) and
    steps like diffusers everywhere else."""
    cfg = dict(rescale_betas_zero_snr=True, clip_sample=False)
    ref, ours = DDPMScheduler(**cfg), ScratchDDPMScheduler(**cfg)
    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    out = ref.step(eps, 999, x, generator=torch.Generator().manual_seed(0)).pred_original_sample
    assert not torch.isfinite(out).all()
    with pytest.raises(ValueError, match="abar_t = 0"):
        ours.step(eps, 999, x)
    ours._host_lookup = False
    with pytest.raises(ValueError, match="abar_t = 0"):
        ours.step(eps.expand(2, 3, 4, 4), torch.tensor([999, 5]), x.expand(2, 3, 4, 4))
    ours._host_lookup = True
    for t in (998, 0):
        torch.testing.assert_close(ours.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample,
                                   ref.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample,
                                   rtol=1e-4, atol=1e-4)


def test_get_variance_forms_where_the_conventions_differ():
    """_get_variance returns diffusers' form for every type. For 'learned' the channels are a log variance here
    (Improved DDPM), so the variance is exp(channels); diffusers returns the channels themselves. For
    fixed_large_log diffusers' form is log beta_t (which its step then square-roots into NaN); ours is the same
    log beta_t, and its step uses exp(0.5 log beta_t)."""
    ours, ref = ScratchDDPMScheduler(variance_type="learned"), DDPMScheduler(variance_type="learned")
    v = torch.full((1, 1, 2, 2), -3.0)
    torch.testing.assert_close(ours._get_variance(500, predicted_variance=v), v.exp())
    assert torch.equal(ref._get_variance(500, predicted_variance=v), v)
    ours, ref = ScratchDDPMScheduler(variance_type="fixed_large_log"), DDPMScheduler(variance_type="fixed_large_log")
    torch.testing.assert_close(ours._get_variance(500), ref._get_variance(500), rtol=1e-5, atol=0)

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

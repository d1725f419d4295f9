"""Drop-in behaviour that diffusers' own DDPM scheduler tests rely on, written here (docs/compat.md lists them).

The reference is diffusers.DDPMScheduler itself, or a float64 chain written in this file from the formulas.
"""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ddpm_from_scratch import ScratchDDPMScheduler

from test_scheduler import CountScalarReads

PREDICTIONS = ["epsilon", "sample", "v_prediction"]
# every variance type both schedulers share with the same meaning (fixed_large_log / learned: test_scheduler_diffusers_bugs)
SHARED_VARIANCES = ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"]


def _channels(variance_type):
    return 2 if variance_type.startswith("learned") else 1


# ----------------------------------------------------------------------------------------------
# Without set_timesteps: the full training chain, as DDPMScheduler
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("variance_type", SHARED_VARIANCES)
def test_full_chain_without_set_timesteps_is_diffusers_chain(prediction_type, variance_type):
    """The chain itself; step() results on it against diffusers and a float64 reference, for every t:
    test_scheduler_parity.test_step_parity_with_diffusers[None-...]."""
    cfg = dict(prediction_type=prediction_type, variance_type=variance_type)
    ours, ref = ScratchDDPMScheduler(**cfg), DDPMScheduler(**cfg)
    assert ours.num_inference_steps is None and ref.num_inference_steps is None
    assert torch.equal(ours.timesteps, ref.timesteps) and ours.timesteps.tolist() == list(range(999, -1, -1))
    assert [ours.previous_timestep(t) for t in (999, 500, 0)] == [998, 499, -1] == [ref.previous_timestep(t) for t in (999, 500, 0)]
    x = torch.randn(2, 1, 4, 4)
    out = torch.cat([x * 0.1] * _channels(variance_type), dim=1)
    for t in (999, 500, 1, 0):
        a = ours.step(out, t, x, generator=torch.Generator().manual_seed(t))
        b = ref.step(out, t, x, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=1e-3, atol=1e-3)
    # a per-sample batch of timesteps steps the same chain as one int at a time
    t = torch.tensor([999, 3])
    batched = ours.step(out, t, x, generator=torch.Generator().manual_seed(1)).pred_original_sample
    for i, ti in enumerate(t.tolist()):
        single = ours.step(out[i:i + 1], ti, x[i:i + 1]).pred_original_sample
        torch.testing.assert_close(batched[i:i + 1], single)


@pytest.mark.parametrize("host_lookup", [True, False], ids=["host-path", "device-path"])
def test_full_chain_without_set_timesteps_has_no_host_sync(host_lookup):
    sched = ScratchDDPMScheduler(variance_type="learned_range")
    sched._host_lookup = host_lookup
    x = torch.randn(2, 3, 8, 8)
    sched.step(torch.randn(2, 6, 8, 8), sched.timesteps[0], x)  # warm the caches
    with CountScalarReads() as mode:
        for t in sched.timesteps[:50]:
            x = sched.step(torch.randn(2, 6, 8, 8).clamp(-1, 1), t, x).prev_sample
    assert mode.count == 0 and len(mode.ops) > 0


def test_set_timesteps_then_full_chain_again():
    """set_timesteps(T) visits the same chain as no set_timesteps at all, only num_inference_steps is set."""
    a, b = ScratchDDPMScheduler(), ScratchDDPMScheduler()
    b.set_timesteps(1000)
    assert b.num_inference_steps == 1000 and torch.equal(a.timesteps, b.timesteps)
    x = torch.randn(1, 1, 4, 4)
    for t in (999, 500, 0):
        torch.testing.assert_close(a.step(x, t, x, generator=torch.Generator().manual_seed(0)).prev_sample,
                                   b.step(x, t, x, generator=torch.Generator().manual_seed(0)).prev_sample, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# _get_variance: diffusers' signature and forms, the variance step() uses
# ----------------------------------------------------------------------------------------------
def _diffusers_form_exact(variance_type, t, prev_t, v=None):
    """diffusers' _get_variance forms from float64 numpy: beta~ (clamped 1e-20), its sqrt, beta, log beta, and
    learned_range's log-variance interpolation."""
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    a, a_prev = abar[t], (abar[prev_t] if prev_t >= 0 else 1.0)
    beta = 1 - a / a_prev
    small = max((1 - a_prev) / (1 - a) * beta, 1e-20)
    if variance_type == "fixed_small":
        return small
    if variance_type == "fixed_small_log":
        return math.sqrt(small)
    if variance_type == "fixed_large":
        return beta
    frac = (v + 1) / 2
    return frac * math.log(beta) + (1 - frac) * math.log(small)


@pytest.mark.parametrize("steps", [None, 10])
@pytest.mark.parametrize("variance_type", SHARED_VARIANCES)
def test_get_variance_matches_diffusers(variance_type, steps):
    """Same signature, same forms as diffusers; within diffusers' float32 error (4 digits near t = 0, where
    1 - abar_t cancels) of it, and within 1e-6 of the float64 value."""
    ours, ref = ScratchDDPMScheduler(variance_type=variance_type), DDPMScheduler(variance_type=variance_type)
    if steps:
        ours.set_timesteps(steps)
        ref.set_timesteps(steps)
    pred = torch.linspace(-1, 1, 6, dtype=torch.float64).view(1, 6, 1, 1) if variance_type == "learned_range" else None
    ts = ours.timesteps.tolist()
    for i, t in enumerate(ts[:-1]):  # the last step (to x_0) adds no noise: below
        a, b = ours._get_variance(t, predicted_variance=pred), ref._get_variance(t, predicted_variance=pred)
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-3, atol=0)
        exact = _diffusers_form_exact(variance_type, t, ts[i + 1], None if pred is None else pred.numpy())
        np.testing.assert_allclose(a.numpy(), exact, rtol=1e-6)
    # the explicit variance_type argument wins over the config, as in diffusers
    t = ts[len(ts) // 2]
    torch.testing.assert_close(ours._get_variance(t, variance_type="fixed_large"),
                               ref._get_variance(t, variance_type="fixed_large"), rtol=1e-4, atol=0)
    # the step to x_0: diffusers' fixed_small reports the clamped zero, and so does every type here (no noise)
    assert ours._get_variance(ts[-1], variance_type="fixed_small").item() == pytest.approx(1e-20) \
        == ref._get_variance(ts[-1], variance_type="fixed_small").item()


def test_get_variance_is_the_variance_step_uses():
    """sigma^2 of the step: the spread of step()'s output around its mean, for a fixed and a learned type."""
    x = torch.zeros(1, 1, 128, 128)
    for vt, out in (("fixed_large", x), ("learned", torch.cat([x, torch.full_like(x, -4.0)], 1))):
        sched = ScratchDDPMScheduler(variance_type=vt, clip_sample=False)
        sched.set_timesteps(20)
        t = int(sched.timesteps[3])
        mean = sched.step(out, t, x, generator=torch.Generator().manual_seed(0)).pred_original_sample  # x0 = 0 -> mean 0
        assert mean.abs().max() == 0
        prev = sched.step(out, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
        var = sched._get_variance(t, predicted_variance=out[:, 1:] if vt == "learned" else None)
        assert prev.var().item() == pytest.approx(var.mean().item(), rel=0.03)
    # diffusers' test values: 0 at t = 0 (clamped to 1e-20), beta~ elsewhere
    s = ScratchDDPMScheduler()
    assert s._get_variance(0).item() == pytest.approx(1e-20)
    assert s._get_variance(487).item() == pytest.approx(0.00979, abs=1e-5)
    assert s._get_variance(999).item() == pytest.approx(0.02, abs=1e-5)
    with pytest.raises(ValueError, match="predicted_variance"):
        ScratchDDPMScheduler(variance_type="learned_range")._get_variance(5)


# ----------------------------------------------------------------------------------------------
# trained_betas sets the length (diffusers' convention), num_train_timesteps = 1
# ----------------------------------------------------------------------------------------------
def test_trained_betas_set_the_chain_length(tmp_path):
    ours = ScratchDDPMScheduler(trained_betas=np.array([0.1, 0.3]))
    assert len(ours) == 2 and ours.config.num_train_timesteps == 2 and ours.timesteps.tolist() == [1, 0]
    torch.testing.assert_close(ours.alphas_cumprod, torch.tensor([0.9, 0.9 * 0.7]))
    ours.save_pretrained(tmp_path)
    loaded = ScratchDDPMScheduler.from_pretrained(tmp_path)
    assert loaded.betas.tolist() == ours.betas.tolist() and len(loaded) == 2
    # a config written by DDPMScheduler keeps num_train_timesteps=1000 beside 2 betas: it loads and steps
    DDPMScheduler(trained_betas=[0.1, 0.3]).save_pretrained(tmp_path / "diffusers")
    assert json.loads((tmp_path / "diffusers" / "scheduler_config.json").read_text())["num_train_timesteps"] == 1000
    from_ref = ScratchDDPMScheduler.from_pretrained(tmp_path / "diffusers")
    assert len(from_ref) == 2
    x = torch.ones(1, 1, 2, 2)
    for t in from_ref.timesteps:
        x = from_ref.step(0.1 * x, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.isfinite(x).all()


def test_one_training_timestep_matches_diffusers():
    ours, ref = ScratchDDPMScheduler(num_train_timesteps=1), DDPMScheduler(num_train_timesteps=1)
    assert ours.timesteps.tolist() == [0] == ref.timesteps.tolist()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(ours.step(0.1 * x, 0, x).prev_sample, ref.step(0.1 * x, 0, x).prev_sample)
    ours.set_timesteps(1)
    assert ours.timesteps.tolist() == [0]


# ----------------------------------------------------------------------------------------------
# The 1000-step chain's loop sum: float64 tables are closer to the exact chain than diffusers' float32 ones
# ----------------------------------------------------------------------------------------------
def _ramp(flip):
    """diffusers' deterministic 4x3x8x8 test tensors: values k / n laid out channel-last, then permuted."""
    n = 4 * 3 * 8 * 8
    k = torch.arange(n)
    return ((k.flip(-1) if flip else k).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


def _noisy_loop_sum(sched):
    """add_noise at t = 1 then step t = 1, 0 with the model x t / (t + 1): sum |x_0|."""
    ts = sched.timesteps[len(sched) - 2:]
    x = sched.add_noise(_ramp(False), _ramp(True), ts[:1])
    g = torch.manual_seed(0)
    for t in ts:
        x = sched.step(x * t / (t + 1), t, x, generator=g).prev_sample
    return x.abs().sum().item()


def _exact_noisy_loop_sum():
    """The same chain in float64 numpy from the formulas (Eq. 4, 15, 7, Algorithm 2), same noise draws."""
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    x = math.sqrt(abar[1]) * _ramp(False).double().numpy() + math.sqrt(1 - abar[1]) * _ramp(True).double().numpy()
    g = torch.manual_seed(0)
    for t in (1, 0):
        a, a_prev = abar[t], (abar[t - 1] if t else 1.0)
        beta = 1 - a / a_prev
        x0 = np.clip((x - math.sqrt(1 - a) * x * t / (t + 1)) / math.sqrt(a), -1, 1)
        x_prev = math.sqrt(a_prev) * beta / (1 - a) * x0 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * x
        if t > 0:
            x_prev = x_prev + math.sqrt((1 - a_prev) / (1 - a) * beta) * torch.randn(x.shape, generator=g).double().numpy()
        x = x_prev
    return float(np.abs(x).sum())


def test_noisy_loop_sum_is_closer_to_the_exact_chain_than_diffusers():
    """diffusers' recorded 387.9466 comes from float32 tables, where 1 - abar_t loses ~4 digits near t = 0
    (1 - float32(0.9999) = 1.00017e-4). Ours computes the tables in float64."""
    exact = _exact_noisy_loop_sum()
    ours, ref = _noisy_loop_sum(ScratchDDPMScheduler()), _noisy_loop_sum(DDPMScheduler())
    assert abs(ours - exact) < 1e-3  # float32 samples on float64 tables
    assert abs(ref - exact) > 10 * abs(ours - exact)  # diffusers' float32 tables: ~0.02 off
    assert abs(ref - 387.9466) < 1e-2  # the value diffusers' test records is its own float32 result


# ----------------------------------------------------------------------------------------------
# Config booleans: strict
# ----------------------------------------------------------------------------------------------
def test_string_booleans_of_a_hand_edited_config_are_parsed(tmp_path):
    ScratchDDPMScheduler().save_pretrained(tmp_path)
    path = tmp_path / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(rescale_betas_zero_snr="false", clip_sample="False", thresholding="false")
    path.write_text(json.dumps(cfg))
    loaded = ScratchDDPMScheduler.from_pretrained(tmp_path)
    assert loaded.config.rescale_betas_zero_snr is False and loaded.config.clip_sample is False
    torch.testing.assert_close(loaded.alphas_cumprod, ScratchDDPMScheduler().alphas_cumprod, rtol=0, atol=0)
    cfg.update(rescale_betas_zero_snr="true")
    path.write_text(json.dumps(cfg))
    assert ScratchDDPMScheduler.from_pretrained(tmp_path).alphas_cumprod[-1].item() == 0.0
    cfg.update(rescale_betas_zero_snr="no")
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        ScratchDDPMScheduler.from_pretrained(tmp_path)


def test_a_string_flag_written_after_construction_is_read_strictly():
    sched = ScratchDDPMScheduler(clip_sample=True)
    sched.register_to_config(clip_sample="false")  # as a pipeline may rewrite its scheduler's config
    x = torch.full((1, 1, 2, 2), 5.0)
    assert sched.step(torch.zeros_like(x), 0, x).pred_original_sample.max().item() > 1.0  # not clipped
    sched.register_to_config(clip_sample="maybe")
    with pytest.raises(ValueError, match="clip_sample"):
        sched.step(torch.zeros_like(x), 0, x)


def test_huge_num_train_timesteps_is_refused_before_allocating(monkeypatch):
    import ddpm_from_scratch.diffusion_math as dm

    def no_allocation(*args, **kwargs):
        raise AssertionError("a schedule was allocated before the check")

    monkeypatch.setattr(dm, "beta_schedule", no_allocation)
    monkeypatch.setattr(dm, "alphas_cumprod", no_allocation)
    with pytest.raises(ValueError, match=r"num_train_timesteps must be an integer in \[1, 1000000\]"):
        ScratchDDPMScheduler(num_train_timesteps=100_000_000)
    with pytest.raises(ValueError, match="trained_betas"):
        ScratchDDPMScheduler(trained_betas=np.full(2_000_000, 0.01))

"""ScratchDDPMScheduler API: config round trips, no host syncs, device-path equivalence, bad input."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, PNDMScheduler
from torch.utils._python_dispatch import TorchDispatchMode

from ddpm_from_scratch import ScratchDDPMScheduler

# The scheduler config that Stable Diffusion v1 checkpoints ship (PNDMScheduler, with its own extra keys).
SD_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def _same_results(a, b, steps=10, shape=(2, 4, 8, 8)):
    a.set_timesteps(steps)
    b.set_timesteps(steps)
    assert torch.equal(a.timesteps, b.timesteps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    for t in a.timesteps:
        out = torch.randn(shape, generator=g)
        ra = a.step(out, t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
        rb = b.step(out, t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
        torch.testing.assert_close(ra, rb, rtol=1e-5, atol=1e-5)


def test_every_diffusers_config_key_with_same_default():
    ours, ref = ScratchDDPMScheduler(), DDPMScheduler()
    ref_keys = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    our_keys = {k: v for k, v in ours.config.items() if not k.startswith("_")}
    # every diffusers key, same default; one key of ours beyond diffusers (Analytic-DPM), off by default
    assert {k: our_keys[k] for k in ref_keys} == ref_keys
    assert set(our_keys) - set(ref_keys) == {"analytic_gamma"} and our_keys["analytic_gamma"] is None
    assert ours.order == 1 and ours.init_noise_sigma == 1.0 and len(ours) == 1000


def test_from_diffusers_config_round_trip():
    ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", variance_type="fixed_large")
    ours = ScratchDDPMScheduler.from_config(ref.config)
    assert ours.config.beta_schedule == "squaredcos_cap_v2" and ours.config.prediction_type == "v_prediction"
    _same_results(ref, ours)
    back = DDPMScheduler.from_config(ours.config)
    assert dict(back.config) == dict(ref.config)


def test_from_stable_diffusion_scheduler_config():
    pndm = PNDMScheduler.from_config(SD_SCHEDULER_CONFIG)
    ours = ScratchDDPMScheduler.from_config(pndm.config)
    ref = DDPMScheduler.from_config(pndm.config)
    assert ours.config.steps_offset == 1 and ours.config.beta_schedule == "scaled_linear"
    _same_results(ref, ours, steps=25)


def test_save_pretrained_from_pretrained(tmp_path):
    ours = ScratchDDPMScheduler(beta_schedule="sigmoid", timestep_spacing="trailing", trained_betas=None, steps_offset=0)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "ScratchDDPMScheduler"
    loaded = ScratchDDPMScheduler.from_pretrained(tmp_path)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(ours.config)
    _same_results(ours, loaded)
    # diffusers' own class reads our saved config too
    _same_results(DDPMScheduler.from_pretrained(tmp_path), loaded)
    # and trained betas survive a round trip
    betas = np.linspace(1e-4, 0.02, 1000)
    ScratchDDPMScheduler(trained_betas=betas.tolist()).save_pretrained(tmp_path / "tb")
    torch.testing.assert_close(ScratchDDPMScheduler.from_pretrained(tmp_path / "tb").betas, torch.tensor(betas, dtype=torch.float32))


def test_config_is_read_at_call_time():
    """Pipelines rewrite clip_sample / steps_offset in the config after construction."""
    ours = ScratchDDPMScheduler(clip_sample=True)
    ours.register_to_config(clip_sample=False, steps_offset=1)
    ours.set_timesteps(10)
    assert ours.timesteps[-1].item() == 1
    x = torch.full((1, 1, 2, 2), 5.0)
    out = ours.step(torch.zeros_like(x), ours.timesteps[-1], x).pred_original_sample
    assert out.max().item() > 1.0  # not clipped


class CountScalarReads(TorchDispatchMode):
    """Counts aten._local_scalar_dense, the op behind .item()/bool(tensor): a host-device sync on accelerators."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("host_lookup", [True, False], ids=["host-path", "device-path"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range", "learned"])
def test_no_host_sync_in_step_and_add_noise(host_lookup, variance_type):
    sched = ScratchDDPMScheduler(variance_type=variance_type, thresholding=variance_type == "fixed_large")
    sched._host_lookup = host_lookup
    sched.set_timesteps(20)
    channels = 6 if variance_type.startswith("learned") else 3
    x = torch.randn(2, 3, 8, 8)
    sched.step(torch.randn(2, channels, 8, 8), sched.timesteps[0], x)  # warm the caches
    t_batch = torch.randint(0, 1000, (2,))
    with CountScalarReads() as mode:
        for t in sched.timesteps:
            x = sched.step(torch.randn(2, channels, 8, 8).clamp(-1, 1), t, x).prev_sample
        sched.add_noise(x, torch.randn_like(x), t_batch.cuda() if torch.cuda.is_available() else t_batch)
        sched.get_velocity(x, torch.randn_like(x), t_batch)
    assert mode.count == 0
    assert len(mode.ops) > 0  # the mode saw the computation


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_device_path_equals_host_path(prediction_type, variance_type):
    host = ScratchDDPMScheduler(prediction_type=prediction_type, variance_type=variance_type)
    dev = ScratchDDPMScheduler(prediction_type=prediction_type, variance_type=variance_type)
    dev._host_lookup = False
    channels = 6 if variance_type == "learned_range" else 3
    for s in (host, dev):
        s.set_timesteps(13)
    g = torch.Generator().manual_seed(0)
    for t in host.timesteps[[0, 5, -2, -1]]:
        x, out = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, channels, 4, 4, generator=g).tanh()
        a = host.step(out, t, x, generator=torch.Generator().manual_seed(1))
        b = dev.step(out, t, x, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, rtol=1e-6, atol=1e-6)


def test_per_sample_timesteps_on_device_path():
    sched = ScratchDDPMScheduler()
    sched.set_timesteps(10)
    x, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    ts = sched.timesteps[[0, 4, 9]]
    batched = sched.step(eps, ts, x, generator=torch.Generator().manual_seed(0)).pred_original_sample
    for i, t in enumerate(ts):
        single = sched.step(eps[i : i + 1], int(t), x[i : i + 1]).pred_original_sample
        torch.testing.assert_close(batched[i : i + 1], single)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_samples_keep_dtype(dtype):
    sched = ScratchDDPMScheduler()
    sched.set_timesteps(5)
    x = torch.randn(1, 3, 4, 4).to(dtype)
    for t in sched.timesteps:
        out = sched.step(torch.randn(1, 3, 4, 4).to(dtype), t, x)
        assert out.prev_sample.dtype == dtype and torch.isfinite(out.prev_sample.float()).all()
        x = out.prev_sample


def test_previous_timestep_and_begin_index():
    sched = ScratchDDPMScheduler()
    assert sched.previous_timestep(10) == 9  # full chain before set_timesteps
    sched.set_timesteps(4)
    ts = sched.timesteps.tolist()
    assert [sched.previous_timestep(t) for t in ts] == ts[1:] + [-1]
    assert sched.previous_timestep(torch.tensor(ts[0])).item() == ts[1]
    sched.set_begin_index(2)
    assert sched.begin_index == 2


def test_custom_timesteps_use_the_visited_chain():
    ours, ref = ScratchDDPMScheduler(), DDPMScheduler()
    custom = [999, 800, 500, 123, 7, 0]
    ours.set_timesteps(timesteps=custom)
    ref.set_timesteps(timesteps=custom)
    assert ours.timesteps.tolist() == custom and ours.custom_timesteps
    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    for t in custom:
        torch.testing.assert_close(
            ours.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample,
            ref.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample,
            rtol=1e-5,
            atol=1e-5,
        )


def _ready(**kw):
    s = ScratchDDPMScheduler(**kw)
    s.set_timesteps(10)
    return s


x4 = torch.zeros(1, 3, 4, 4)

BAD_INPUT = [
    ("beta_schedule", lambda: ScratchDDPMScheduler(beta_schedule="cosine"), ValueError, "squaredcos_cap_v2"),
    ("variance_type", lambda: ScratchDDPMScheduler(variance_type="small"), ValueError, "fixed_small"),
    ("prediction_type", lambda: ScratchDDPMScheduler(prediction_type="noise"), ValueError, "v_prediction"),
    ("timestep_spacing", lambda: ScratchDDPMScheduler(timestep_spacing="uniform"), ValueError, "trailing"),
    ("trained_betas", lambda: ScratchDDPMScheduler(trained_betas=[0.5] * 999 + [1.5]), ValueError, "(0, 1)"),
    ("trained_betas", lambda: ScratchDDPMScheduler(num_train_timesteps=20, trained_betas=[0.1] * 10), ValueError,
     "num_train_timesteps=20"),
    ("trained_betas", lambda: ScratchDDPMScheduler(trained_betas=[[0.1, 0.2]]), ValueError, "1-D"),
    ("trained_betas", lambda: ScratchDDPMScheduler(trained_betas=0.1), ValueError, "1-D"),
    ("trained_betas", lambda: ScratchDDPMScheduler(trained_betas=range(1_000_001)), ValueError, "1000000"),
    ("beta_end", lambda: ScratchDDPMScheduler(beta_start=0.1, beta_end=2), ValueError, "(0, 1)"),
    ("beta_end", lambda: ScratchDDPMScheduler(beta_end=1.5), ValueError, "(0, 1)"),
    ("beta_start", lambda: ScratchDDPMScheduler(beta_start=0.0), ValueError, "(0, 1)"),
    ("num_train_timesteps", lambda: ScratchDDPMScheduler(num_train_timesteps=0), ValueError, "[1, 1000000]"),
    ("num_train_timesteps", lambda: ScratchDDPMScheduler(num_train_timesteps=100_000_000), ValueError, "[1, 1000000]"),
    ("num_train_timesteps", lambda: ScratchDDPMScheduler(num_train_timesteps=10.0), ValueError, "integer"),
    ("num_train_timesteps", lambda: ScratchDDPMScheduler(num_train_timesteps=1, rescale_betas_zero_snr=True), ValueError,
     ">= 2"),
    ("rescale_betas_zero_snr", lambda: ScratchDDPMScheduler(rescale_betas_zero_snr="no"), ValueError, "true or false"),
    ("clip_sample", lambda: ScratchDDPMScheduler(clip_sample=1), ValueError, "true or false"),
    ("thresholding", lambda: ScratchDDPMScheduler(thresholding=None), ValueError, "true or false"),
    ("steps_offset", lambda: ScratchDDPMScheduler(steps_offset=-1), ValueError, "non-negative"),
    ("dynamic_thresholding_ratio", lambda: ScratchDDPMScheduler(dynamic_thresholding_ratio=1.5), ValueError, "(0, 1]"),
    ("num_inference_steps", lambda: ScratchDDPMScheduler().set_timesteps(0), ValueError, "[1, num_train_timesteps"),
    ("num_inference_steps", lambda: ScratchDDPMScheduler().set_timesteps(-3), ValueError, "[1, num_train_timesteps"),
    ("num_inference_steps", lambda: ScratchDDPMScheduler().set_timesteps(1001), ValueError, "[1, num_train_timesteps"),
    ("num_inference_steps", lambda: ScratchDDPMScheduler().set_timesteps(2.5), ValueError, "integer"),
    ("num_inference_steps", lambda: ScratchDDPMScheduler().set_timesteps(), ValueError, "timesteps"),
    ("timesteps", lambda: ScratchDDPMScheduler().set_timesteps(timesteps=[10, 20, 5]), ValueError, "strictly descending"),
    ("timesteps", lambda: ScratchDDPMScheduler().set_timesteps(timesteps=[1000, 500]), ValueError, "[0, 999]"),
    ("timesteps", lambda: ScratchDDPMScheduler().set_timesteps(timesteps=[500, -1]), ValueError, "[0, 999]"),
    ("timesteps", lambda: ScratchDDPMScheduler().set_timesteps(10, timesteps=[5, 1]), ValueError, "not both"),
    ("model_output", lambda: _ready().step(torch.zeros(1, 3, 5, 4), 900, x4), ValueError, "shape of sample"),
    ("model_output", lambda: _ready(variance_type="learned_range").step(x4, 900, x4), ValueError, "2C"),
    ("timestep", lambda: _ready().step(x4, 901, x4), ValueError, "not in the schedule"),
    ("timestep", lambda: _ready().step(x4, torch.tensor(901), x4), ValueError, "901"),
    ("timestep", lambda: ScratchDDPMScheduler().step(x4, 1000, x4), ValueError, "[0, 999]"),
    ("timestep", lambda: ScratchDDPMScheduler().step(x4, -1, x4), ValueError, "[0, 999]"),
    ("timestep", lambda: ScratchDDPMScheduler().step(x4, torch.tensor(2.5), x4), ValueError, "integer"),
    ("timestep", lambda: _ready().step(x4, "900", x4), TypeError, "int"),
    ("timesteps", lambda: ScratchDDPMScheduler().add_noise(x4, x4, torch.tensor([1000])), ValueError, "[0, 999]"),
    ("timesteps", lambda: ScratchDDPMScheduler().add_noise(x4.expand(2, 3, 4, 4), x4, torch.tensor([3, -2])), ValueError,
     "-2"),
    ("timesteps", lambda: ScratchDDPMScheduler().get_velocity(x4, x4, torch.tensor([1000])), ValueError, "[0, 999]"),
    ("timesteps", lambda: ScratchDDPMScheduler().add_noise(x4, x4, torch.tensor([1.5])), TypeError, "integers"),
    ("prediction_type", lambda: ScratchDDPMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing").set_timesteps(10),
     ValueError, "v_prediction"),
    ("steps_offset", lambda: ScratchDDPMScheduler(steps_offset=1).set_timesteps(1000), ValueError, "steps_offset"),
    ("analytic_gamma", lambda: ScratchDDPMScheduler(variance_type="analytic"), ValueError, "estimate_analytic_gamma"),
    ("analytic_gamma", lambda: ScratchDDPMScheduler(analytic_gamma=[0.5] * 10), ValueError, "num_train_timesteps=1000"),
]


@pytest.mark.parametrize("param,call,exc,allowed", BAD_INPUT, ids=[f"{i}-{c[0]}" for i, c in enumerate(BAD_INPUT)])
def test_bad_input_names_the_parameter_and_allowed_values(param, call, exc, allowed):
    with pytest.raises(exc) as info:
        call()
    assert param in str(info.value)
    assert allowed in str(info.value)


def test_learned_variance_model_sampled_with_a_fixed_variance_ignores_the_variance_half():
    sched = ScratchDDPMScheduler()
    sched.set_timesteps(10)
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = sched.timesteps[2]
    both = torch.cat([eps, torch.full_like(eps, 123.0)], dim=1)
    a = sched.step(both, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    b = sched.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("host_lookup", [True, False], ids=["host-path", "device-path"])
@pytest.mark.parametrize("set_timesteps", [True, False], ids=["respaced", "full-chain"])
def test_out_of_schedule_batched_timesteps_raise_naming_them(host_lookup, set_timesteps):
    """A batch of timesteps holding one outside the schedule used to give NaN (or another step's row) silently."""
    sched = ScratchDDPMScheduler()
    sched._host_lookup = host_lookup
    if set_timesteps:
        sched.set_timesteps(10)
    x = torch.randn(3, 1, 4, 4)
    good = sched.timesteps[[0, 1, 2]]
    bad = [[good[0].item(), 1000, good[2].item()], [good[0].item(), -1, good[2].item()]]
    if set_timesteps:
        bad.append([good[0].item(), good[0].item() - 1, good[2].item()])  # a training timestep, but not visited
    for ts in bad:
        with pytest.raises(ValueError) as info:
            sched.step(x, torch.tensor(ts), x)
        assert str(ts[1]) in str(info.value)
        assert ("scheduler.timesteps" in str(info.value)) if set_timesteps else ("[0, 999]" in str(info.value))
    with pytest.raises(ValueError, match=r"2\.5"):
        sched.step(x, torch.tensor([float(good[0]), 2.5, float(good[2])]), x)
    assert torch.isfinite(sched.step(x, good, x).prev_sample).all()
    for fn in (sched.add_noise, sched.get_velocity):
        with pytest.raises(ValueError, match=r"1000.*\[0, 999\]"):
            fn(x, x, torch.tensor([5, 1000, 7]))


GPU_ASSERT_SCRIPT = r"""
import sys, torch
from ddpm_from_scratch import ScratchDDPMScheduler
s = ScratchDDPMScheduler()
s.set_timesteps(10)
x = torch.randn(2, 1, 4, 4, device="cuda")
kind = sys.argv[1]
torch.cuda.set_sync_debug_mode("error")  # the check itself must not sync
if kind == "step":
    out = s.step(x, torch.tensor([999, 5], device="cuda"), x).prev_sample
else:
    out = s.add_noise(x, x, torch.tensor([5, 1000], device="cuda"))
torch.cuda.set_sync_debug_mode(0)
torch.cuda.synchronize()  # the device-side assert surfaces here
print("NO ERROR", out.isnan().any().item())
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["step", "add_noise"])
def test_out_of_schedule_cuda_timesteps_trip_a_device_assert(kind):
    """On the GPU the check is a device-side assert (no host sync): the run stops instead of returning NaN. It
    poisons the CUDA context, hence the subprocess."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", GPU_ASSERT_SCRIPT, kind], capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)
    assert proc.returncode != 0 and "NO ERROR" not in proc.stdout, proc.stdout + proc.stderr

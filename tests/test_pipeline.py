"""ScratchDDPMPipeline: sampling against diffusers' DDPMPipeline and an analytic denoiser, arguments, saving/loading.

References: diffusers.DDPMPipeline run on the same UNet/scheduler/seed (the loop must match it exactly), and a
point-mass denoiser whose epsilon prediction is exact in closed form (float64), so ancestral sampling must
return the point itself. Repo ids are loaded from a hand-built Hugging Face cache (HF_HUB_OFFLINE=1 from
conftest); the HTTP round trip is tested in test_hub.py.
"""

import contextlib
import json
import os
import shutil
import warnings

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.pipelines import pipeline_loading_utils
from PIL import Image
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

import ddpm_from_scratch  # noqa: F401  (registers the pipeline with diffusers)
from ddpm_from_scratch import ScratchDDPMScheduler
from ddpm_from_scratch.pipeline_ddpm import ScratchDDPMPipeline
from ddpm_from_scratch.unet_presets import build_unet

T = 1000


def tiny_unet(seed=0, **overrides) -> UNet2DModel:
    torch.manual_seed(seed)
    return build_unet("tiny", **overrides).eval()


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def scratch_pipe(unet=None, **scheduler_kwargs) -> ScratchDDPMPipeline:
    return quiet(ScratchDDPMPipeline(unet if unet is not None else tiny_unet(), ScratchDDPMScheduler(**scheduler_kwargs)))


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# An analytic denoiser: data = a single image x0*, so eps(x_t, t) = (x_t - sqrt(abar_t) x0*) / sqrt(1 - abar_t)
# ----------------------------------------------------------------------------------------------
def linear_alphas_cumprod_f64():
    """abar_t for the DDPM linear schedule (beta 1e-4 .. 0.02 over 1000 steps), float64."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0)


class PointMassDenoiser(UNet2DModel):
    """Exact epsilon for the point-mass data distribution at ``target`` (C, H, W) in [-1, 1]."""

    def __init__(self, target: torch.Tensor, out_factor: int = 1):
        c, h, w = target.shape
        super().__init__(sample_size=h, in_channels=c, out_channels=out_factor * c, block_out_channels=(4,),
                         down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=1,
                         layers_per_block=1, add_attention=False)
        self.target = target.double()  # plain attributes: .to(dtype) must not round them
        self.abar = linear_alphas_cumprod_f64()
        self.out_factor = out_factor
        self.calls = []

    def forward(self, sample, timestep, return_dict=True):
        self.calls.append(timestep)
        abar = self.abar[timestep.long()]
        eps = (sample.double() - abar.sqrt() * self.target) / (1.0 - abar).sqrt()
        if self.out_factor == 2:  # learned_range output v = 0: the geometric mean of beta_t and beta~_t
            eps = torch.cat([eps, torch.zeros_like(eps)], dim=1)
        out = eps.to(sample.dtype)
        return (out,) if not return_dict else diffusers.models.unets.unet_2d.UNet2DOutput(sample=out)


def target_image(channels=3, size=8):
    """A smooth deterministic image in [-0.8, 0.8], shape (C, size, size)."""
    grid = torch.linspace(-0.8, 0.8, size, dtype=torch.float64)
    img = torch.stack([(grid[:, None] * grid[None, :] * (k + 1)).clamp(-0.8, 0.8) for k in range(channels)])
    img[:, 0, 0] = 0.8
    return img


@pytest.mark.filterwarnings("ignore:the UNet is float16 on the CPU")
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_analytic_denoiser_recovers_the_point(dtype, atol):
    target = target_image()
    unet = PointMassDenoiser(target).to(dtype)
    pipe = quiet(ScratchDDPMPipeline(unet, ScratchDDPMScheduler()))
    images = pipe(batch_size=2, generator=gen(0), num_inference_steps=20, output_type="pt").images
    expected = (target.float() / 2 + 0.5).expand(2, -1, -1, -1)
    assert images.dtype == torch.float32 and images.shape == (2, 3, 8, 8)
    torch.testing.assert_close(images, expected, rtol=0, atol=atol)
    assert all(c.dtype == torch.int64 for c in unet.calls)


def test_analytic_denoiser_learned_range():
    target = target_image(channels=1)
    pipe = quiet(ScratchDDPMPipeline(PointMassDenoiser(target, out_factor=2),
                                     ScratchDDPMScheduler(variance_type="learned_range")))
    images = pipe(batch_size=1, generator=gen(1), num_inference_steps=10, output_type="np").images
    np.testing.assert_allclose(images[0, ..., 0], (target[0] / 2 + 0.5).numpy(), rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Same loop as diffusers' DDPMPipeline
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, ScratchDDPMScheduler])
def test_matches_diffusers_ddpm_pipeline_exactly(scheduler_cls):
    unet = tiny_unet()
    ours = quiet(ScratchDDPMPipeline(unet, scheduler_cls()))
    ref = quiet(DDPMPipeline(unet, scheduler_cls()))
    a = ours(batch_size=2, generator=gen(3), num_inference_steps=8, output_type="np").images
    b = ref(batch_size=2, generator=gen(3), num_inference_steps=8, output_type="np").images
    np.testing.assert_array_equal(a, b)
    assert a.std() > 1e-3


def test_learned_variance_unet_matches_diffusers():
    """2C-channel UNet: our scheduler splits the variance half like diffusers' DDPMScheduler (learned_range)."""
    unet = tiny_unet(variance_type="learned_range")
    assert unet.config.out_channels == 6
    ours = scratch_pipe(unet, variance_type="learned_range")
    ref = quiet(DDPMPipeline(unet, DDPMScheduler(variance_type="learned_range")))
    a = ours(batch_size=2, generator=gen(4), num_inference_steps=10, output_type="np").images
    b = ref(batch_size=2, generator=gen(4), num_inference_steps=10, output_type="np").images
    assert a.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def test_generator_list_gives_one_reproducible_image_per_generator():
    pipe = scratch_pipe()
    batch = pipe(batch_size=3, generator=[gen(10), gen(11), gen(12)], num_inference_steps=5, output_type="np").images
    for i, seed in enumerate((10, 11, 12)):
        single = pipe(batch_size=1, generator=[gen(seed)], num_inference_steps=5, output_type="np").images
        np.testing.assert_allclose(batch[i], single[0], rtol=0, atol=1e-5)
    again = pipe(batch_size=3, generator=[gen(10), gen(11), gen(12)], num_inference_steps=5, output_type="np").images
    np.testing.assert_array_equal(batch, again)
    assert np.abs(batch[0] - batch[1]).max() > 1e-2


def test_latents_argument_is_x_T():
    pipe = scratch_pipe()
    noise = torch.randn(2, 3, 8, 8, generator=gen(5))
    a = pipe(batch_size=2, generator=gen(6), latents=noise, num_inference_steps=4, output_type="np").images
    b = pipe(batch_size=2, generator=gen(5), num_inference_steps=4, output_type="np").images  # x_T drawn from gen(5)
    c = pipe(batch_size=2, generator=gen(6), latents=noise.clone(), num_inference_steps=4, output_type="np").images
    np.testing.assert_array_equal(a, c)
    assert np.abs(a - b).max() > 1e-3  # step noise comes from the generator, not from latents


# ----------------------------------------------------------------------------------------------
# Output types, channels, dtypes
# ----------------------------------------------------------------------------------------------
def test_output_types_agree():
    pipe = scratch_pipe()
    kwargs = dict(batch_size=2, num_inference_steps=3)
    as_np = pipe(generator=gen(7), output_type="np", **kwargs).images
    as_pt = pipe(generator=gen(7), output_type="pt", **kwargs).images
    as_pil = pipe(generator=gen(7), output_type="pil", **kwargs).images
    assert as_np.dtype == np.float32 and as_np.shape == (2, 8, 8, 3)
    assert 0.0 <= as_np.min() and as_np.max() <= 1.0
    assert isinstance(as_pt, torch.Tensor) and as_pt.shape == (2, 3, 8, 8)
    np.testing.assert_array_equal(as_pt.permute(0, 2, 3, 1).numpy(), as_np)
    assert len(as_pil) == 2 and all(isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (8, 8) for im in as_pil)
    np.testing.assert_array_equal(np.asarray(as_pil[1]), (as_np[1] * 255).round().astype(np.uint8))
    tup = pipe(generator=gen(7), output_type="np", return_dict=False, **kwargs)
    assert isinstance(tup, tuple) and np.array_equal(tup[0], as_np)


def test_grayscale_gives_L_images():
    pipe = scratch_pipe(tiny_unet(in_channels=1))
    images = pipe(batch_size=2, generator=gen(8), num_inference_steps=2).images
    assert [im.mode for im in images] == ["L", "L"]
    as_np = pipe(batch_size=2, generator=gen(8), num_inference_steps=2, output_type="np").images
    np.testing.assert_array_equal(np.asarray(images[0]), (as_np[0, ..., 0] * 255).round().astype(np.uint8))


def test_two_channels_np_ok_pil_refused():
    pipe = scratch_pipe(tiny_unet(in_channels=2))
    assert pipe(num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 2)
    with pytest.raises(ValueError, match="output_type"):
        pipe(num_inference_steps=2, output_type="pil")


@pytest.mark.filterwarnings("ignore:the UNet is float16 on the CPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_unet(dtype):
    unet = tiny_unet().to(dtype)
    pipe = scratch_pipe(unet)
    images = pipe(batch_size=2, generator=gen(9), num_inference_steps=3, output_type="pt").images
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert pipe.unet.dtype == dtype


# ----------------------------------------------------------------------------------------------
# Loop: callbacks, progress bar, nothing added per step
# ----------------------------------------------------------------------------------------------
def test_callback_sees_every_step_and_can_replace_latents():
    pipe = scratch_pipe()
    seen = []

    def callback(p, i, t, kwargs):
        assert p is pipe and set(kwargs) == {"latents"}
        seen.append((i, int(t)))
        if i == 3:
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return {}

    images = pipe(num_inference_steps=4, callback_on_step_end=callback, output_type="np").images
    ref = ScratchDDPMScheduler()
    ref.set_timesteps(4)
    assert seen == list(enumerate(int(t) for t in ref.timesteps))
    np.testing.assert_array_equal(images, np.full_like(images, 0.5))  # x_0 := 0 -> pixel 0.5


def test_progress_bar_switch(capsys):
    pipe = ScratchDDPMPipeline(tiny_unet(), ScratchDDPMScheduler())
    pipe.set_progress_bar_config(disable=False)
    pipe(num_inference_steps=3, output_type="np")
    assert "3/3" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe(num_inference_steps=3, output_type="np")
    assert "3/3" not in capsys.readouterr().err


class _CountOutside(TorchFunctionMode):
    """Counts torch calls made outside the UNet forward, scheduler.step and set_timesteps."""

    def __init__(self):
        super().__init__()
        self.outside = 0
        self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.depth == 0:
            self.outside += 1
        return func(*args, **(kwargs or {}))

    def wrap(self, fn):
        def inner(*args, **kwargs):
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
        return inner


def _ops_outside(num_inference_steps):
    pipe = scratch_pipe()
    counter = _CountOutside()
    pipe.unet.forward = counter.wrap(pipe.unet.forward)
    pipe.scheduler.step = counter.wrap(pipe.scheduler.step)
    pipe.scheduler.set_timesteps = counter.wrap(pipe.scheduler.set_timesteps)
    timesteps_seen = []
    pipe.unet.register_forward_pre_hook(lambda m, args: timesteps_seen.append(args[1]))
    with counter:
        pipe(batch_size=2, generator=gen(0), num_inference_steps=num_inference_steps, output_type="pt")
    assert len(timesteps_seen) == num_inference_steps
    assert all(isinstance(t, torch.Tensor) and t.ndim == 0 for t in timesteps_seen)  # the 0-d tensor, as is
    return counter.outside


def test_loop_adds_no_torch_work_per_step():
    """Torch calls outside UNet/scheduler do not grow with the number of steps (no per-step syncs/copies)."""
    assert _ops_outside(2) == _ops_outside(7)


# ----------------------------------------------------------------------------------------------
# Bad arguments
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(batch_size="2"), ValueError, "batch_size"),
        (dict(batch_size=True), ValueError, "batch_size"),
        (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
        (dict(num_inference_steps=2.5), ValueError, "num_inference_steps"),
        (dict(num_inference_steps=T + 1), ValueError, "num_inference_steps"),
        (dict(output_type="jpg"), ValueError, "output_type"),
        (dict(batch_size=2, generator=[torch.Generator()]), ValueError, "generator"),
        (dict(generator=[torch.Generator(), 3]), TypeError, "generator"),
        (dict(generator=42), TypeError, "generator"),
        (dict(latents=torch.zeros(1, 3, 4, 4)), ValueError, "latents"),
        (dict(latents=np.zeros((1, 3, 8, 8))), TypeError, "latents"),
        (dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"]), ValueError,
         "callback_on_step_end_tensor_inputs"),
        (dict(callback_on_step_end="print"), TypeError, "callback_on_step_end"),
    ],
)
def test_bad_arguments(kwargs, exc, word):
    pipe = scratch_pipe()
    kwargs.setdefault("num_inference_steps", 2)
    with pytest.raises(exc, match=word):
        pipe(**kwargs)


def test_variance_channels_must_match_scheduler():
    with pytest.raises(ValueError, match="out_channels"):
        scratch_pipe(tiny_unet(), variance_type="learned_range")(num_inference_steps=2)


def test_learned_variance_unet_sampled_with_a_fixed_variance():
    """A 2C-channel UNet with a fixed_small scheduler: the variance half is ignored, as in a manual loop."""
    unet = tiny_unet(variance_type="learned_range")
    images = scratch_pipe(unet)(num_inference_steps=3, generator=gen(0), output_type="pt").images
    sched = ScratchDDPMScheduler()
    sched.set_timesteps(3)
    g = gen(0)
    x = torch.randn((1, 3, 8, 8), generator=g)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample[:, :3], t, x, generator=g).prev_sample
    torch.testing.assert_close(images, (x / 2 + 0.5).clamp(0, 1))


# ----------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved ScratchDDPMPipeline (tiny UNet, our scheduler) and the pipeline itself."""
    pipe = scratch_pipe(tiny_unet(seed=1), beta_schedule="squaredcos_cap_v2", variance_type="fixed_large")
    folder = tmp_path_factory.mktemp("saved") / "pipe"
    pipe.save_pretrained(folder)
    return folder, pipe


def _same_weights(a, b):
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_writes_safetensors_and_our_modules(saved):
    folder, pipe = saved
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "ScratchDDPMPipeline"
    assert index["scheduler"] == ["ddpm_from_scratch.scheduling_ddpm", "ScratchDDPMScheduler"]
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert "unet/diffusion_pytorch_model.safetensors" in files and "unet/config.json" in files
    assert "scheduler/scheduler_config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in files)
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "ScratchDDPMScheduler" and sched["beta_schedule"] == "squaredcos_cap_v2"
    stored = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(stored[k], v) for k, v in pipe.unet.state_dict().items())


def test_refuses_pickle_serialization(tmp_path):
    with pytest.raises(ValueError, match="safe_serialization"):
        scratch_pipe().save_pretrained(tmp_path / "x", safe_serialization=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("loader", [ScratchDDPMPipeline, DiffusionPipeline])
def test_load_local_folder(saved, loader):
    folder, pipe = saved
    loaded = quiet(loader.from_pretrained(folder))
    assert type(loaded) is ScratchDDPMPipeline and type(loaded.scheduler) is ScratchDDPMScheduler
    assert _same_weights(loaded, pipe)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
    a = loaded(batch_size=2, generator=gen(2), num_inference_steps=4, output_type="np").images
    b = pipe(batch_size=2, generator=gen(2), num_inference_steps=4, output_type="np").images
    np.testing.assert_array_equal(a, b)


def test_diffusers_ddpm_pipeline_loads_our_scheduler(saved, tmp_path):
    folder, pipe = saved
    loaded = DDPMPipeline.from_pretrained(folder)
    assert type(loaded) is DDPMPipeline and type(loaded.scheduler) is ScratchDDPMScheduler
    assert _same_weights(loaded, pipe)
    # a DDPMPipeline saved with our scheduler round-trips through the generic loader too
    loaded.save_pretrained(tmp_path / "ddpm")
    index = json.loads((tmp_path / "ddpm" / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["scheduler"][1] == "ScratchDDPMScheduler"
    again = DiffusionPipeline.from_pretrained(tmp_path / "ddpm")
    assert type(again) is DDPMPipeline and type(again.scheduler) is ScratchDDPMScheduler


def test_registration_with_diffusers():
    assert diffusers.ScratchDDPMPipeline is ScratchDDPMPipeline
    assert "ddpm_from_scratch.scheduling_ddpm" in pipeline_loading_utils.LOADABLE_CLASSES


def _pickle_only_copy(folder, dest):
    shutil.copytree(folder, dest)
    weights = dest / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), dest / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    return dest


def test_pickle_only_folder_needs_explicit_opt_in(saved, tmp_path):
    folder, pipe = saved
    pickled = _pickle_only_copy(folder, tmp_path / "pickled")
    with pytest.raises(ValueError, match="use_safetensors=False"):
        ScratchDDPMPipeline.from_pretrained(pickled)
    with pytest.raises(ValueError, match="use_safetensors=False"):
        ScratchDDPMPipeline.from_pretrained(pickled, use_safetensors=True)
    loaded = ScratchDDPMPipeline.from_pretrained(pickled, use_safetensors=False)
    assert _same_weights(loaded, pipe)


@pytest.mark.parametrize("bad", ["./no/such/folder", "a/b/c", "bad id!"])
def test_bad_path_or_repo_id(bad):
    with pytest.raises(ValueError, match="pretrained_model_name_or_path"):
        ScratchDDPMPipeline.from_pretrained(bad)


def test_file_instead_of_folder(saved):
    folder, _ = saved
    with pytest.raises(ValueError, match="file"):
        ScratchDDPMPipeline.from_pretrained(folder / "model_index.json")


def _fake_hub_cache(cache, repo_id, folder, commit="0123456789abcdef0123456789abcdef01234567"):
    """Lay ``folder`` out as the cached snapshot of ``repo_id`` at ``main`` (huggingface_hub cache layout)."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo_dir / "snapshots" / commit)


@pytest.mark.parametrize("loader", [ScratchDDPMPipeline, DiffusionPipeline])
def test_load_repo_id_from_cache(saved, tmp_path, loader):
    """Repo ids resolve through huggingface_hub (offline here: the cache) with cache_dir / revision kwargs."""
    folder, pipe = saved
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    _fake_hub_cache(tmp_path, "someone/tiny-ddpm", folder)
    loaded = loader.from_pretrained("someone/tiny-ddpm", cache_dir=tmp_path, revision="main")
    assert type(loaded) is ScratchDDPMPipeline and _same_weights(loaded, pipe)
    assert loaded.config._name_or_path == "someone/tiny-ddpm"


def test_pickle_only_repo_refused(saved, tmp_path):
    folder, pipe = saved
    pickled = _pickle_only_copy(folder, tmp_path / "pickled")
    _fake_hub_cache(tmp_path / "cache", "someone/pickled", pickled)
    with pytest.raises(ValueError, match="use_safetensors=False"):
        ScratchDDPMPipeline.from_pretrained("someone/pickled", cache_dir=tmp_path / "cache", local_files_only=True)
    loaded = ScratchDDPMPipeline.from_pretrained("someone/pickled", cache_dir=tmp_path / "cache", use_safetensors=False)
    assert _same_weights(loaded, pipe)


def test_package_import_alone_registers_the_pipeline():
    """A fresh interpreter: ``import ddpm_from_scratch`` is enough for DiffusionPipeline to resolve our class."""
    import subprocess
    import sys

    code = (
        "import diffusers, ddpm_from_scratch\n"
        "assert ddpm_from_scratch.ScratchDDPMPipeline is diffusers.ScratchDDPMPipeline\n"
        "assert callable(ddpm_from_scratch.build_unet) and callable(ddpm_from_scratch.unet_config)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# No silent wrong result: non-finite samples, dtypes a device cannot use (issue 10)
# ----------------------------------------------------------------------------------------------
from ddpm_from_scratch import pipeline_ddpm as P  # noqa: E402


def _nan_weights_unet():
    unet = tiny_unet()
    with torch.no_grad():
        unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    return unet


@pytest.mark.parametrize("output_type", ["pil", "np", "pt"])
def test_nan_weights_raise_instead_of_black_images(output_type):
    pipe = scratch_pipe(_nan_weights_unet())
    with pytest.raises(P.NonFiniteSampleError, match=r"NaN/inf after 3 steps.*weights.*conv_in\.weight"):
        pipe(batch_size=2, generator=gen(0), num_inference_steps=3, output_type=output_type)


class _NaNAtTimestep(PointMassDenoiser):
    """The exact denoiser, except that its output is NaN at one timestep (weights stay finite)."""

    def __init__(self, target, bad_t):
        super().__init__(target)
        self.bad_t = bad_t

    def forward(self, sample, timestep, return_dict=True):
        out = super().forward(sample, timestep, return_dict=False)[0]
        if int(timestep) == self.bad_t:
            out = torch.full_like(out, float("nan"))
        return (out,) if not return_dict else diffusers.models.unets.unet_2d.UNet2DOutput(sample=out)


def test_non_finite_model_output_raises():
    sched = ScratchDDPMScheduler()
    sched.set_timesteps(5)
    bad_t = int(sched.timesteps[2])
    pipe = quiet(ScratchDDPMPipeline(_NaNAtTimestep(target_image(channels=1), bad_t), ScratchDDPMScheduler()))
    with pytest.raises(P.NonFiniteSampleError, match="became non-finite during sampling"):
        pipe(num_inference_steps=5, generator=gen(0), output_type="np")
    # the same denoiser with a finite output everywhere samples normally
    ok = quiet(ScratchDDPMPipeline(_NaNAtTimestep(target_image(channels=1), -1), ScratchDDPMScheduler()))
    assert np.isfinite(ok(num_inference_steps=5, generator=gen(0), output_type="np").images).all()


def test_non_finite_latents_from_a_callback_raise():
    def callback(p, i, t, kwargs):
        return {"latents": torch.full_like(kwargs["latents"], float("inf"))} if i == 1 else {}

    with pytest.raises(P.NonFiniteSampleError, match="callback_on_step_end"):
        scratch_pipe()(num_inference_steps=3, callback_on_step_end=callback, output_type="pt")


def test_non_finite_x_T_is_refused_before_the_loop():
    pipe = scratch_pipe()
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    noise = torch.randn(1, 3, 8, 8)
    noise[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="latents"):
        pipe(num_inference_steps=2, latents=noise)
    assert calls == []


def test_float16_on_cpu_says_so():
    pipe = scratch_pipe(tiny_unet().to(torch.float16))
    with pytest.warns(UserWarning, match="float16 on the CPU.*float32"):
        images = pipe(num_inference_steps=2, generator=gen(0), output_type="pt").images
    assert torch.isfinite(images).all()
    with warnings_as_errors():  # float32 and bfloat16 on a CPU: no message
        scratch_pipe(tiny_unet())(num_inference_steps=2, output_type="pt")
        scratch_pipe(tiny_unet().to(torch.bfloat16))(num_inference_steps=2, output_type="pt")


@contextlib.contextmanager
def warnings_as_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        yield


def test_unusable_dtype_refused_before_the_loop():
    unet = tiny_unet().to(torch.float8_e4m3fn)
    calls = []
    unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(ValueError, match=r"dtype torch\.float8_e4m3fn cannot sample.*float32"):
        scratch_pipe(unet)(num_inference_steps=2)
    assert calls == []
    with pytest.raises(ValueError, match="float64 is not supported on mps"):
        P.check_dtype_device(torch.float64, torch.device("mps"))
    P.check_dtype_device(torch.float64, torch.device("cpu"))  # float64 on a CPU is fine


def test_from_pretrained_with_float16_on_cpu_says_so(saved):
    folder, _ = saved
    pipe = quiet(ScratchDDPMPipeline.from_pretrained(folder, dtype=torch.float16))
    assert pipe.unet.dtype == torch.float16
    with pytest.warns(UserWarning, match="float16 on the CPU"):
        pipe(num_inference_steps=2, output_type="np")


@pytest.mark.parametrize("loader", [DiffusionPipeline, DDPMPipeline])
def test_diffusers_loaders_refuse_pickle_only_folders_too(saved, tmp_path, loader):
    folder, pipe = saved
    pickled = _pickle_only_copy(folder, tmp_path / "pickled")
    with pytest.raises(ValueError, match=r"'unet'.*only pickle weights.*use_safetensors=False"):
        loader.from_pretrained(pickled)
    loaded = loader.from_pretrained(pickled, use_safetensors=False)  # the explicit opt-in still works
    assert _same_weights(loaded, pipe)


def test_diffusion_pipeline_refuses_pickle_only_repo(saved, tmp_path):
    folder, _ = saved
    pickled = _pickle_only_copy(folder, tmp_path / "pickled")
    _fake_hub_cache(tmp_path / "cache", "someone/pickled", pickled)
    with pytest.raises(ValueError, match="only pickle weights"):
        DiffusionPipeline.from_pretrained("someone/pickled", cache_dir=tmp_path / "cache")


def test_pickle_guard_leaves_other_pipelines_alone(tmp_path):
    """A plain DDPMPipeline folder (diffusers' own scheduler) with pickle weights loads as diffusers decides."""
    ref = DDPMPipeline(tiny_unet(), DDPMScheduler())
    ref.save_pretrained(tmp_path / "plain")
    _pickle_only_copy(tmp_path / "plain", tmp_path / "plain-pickled")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "plain-pickled")
    assert type(loaded) is DDPMPipeline and _same_weights(loaded, ref)


# ----------------------------------------------------------------------------------------------
# register_with_diffusers: the private API it was written against is checked
# ----------------------------------------------------------------------------------------------
def test_registration_wraps_the_loader_once():
    from diffusers.pipelines import pipeline_utils

    before = pipeline_utils.load_sub_model
    assert P.register_with_diffusers() is True and P.register_with_diffusers() is True
    assert pipeline_utils.load_sub_model is before and getattr(before, P._GUARD_MARK)
    assert P.diffusers_integration_problem(diffusers.__version__) is None


def test_registration_warns_on_another_diffusers_version(monkeypatch):
    monkeypatch.setattr(diffusers, "__version__", "0.99.0")
    with pytest.warns(UserWarning, match=r"written against diffusers 0\.42\.x.*0\.99\.0.*pip install 'diffusers==0\.42\.\*'"):
        assert P.register_with_diffusers() is True
    monkeypatch.setattr(diffusers, "__version__", "0.42.7")  # a patch release of the same series: silent
    with warnings_as_errors():
        assert P.register_with_diffusers() is True


def test_registration_refuses_a_changed_private_api(monkeypatch):
    from diffusers.pipelines import pipeline_utils

    monkeypatch.delattr(diffusers, "ScratchDDPMPipeline")
    monkeypatch.delattr(pipeline_loading_utils, "LOADABLE_CLASSES")
    with pytest.raises(P.DiffusersIntegrationError, match=r"LOADABLE_CLASSES.*pip install 'diffusers==0\.42\.\*'"):
        P.register_with_diffusers()
    with pytest.warns(UserWarning, match="cannot register"):
        assert P.register_with_diffusers(strict=False) is False
    assert not hasattr(diffusers, "ScratchDDPMPipeline")  # nothing half-registered
    monkeypatch.undo()
    monkeypatch.setattr(pipeline_utils, "load_sub_model", lambda library_name, class_name: None)
    kind, message = P.diffusers_integration_problem(diffusers.__version__)
    assert kind == "api" and "cached_folder" in message and "load_sub_model" in message

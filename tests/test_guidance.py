"""Class conditioning and classifier-free guidance: guidance.py and ScratchDDPMPipeline(class_labels, guidance_scale).

References: an explicit two-pass loop (two separate UNet calls per step, the guidance formula written out in
float64, ScratchDDPMScheduler.step), the closed-form eps <-> x_0 <-> v maps in float64, and the saved / pulled
files themselves for the loading round trips (local folder, DiffusionPipeline.from_pretrained, tests/hub_server.py).
"""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import ddpm_from_scratch  # noqa: F401  (registers the pipeline with diffusers)
from ddpm_from_scratch import ScratchDDPMScheduler, guidance
from ddpm_from_scratch import diffusion_math as dm
from ddpm_from_scratch import likelihood as L
from ddpm_from_scratch.pipeline_ddpm import ScratchDDPMPipeline
from ddpm_from_scratch.unet_presets import build_unet

NAMES = ["cat", "dog", "owl"]


def cond_unet(seed=0, num_classes=3, **overrides):
    torch.manual_seed(seed)
    return build_unet("tiny", in_channels=1, num_classes=num_classes, **overrides).eval()


def cond_pipe(unet=None, class_names=NAMES, **scheduler_kwargs):
    scheduler_kwargs.setdefault("num_train_timesteps", 50)
    pipe = ScratchDDPMPipeline(unet if unet is not None else cond_unet(), ScratchDDPMScheduler(**scheduler_kwargs),
                               class_names=class_names)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class ForwardLog:
    """Records (batch size, class labels) of every UNet forward."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        labels = kwargs.get("class_labels")
        self.calls.append((args[0].shape[0], None if labels is None else labels.tolist()))


@torch.no_grad()
def two_pass_reference(pipe, labels, scale, steps, seed):
    """Sampling with two separate UNet calls per step, combined in float64 by the written-out formula."""
    unet, sched = pipe.unet, ScratchDDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor(labels)
    null = torch.full_like(labels, unet.config.num_class_embeds - 1)
    x = torch.randn((len(labels), 1, 8, 8), generator=gen)
    sched.set_timesteps(steps)
    c = unet.config.in_channels
    for t in sched.timesteps:
        out_c = unet(x, t, class_labels=labels).sample.double()
        out_u = unet(x, t, class_labels=null).sample.double()
        pred = out_u[:, :c] + scale * (out_c[:, :c] - out_u[:, :c])
        out = torch.cat([pred, out_c[:, c:]], dim=1).float()
        x = sched.step(out, t, x, generator=gen).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# The pure parts
# ----------------------------------------------------------------------------------------------
def test_combine_is_the_guidance_formula():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, 2, 3, 3, generator=g,
                                                                                          dtype=torch.float64)
    for s in (0.0, 0.5, 1.0, 2.0, 4.0):
        expected = (1 - s) * uncond + s * cond
        torch.testing.assert_close(guidance.combine(cond, uncond, s), expected, rtol=0, atol=1e-12)
    assert torch.equal(guidance.combine(cond, uncond, 0.0), uncond)


def test_guided_output_guides_only_the_prediction_half():
    g = torch.Generator().manual_seed(1)
    out = torch.randn(6, 4, 2, 2, generator=g, dtype=torch.float64)  # 2B = 6, C = 2, learned variance: 4 channels
    res = guidance.guided_output(out, 3.0, channels=2)
    assert res.shape == (3, 4, 2, 2)
    torch.testing.assert_close(res[:, :2], out[3:, :2] + 3.0 * (out[:3, :2] - out[3:, :2]), rtol=0, atol=1e-12)
    assert torch.equal(res[:, 2:], out[:3, 2:])  # variance: the conditional half, untouched
    fixed = guidance.guided_output(out[:, :2], 3.0, channels=2)
    torch.testing.assert_close(fixed, res[:, :2], rtol=0, atol=0)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_guiding_in_output_space_equals_guiding_epsilon(prediction_type):
    """x_0 and v are affine in eps for a fixed x_t and t: guiding either equals guiding eps (float64)."""
    g = torch.Generator().manual_seed(2)
    abar = torch.tensor(0.37, dtype=torch.float64)
    sa, s1 = abar.sqrt(), (1 - abar).sqrt()
    x_t = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    out_c, out_u = (torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))

    def to_eps(out):
        row = SimpleNamespace(sqrt_abar=sa, sqrt_one_minus_abar=s1, sqrt_recip_abar=1 / sa)  # one chain step
        x0 = dm.x0_from_model_output(prediction_type, out, x_t, row)
        return dm.eps_from_x0(x_t, x0, sa, s1)

    for s in (0.0, 2.0, 4.0):
        guided_then_eps = to_eps(guidance.combine(out_c, out_u, s))
        eps_then_guided = guidance.combine(to_eps(out_c), to_eps(out_u), s)
        torch.testing.assert_close(guided_then_eps, eps_then_guided, rtol=0, atol=1e-12)


def test_resolve_labels_ints_names_and_broadcast():
    r = guidance.resolve_class_labels
    assert r(["dog", 0, np.int64(2)], 3, 3, NAMES).tolist() == [1, 0, 2]
    assert r("owl", 4, 3, NAMES).tolist() == [2, 2, 2, 2]
    assert r(torch.tensor([2, 1]), 2, 3, None).tolist() == [2, 1]
    assert guidance.infer_batch_size(None, [1, 2, 0]) == 3 and guidance.infer_batch_size(None, "cat") == 1
    assert guidance.infer_batch_size(5, "cat") == 5


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_guided_sampling_equals_explicit_two_pass(prediction_type):
    pipe = cond_pipe(prediction_type=prediction_type)
    log = ForwardLog(pipe.unet)
    labels = [0, 2, 1, 2]
    out = pipe(class_labels=labels, guidance_scale=2.5, num_inference_steps=6, output_type="pt",
               generator=torch.Generator().manual_seed(7)).images
    # one batched forward per step: 2B rows, the conditional labels then the null class
    assert [c[0] for c in log.calls] == [8] * 6
    assert all(c[1] == labels + [3] * 4 for c in log.calls)
    ref = two_pass_reference(pipe, labels, 2.5, 6, 7)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)


def test_learned_variance_guides_the_prediction_half_only():
    pipe = cond_pipe(cond_unet(variance_type="learned_range"), variance_type="learned_range")
    labels = [1, 0, 2]
    out = pipe(class_labels=labels, guidance_scale=3.0, num_inference_steps=5, output_type="pt",
               generator=torch.Generator().manual_seed(3)).images
    torch.testing.assert_close(out, two_pass_reference(pipe, labels, 3.0, 5, 3), rtol=0, atol=2e-5)


@pytest.mark.parametrize("scale,half", [(1.0, "cond"), (0.0, "null")])
def test_scale_one_is_conditional_and_zero_unconditional(scale, half):
    pipe = cond_pipe()
    log = ForwardLog(pipe.unet)
    labels = [2, 0]
    out = pipe(class_labels=labels, guidance_scale=scale, num_inference_steps=4, output_type="pt",
               generator=torch.Generator().manual_seed(5)).images
    expected_labels = labels if half == "cond" else [3, 3]
    assert all(c == (2, expected_labels) for c in log.calls) and len(log.calls) == 4  # one half is enough
    torch.testing.assert_close(out, two_pass_reference(pipe, labels, scale, 4, 5), rtol=0, atol=2e-5)
    # no labels at all: the null class, as guidance_scale=0
    if half == "null":
        plain = pipe(batch_size=2, num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(5))
        assert torch.equal(plain.images, out)


def test_classes_really_condition_the_samples():
    pipe = cond_pipe()
    a = pipe(class_labels=[0, 0], num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0))
    b = pipe(class_labels=[1, 1], num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a.images, b.images)


def test_names_and_indices_give_the_same_images():
    pipe = cond_pipe()
    by_name = pipe(class_labels=["dog", "owl"], guidance_scale=2.0, num_inference_steps=3, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
    by_index = pipe(class_labels=[1, 2], guidance_scale=2.0, num_inference_steps=3, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    single = pipe(class_labels="dog", batch_size=2, num_inference_steps=3, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert by_name.shape == (2, 8, 8, 1) and np.array_equal(by_name, by_index) and single.shape[0] == 2


@pytest.mark.parametrize(
    "make,kwargs,exc,words",
    [
        ("cond", dict(class_labels=[3]), ValueError, "class_labels.*out of range.*0..2"),
        ("cond", dict(class_labels=[-1]), ValueError, "class_labels.*out of range"),
        ("cond", dict(class_labels=["cow"]), ValueError, "class_labels.*unknown class name 'cow'.*cat"),
        ("cond", dict(class_labels=[1.5]), TypeError, "class_labels"),
        ("cond", dict(class_labels=[True]), TypeError, "class_labels"),
        ("cond", dict(class_labels=torch.tensor([0.0])), TypeError, "class_labels"),
        ("cond", dict(class_labels=[]), ValueError, "class_labels"),
        ("cond", dict(class_labels=[0, 1], batch_size=3), ValueError, "class_labels has 2 labels but batch_size=3"),
        ("cond", dict(class_labels=[0], guidance_scale=-1.0), ValueError, "guidance_scale"),
        ("cond", dict(class_labels=[0], guidance_scale=float("nan")), ValueError, "guidance_scale"),
        ("cond", dict(class_labels=[0], guidance_scale="2"), TypeError, "guidance_scale"),
        ("cond", dict(guidance_scale=2.0), ValueError, "guidance_scale needs class_labels"),
        ("nonames", dict(class_labels=["cat"]), ValueError, "class_labels.*no class names"),
        ("uncond", dict(class_labels=[0]), ValueError, "class_labels needs a class-conditional UNet"),
        ("uncond", dict(guidance_scale=2.0), ValueError, "guidance_scale needs a class-conditional UNet"),
    ],
)
def test_bad_conditioning_is_refused_before_any_forward(make, kwargs, exc, words):
    if make == "uncond":
        torch.manual_seed(0)
        pipe = cond_pipe(build_unet("tiny", in_channels=1).eval(), class_names=None)
    else:
        pipe = cond_pipe(class_names=None if make == "nonames" else NAMES)
    log = ForwardLog(pipe.unet)
    with pytest.raises(exc, match=words):
        pipe(num_inference_steps=2, **kwargs)
    assert log.calls == []


@pytest.mark.parametrize(
    "unet_kwargs,names,words",
    [
        (dict(num_classes=3), ["a", "b"], "class_names has 2 names but the UNet has 3 classes"),
        (dict(num_classes=3), ["a", "a", "b"], "class_names must be distinct"),
        (dict(num_classes=3), "abc", "class_names must be a list"),
        (dict(), ["a", "b"], "class_names were given but the UNet is unconditional"),
    ],
)
def test_bad_class_names_are_refused(unet_kwargs, names, words):
    unet = build_unet("tiny", in_channels=1, **unet_kwargs)
    with pytest.raises((ValueError, TypeError), match=words):
        ScratchDDPMPipeline(unet, ScratchDDPMScheduler(), class_names=names)


def test_foreign_class_conditioning_is_refused():
    unet = build_unet("tiny", in_channels=1, class_embed_type="timestep")
    with pytest.raises(ValueError, match="class_embed_type='timestep' is not supported"):
        ScratchDDPMPipeline(unet, ScratchDDPMScheduler())


# ----------------------------------------------------------------------------------------------
# Saving and loading keep the classes
# ----------------------------------------------------------------------------------------------
def _sample(pipe, labels):
    return pipe(class_labels=labels, guidance_scale=2.0, num_inference_steps=3, output_type="np",
                generator=torch.Generator().manual_seed(11)).images


def test_class_names_survive_save_pretrained_and_both_loaders(tmp_path, caplog):
    pipe = cond_pipe()
    before = _sample(pipe, [0, 1, 2])
    pipe.save_pretrained(tmp_path)
    with open(tmp_path / "model_index.json") as f:
        assert json.load(f)["class_names"] == {"0": "cat", "1": "dog", "2": "owl"}
    with open(tmp_path / "unet" / "config.json") as f:
        assert json.load(f)["num_class_embeds"] == 4
    for loader in (ScratchDDPMPipeline.from_pretrained, DiffusionPipeline.from_pretrained):
        loaded = loader(str(tmp_path))
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded) is ScratchDDPMPipeline and loaded.class_names == NAMES
        assert np.array_equal(_sample(loaded, ["cat", "dog", "owl"]), before)
        with pytest.raises(ValueError, match="unknown class name"):
            loaded(class_labels=["emu"], num_inference_steps=2)
    assert "Expected types" not in caplog.text  # diffusers' init-argument type check accepts the stored form
    # the stored form is checked too
    with pytest.raises(ValueError, match="keys 0..2"):
        ScratchDDPMPipeline(pipe.unet, pipe.scheduler, class_names={"0": "cat", "1": "dog", "5": "owl"})
    assert ScratchDDPMPipeline(pipe.unet, pipe.scheduler, class_names={"1": "dog", "0": "cat", "2": "owl"}
                               ).class_names == NAMES


def test_unconditional_folder_still_loads_without_class_names(tmp_path):
    torch.manual_seed(0)
    pipe = ScratchDDPMPipeline(build_unet("tiny", in_channels=1), ScratchDDPMScheduler(num_train_timesteps=20))
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index.pop("class_names")  # a folder written before class names existed
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    loaded = ScratchDDPMPipeline.from_pretrained(str(tmp_path))
    assert loaded.class_names is None


HUB_SCRIPT = r'''
import json, sys
import numpy as np, torch
import diffusers
import ddpm_from_scratch
from ddpm_from_scratch import ScratchDDPMScheduler, ScratchDDPMPipeline
from ddpm_from_scratch.unet_presets import build_unet

out, mode = sys.argv[1], sys.argv[2]
def sample(pipe, labels):
    pipe.set_progress_bar_config(disable=True)
    return pipe(class_labels=labels, guidance_scale=2.0, num_inference_steps=3, output_type="np",
                generator=torch.Generator().manual_seed(11)).images
if mode == "push":
    torch.manual_seed(0)
    pipe = ScratchDDPMPipeline(build_unet("tiny", in_channels=1, num_classes=3),
                               ScratchDDPMScheduler(num_train_timesteps=50), class_names=["cat", "dog", "owl"])
    pipe.push_to_hub("user/cond")
    np.save(f"{out}/pushed.npy", sample(pipe, [0, 1, 2]))
else:
    res = {}
    for name, loader in (("scratch", ScratchDDPMPipeline.from_pretrained),
                         ("generic", diffusers.DiffusionPipeline.from_pretrained)):
        pipe = loader("user/cond", cache_dir=f"{out}/cache_{name}")
        res[name] = {"class": type(pipe).__name__, "names": pipe.class_names}
        np.save(f"{out}/pulled_{name}.npy", sample(pipe, ["cat", "dog", "owl"]))
    json.dump(res, open(f"{out}/pulled.json", "w"))
'''


def test_class_names_survive_the_hub_round_trip(tmp_path):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from hub_server import HubServer

    script = tmp_path / "client.py"
    script.write_text(HUB_SCRIPT)
    with HubServer(root=str(tmp_path / "server")) as hub:
        for mode in ("push", "pull"):
            env = hub.client_env(str(tmp_path / f"home_{mode}"), token="hf_" + "x" * 30)
            env.update(OMP_NUM_THREADS="1", TQDM_DISABLE="1", DIFFUSERS_NO_ADVISORY_WARNINGS="1",
                       PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
            proc = subprocess.run([sys.executable, str(script), str(tmp_path), mode], env=env, capture_output=True,
                                  text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-4000:]
        stored = json.loads(hub.read_files("user/cond")["model_index.json"])
    assert stored["class_names"] == {"0": "cat", "1": "dog", "2": "owl"}
    pulled = json.loads((tmp_path / "pulled.json").read_text())
    pushed = np.load(tmp_path / "pushed.npy")
    for name in ("scratch", "generic"):
        assert pulled[name] == {"class": "ScratchDDPMPipeline", "names": ["cat", "dog", "owl"]}
        assert np.array_equal(np.load(tmp_path / f"pulled_{name}.npy"), pushed)


# ----------------------------------------------------------------------------------------------
# The library functions that sample or score through the pipeline
# ----------------------------------------------------------------------------------------------
def test_sample_images_slices_labels_over_batches():
    pipe = cond_pipe()
    log = ForwardLog(pipe.unet)
    out = L.sample_images(pipe.unet, pipe.scheduler, 5, 3, batch_size=2, class_labels=[0, "owl", 2, 2, "dog"],
                          guidance_scale=2.0, class_names=NAMES, generator=torch.Generator().manual_seed(0))
    assert out.shape == (5, 1, 8, 8) and len(log.calls) == 9  # 3 batches x 3 steps, one forward each
    assert [c[1] for c in log.calls[::3]] == [[0, 2, 3, 3], [2, 2, 3, 3], [1, 3]]
    with pytest.raises(ValueError, match="class_labels has 2 labels but batch_size=5"):
        L.sample_images(pipe.unet, pipe.scheduler, 5, 3, class_labels=[0, 1])


def test_bits_per_dim_of_a_conditional_unet_is_its_null_class_model():
    unet = cond_unet()

    class NullOnly(torch.nn.Module):  # the same network, always given the null class
        def __init__(self):
            super().__init__()
            self.inner = unet

        def forward(self, x, t):
            return self.inner(x, t, class_labels=torch.full((x.shape[0],), 3)).sample

    sched = ScratchDDPMScheduler(num_train_timesteps=20)
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a = L.bits_per_dim(unet, sched, images, generator=torch.Generator().manual_seed(1))
    b = L.bits_per_dim(NullOnly(), sched, images, generator=torch.Generator().manual_seed(1))
    assert math.isfinite(a.total) and a.total == pytest.approx(b.total, rel=1e-12)


def test_per_image_generators_keep_each_guided_image_independent_of_the_batch():
    pipe = cond_pipe()

    def run(labels, seeds):
        return pipe(class_labels=labels, guidance_scale=3.0, num_inference_steps=4, output_type="pt",
                    generator=[torch.Generator().manual_seed(s) for s in seeds]).images

    both = run([1, 2], [10, 20])
    alone = run([2], [20])
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=1e-5)  # row 1 of [x, x] and its null twin only

"""evaluation.evaluate_model: seeded (same values twice), scored against the held-out digits, bad input refused, and
a real 2-process Accelerate run that splits the work and gives the 1-process numbers."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from ddpm_from_scratch import ScratchDDPMScheduler, evaluation as ev
from ddpm_from_scratch.metrics import digits_images, frechet_distance_images
from ddpm_from_scratch.unet_presets import build_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "eval_worker.py")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_unet("tiny", in_channels=1).eval(), ScratchDDPMScheduler(num_train_timesteps=20)


def _eval(model, **kw):
    args = dict(num_samples=8, num_inference_steps=4, seed=1, bound_num_images=8, bound_num_inference_steps=3,
                batch_size=4, keep_samples=8)
    args.update(kw)
    return ev.evaluate_model(*model, **args)


def test_seeded_evaluation_gives_the_same_values_twice_and_other_seeds_differ(model):
    a, b = _eval(model), _eval(model)
    assert a.metrics == b.metrics and torch.equal(a.samples, b.samples)
    assert set(a.metrics) == {"fdd", "num_samples", "num_inference_steps", "bits_per_dim", "bits_per_dim_stderr",
                              "bound_num_inference_steps", "bound_num_images"}
    c = _eval(model, seed=2)
    assert c.metrics["fdd"] != a.metrics["fdd"] and c.metrics["bits_per_dim"] != a.metrics["bits_per_dim"]


def test_fdd_is_against_the_held_out_split_never_the_training_images(model):
    res = _eval(model)
    held_out, _ = digits_images(8, "test")
    train, _ = digits_images(8, "train")
    assert held_out.shape[0] == 359
    assert res.metrics["fdd"] == pytest.approx(frechet_distance_images(held_out, res.samples), rel=1e-6)
    assert res.metrics["fdd"] != pytest.approx(frechet_distance_images(train, res.samples), rel=1e-3)


def test_the_bound_of_one_chunk_is_likelihoods_bound(model):
    from ddpm_from_scratch.likelihood import bits_per_dim

    images = digits_images(8, "test")[0][:6]
    shared = ev.bits_per_dim_shared(*model, images, 3, seed=4, batch_size=6)
    direct = bits_per_dim(*model, images, num_inference_steps=3, batch_size=6,
                          generator=torch.Generator().manual_seed(ev.chunk_seed(4, ev.BOUND_STREAM, 0)))
    assert shared["bits_per_dim"] == pytest.approx(direct.total, rel=1e-12)
    assert shared["terms_bpd"] == pytest.approx(direct.terms.tolist(), rel=1e-12)
    # chunks of 2 images: the mean over images of each chunk's per-image totals
    parts = [bits_per_dim(*model, images[k:k + 2], num_inference_steps=3, batch_size=2,
                          generator=torch.Generator().manual_seed(ev.chunk_seed(4, ev.BOUND_STREAM, k // 2))).per_image
             for k in (0, 2, 4)]
    assert ev.bits_per_dim_shared(*model, images, 3, seed=4, batch_size=2)["bits_per_dim"] == pytest.approx(
        float(torch.cat(parts).mean()), rel=1e-12)


def test_chunks_are_dealt_round_robin_and_cover_everything_once():
    assert ev.chunks(7, 3) == [(0, 0, 3), (1, 3, 6), (2, 6, 7)]
    assert ev.my_chunks(7, 3, 0, 2) == [(0, 0, 3), (2, 6, 7)] and ev.my_chunks(7, 3, 1, 2) == [(1, 3, 6)]
    assert len({ev.chunk_seed(0, s, k) for s in (0, 1) for k in range(50)}) == 100


def test_bad_settings_are_refused_naming_the_parameter(model):
    for kw, match in (({"num_samples": 1}, "num_samples"), ({"num_inference_steps": 21}, "num_inference_steps"),
                      ({"bound_num_inference_steps": 0}, "bound_num_inference_steps"), ({"batch_size": 0}, "batch_size"),
                      ({"reference": torch.zeros(5, 8)}, "reference"), ({"feature_extractor": "clip"}, "feature_extractor"),
                      ({"reference": torch.zeros(4, 1, 8, 8)}, "bound_num_images")):
        with pytest.raises(ValueError, match=match):
            _eval(model, **kw)


def test_fid_without_torch_fidelity_says_how_to_install(model):
    ok, _ = __import__("ddpm_from_scratch.metrics", fromlist=["x"]).inception_available()
    if ok:
        pytest.skip("torch-fidelity and its weights are installed here")
    with pytest.raises(RuntimeError, match="pip install|never downloads"):
        _eval(model, reference=torch.zeros(4, 1, 8, 8), feature_extractor="inception", bound_num_images=0)


def test_a_custom_feature_extractor_scores_against_the_given_held_out_reference(model):
    reference = digits_images(8, "test")[0][:40]
    mean_pixel = lambda x: x.flatten(1)[:, :4]  # noqa: E731
    res = _eval(model, reference=reference, feature_extractor=mean_pixel, bound_num_images=0)
    assert set(res.metrics) == {"fd", "num_samples", "num_inference_steps"}
    assert res.metrics["fd"] == pytest.approx(frechet_distance_images(reference, res.samples, mean_pixel), rel=1e-6)


def test_real_fdd_floor_is_positive_and_shrinks_with_more_samples():
    small, large = ev.digits_fdd_floor(64, draws=4), ev.digits_fdd_floor(1024, draws=4)
    assert 0 < large["mean"] < small["mean"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_split_the_evaluation_and_match_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    proc = subprocess.run([sys.executable, WORKER, str(tmp_path / "one")], env=env, capture_output=True, text=True,
                          timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]
    proc = subprocess.run(launch + [WORKER, str(tmp_path / "two")], env=env, capture_output=True, text=True,
                          timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    r0, r1 = (json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert one["world"] == 1 and r0["world"] == r1["world"] == 2
    # same numbers on every process and as one process alone
    assert r0["metrics"] == r1["metrics"] == one["metrics"]
    assert r0["samples"] == one["samples"]
    # the work was shared: 12 samples x 4 steps + 10 images x 3 bound steps in chunks of 3 -> 4 + 4 chunks,
    # rank 0 takes chunks 0, 2 of each, rank 1 chunks 1, 3
    total = 12 * 4 + 10 * 3
    assert one["images_through_unet"] == total
    assert r0["images_through_unet"] + r1["images_through_unet"] == total
    assert r0["images_through_unet"] == 2 * 3 * 4 + (3 + 3) * 3 and r1["images_through_unet"] == 2 * 3 * 4 + (3 + 1) * 3
    assert r0["work"] == r1["work"] == [{"rank": 0, "samples": 6, "bound_images": 6},
                                         {"rank": 1, "samples": 6, "bound_images": 4}]
    assert one["work"] == [{"rank": 0, "samples": 12, "bound_images": 10}]

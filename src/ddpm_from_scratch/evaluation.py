"""Evaluation of a model during or after training: seeded samples, their Frechet distance to HELD-OUT images, and
the held-out bits/dim on a respaced chain; split over processes, the same numbers on any number of them.

    from ddpm_from_scratch.evaluation import evaluate_model
    result = evaluate_model(ema_unet, scheduler, num_samples=256, num_inference_steps=100, seed=0)
    result.metrics   # {"fdd": ..., "bits_per_dim": ..., "bits_per_dim_stderr": ..., ...}

Determinism and sharing: work is cut into fixed chunks (``batch_size`` samples, ``batch_size`` held-out images) and
chunk k draws its noise from its own CPU generator seeded by (seed, stream, k). Each process takes the chunks
k = rank, rank + world, ... and the chunk results are gathered (``accelerate.utils.gather_object``) so that every
process ends with all of them, in chunk order. So the metrics do not depend on the number of processes, each
process does 1/world of the work, and a resumed run re-evaluating a step gets the same values.

The sample metric: on the built-in digits, the Frechet digit distance (FDD) to the held-out split, in the features
of the shipped digits classifier. Elsewhere, FID in InceptionV3 features (torch-fidelity, local weights only;
otherwise an error says how to install it) against reference images the caller passes, which must be held out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

SAMPLE_STREAM, BOUND_STREAM = 0, 1


def chunk_seed(seed: int, stream: int, index: int) -> int:
    """A 63-bit seed for chunk ``index`` of ``stream``, independent across (seed, stream, index)."""
    return int(np.random.SeedSequence([int(seed), int(stream), int(index)]).generate_state(2, np.uint64)[0] >> 1)


def chunks(total: int, size: int) -> list[tuple[int, int, int]]:
    """[(k, start, stop)] cutting range(total) into pieces of ``size`` (the last may be shorter)."""
    return [(k, start, min(start + size, total)) for k, start in enumerate(range(0, total, size))]


def my_chunks(total: int, size: int, rank: int, world: int) -> list[tuple[int, int, int]]:
    """The chunks process ``rank`` of ``world`` takes: k = rank, rank + world, ..."""
    return chunks(total, size)[rank::world]


def _gather(local: list, accelerator) -> list:
    """Every process's (k, payload) list, concatenated and sorted by k (on every process)."""
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        local = gather_object(local)
    return sorted(local, key=lambda item: item[0])


def _rank_world(accelerator) -> tuple[int, int]:
    return (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@torch.inference_mode()
def sample_shared(unet, scheduler, num_samples: int, num_inference_steps: int | None, seed: int, *,
                  batch_size: int = 64, accelerator=None, variance_type: str | None = None) -> torch.Tensor:
    """num_samples (N, C, H, W) float32 in [-1, 1] on the CPU, this process sampling its chunks only, all gathered."""
    from .likelihood import sample_images

    rank, world = _rank_world(accelerator)
    local = [(k, sample_images(unet, scheduler, stop - start, num_inference_steps, variance_type=variance_type,
                               batch_size=stop - start, generator=torch.Generator().manual_seed(
                                   chunk_seed(seed, SAMPLE_STREAM, k))))
             for k, start, stop in my_chunks(num_samples, batch_size, rank, world)]
    return torch.cat([images for _, images in _gather(local, accelerator)])


@torch.inference_mode()
def bits_per_dim_shared(unet, scheduler, images: torch.Tensor, num_inference_steps: int | None, seed: int, *,
                        batch_size: int = 64, accelerator=None) -> dict:
    """The bound of ``images`` (N, C, H, W), split over processes by chunks: {bits_per_dim, stderr, prior_bpd,
    decoder_bpd, num_steps, num_images, terms_bpd (S,), timesteps (S,)} (likelihood.bits_per_dim per chunk)."""
    from .likelihood import bits_per_dim

    rank, world = _rank_world(accelerator)
    local = []
    for k, start, stop in my_chunks(images.shape[0], batch_size, rank, world):
        res = bits_per_dim(unet, scheduler, images[start:stop], num_inference_steps=num_inference_steps,
                           batch_size=batch_size, generator=torch.Generator().manual_seed(chunk_seed(seed, BOUND_STREAM, k)))
        local.append((k, (res.per_image, res.terms * (stop - start), res.prior * (stop - start), res.timesteps)))
    parts = [p for _, p in _gather(local, accelerator)]
    per_image = torch.cat([p[0] for p in parts])
    n = per_image.numel()
    terms = sum(p[1] for p in parts) / n
    return {"bits_per_dim": float(per_image.mean()), "stderr": float(per_image.std() / n**0.5) if n > 1 else float("nan"),
            "prior_bpd": float(sum(p[2] for p in parts) / n), "decoder_bpd": float(terms[-1]),
            "num_steps": int(terms.numel()), "num_images": n, "terms_bpd": terms.tolist(),
            "timesteps": parts[0][3].tolist()}


def resolve_feature_extractor(feature_extractor, device=None) -> tuple[str, Callable]:
    """(metric name, extractor): "digits" -> ("fdd", digits classifier); "inception" -> ("fid", InceptionV3 via
    torch-fidelity, RuntimeError naming the install when missing); a callable -> ("fd", it)."""
    from . import metrics

    if callable(feature_extractor):
        return "fd", feature_extractor
    if feature_extractor == "digits":
        return "fdd", metrics.digits_feature_extractor(device=device)
    if feature_extractor == "inception":
        return "fid", metrics.inception_feature_extractor(device=device)
    raise ValueError(f"feature_extractor must be 'digits', 'inception' or a callable, got {feature_extractor!r}")


@dataclass
class EvalResult:
    """metrics: {name: float} (fdd|fid|fd, bits_per_dim, bits_per_dim_stderr, num_samples, num_inference_steps,
    bound_num_inference_steps, bound_num_images); samples: the first ``keep_samples`` samples (K, C, H, W) in
    [-1, 1] (for a grid); bound: the full bits_per_dim_shared dict (per-term), or None; work: what each process
    did itself, gathered: [{"rank", "samples", "bound_images"}] by rank."""

    metrics: dict
    samples: torch.Tensor
    bound: dict | None
    work: list = field(default_factory=list)


@torch.inference_mode()
def evaluate_model(unet, scheduler, *, num_samples: int = 256, num_inference_steps: int | None = 100, seed: int = 0,
                   reference: torch.Tensor | None = None, feature_extractor="digits",
                   bound_num_inference_steps: int | None = 20, bound_num_images: int | None = None,
                   batch_size: int = 64, accelerator=None, keep_samples: int = 64) -> EvalResult:
    """Evaluates ``unet`` (pass the EMA weights) with ``scheduler``; same values on any number of processes.

    reference: held-out images (M, C, H, W) in [-1, 1] for the sample metric (default: the held-out digits at the
    model's size; never the training split). feature_extractor: see resolve_feature_extractor. With num_samples = 0
    only the bound is computed. bound_num_inference_steps: the respaced chain of the bound (None: all T);
    bound_num_images: the first that many held-out digits (None: all 359); 0 skips the bound (digits only)."""
    from .metrics import compute_features, digits_for_unet, frechet_distance_features

    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0 or num_samples == 1:
        raise ValueError(f"num_samples must be 0 (no sample metric) or an integer >= 2, got {num_samples!r}")
    _positive_int("batch_size", batch_size)
    T = int(scheduler.config.num_train_timesteps)
    for name, value in (("num_inference_steps", num_inference_steps),
                        ("bound_num_inference_steps", bound_num_inference_steps)):
        if value is not None and (_positive_int(name, value) > T):
            raise ValueError(f"{name} must be <= the scheduler's {T} training timesteps, got {value}")
    digits = reference is None
    if not digits and (not isinstance(reference, torch.Tensor) or reference.dim() != 4 or reference.shape[0] < 2):
        raise ValueError("reference must be held-out images, a tensor (M >= 2, C, H, W) in [-1, 1]")
    if not digits and bound_num_images not in (None, 0):
        raise ValueError("bound_num_images needs the built-in digits' held-out split (reference=None); pass 0")
    device = next(unet.parameters()).device
    was_training = unet.training
    unet.eval()
    try:
        out: dict = {}
        samples = torch.empty(0)
        if num_samples:
            name, extractor = resolve_feature_extractor(feature_extractor, device)
            real = digits_for_unet(unet, "test") if digits else reference
            samples = sample_shared(unet, scheduler, num_samples, num_inference_steps, seed, batch_size=batch_size,
                                    accelerator=accelerator)
            if not torch.isfinite(samples).all():
                raise FloatingPointError("the model's samples hold NaN or infinite values; no metric computed")
            out[name] = frechet_distance_features(compute_features(extractor, real, batch_size),
                                                  compute_features(extractor, samples, batch_size))
            out.update(num_samples=num_samples, num_inference_steps=num_inference_steps or T)
        bound = None
        if digits and bound_num_images != 0:
            held_out = digits_for_unet(unet, "test")[:bound_num_images]
            bound = bits_per_dim_shared(unet, scheduler, held_out, bound_num_inference_steps, seed,
                                        batch_size=batch_size, accelerator=accelerator)
            out.update(bits_per_dim=bound["bits_per_dim"], bits_per_dim_stderr=bound["stderr"],
                       bound_num_inference_steps=bound["num_steps"], bound_num_images=bound["num_images"])
        rank, world = _rank_world(accelerator)
        mine = {"rank": rank, "samples": sum(b - a for _, a, b in my_chunks(num_samples, batch_size, rank, world)),
                "bound_images": 0 if bound is None else sum(
                    b - a for _, a, b in my_chunks(bound["num_images"], batch_size, rank, world))}
        work = [w for _, w in _gather([(rank, mine)], accelerator)]
    finally:
        unet.train(was_training)
    return EvalResult(metrics=out, samples=samples[:keep_samples], bound=bound, work=work)


def digits_fdd_floor(num_samples: int = 256, resolution: int = 8, draws: int = 20, seed: int = 0) -> dict:
    """The FDD that real data scores at a sample size: ``num_samples`` TRAINING digits drawn without replacement
    against the whole held-out split, over ``draws`` draws -> {mean, std, min, max, num_samples, draws}. A model's
    FDD with that many samples cannot be expected below it."""
    from .metrics import compute_features, digits_feature_extractor, digits_images, frechet_distance_features

    _positive_int("num_samples", num_samples)
    _positive_int("draws", draws)
    train, _ = digits_images(resolution, "train")
    held_out, _ = digits_images(resolution, "test")
    if num_samples > train.shape[0] or num_samples < 2:
        raise ValueError(f"num_samples must be in [2, {train.shape[0]}] (the train split), got {num_samples}")
    extractor = digits_feature_extractor()
    f_train, f_test = compute_features(extractor, train), compute_features(extractor, held_out)
    gen = torch.Generator().manual_seed(seed)
    values = torch.tensor([frechet_distance_features(f_test, f_train[torch.randperm(train.shape[0], generator=gen)[:num_samples]])
                           for _ in range(draws)], dtype=torch.float64)
    return {"mean": float(values.mean()), "std": float(values.std()) if draws > 1 else 0.0, "min": float(values.min()),
            "max": float(values.max()), "num_samples": num_samples, "draws": draws}

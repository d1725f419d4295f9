#!/usr/bin/env python
"""Classifier-free guidance on the built-in digits: class accuracy, FDD, diversity and time per sample per scale.

    python benchmarks/bench_guidance.py --model /tmp/cond --scales 0 1 2 4 --num_samples 500 --steps 1000 \
        [--uncond_model /tmp/uncond] [--json results.json]

For each guidance scale s, ``--num_samples`` samples are drawn with balanced labels (sample i asks for class
i mod 10) through ScratchDDPMPipeline (one batched forward per step; s = 0 and s = 1 need only one half, so they
cost half of s = 2 or 4). Columns:

- accuracy: the fraction the shipped digits classifier (metrics.load_digits_classifier) assigns to the requested
  class; the classifier scores about 98.6% on the real held-out digits (printed as a reference row);
- FDD: Frechet digit distance of the samples to the 359 held-out digits (metrics.frechet_distance_images);
- within-class spread: the trace of each class's feature covariance over the real held-out digits' trace for the
  same class, averaged over classes (1 = as diverse as real digits of that class; lower = less diverse);
- time per sample: wall time of the sampling call over num_samples (one process, this machine, measured in the
  same run for every scale).

``--uncond_model``: an unconditional model sampled with the same count, steps and seed, for the FDD baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a class-conditional digits pipeline folder")
    p.add_argument("--uncond_model", default=None, help="an unconditional digits pipeline folder (FDD baseline)")
    p.add_argument("--scales", type=float, nargs="*", default=[0.0, 1.0, 2.0, 4.0],
                   help="guidance scales (none: only the --uncond_model baseline)")
    p.add_argument("--num_samples", type=int, default=500)
    p.add_argument("--steps", type=int, default=1000, help="sampling steps (respaced when < training steps)")
    p.add_argument("--batch_size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.num_samples < 10 or args.steps < 1 or args.batch_size < 1:
        p.error("--num_samples must be >= 10, --steps and --batch_size >= 1")
    return args


def class_feature_spread(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K,) trace of the feature covariance within each class; features (N, D), labels (N,)."""
    out = torch.empty(num_classes, dtype=torch.float64)
    for k in range(num_classes):
        f = features[labels == k].double()
        out[k] = f.var(dim=0, unbiased=True).sum() if f.shape[0] > 1 else float("nan")
    return out


def score(samples: torch.Tensor, labels: torch.Tensor | None, real: torch.Tensor, real_labels: torch.Tensor,
          classifier) -> dict:
    """Accuracy (when labels are given), FDD and within-class spread of samples (N, 1, 8, 8) in [-1, 1]."""
    from ddpm_from_scratch.metrics import frechet_distance_features, to_digit_input

    with torch.no_grad():
        x = to_digit_input(samples)
        feats, logits = classifier.features(x), classifier(x)
        real_feats = classifier.features(to_digit_input(real))
    out = {"fdd": frechet_distance_features(real_feats, feats)}
    predicted = logits.argmax(dim=1)
    if labels is not None:
        out["accuracy"] = float((predicted == labels).double().mean())
        spread = class_feature_spread(feats, labels, 10) / class_feature_spread(real_feats, real_labels, 10)
        out["within_class_spread"] = float(spread.mean())
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from ddpm_from_scratch.likelihood import sample_images
    from ddpm_from_scratch.metrics import digits_images, load_digits_classifier
    from ddpm_from_scratch.pipeline_ddpm import ScratchDDPMPipeline

    classifier = load_digits_classifier()
    real, real_labels = digits_images(8, "test")
    with torch.no_grad():
        real_acc = float((classifier(real).argmax(1) == real_labels).double().mean())
    print(f"classifier on the {len(real)} real held-out digits: accuracy {real_acc:.4f}", flush=True)

    rows = []
    if args.scales:
        pipe = ScratchDDPMPipeline.from_pretrained(args.model)
        unet = pipe.unet.to(args.device).eval()
        if pipe.class_names is None:
            raise SystemExit(f"--model {args.model} is not class-conditional")
        labels = torch.arange(args.num_samples) % len(pipe.class_names)
    for scale in args.scales:
        start = time.perf_counter()
        samples = sample_images(unet, pipe.scheduler, args.num_samples, args.steps, batch_size=args.batch_size,
                                generator=torch.Generator().manual_seed(args.seed), class_labels=labels,
                                guidance_scale=scale)
        elapsed = time.perf_counter() - start
        row = {"guidance_scale": scale, "num_samples": args.num_samples, "steps": args.steps,
               "seconds_per_sample": elapsed / args.num_samples,
               **score(samples, labels, real, real_labels, classifier)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    baseline = None
    if args.uncond_model:
        upipe = ScratchDDPMPipeline.from_pretrained(args.uncond_model)
        start = time.perf_counter()
        samples = sample_images(upipe.unet.to(args.device).eval(), upipe.scheduler, args.num_samples, args.steps,
                                batch_size=args.batch_size, generator=torch.Generator().manual_seed(args.seed))
        elapsed = time.perf_counter() - start
        baseline = {"model": args.uncond_model, "num_samples": args.num_samples, "steps": args.steps,
                    "seconds_per_sample": elapsed / args.num_samples,
                    **score(samples, None, real, real_labels, classifier)}
        print(json.dumps({"unconditional": baseline}), flush=True)

    print("\n| guidance scale | class accuracy | FDD | within-class spread | time per sample |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['guidance_scale']:g} | {100 * r['accuracy']:.1f}% | {r['fdd']:.2f} | "
              f"{r['within_class_spread']:.2f} | {1000 * r['seconds_per_sample']:.1f} ms |")
    if baseline:
        print(f"| unconditional model | - | {baseline['fdd']:.2f} | - | {1000 * baseline['seconds_per_sample']:.1f} ms |")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"classifier_real_accuracy": real_acc, "rows": rows, "unconditional": baseline,
                       "argv": sys.argv[1:]}, f, indent=2)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

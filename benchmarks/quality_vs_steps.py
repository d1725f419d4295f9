"""Sample quality and bits/dim vs sampling steps for each reverse variance (issue 5's result table).

    python benchmarks/quality_vs_steps.py --model output/digits --hybrid_model output/digits-hybrid \
        --device cuda --out quality_vs_steps.md

For the main (epsilon, fixed-variance) model: fixed_small, fixed_large and analytic variance (Bao et al. 2022;
Gamma_t estimated on the train split of the digits); for the hybrid-trained model (variance_type learned_range),
learned_range. Each cell: FDD (Frechet digit distance of --num_samples samples to the held-out digits) and the
bits/dim bound on the held-out digits with the same respaced chain. Prints and writes a markdown table.
Held-out = metrics.digits_split_indices()'s test split: held out only if the model was trained without it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from ddpm_from_scratch import likelihood
from ddpm_from_scratch.cli import load_model
from ddpm_from_scratch.metrics import compute_features, digits_feature_extractor, digits_for_unet, frechet_distance_features


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="main digits model folder (fixed variance, epsilon)")
    p.add_argument("--hybrid_model", default=None, help="hybrid-trained learned_range model folder (optional)")
    p.add_argument("--steps", type=int, nargs="+", default=[1000, 250, 100, 50, 20])
    p.add_argument("--num_samples", type=int, default=1000, help="samples per cell for FDD")
    p.add_argument("--num_eval_images", type=int, default=None, help="held-out images for bits/dim (default all 359)")
    p.add_argument("--gamma_images", type=int, default=512, help="train images for the analytic-variance Monte Carlo")
    p.add_argument("--no_bpd", action="store_true", help="skip bits/dim (FDD only)")
    p.add_argument("--batch_size", type=int, default=500)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="quality_vs_steps.md")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    unet, sched, _ = load_model(args.model, args.device)
    held_out, train = digits_for_unet(unet, "test"), digits_for_unet(unet, "train")
    eval_images = held_out[: args.num_eval_images] if args.num_eval_images else held_out
    extractor = digits_feature_extractor(device=args.device)
    real_feats = compute_features(extractor, held_out)
    ref_fd = frechet_distance_features(compute_features(extractor, train), real_feats)

    print(f"estimating analytic Gamma_t on {args.gamma_images} train images x {sched.config.num_train_timesteps} t")
    gamma = likelihood.estimate_analytic_gamma(unet, sched, train[: args.gamma_images], batch_size=args.batch_size,
                                               generator=torch.Generator().manual_seed(args.seed), progress=True)
    runs = [("fixed_small", unet, sched), ("fixed_large", unet, sched), ("analytic", unet, sched)]
    if args.hybrid_model:
        h_unet, h_sched, _ = load_model(args.hybrid_model, args.device)
        runs.append(("learned_range", h_unet, h_sched))
    elif sched.config.variance_type == "learned_range":
        runs.append(("learned_range", unet, sched))

    T = sched.config.num_train_timesteps
    results = {}
    for name, model, scheduler in runs:
        for steps in args.steps:
            n = None if steps >= T else steps
            gen = torch.Generator().manual_seed(args.seed)
            t0 = time.time()
            samples = likelihood.sample_images(model, scheduler, args.num_samples, n, variance_type=name,
                                               analytic_gamma=gamma, batch_size=args.batch_size, generator=gen)
            fdd = frechet_distance_features(compute_features(extractor, samples), real_feats)
            bpd = None
            if not args.no_bpd:
                bpd = likelihood.bits_per_dim(model, scheduler, eval_images, n, batch_size=args.batch_size,
                                              generator=torch.Generator().manual_seed(args.seed + 1),
                                              variance_type=name, analytic_gamma=gamma).total
            results[(name, steps)] = (fdd, bpd)
            print(f"{name:14s} {steps:5d} steps: FDD {fdd:.4f}" + (f"  bits/dim {bpd:.4f}" if bpd is not None else "")
                  + f"  ({time.time() - t0:.1f}s)", flush=True)

    header = "| variance | " + " | ".join(f"{s} steps" for s in args.steps) + f" | FDD({min(args.steps, key=lambda s: abs(s - 50))}) / FDD({max(args.steps)}) |"
    lines = [f"FDD (bits/dim) on held-out digits; device {args.device}; {args.num_samples} samples per cell; "
             f"FDD(train split vs held-out) = {ref_fd:.4f}", "", header, "|" + "---|" * (len(args.steps) + 2)]
    for name, _, _ in runs:
        cells = []
        for s in args.steps:
            fdd, bpd = results[(name, s)]
            cells.append(f"{fdd:.3f}" + (f" ({bpd:.3f})" if bpd is not None else ""))
        s50 = min(args.steps, key=lambda s: abs(s - 50))
        ratio = results[(name, s50)][0] / results[(name, max(args.steps))][0]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    table = "\n".join(lines) + "\n"
    print(table)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(table)
    os.replace(tmp, args.out)
    with open(args.out + ".json.tmp", "w", encoding="utf-8") as f:
        json.dump({f"{k[0]}@{k[1]}": {"fdd": v[0], "bpd": v[1]} for k, v in results.items()}, f, indent=2)
    os.replace(args.out + ".json.tmp", os.path.splitext(args.out)[0] + ".json")
    print(f"total {time.time() - t_start:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()

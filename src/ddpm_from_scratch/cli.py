"""Console entry point ``ddpm-from-scratch``: ``evaluate`` (bits/dim, optionally FDD) and ``sample`` (a PNG grid).

    ddpm-from-scratch evaluate --model DIR [--num_images 360] [--steps K] [--variance_type fixed_large] [--fdd]
    ddpm-from-scratch sample --model DIR --num_images 16 --steps 100 --out grid.png

``--model`` is a folder written by ``ScratchDDPMPipeline.save_pretrained`` (subfolders ``unet`` and ``scheduler``).
Evaluation data: the held-out split of the built-in digits at the model's resolution (metrics.digits_images).
This module only wires: the bound lives in likelihood.py, the metrics in metrics.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from . import likelihood


def load_model(folder: str, device=None):
    """(unet, scheduler) from a saved pipeline folder (ScratchDDPMPipeline, else the unet/ + scheduler/ subfolders)."""
    if not os.path.isdir(folder):
        raise ValueError(f"--model {folder!r} is not a folder (expected a saved pipeline with unet/ and scheduler/)")
    from .pipeline_ddpm import ScratchDDPMPipeline

    if os.path.isfile(os.path.join(folder, "model_index.json")):
        pipe = ScratchDDPMPipeline.from_pretrained(folder)
        unet, scheduler = pipe.unet, pipe.scheduler
    else:
        from diffusers import UNet2DModel

        from .scheduling_ddpm import ScratchDDPMScheduler

        unet = UNet2DModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
        scheduler = ScratchDDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    return unet.to(device).eval(), scheduler


def image_grid(images: torch.Tensor, nrow: int | None = None):
    """(N, C, H, W) in [-1, 1] -> one PIL image (train_utils.image_grid with 1 px gaps)."""
    from .train_utils import image_grid as grid

    return grid(((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy(), nrow=nrow, pad=1)


def save_atomically(image, path: str) -> None:
    """Write a PIL image via a temporary file + rename, so an existing file is never left half-written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--out {path!r}: folder {folder!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        raise ValueError(f"--out must end in .png, .jpg, .jpeg, .webp or .bmp, got {path!r}")
    tmp = path + ".tmp" + ext
    image.save(tmp)
    os.replace(tmp, path)


def _positive_int(name):
    def parse(value: str) -> int:
        try:
            out = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {value!r}") from None
        if out < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {value!r}")
        return out

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm-from-scratch", description="DDPM from scratch: evaluate and sample.")
    sub = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="folder of a saved pipeline (unet/ + scheduler/)")
    common.add_argument("--steps", type=_positive_int("--steps"), default=None,
                        help="sampling / bound steps (respaced chain); default: all training timesteps")
    common.add_argument("--variance_type", choices=likelihood.VARIANCE_CHOICES, default=None,
                        help="reverse variance; default: the scheduler's ('analytic' needs analytic_gamma in its config)")
    common.add_argument("--batch_size", type=_positive_int("--batch_size"), default=128)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--no_progress", action="store_true", help="hide the progress bar")

    ev = sub.add_parser("evaluate", parents=[common], help="bits/dim on held-out digits (and optionally FDD)")
    ev.add_argument("--num_images", type=_positive_int("--num_images"), default=None,
                    help="held-out images to score (default: all 359)")
    ev.add_argument("--fdd", action="store_true", help="also sample --num_samples images and report the Frechet digit distance")
    ev.add_argument("--num_samples", type=_positive_int("--num_samples"), default=1000)
    ev.add_argument("--json", default=None, help="also write the results to this JSON file")

    av = sub.add_parser("estimate-variance", parents=[common],
                        help="estimate Analytic-DPM's Gamma_t on the train digits and store it in the model's scheduler "
                             "config, so that --variance_type analytic works for sample / evaluate")
    av.add_argument("--num_images", type=_positive_int("--num_images"), default=512,
                    help="train-split digits for the Monte Carlo estimate of E||eps_theta||^2 / d per timestep")

    sp = sub.add_parser("sample", parents=[common], help="sample images into a PNG grid")
    sp.add_argument("--num_images", type=_positive_int("--num_images"), default=16)
    sp.add_argument("--out", required=True, help="output image (e.g. grid.png)")
    sp.add_argument("--class_labels", nargs="+", default=None, metavar="LABEL",
                    help="class-conditional models: the classes to sample, as class names (model_index.json's "
                         "class_names) or indices; one row of the grid per label, --num_images a multiple of their count")
    sp.add_argument("--guidance_scale", type=float, default=None,
                    help="classifier-free guidance scale s >= 0 (with --class_labels): 0 unconditional, 1 conditional "
                         "(default), > 1 more typical of the class")
    return parser


def model_class_names(folder: str) -> list[str] | None:
    """The class names a saved pipeline records in model_index.json (None when it has none)."""
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        return None
    from .guidance import check_class_names

    with open(path, encoding="utf-8") as f:
        stored = json.load(f).get("class_names")
    return None if stored is None else check_class_names(stored, len(stored))


def cli_class_labels(tokens: list[str], class_names: list[str] | None, num_images: int) -> list:
    """--class_labels tokens -> one label per image (a class name when it is one, else an int index), each label
    repeated over one grid row of num_images / len(tokens) images."""
    if num_images % len(tokens):
        raise ValueError(f"--num_images {num_images} must be a multiple of the {len(tokens)} --class_labels "
                         "(one grid row per label)")
    labels = []
    for token in tokens:
        if class_names and token in class_names:
            labels.append(token)
        else:
            try:
                labels.append(int(token))
            except ValueError:
                labels.append(token)  # an unknown name: guidance.resolve_class_labels names it in its error
    return [label for label in labels for _ in range(num_images // len(tokens))]


def evaluate(args) -> dict:
    from .metrics import digits_report

    unet, scheduler = load_model(args.model, args.device)
    out = digits_report(unet, scheduler, num_inference_steps=args.steps, num_images=args.num_images,
                        num_samples=args.num_samples if args.fdd else 0, variance_type=args.variance_type,
                        batch_size=args.batch_size, generator=torch.Generator().manual_seed(args.seed),
                        progress=not args.no_progress)
    print(f"bits/dim: {out['bits_per_dim']:.4f} +- {out['stderr']:.4f} (prior {out['prior_bpd']:.2e}, decoder "
          f"{out['decoder_bpd']:.4f}, {out['num_steps']} steps, variance {out['variance_type']}, "
          f"{out['num_images']} held-out images)")
    if args.fdd:
        print(f"FDD: {out['fdd']:.4f} ({args.num_samples} samples vs held-out digits)")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
        os.replace(tmp, args.json)
    return out


def estimate_variance(args) -> str:
    """Gamma_t by Monte Carlo over train digits, written into <model>/scheduler/scheduler_config.json atomically."""
    from .metrics import digits_for_unet

    unet, scheduler = load_model(args.model, args.device)
    images = digits_for_unet(unet, "train")
    gamma = likelihood.estimate_analytic_gamma(unet, scheduler, images[: args.num_images], batch_size=args.batch_size,
                                               generator=torch.Generator().manual_seed(args.seed),
                                               progress=not args.no_progress)
    updated = likelihood.with_analytic_variance(scheduler, gamma)
    folder = os.path.join(args.model, "scheduler")
    tmp = folder + ".tmp-analytic"
    updated.save_pretrained(tmp)
    os.makedirs(folder, exist_ok=True)
    os.replace(os.path.join(tmp, "scheduler_config.json"), os.path.join(folder, "scheduler_config.json"))
    os.rmdir(tmp)
    print(f"stored analytic_gamma ({len(gamma)} timesteps, from {min(args.num_images, len(images))} train digits) "
          f"in {folder}; sample with --variance_type analytic")
    return folder


def sample(args) -> str:
    if args.guidance_scale is not None and args.class_labels is None:
        raise ValueError("--guidance_scale needs --class_labels")
    unet, scheduler = load_model(args.model, args.device)
    names = model_class_names(args.model)
    labels = None if args.class_labels is None else cli_class_labels(args.class_labels, names, args.num_images)
    gen = torch.Generator().manual_seed(args.seed)
    images = likelihood.sample_images(unet, scheduler, args.num_images, args.steps, variance_type=args.variance_type,
                                      batch_size=args.batch_size, generator=gen, progress=not args.no_progress,
                                      class_labels=labels, guidance_scale=args.guidance_scale, class_names=names)
    nrow = None if labels is None else args.num_images // len(args.class_labels)
    save_atomically(image_grid(images, nrow=nrow), args.out)
    print(f"wrote {args.num_images} samples to {args.out}")
    return args.out


def run(argv=None):
    """Parse ``argv`` and run the subcommand; returns its result (evaluate: dict, sample/estimate-variance: a path).
    Bad input exits with status 2 and a message."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "evaluate":
            return evaluate(args)
        if args.command == "estimate-variance":
            return estimate_variance(args)
        return sample(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"ddpm-from-scratch {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


def main(argv=None) -> int:
    """Console entry point ``ddpm-from-scratch``: exit status 0 on success."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())

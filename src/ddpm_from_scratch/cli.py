"""Console entry point ``ddpm-from-scratch``: ``evaluate`` (bits/dim, optionally FDD), ``estimate-variance``
(Analytic-DPM's Gamma_t into the scheduler config) and ``sample`` (a PNG grid and/or one PNG per image).

    ddpm-from-scratch evaluate --model DIR_OR_REPO [--revision REV] [--num_images 359] [--steps K] [--fdd] [--json F]
    ddpm-from-scratch estimate-variance --model DIR [--steps K] [--num_images 512]
    ddpm-from-scratch sample --model DIR_OR_REPO [--revision REV] --num_images 64 --steps 100 --out grid.png [--out_dir D]

``--model`` is resolved as ``ScratchDDPMPipeline.from_pretrained`` resolves it: an existing folder written by
``save_pretrained`` (or with ``unet/`` and ``scheduler/`` subfolders), else a Hub repo id (``user/name``) at
``--revision`` (branch, tag or commit). Evaluation data: the held-out split of the built-in digits at the model's
resolution (metrics.digits_images).

Every error is one line on stderr and exit status 2, and every argument and path is checked before the model is
loaded or anything is computed (set DDPM_FROM_SCRATCH_TRACEBACK=1 to see the traceback of an unexpected error).
Each subcommand is one ``add_<name>_parser`` function plus one function that runs it (``set_defaults(run=...)``).
This module only wires: the bound lives in likelihood.py, the metrics in metrics.py, grids in images.py, atomic
writes in fileio.py.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch

from . import likelihood
from .report import REPORT_TRAJECTORY_STEPS

PROG = "ddpm-from-scratch"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TRACEBACK_ENV = "DDPM_FROM_SCRATCH_TRACEBACK"
_CHECKPOINT_RE = re.compile(r"^checkpoint-\d+$")
# Files Accelerate's save_state / the training script write into a checkpoint-<step> folder.
_CHECKPOINT_MARKERS = ("training_state.json", "optimizer.bin", "random_states_0.pkl", "model.safetensors")


class CLIError(Exception):
    """A bad command line: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------
# Argument types and path checks (all run before any work)
# ----------------------------------------------------------------------------------------------
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


def parse_device(value: str) -> str:
    """``--device``: a torch device string whose device exists on this machine (cpu, cuda, cuda:N, mps, ...)."""
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"--device must be a torch device such as cpu, cuda, cuda:0 or mps, "
                                         f"got {value!r}") from None
    if device.type == "cpu":
        return value
    if device.type == "meta":
        raise argparse.ArgumentTypeError("--device meta holds no data and cannot sample; use cpu or a GPU")
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise argparse.ArgumentTypeError(f"--device {value!r}: no {device.type} device is available here "
                                         f"(torch {torch.__version__}); use --device cpu")
    count = getattr(getattr(torch, device.type, None), "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise argparse.ArgumentTypeError(f"--device {value!r}: this machine has {count()} {device.type} device(s) "
                                         f"(indices 0..{count() - 1})")
    return value


def check_output_file(path: str, flag: str, extensions: tuple[str, ...] | None = None) -> str:
    """A file that can be written: not a folder, in an existing writable folder, with an allowed extension."""
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} is a folder; give a file name")
    if extensions is not None and os.path.splitext(path)[1].lower() not in extensions:
        raise CLIError(f"{flag} must end in {', '.join(extensions)}, got {path!r}")
    return _check_parent_writable(path, flag)


def _check_parent_writable(path: str, flag: str, missing_note: str = "") -> str:
    """The folder ``path`` goes into exists and is writable (CLIError naming ``flag`` otherwise); returns path."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CLIError(f"{flag} {path!r}: folder {parent!r} does not exist{missing_note}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {path!r}: folder {parent!r} is not writable")
    return path


def check_output_dir(path: str, flag: str) -> str:
    """A folder that exists and is writable, or that can be created in an existing writable folder."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise CLIError(f"{flag} {path!r} is a file; give a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise CLIError(f"{flag} {path!r} is not writable")
        return path
    return _check_parent_writable(path, flag, " (only the last level is created)")


# ----------------------------------------------------------------------------------------------
# --model: a folder or a Hub repo id, as ScratchDDPMPipeline.from_pretrained resolves it
# ----------------------------------------------------------------------------------------------
def checkpoint_hint(folder: str) -> str | None:
    """For a training ``checkpoint-<step>`` folder (resume state, not a pipeline): what to pass as --model instead."""
    folder = os.path.abspath(folder)
    name = os.path.basename(folder)
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return None
    named = bool(_CHECKPOINT_RE.match(name))
    marked = [m for m in _CHECKPOINT_MARKERS if os.path.isfile(os.path.join(folder, m))]
    if not (named or "training_state.json" in marked or len(marked) >= 2):
        return None
    parent = os.path.dirname(folder)
    for run_dir in (parent, os.path.dirname(parent)):  # output_dir/checkpoint-N, output_dir/previous-checkpoints-n/...
        if os.path.isfile(os.path.join(run_dir, "model_index.json")):
            return (f"--model {folder!r} is a training checkpoint (the state to resume training from), not a "
                    f"pipeline; use the pipeline that training exported: --model {run_dir}")
    run = os.path.dirname(parent) if os.path.basename(parent).startswith("previous-checkpoints-") else parent
    return (f"--model {folder!r} is a training checkpoint (the state to resume training from), not a pipeline, and "
            f"{run!r} holds no exported pipeline yet; finish the run with `python training/train.py --output_dir "
            f"{run} --resume_from_checkpoint latest` (it exports the pipeline to {run}), then pass --model {run}")


def resolve_model(model: str, revision: str | None = None, *, local_only: bool = False) -> str:
    """Checks ``--model`` (and ``--revision``) without loading anything; returns "folder" or "repo"."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.isdir(model):
        hint = checkpoint_hint(model)
        if hint is not None:
            raise CLIError(hint)
        has_index = os.path.isfile(os.path.join(model, "model_index.json"))
        has_parts = all(os.path.isdir(os.path.join(model, sub)) for sub in ("unet", "scheduler"))
        if not (has_index or has_parts):
            raise CLIError(f"--model {model!r} is a folder but not a saved pipeline (no model_index.json, nor unet/ "
                           "and scheduler/ subfolders)")
        if revision is not None:
            raise CLIError(f"--revision {revision!r} applies to a Hub repo id; --model {model!r} is a local folder")
        return "folder"
    if os.path.exists(model):
        raise CLIError(f"--model {model!r} is a file; give the pipeline's folder or a Hub repo id")
    if local_only:
        raise CLIError(f"--model {model!r} is not a local folder; this command writes into the model's folder, so it "
                       "needs a local copy (a saved pipeline folder)")
    try:
        validate_repo_id(model)
    except HFValidationError:
        raise CLIError(f"--model {model!r} is neither an existing folder nor a Hub repo id ('user/name')") from None
    return "repo"


def load_model(model: str, device=None, revision: str | None = None, progress: bool = True):
    """(unet, scheduler, class_names) from a saved pipeline folder or a Hub repo id at ``revision``
    (ScratchDDPMPipeline, else a folder's unet/ + scheduler/ subfolders, which record no class names); the UNet on
    ``device`` in eval mode. class_names: a conditional pipeline's ``pipe.class_names``, else None. Pickle-only
    weights are refused."""
    from diffusers.utils import logging as diffusers_logging

    hide = not progress and diffusers_logging.is_progress_bar_enabled()
    if hide:
        diffusers_logging.disable_progress_bar()
    try:
        return _load_model(model, device, revision)
    finally:
        if hide:
            diffusers_logging.enable_progress_bar()


def _load_model(model: str, device, revision: str | None):
    from .pipeline_ddpm import ScratchDDPMPipeline, check_component_safetensors

    kind = resolve_model(model, revision)
    if kind == "folder" and not os.path.isfile(os.path.join(model, "model_index.json")):
        from diffusers import UNet2DModel

        from .scheduling_ddpm import ScratchDDPMScheduler

        check_component_safetensors("unet", os.path.join(model, "unet"))
        unet = UNet2DModel.from_pretrained(model, subfolder="unet", use_safetensors=True)
        scheduler = ScratchDDPMScheduler.from_pretrained(model, subfolder="scheduler")
        class_names = None
    else:
        kwargs = {} if revision is None else {"revision": revision}
        try:
            pipe = ScratchDDPMPipeline.from_pretrained(model, **kwargs)
        except Exception as err:
            if kind == "repo":
                at = f" at --revision {revision!r}" if revision is not None else ""
                raise CLIError(f"--model {model!r} is not a local folder, and as a Hub repo id{at} it cannot be "
                               f"loaded: {_one_line(err)}") from err
            raise CLIError(f"--model {model!r}: cannot load this folder: {_one_line(err)}") from err
        unet, scheduler, class_names = pipe.unet, pipe.scheduler, pipe.class_names
    return unet.to(device).eval(), scheduler, class_names


def check_variance_available(variance_type: str | None, scheduler, model: str) -> None:
    """``--variance_type analytic`` needs Gamma_t in the model's scheduler config: say how to get it."""
    if variance_type == "analytic" and scheduler.config.get(likelihood.ANALYTIC_CONFIG_KEY) is None:
        raise CLIError(f"--variance_type analytic needs Analytic-DPM's Gamma_t in the scheduler config of {model!r}; "
                       f"store it first with: ddpm-from-scratch estimate-variance --model {model}")


# ----------------------------------------------------------------------------------------------
# The parser: shared option groups, then one function per subcommand
# ----------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): ``ddpm-from-scratch sample: error: ...``, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _model_options(*, repo: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    if repo:
        p.add_argument("--model", required=True,
                       help="folder of a saved pipeline (save_pretrained), or a Hub repo id 'user/name'")
        p.add_argument("--revision", default=None,
                       help="branch, tag or commit of a Hub repo id (as from_pretrained(revision=...))")
    else:
        p.add_argument("--model", required=True, help="local folder of a saved pipeline (written into)")
    return p


def _run_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--batch_size", type=_positive_int("--batch_size"), default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=parse_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device: cpu, cuda, cuda:N, mps (default: cuda when available)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


def _chain_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--steps", type=_positive_int("--steps"), default=None,
                   help="sampling / bound steps (respaced chain); default: all training timesteps")
    p.add_argument("--variance_type", choices=likelihood.VARIANCE_CHOICES, default=None,
                   help="reverse variance; default: the scheduler's ('analytic' needs analytic_gamma in its config)")
    return p


def add_evaluate_parser(sub) -> None:
    ev = sub.add_parser("evaluate", parents=[_model_options(), _chain_options(), _run_options()],
                        help="bits/dim on held-out digits (and optionally FDD)")
    ev.add_argument("--num_images", type=_positive_int("--num_images"), default=None,
                    help="held-out images to score (default: all 359)")
    ev.add_argument("--fdd", action="store_true",
                    help="also sample --num_samples images and report the Frechet digit distance")
    ev.add_argument("--num_samples", type=_positive_int("--num_samples"), default=None,
                    help="samples for --fdd (default 1000; only with --fdd)")
    ev.add_argument("--json", default=None, help="also write the results to this JSON file (atomically)")
    ev.set_defaults(run=evaluate)


def add_estimate_variance_parser(sub) -> None:
    av = sub.add_parser("estimate-variance", parents=[_model_options(repo=False), _run_options()],
                        help="estimate Analytic-DPM's Gamma_t on the train digits and store it in the model's scheduler "
                             "config, so that --variance_type analytic works for sample / evaluate")
    av.add_argument("--num_images", type=_positive_int("--num_images"), default=512,
                    help="train-split digits for the Monte Carlo estimate of E||eps_theta||^2 / d per timestep")
    av.add_argument("--steps", type=_positive_int("--steps"), default=None,
                    help="estimate Gamma_t only at the timesteps a --steps K chain visits (K model passes per image "
                         "instead of all T; other timesteps are interpolated); default: every training timestep")
    av.set_defaults(run=estimate_variance)


def add_sample_parser(sub) -> None:
    sp = sub.add_parser("sample", parents=[_model_options(), _chain_options(), _run_options()],
                        help="sample images into a PNG grid (--out) and/or one PNG per image (--out_dir)")
    sp.add_argument("--num_images", type=_positive_int("--num_images"), default=16)
    sp.add_argument("--out", default=None, help="grid image to write (.png, .jpg, .jpeg, .webp, .bmp)")
    sp.add_argument("--scale", type=_positive_int("--scale"), default=None,
                    help="enlarge each grid pixel this many times (nearest); default: the smallest scale that makes "
                         "the grid at least 512 px wide")
    sp.add_argument("--out_dir", default=None,
                    help="folder to write one PNG per image into (0000.png, 0001.png, ... at the model's resolution; "
                         "same-named files are replaced)")
    sp.add_argument("--class_labels", nargs="+", default=None, metavar="LABEL",
                    help="class-conditional models: the classes to sample, as class names (model_index.json's "
                         "class_names) or indices; one row of the grid per label, --num_images a multiple of their count")
    sp.add_argument("--guidance_scale", type=float, default=None,
                    help="classifier-free guidance scale s >= 0 (with --class_labels): 0 unconditional, 1 conditional "
                         "(default), > 1 more typical of the class")
    sp.set_defaults(run=sample)


def add_report_parser(sub) -> None:
    rp = sub.add_parser("report", help="draw a training output folder as PNG figures gathered in "
                                       "OUTPUT_DIR/report/report.md (loss, metrics, samples, trajectory, bound)")
    rp.add_argument("output_dir", metavar="OUTPUT_DIR", help="a training run's --output_dir")
    rp.add_argument("--steps", type=_positive_int("--steps"), default=REPORT_TRAJECTORY_STEPS,
                    help="the trajectory's sampling steps")
    rp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one trajectory per seed")
    rp.add_argument("--bound_steps", type=_positive_int("--bound_steps"), default=50,
                    help="respaced chain of the per-timestep bound panel")
    rp.add_argument("--bound_num_images", type=_positive_int("--bound_num_images"), default=128,
                    help="held-out digits scored by the bound panel")
    rp.add_argument("--device", type=parse_device, default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device: cpu, cuda, cuda:N, mps (default: cuda when available)")
    rp.set_defaults(run=report)


SUBCOMMANDS = (add_evaluate_parser, add_estimate_variance_parser, add_sample_parser, add_report_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="DDPM from scratch: evaluate, sample and report.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


# ----------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------


def cli_class_labels(tokens: list[str], class_names: list[str] | None, num_images: int) -> list:
    """--class_labels tokens -> one label per image (a class name when it is one, else an int index), each label
    repeated over one grid row of num_images / len(tokens) images (num_images a multiple of len(tokens), checked
    by sample before loading)."""
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
    from .fileio import atomic_write_json
    from .metrics import digits_report

    if args.num_samples is not None and not args.fdd:
        raise CLIError("--num_samples is only used with --fdd; add --fdd or drop --num_samples")
    if args.json:
        check_output_file(args.json, "--json")
    num_samples = args.num_samples or 1000
    unet, scheduler, _ = load_model(args.model, args.device, args.revision, not args.no_progress)
    check_variance_available(args.variance_type, scheduler, args.model)
    out = digits_report(unet, scheduler, num_inference_steps=args.steps, num_images=args.num_images,
                        num_samples=num_samples if args.fdd else 0, variance_type=args.variance_type,
                        batch_size=args.batch_size, generator=torch.Generator().manual_seed(args.seed),
                        progress=not args.no_progress)
    print(f"bits/dim: {out['bits_per_dim']:.4f} +- {out['stderr']:.4f} (prior {out['prior_bpd']:.2e}, decoder "
          f"{out['decoder_bpd']:.4f}, {out['num_steps']} steps, variance {out['variance_type']}, "
          f"{out['num_images']} held-out images)")
    if args.fdd:
        print(f"FDD: {out['fdd']:.4f} ({num_samples} samples vs held-out digits)")
    if args.json:
        atomic_write_json(args.json, out)
    return out


def estimate_variance(args) -> str:
    """Gamma_t by Monte Carlo over train digits, written into <model>/scheduler/scheduler_config.json atomically."""
    from .fileio import atomic_write
    from .metrics import digits_for_unet

    resolve_model(args.model, local_only=True)
    folder = os.path.join(args.model, "scheduler")
    check_output_file(os.path.join(folder, "scheduler_config.json"), "--model's scheduler config")
    unet, scheduler, _ = load_model(args.model, args.device, progress=not args.no_progress)
    timesteps = None if args.steps is None else likelihood.visited_timesteps(scheduler, args.steps)
    images = digits_for_unet(unet, "train")
    gamma = likelihood.estimate_analytic_gamma(unet, scheduler, images[: args.num_images], timesteps=timesteps,
                                               batch_size=args.batch_size,
                                               generator=torch.Generator().manual_seed(args.seed),
                                               progress=not args.no_progress)
    updated = likelihood.with_analytic_variance(scheduler, gamma)
    atomic_write(os.path.join(folder, "scheduler_config.json"), updated.to_json_file)
    at = "every timestep" if timesteps is None else f"the {len(timesteps)} timesteps of a {args.steps}-step chain"
    print(f"stored analytic_gamma (estimated at {at}, from {min(args.num_images, len(images))} train digits) "
          f"in {folder}; sample with --variance_type analytic")
    return folder


def sample(args) -> list[str]:
    """Writes the grid (--out) and/or one PNG per image (--out_dir); returns the written paths."""
    from . import images as img

    if args.out is None and args.out_dir is None:
        raise CLIError("give --out (one grid image) and/or --out_dir (a folder for one PNG per image)")
    if args.guidance_scale is not None and args.class_labels is None:
        raise CLIError("--guidance_scale needs --class_labels")
    if args.class_labels is not None and args.num_images % len(args.class_labels):
        raise CLIError(f"--num_images {args.num_images} must be a multiple of the {len(args.class_labels)} "
                       "--class_labels (one grid row per label)")
    if args.scale is not None and args.out is None:
        raise CLIError("--scale enlarges the --out grid; add --out (the --out_dir images keep the model's resolution)")
    if args.out is not None:
        check_output_file(args.out, "--out", IMAGE_EXTENSIONS)
    if args.out_dir is not None:
        check_output_dir(args.out_dir, "--out_dir")
    unet, scheduler, names = load_model(args.model, args.device, args.revision, not args.no_progress)
    check_variance_available(args.variance_type, scheduler, args.model)
    labels = None if args.class_labels is None else cli_class_labels(args.class_labels, names, args.num_images)
    gen = torch.Generator().manual_seed(args.seed)
    samples = likelihood.sample_images(unet, scheduler, args.num_images, args.steps, variance_type=args.variance_type,
                                       batch_size=args.batch_size, generator=gen, progress=not args.no_progress,
                                       class_labels=labels, guidance_scale=args.guidance_scale, class_names=names)
    nrow = None if labels is None else args.num_images // len(args.class_labels)
    written = []
    if args.out is not None:
        grid = img.image_grid(samples, nrow=nrow, scale=args.scale)
        from .fileio import atomic_save_image

        written.append(atomic_save_image(grid, args.out))
        print(f"wrote a grid of {args.num_images} samples ({grid.width}x{grid.height} px) to {args.out}")
    if args.out_dir is not None:
        os.makedirs(args.out_dir, exist_ok=True)
        paths = img.save_images(samples, args.out_dir)
        written += paths
        print(f"wrote {len(paths)} samples to {args.out_dir} ({os.path.basename(paths[0])} ... "
              f"{os.path.basename(paths[-1])})")
    return written


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def _one_line(err: BaseException) -> str:
    """An exception as one line: its message with newlines folded (and its type unless it is a usage error)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, (CLIError, ValueError, TypeError, OSError)) else f"{type(err).__name__}: {text}"


def report(args) -> str:
    """Writes OUTPUT_DIR/report/ (report.write_report); returns the path of its report.md."""
    from .report import write_report

    try:
        result = write_report(args.output_dir, num_inference_steps=args.steps, seeds=args.seeds,
                              bound_num_images=args.bound_num_images, bound_num_inference_steps=args.bound_steps,
                              device=args.device)
    except RuntimeError as err:  # matplotlib missing
        raise ValueError(str(err)) from err
    left_out = "".join(f"; {panel} not drawn: {why}" for panel, why in result.skipped.items())
    print(f"wrote {len(result.figures)} figures and {result.page}{left_out}")
    return result.page


def run(argv=None):
    """Parse ``argv`` and run the subcommand; returns its result (evaluate: dict, estimate-variance: the scheduler
    folder, sample: the written paths). Any error exits with status 2 and one line on stderr."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"{PROG} {args.command}: error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from err


def main(argv=None) -> int:
    """Console entry point ``ddpm-from-scratch``: exit status 0 on success."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())

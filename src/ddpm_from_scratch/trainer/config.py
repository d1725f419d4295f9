"""TrainConfig: every training setting as one typed, documented field, validated as a whole before any work.

``training/train.py`` builds its command line from this dataclass (``transformers.HfArgumentParser``: the field
name is the flag, ``metadata["help"]`` its help), a notebook builds it directly::

    from ddpm_from_scratch.trainer import TrainConfig, Trainer
    Trainer(TrainConfig(output_dir="out", max_train_steps=200)).train()

Defaults, on purpose (one rule): a field whose default is ``None`` below and that appears in ``RECIPES`` takes its
value from the recipe of the data source. The built-in digits (no ``--dataset_name`` / ``--train_data_dir``) use
the digits recipe (``DIGITS_RECIPE``: tuned to train in minutes on a CPU); a user's data takes the defaults of
diffusers' ``examples/unconditional_image_generation/train_unconditional.py`` (``DIFFUSERS_RECIPE``), so that its
command lines train the same way here. ``TrainConfig.resolved()`` fills them in, the Trainer logs every value it
filled and the model card records every effective value.

Adding a setting: add a field with ``metadata={"help": ...}`` (and ``"choices"`` for a fixed set), add its checks
to ``TrainConfig.problems`` and, when a checkpoint trained with another value cannot be continued, its name to
``checkpoints.MUST_MATCH``.
"""

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..data import BAD_IMAGE_POLICIES, CHANNEL_CHOICES
from ..diffusion_math import BETA_SCHEDULES, LEARNED_VARIANCE_TYPES, PREDICTION_TYPES, VARIANCE_TYPES
from ..losses import LOSS_TYPES


class ConfigError(ValueError):
    """A setting (or a combination) that cannot train correctly; the message names the flag(s) and allowed values."""


LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
LOGGERS = ("tensorboard", "wandb", "none")
NAN_POLICIES = ("error", "skip")
DIGITS_SPLIT_CHOICES = ("train", "all")
MAX_TRAIN_TIMESTEPS = 100_000  # T above this is a typo, not a schedule (the paper uses 1000, iDDPM 4000)
DEFAULT_DIGITS_STEPS = 2000

# The two recipes of the defaults rule (module docstring). Keys are TrainConfig fields whose default is None.
DIGITS_RECIPE: dict[str, Any] = {
    "output_dir": "output/digits",
    "unet_preset": "digits",
    "resolution": None,  # the preset's sample_size (8)
    "center_crop": True,
    "train_batch_size": 64,
    "eval_batch_size": 64,
    "max_train_steps": DEFAULT_DIGITS_STEPS,
    "learning_rate": 2e-3,
    "lr_warmup_steps": 100,
    "adam_beta1": 0.9,
    "adam_weight_decay": 0.0,
    "use_ema": True,
    "ema_max_decay": 0.999,
    "save_images_steps": 1000,
}
DIFFUSERS_RECIPE: dict[str, Any] = {
    "output_dir": "ddpm-model-64",
    "unet_preset": "diffusers-example",
    "resolution": 64,
    "center_crop": False,
    "train_batch_size": 16,
    "eval_batch_size": 16,
    "num_epochs": 100,
    "learning_rate": 1e-4,
    "lr_warmup_steps": 500,
    "adam_beta1": 0.95,
    "adam_weight_decay": 1e-6,
    "use_ema": False,
    "ema_max_decay": 0.9999,
    "save_images_epochs": 10,
    "save_model_epochs": 10,
    "mixed_precision": "no",
}
EVAL_ASYNC_CHOICES = ("auto", "true", "false")
RECIPES = {"digits": DIGITS_RECIPE, "diffusers": DIFFUSERS_RECIPE}
# Fields that have to stay None after resolution in one recipe (e.g. num_epochs for the digits).
_RECIPE_FIELDS = sorted(set(DIGITS_RECIPE) | set(DIFFUSERS_RECIPE))

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$|^[A-Za-z0-9][\w.-]{0,95}$")


def _f(default, help: str, **extra):
    """A dataclass field with its CLI help (and e.g. ``choices``) in the metadata HfArgumentParser reads."""
    return field(default=default, metadata={"help": help, **extra})


def _opt_bool(help: str):
    """An optional bool (None = the recipe's value) that is also a bare switch on the CLI: ``--use_ema``."""
    return field(default=None, metadata={"help": help, "nargs": "?", "const": True})


@dataclass
class TrainConfig:
    """Every setting of a training run. ``None`` on a recipe field means "the recipe's value" (module docstring)."""

    # ---- data ----
    dataset_name: str | None = _f(None, "A datasets Hub name or a local path (a saved dataset or a folder datasets "
                                        "can load). With neither this nor --train_data_dir, the built-in "
                                        "scikit-learn digits are used.")
    dataset_config_name: str | None = _f(None, "The dataset's config name, if it has several.")
    train_data_dir: str | None = _f(None, "A folder of images (datasets' imagefolder; subfolders become labels).")
    cache_dir: str | None = _f(None, "Where datasets caches downloaded/prepared data.")
    resolution: int | None = _f(None, "Training image size (square). Default: the UNet preset's sample_size (8) "
                                      "for the digits, 64 for your data.")
    center_crop: bool | None = _opt_bool("After resizing the shorter side to --resolution, crop the centre; "
                                         "false crops at a random offset (a pure function of seed, epoch and "
                                         "image). Default: on for the digits, off for your data (as diffusers).")
    random_flip: bool = _f(False, "Flip images horizontally with probability 1/2 (off by default: flipped digits "
                                  "are not digits).")
    image_channels: str = _f("auto", "1 = grayscale, 3 = RGB; auto = 1 when every image is grayscale, else 3.",
                             choices=list(CHANNEL_CHOICES))
    on_bad_image: str = _f("error", "An unreadable image stops the run naming the file (error) or is skipped and "
                                    "counted.", choices=list(BAD_IMAGE_POLICIES))
    digits_split: str = _f("train", "Built-in digits only: 'train' = 1438 of the 1797 digits, holding out the 359 "
                                    "that `ddpm-from-scratch evaluate` and the FDD score; 'all' = every digit.",
                           choices=list(DIGITS_SPLIT_CHOICES))
    class_conditional: bool = _f(False, "Train a class-conditional model with classifier-free guidance: labels from "
                                        "the digits, the --train_data_dir subfolders or a dataset's ClassLabel "
                                        "column (--label_column).")
    class_dropout_prob: float = _f(0.1, "With --class_conditional: probability that a label is replaced by the null "
                                        "class, which trains the unconditional model guidance needs (0 < p < 1).")
    label_column: str | None = _f(None, "With --class_conditional: the dataset's label column (default: its only "
                                        "ClassLabel column).")
    eval_guidance_scale: float = _f(2.0, "With --class_conditional: guidance scale of the sample grids (one row per "
                                         "class).")
    dataloader_num_workers: int = _f(0, "DataLoader worker processes (0 = load in the main process).")
    preserve_input_precision: bool = _f(False, "diffusers' flag to keep 16/32-bit images; refused here: images are "
                                               "decoded to 8 bits per channel.")

    # ---- model and diffusion ----
    unet_preset: str | None = _f(None, "UNet architecture (ddpm_from_scratch.unet_presets, or 'diffusers-example' "
                                       "= the UNet of diffusers' train_unconditional.py); in_channels and "
                                       "sample_size follow the data and --resolution. Default: digits for the "
                                       "digits, diffusers-example for your data.")
    model_config_name_or_path: str | None = _f(None, "A UNet2DModel config (a folder with config.json, or a Hub "
                                                     "repo id) to train instead of --unet_preset.")
    ddpm_num_steps: int = _f(1000, "Diffusion steps T of the forward process.")
    ddpm_beta_schedule: str = _f("linear", "Beta schedule.", choices=list(BETA_SCHEDULES))
    prediction_type: str = _f("epsilon", "What the UNet predicts: the noise eps (DDPM), x_0 ('sample') or v.",
                              choices=list(PREDICTION_TYPES))
    variance_type: str = _f("fixed_small", "Reverse-process variance; learned / learned_range double the UNet's "
                                           "output channels (and need --loss hybrid or vlb to be trained).",
                            choices=list(VARIANCE_TYPES))
    loss: str = _f("simple", "Training objective (ddpm_from_scratch.losses.LOSS_TYPES).", choices=list(LOSS_TYPES))
    allow_untrained_variance: bool = _f(False, "Allow a learned --variance_type with --loss simple, which never "
                                               "trains the variance half of the output.")
    importance_sampling: bool = _f(False, "With --loss vlb: draw t with probability proportional to sqrt(E[L_t^2]) "
                                          "over the last 10 bound terms of each t (Improved DDPM Sec. 3.3).")
    snr_gamma: float | None = _f(None, "Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is the paper's "
                                       "choice. Off by default.")
    enable_xformers_memory_efficient_attention: bool = _f(False, "Use xformers attention (CUDA with xformers "
                                                                 "installed only).")

    # ---- optimisation ----
    train_batch_size: int | None = _f(None, "Batch size per process. Default: 64 for the digits, 16 for your data.")
    num_epochs: int | None = _f(None, "Epochs to train (ignored when --max_train_steps is given). Default: 100 for "
                                      "your data.")
    max_train_steps: int | None = _f(None, f"Optimizer steps to train. Default: {DEFAULT_DIGITS_STEPS} for the "
                                           "digits; --num_epochs epochs for your data.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    learning_rate: float | None = _f(None, "Peak learning rate (AdamW). Default: 2e-3 for the digits, 1e-4 for your "
                                           "data.")
    lr_scheduler: str = _f("cosine", "Learning-rate schedule (diffusers.optimization).", choices=list(LR_SCHEDULERS))
    lr_warmup_steps: int | None = _f(None, "Linear warm-up optimizer steps of the LR schedule. Default: 100 for the "
                                           "digits, 500 for your data.")
    adam_beta1: float | None = _f(None, "AdamW beta1. Default: 0.9 for the digits, 0.95 for your data.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_weight_decay: float | None = _f(None, "AdamW decoupled weight decay. Default: 0 for the digits, 1e-6 for "
                                               "your data.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float | None = _f(1.0, "Clip the global gradient norm to this (positive; 0 or unset = no "
                                          "clipping; the norm is still logged).")
    use_ema: bool | None = _opt_bool("Keep an exponential moving average of the weights; the exported UNet holds "
                                     "it. Default: on for the digits, off for your data (as diffusers).")
    ema_max_decay: float | None = _f(None, "Largest EMA decay. Default: 0.999 for the digits, 0.9999 for your data.")
    ema_min_decay: float = _f(0.0, "Smallest EMA decay.")
    ema_inv_gamma: float = _f(1.0, "EMA warm-up: decay = 1-(1+n/inv_gamma)^-power.")
    ema_power: float = _f(0.75, "EMA warm-up power.")
    ema_update_after_step: int = _f(0, "EMA copies the weights until this step.")
    mixed_precision: str | None = _f(None, "Mixed precision. Default: the accelerate config's choice (else no) for "
                                           "the digits, no for your data.", choices=list(MIXED_PRECISIONS))
    nan_policy: str = _f("error", "A non-finite loss or gradient stops the run naming the step (error; nothing "
                                  "is saved or exported after it), or skips that optimizer step (skip; at most "
                                  "--max_nan_skips times).", choices=list(NAN_POLICIES))
    max_nan_skips: int = _f(10, "With --nan_policy skip: the run stops once more steps than this were skipped.")
    seed: int = _f(0, "Seed of everything random: init, epoch order, noise, timesteps, crops, flips, samples.")
    num_threads: int | None = _f(None, "torch CPU threads per process (default: cores / local processes).")
    local_rank: int = _f(-1, "Accepted as launchers pass it; the process rank comes from Accelerate's environment.")

    # ---- checkpoints, samples, logging ----
    output_dir: str | None = _f(None, "Where the pipeline, model card, samples, logs and checkpoints go. Default: "
                                      "output/digits for the digits, ddpm-model-64 for your data.")
    overwrite_output_dir: bool = _f(False, "Allow training into an output_dir that already holds a model (its "
                                           "checkpoints are moved aside, not deleted).")
    checkpointing_steps: int = _f(500, "Save a resumable checkpoint-<step> every this many optimizer steps "
                                       "(0 = never).")
    checkpoints_total_limit: int | None = _f(None, "Keep at most this many complete checkpoints (older ones are "
                                                   "deleted after a new save).")
    resume_from_checkpoint: str | None = _f(None, "A checkpoint path, or 'latest' for the newest loadable one in "
                                                  "output_dir.")
    save_images_steps: int | None = _f(None, "Write samples/step_<N>.png every this many steps (0 = only at the "
                                             "end). Default: 1000 for the digits, off for your data.")
    save_images_epochs: int | None = _f(None, "Write samples/step_<N>.png at the end of every this many epochs "
                                              "(0 = off). Default: off for the digits, 10 for your data.")
    save_model_epochs: int | None = _f(None, "Export the pipeline to output_dir at the end of every this many epochs "
                                             "(0 = only at the end). Default: off for the digits, 10 for your data.")
    eval_batch_size: int | None = _f(None, "Images in each sample grid. Default: 64 for the digits, 16 for your "
                                           "data.")
    ddpm_num_inference_steps: int = _f(1000, "Denoising steps for the samples (<= --ddpm_num_steps).")
    eval_at_end: bool = _f(False, "Built-in digits only: after training, compute the bits/dim bound on the 359 "
                                  "held-out digits and the Frechet digit distance of --eval_num_samples samples, "
                                  "and put both on the model card.")
    eval_num_samples: int = _f(256, "Samples for the Frechet digit distance of --eval_at_end and of every --eval_steps "
                                    "evaluation (0 = bits/dim only).")
    eval_steps: int = _f(0, "Built-in digits only: evaluate the EMA weights every this many optimizer steps and at the "
                            "end (0 = off): the FDD of --eval_num_samples samples (--ddpm_num_inference_steps steps, "
                            "--eval_batch_size at a time, shared over the processes) against the held-out digits and "
                            "the held-out bits/dim on an --eval_bound_steps-step chain, to metrics.jsonl, TensorBoard "
                            "(with the sample grid) and run_info.json. Seeded: a resumed run records the same values.")
    eval_bound_steps: int = _f(20, "Steps of the respaced chain of each evaluation's held-out bits/dim (0 = skip the "
                                   "bound).")
    eval_async: str = _f("auto", "Where each --eval_steps evaluation runs: 'true' = in a background worker process "
                                 "(1 thread) on a core that training leaves free, so training does not wait for it "
                                 "(it waits only when the previous evaluation is still running at the next due "
                                 "step, and for the last one before the export); 'false' = in the training process; "
                                 "'auto' = true for a single-process CPU run on a machine with more cores than torch "
                                 "threads, false otherwise. 'true' needs a single-process CPU run. Same values "
                                 "either way.", choices=list(EVAL_ASYNC_CHOICES))
    keep_best: str | None = _f(None, "Keep the EMA weights of the best evaluation by this metric (lower is better) in "
                                     "output_dir/best/, outside the checkpoint rotation. Needs --eval_steps.",
                               choices=["fdd", "bits_per_dim"])
    export: str = _f("last", "Which weights become the exported pipeline: 'last' (the final EMA weights) or 'best' "
                             "(those kept by --keep_best); the model card says which and why.",
                     choices=["last", "best"])
    report: bool = _f(True, "At the end, draw the run as figures in output_dir/report/ (report.md: loss, metrics, "
                            "sample grids, a denoising trajectory, the bound per timestep) and embed the main one in "
                            "the model card.")
    logger: str = _f("tensorboard", "Experiment tracker (wandb needs `pip install wandb`).", choices=list(LOGGERS))
    logging_dir: str = _f("logs", "TensorBoard directory, relative to output_dir.")
    logging_steps: int = _f(10, "Log scalars (TensorBoard and output_dir/metrics.jsonl) every this many steps.")

    # ---- hub ----
    push_to_hub: bool = _f(False, "Upload output_dir (without checkpoints and logs) to the Hub at the end.")
    hub_model_id: str | None = _f(None, "Repository id 'user/name' (default: output_dir's name).")
    hub_private_repo: bool = _f(False, "Create the repository as private.")
    hub_token: str | None = _f(None, "A Hub token; prefer `hf auth login` or HF_TOKEN (a token on the command line "
                                     "leaks into shell history). Never written to the card or logs.")

    # ------------------------------------------------------------------------------------------------------
    @property
    def uses_builtin_digits(self) -> bool:
        return not self.dataset_name and not self.train_data_dir

    @property
    def recipe(self) -> str:
        """'digits' for the built-in digits, 'diffusers' for a user's data (the defaults rule)."""
        return "digits" if self.uses_builtin_digits else "diffusers"

    def recipe_values(self) -> dict[str, Any]:
        """{field: value} that ``resolved()`` takes from the recipe (the fields left unset)."""
        recipe = RECIPES[self.recipe]
        values = {k: recipe[k] for k in _RECIPE_FIELDS if getattr(self, k) is None and recipe.get(k) is not None}
        if self.model_config_name_or_path is not None:
            values.pop("unet_preset", None)  # the UNet comes from that config
        if self.num_epochs is not None or self.max_train_steps is not None:
            values.pop("num_epochs", None)
            values.pop("max_train_steps", None)
        return values

    def resolved(self) -> "TrainConfig":
        """A copy with every unset recipe field filled in from the data source's recipe."""
        return dataclasses.replace(self, **self.recipe_values())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every reason this (resolved) config cannot train correctly, each naming its flag(s); [] when fine.
        Cheap and side-effect free except for reading the file system (paths) and, with --push_to_hub, asking the
        Hub who the token belongs to."""
        c = self
        out: list[str] = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                out.append(message)

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def positive_int(name, minimum=1, optional=False):
            v = getattr(c, name)
            if v is None and optional:
                return
            need(is_int(v) and v >= minimum, f"--{name} must be an integer >= {minimum}" +
                 (" (or unset)" if optional else "") + f", got {v!r}")

        def finite(name, low=None, high=None, low_open=False, high_open=False, optional=False, text=None):
            v = getattr(c, name)
            if v is None and optional:
                return
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if ok and low is not None:
                ok = v > low if low_open else v >= low
            if ok and high is not None:
                ok = v < high if high_open else v <= high
            need(ok, f"--{name} must be {text}, got {v!r}")

        def choice(name, allowed):
            v = getattr(c, name)
            need(v in allowed, f"--{name} must be one of {list(allowed)}, got {v!r}")

        for name in ("train_batch_size", "gradient_accumulation_steps", "eval_batch_size", "ddpm_num_inference_steps",
                     "logging_steps"):
            positive_int(name)
        positive_int("ddpm_num_steps", minimum=2)
        for name in ("max_train_steps", "num_epochs", "resolution", "checkpoints_total_limit", "num_threads"):
            positive_int(name, optional=True)
        for name in ("checkpointing_steps", "dataloader_num_workers", "ema_update_after_step", "lr_warmup_steps",
                     "eval_num_samples", "max_nan_skips", "eval_steps", "eval_bound_steps"):
            positive_int(name, minimum=0)
        for name in ("save_images_steps", "save_images_epochs", "save_model_epochs"):
            positive_int(name, minimum=0, optional=True)
        need(is_int(c.seed) and c.seed >= 0, f"--seed must be an integer >= 0, got {c.seed!r}")
        need(is_int(c.local_rank) and c.local_rank >= -1, f"--local_rank must be an integer >= -1, got {c.local_rank!r}")
        if is_int(c.ddpm_num_steps):
            need(c.ddpm_num_steps <= MAX_TRAIN_TIMESTEPS,
                 f"--ddpm_num_steps must be <= {MAX_TRAIN_TIMESTEPS}, got {c.ddpm_num_steps}")
            if is_int(c.ddpm_num_inference_steps):
                need(c.ddpm_num_inference_steps <= c.ddpm_num_steps,
                     f"--ddpm_num_inference_steps ({c.ddpm_num_inference_steps}) must be <= --ddpm_num_steps "
                     f"({c.ddpm_num_steps}): the sampler takes a subset of the training timesteps")

        finite("learning_rate", low=0, low_open=True, text="a finite number > 0")
        finite("max_grad_norm", low=0, optional=True, text="a finite number > 0, or 0/unset for no clipping")
        finite("snr_gamma", low=0, low_open=True, optional=True, text="a finite number > 0, or unset (off)")
        for name in ("adam_beta1", "adam_beta2"):
            finite(name, low=0, high=1, high_open=True, text="in [0, 1)")
        finite("adam_weight_decay", low=0, text="a finite number >= 0")
        finite("class_dropout_prob", low=0, high=1, low_open=True, high_open=True,
               text="in (0, 1) (0 never trains the null class guidance needs)")
        finite("eval_guidance_scale", low=0, text="a finite number >= 0")
        finite("adam_epsilon", low=0, low_open=True, text="a finite number > 0")
        finite("ema_inv_gamma", low=0, low_open=True, text="a finite number > 0")
        finite("ema_power", low=0, low_open=True, text="a finite number > 0")
        finite("ema_min_decay", low=0, high=1, high_open=True, text="in [0, 1)")
        finite("ema_max_decay", low=0, high=1, high_open=True, text="in [0, 1)")
        if all(isinstance(v, (int, float)) for v in (c.ema_min_decay, c.ema_max_decay)):
            need(c.ema_min_decay <= c.ema_max_decay,
                 f"--ema_min_decay ({c.ema_min_decay}) must be <= --ema_max_decay ({c.ema_max_decay})")

        choice("ddpm_beta_schedule", BETA_SCHEDULES)
        choice("prediction_type", PREDICTION_TYPES)
        choice("variance_type", VARIANCE_TYPES)
        choice("loss", LOSS_TYPES)
        choice("lr_scheduler", LR_SCHEDULERS)
        choice("logger", LOGGERS)
        choice("nan_policy", NAN_POLICIES)
        choice("image_channels", CHANNEL_CHOICES)
        choice("on_bad_image", BAD_IMAGE_POLICIES)
        choice("digits_split", DIGITS_SPLIT_CHOICES)
        if c.mixed_precision is not None:
            choice("mixed_precision", MIXED_PRECISIONS)

        # ---- combinations ----
        learned = c.variance_type in LEARNED_VARIANCE_TYPES
        if learned and c.loss == "simple" and not c.allow_untrained_variance:
            out.append(f"--variance_type {c.variance_type} with --loss simple never trains the variance half of the "
                       "UNet's output: use --loss hybrid or vlb, or pass --allow_untrained_variance")
        if c.loss == "hybrid" and not learned:
            out.append(f"--loss hybrid trains a learned variance: --variance_type must be one of "
                       f"{list(LEARNED_VARIANCE_TYPES)}, got {c.variance_type!r}")
        if c.importance_sampling and c.loss != "vlb":
            out.append(f"--importance_sampling reweights the bound's terms: it needs --loss vlb, got --loss {c.loss}")
        if c.snr_gamma is not None and c.loss != "simple":
            out.append(f"--snr_gamma weights the simple loss: it needs --loss simple, got --loss {c.loss}")
        if c.dataset_name and c.train_data_dir:
            out.append("give either --dataset_name or --train_data_dir, not both")
        out.extend(_eval_problems(c, is_int))
        if c.label_column is not None and not c.class_conditional:
            out.append("--label_column is only used with --class_conditional")
        if c.eval_at_end and not c.uses_builtin_digits:
            out.append("--eval_at_end scores held-out built-in digits: use it without --dataset_name/--train_data_dir")
        if c.unet_preset is not None and c.model_config_name_or_path is not None:
            out.append("give either --unet_preset or --model_config_name_or_path, not both")
        if c.unet_preset is not None and c.model_config_name_or_path is None:
            from .model import preset_names

            need(c.unet_preset in preset_names(), f"--unet_preset must be one of {preset_names()}, got {c.unet_preset!r}")
        if c.preserve_input_precision:
            out.append("--preserve_input_precision is not supported: images are decoded to 8 bits per channel here")
        if c.enable_xformers_memory_efficient_attention:
            out.extend(_xformers_problems())
        if c.logger == "wandb":
            try:
                import wandb  # noqa: F401
            except ImportError:
                out.append("--logger wandb needs the wandb package: `pip install wandb` (or use --logger tensorboard)")
        if c.logger == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                out.append("--logger tensorboard needs the tensorboard package: `pip install tensorboard` "
                           "(or use --logger none)")
        if c.mixed_precision in ("fp16", "bf16"):
            out.extend(_precision_problems(c.mixed_precision))

        # ---- paths (read only) ----
        if c.output_dir is not None:
            out.extend(_output_dir_problems(c.output_dir))
        if c.train_data_dir is not None and not os.path.isdir(c.train_data_dir):
            out.append(f"--train_data_dir {c.train_data_dir!r} does not exist or is not a directory")
        if c.dataset_name is not None and c.dataset_name.startswith(("./", "../", "/", "~")) \
                and not os.path.exists(os.path.expanduser(c.dataset_name)):
            out.append(f"--dataset_name {c.dataset_name!r} looks like a local path but does not exist")
        if c.model_config_name_or_path is not None:
            from .model import model_config_problem

            problem = model_config_problem(c.model_config_name_or_path, c.cache_dir)
            if problem:
                out.append(problem)
        if c.resume_from_checkpoint not in (None, "latest") and not c.resume_from_checkpoint:
            out.append("--resume_from_checkpoint must be a checkpoint path or 'latest'")
        if c.push_to_hub:
            out.extend(_hub_problems(c))
        elif c.hub_model_id is not None and not _HUB_ID_RE.match(c.hub_model_id):
            out.append(f"--hub_model_id must look like 'user/name' (letters, digits, '-', '_', '.'), got "
                       f"{c.hub_model_id!r}")
        return out

    def validate(self) -> "TrainConfig":
        """The resolved config, or ConfigError listing every problem (one line, '; '-separated).
        Touches no data, model or output folder."""
        resolved = self.resolved()
        found = resolved.problems()
        if found:
            raise ConfigError("; ".join(found))
        return resolved


def eval_async_setting(value) -> str | None:
    """--eval_async as one of EVAL_ASYNC_CHOICES (a config file's JSON/YAML true/false too), None when invalid."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if value in EVAL_ASYNC_CHOICES else None


def _eval_problems(c: "TrainConfig", is_int) -> list[str]:
    """--eval_steps / --keep_best / --export: the combinations that cannot evaluate or keep what was asked."""
    out = []
    evaluating = is_int(c.eval_steps) and c.eval_steps > 0
    if c.keep_best is not None and c.keep_best not in ("fdd", "bits_per_dim"):
        out.append(f"--keep_best must be one of ['fdd', 'bits_per_dim'], got {c.keep_best!r}")
    if c.export not in ("last", "best"):
        out.append(f"--export must be one of ['last', 'best'], got {c.export!r}")
    setting = eval_async_setting(c.eval_async)
    if setting is None:
        out.append(f"--eval_async must be one of {list(EVAL_ASYNC_CHOICES)}, got {c.eval_async!r}")
    elif setting == "true" and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        out.append(f"--eval_async true runs each evaluation in one background process on a free CPU core: it needs a "
                   f"single-process run, this one has {os.environ['WORLD_SIZE']} processes (use --eval_async auto or "
                   f"false: the processes then share each evaluation)")
    if c.keep_best is not None and not evaluating:
        out.append(f"--keep_best {c.keep_best} compares evaluations: it needs --eval_steps N (N >= 1)")
    if c.export == "best" and c.keep_best is None:
        out.append("--export best exports the weights kept by --keep_best: pass --keep_best fdd or bits_per_dim")
    if not evaluating:
        return out
    if not c.uses_builtin_digits:
        out.append("--eval_steps scores samples against held-out images, which only the built-in digits have here "
                   "(FID against a held-out set of your data is not wired into training yet: evaluate the exported "
                   "model with ddpm_from_scratch.evaluation.evaluate_model(reference=...))")
    if is_int(c.eval_num_samples) and c.eval_num_samples == 1:
        out.append("--eval_num_samples must be 0 (no FDD) or >= 2 with --eval_steps (a covariance needs 2 samples)")
    if c.eval_num_samples == 0 and c.eval_bound_steps == 0:
        out.append("--eval_steps with --eval_num_samples 0 and --eval_bound_steps 0 has nothing to evaluate")
    if c.keep_best == "fdd" and c.eval_num_samples == 0:
        out.append("--keep_best fdd needs samples: --eval_num_samples must be >= 2")
    if c.keep_best == "bits_per_dim" and c.eval_bound_steps == 0:
        out.append("--keep_best bits_per_dim needs the bound: --eval_bound_steps must be >= 1")
    if is_int(c.eval_bound_steps) and is_int(c.ddpm_num_steps) and c.eval_bound_steps > c.ddpm_num_steps:
        out.append(f"--eval_bound_steps ({c.eval_bound_steps}) must be <= --ddpm_num_steps ({c.ddpm_num_steps})")
    return out


# ----------------------------------------------------------------------------------------------------------
# Environment checks
# ----------------------------------------------------------------------------------------------------------

def _xformers_problems() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return ["--enable_xformers_memory_efficient_attention needs a CUDA GPU (xformers has no CPU kernels)"]
    try:
        import xformers  # noqa: F401
    except ImportError:
        return ["--enable_xformers_memory_efficient_attention needs the xformers package (`pip install xformers`)"]
    return []


def _precision_problems(precision: str) -> list[str]:
    """fp16/bf16 where this machine cannot run them."""
    import torch

    if torch.cuda.is_available():
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            return ["--mixed_precision bf16: this GPU does not support bfloat16; use fp16 or no"]
        return []
    if precision == "fp16":
        return ["--mixed_precision fp16 needs a GPU (CPU autocast has no float16 training); use bf16 or no on a CPU"]
    return []  # bf16 autocast runs on CPUs


def _output_dir_problems(path: str) -> list[str]:
    """The output folder (or its nearest existing parent) must be a writable directory."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        return [f"--output_dir {path!r} exists and is not a directory"]
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        return [f"--output_dir {path!r} is not writable (no write permission on {probe!r})"]
    return []


def _hub_problems(c: TrainConfig) -> list[str]:
    """--push_to_hub: a well-formed repo id and a token the Hub accepts, checked now rather than after training."""
    repo_id = c.hub_model_id or os.path.basename(os.path.normpath(os.path.abspath(c.output_dir or ".")))
    if not _HUB_ID_RE.match(repo_id):
        flag = "--hub_model_id" if c.hub_model_id else "--output_dir's name (the default --hub_model_id)"
        return [f"{flag} must look like 'user/name' (letters, digits, '-', '_', '.'), got {repo_id!r}"]
    from huggingface_hub import HfApi, get_token

    token = c.hub_token or get_token()
    if not token:
        return ["--push_to_hub needs a Hub token: run `hf auth login`, set HF_TOKEN, or pass --hub_token"]
    try:
        HfApi(token=token).whoami()
    except Exception as exc:  # offline, unreachable, rejected: all mean the push would fail after training
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return [f"--push_to_hub: the Hub did not accept the token ({type(exc).__name__}: {reason[:200]})"]
    return []


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def build_parser(description: str | None = None):
    """HfArgumentParser over TrainConfig, plus ``--config FILE`` and the ``--no-<flag>`` / ``--no_<flag>`` forms of
    the boolean switches whose default is the recipe's (``--no-use_ema``, ``--no-center_crop``)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(TrainConfig, description=description)
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="A JSON or YAML file of settings (field: value); flags given on the command line win.")
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("nargs") == "?" and f.default is None:
            parser.add_argument(f"--no_{f.name}", f"--no-{f.name}", dest=f.name, action="store_const", const=False,
                                help=f"Same as --{f.name} false.")
    return parser


def load_config_file(path: str) -> dict[str, Any]:
    """{field: value} from a JSON (.json) or YAML (.yaml/.yml) file; ConfigError on unknown keys or bad syntax."""
    import json

    if not os.path.isfile(path):
        raise ConfigError(f"--config {path!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise ConfigError(f"--config {path!r} is not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'}: "
                          f"{str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path!r} must hold a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"--config {path!r} has unknown settings {unknown} (allowed: the flags of --help)")
    return data


def parse_cli(argv: list[str] | None = None) -> TrainConfig:
    """Command line (and ``--config FILE``) -> TrainConfig, not yet validated. argparse errors exit with status 2."""
    parser = build_parser(description="Train a DDPM on images. With no data flag it trains the `digits` UNet on the "
                                      "1797 8x8 handwritten digits shipped with scikit-learn (no download).")
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        try:
            defaults = load_config_file(pre.config)
        except ConfigError as exc:
            parser.error(str(exc))
        parser.set_defaults(**defaults)
    namespace = parser.parse_args(argv)
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**values)

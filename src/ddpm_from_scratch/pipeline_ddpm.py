"""ScratchDDPMPipeline: DDPM sampling (Ho et al. 2020, Algorithm 2) as a diffusers pipeline, unconditional or
class-conditional with classifier-free guidance (guidance.py).

The loop is the UNet and ``scheduler.step`` and nothing else; everything that can be checked is checked
before the first step (arguments, the UNet's dtype on its device, a given x_T). The result is checked once,
after the last step: non-finite samples (NaN weights, a float16 overflow) raise ``NonFiniteSampleError`` with
a diagnosis instead of turning into black images. Loading is safetensors-first: a folder (or Hub repo) whose
model weights exist only as pickle is refused unless the caller opts in with ``use_safetensors=False``, by
``ScratchDDPMPipeline.from_pretrained`` and by diffusers' generic loaders alike.

Importing this module registers the pipeline with diffusers (see ``register_with_diffusers``) so that
``diffusers.DiffusionPipeline.from_pretrained`` resolves ``"_class_name": "ScratchDDPMPipeline"``, can
download repos whose scheduler component lives in ``ddpm_from_scratch.scheduling_ddpm``, and refuses
pickle-only weights in such folders.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections.abc import Callable, Sequence

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines import pipeline_loading_utils
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id
from packaging import version as _version
from PIL import Image

from . import diffusion_math as dm
from . import guidance, scheduling_ddpm

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt")
LEARNED_VARIANCE_TYPES = dm.LEARNED_VARIANCE_TYPES
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_PICKLE_PATTERNS = [f"*{s}" for s in PICKLE_SUFFIXES]
_FOREIGN_PATTERNS = ["*.msgpack", "*.onnx", "*.pb", "*.h5", "*.ot", "*.gguf"]
_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
# Modules of this package that define pipeline components (they appear in model_index.json).
_COMPONENT_MODULES = (scheduling_ddpm,)
_PACKAGE = __name__.split(".")[0]
# Floating dtypes a UNet can sample in (the limits of particular devices are in check_dtype_device).
SAMPLING_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class NonFiniteSampleError(ValueError):
    """The samples hold NaN or infinite values after the last step (the pipeline refuses to return them)."""


# ----------------------------------------------------------------------------------------------
# Argument checks and small pure helpers
# ----------------------------------------------------------------------------------------------
def _is_int(value) -> bool:
    """True for Python/numpy integers, False for bools."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _image_shape(unet_config, batch_size: int) -> tuple[int, ...]:
    """(B, C, H, W) of the samples a UNet2DModel config produces."""
    size = unet_config.sample_size
    if size is None:
        raise ValueError("unet.config.sample_size is None: the pipeline cannot know the image size")
    height, width = (size, size) if _is_int(size) else tuple(size)
    return (batch_size, unet_config.in_channels, int(height), int(width))


def _check_generator(generator, batch_size: int) -> None:
    """None, one torch.Generator, or a list of exactly ``batch_size`` generators (one per image)."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)):
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise TypeError("generator must be a torch.Generator or a list of torch.Generator")
        if len(generator) != batch_size:
            raise ValueError(
                f"generator is a list of {len(generator)} generators but batch_size={batch_size}; "
                "pass one generator per image"
            )
        return
    raise TypeError(f"generator must be None, a torch.Generator or a list of them, got {type(generator).__name__}")


def _check_variance_output(unet_config, scheduler_config) -> None:
    """A learned variance_type needs the UNet's extra variance channels."""
    in_ch, out_ch = unet_config.in_channels, unet_config.out_channels
    variance_type = getattr(scheduler_config, "variance_type", None)
    learned = variance_type in LEARNED_VARIANCE_TYPES
    if learned and out_ch != 2 * in_ch:
        raise ValueError(
            f"scheduler.config.variance_type={variance_type!r} needs a UNet with out_channels = 2 * in_channels "
            f"= {2 * in_ch}, got out_channels={out_ch}"
        )
    # out_ch == 2 * in_ch with a fixed variance: a learned-variance UNet sampled with a fixed variance (the
    # scheduler ignores the variance half).
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"unet out_channels={out_ch} must equal in_channels={in_ch} (or twice it for a learned variance)")


def check_dtype_device(dtype: torch.dtype, device: torch.device) -> None:
    """Raise ValueError for a UNet dtype that cannot sample on ``device``; warn when it works but badly.

    float16 on a CPU runs, but emulated: about 10x slower than float32 for the ``digits`` UNet on an AVX-512 CPU
    (measured with torch 2.13), with float16's range and precision, so it is almost never what was meant.
    """
    device = torch.device(device)
    if dtype not in SAMPLING_DTYPES:
        raise ValueError(
            f"the UNet's dtype {dtype} cannot sample: use torch.float32 (any device), torch.bfloat16, or torch.float16 "
            f"(GPU); load with from_pretrained(..., dtype=torch.float32) or call pipe.to(torch.float32)"
        )
    if device.type == "mps" and dtype == torch.float64:
        raise ValueError("the UNet's dtype torch.float64 is not supported on mps; use torch.float32 or torch.float16")
    if device.type == "cpu" and dtype == torch.float16:
        warnings.warn(
            "the UNet is float16 on the CPU: CPUs have no native float16 arithmetic, so sampling runs emulated "
            "(about 10x slower than float32 for the digits UNet) and with float16's range; on a CPU load with "
            "dtype=torch.float32 (or torch.bfloat16), or move the pipeline to a GPU",
            UserWarning, stacklevel=2,
        )
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        warnings.warn(
            f"the UNet is bfloat16 but {torch.cuda.get_device_name(device)} has no native bfloat16: sampling runs "
            "emulated and slowly; use torch.float16 or torch.float32 on this GPU",
            UserWarning, stacklevel=2,
        )


def _non_finite_parameters(module: torch.nn.Module, limit: int = 3) -> tuple[int, list[str]]:
    """(number of parameter/buffer tensors holding NaN/inf, the first ``limit`` of their names)."""
    bad = [name for name, p in [*module.named_parameters(), *module.named_buffers()]
           if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    return len(bad), bad[:limit]


def check_finite_samples(latents: torch.Tensor, unet: torch.nn.Module, num_steps: int, callback: bool) -> None:
    """Raise NonFiniteSampleError when x_0 ``latents`` (B, C, H, W) holds NaN/inf, with the likely cause.

    One reduction and one host sync per call, none per step; the diagnosis (weights, dtype, callback) runs only
    on the failure path. Non-finite values propagate through every later step, so a check of x_0 sees any step's.
    """
    finite = torch.isfinite(latents)
    if bool(finite.all()):
        return
    count, total = int((~finite).sum()), finite.numel()
    where = f"the samples hold NaN/inf after {num_steps} steps ({count} of {total} values)"
    n_bad, names = _non_finite_parameters(unet)
    if n_bad:
        cause = (f"the UNet's weights hold NaN/inf ({n_bad} tensors, e.g. {', '.join(names)}): the model is broken "
                 "(a diverged training run?); load another checkpoint")
    elif unet.dtype in (torch.float16, torch.bfloat16):
        cause = (f"the UNet runs in {unet.dtype}, whose range its activations or the scheduler's arithmetic "
                 "exceeded; sample in torch.float32")
    else:
        cause = "the UNet output or the latents became non-finite during sampling"
    if callback:
        cause += "; callback_on_step_end may also have returned non-finite latents"
    raise NonFiniteSampleError(f"{where}: {cause}. No images are returned.")


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, H, W, C) floats in [0, 1] -> B PIL images: 'L' for 1 channel, 'RGB' for 3, 'RGBA' for 4."""
    channels = images.shape[-1]
    if channels not in (1, 3, 4):
        raise ValueError(f"output_type='pil' supports 1, 3 or 4 channels, got {channels}; use 'np' or 'pt'")
    pixels = (images * 255.0).round().astype(np.uint8)
    if channels == 1:
        pixels = pixels[..., 0]
    return [Image.fromarray(p) for p in pixels]


def _model_folders(folder: str) -> dict[str, str]:
    """Components of a saved pipeline that hold model weights (a ``config.json`` in their subfolder)."""
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        return {}
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    out = {}
    for name, value in index.items():
        sub = os.path.join(folder, name)
        if isinstance(value, list) and value[0] is not None and os.path.isfile(os.path.join(sub, "config.json")):
            out[name] = sub
    return out


def check_component_safetensors(name: str, sub: str, use_safetensors: bool | None = None) -> None:
    """Refuse a model component folder ``sub`` without safetensors weights, unless ``use_safetensors is False``."""
    if use_safetensors is False or not os.path.isdir(sub):
        return
    files = sorted(os.listdir(sub))
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    found = (f"only pickle weights {pickles}" if pickles
             else f"no safetensors weights (files: {files}; pickle weights are not downloaded)")
    raise ValueError(
        f"component {name!r} in {os.path.dirname(os.path.abspath(sub))} has {found}. Pickle files can run arbitrary "
        "code when loaded, so they are refused; convert them to safetensors, or pass use_safetensors=False to load "
        "pickle weights from a source you trust."
    )


def check_safetensors_only(folder: str, use_safetensors: bool | None) -> None:
    """Refuse a saved pipeline whose model weights are not safetensors, unless ``use_safetensors is False``."""
    for name, sub in _model_folders(folder).items():
        check_component_safetensors(name, sub, use_safetensors)


def is_our_pipeline_folder(folder: str) -> bool:
    """True when ``folder``'s model_index.json names ScratchDDPMPipeline or a component of this package."""
    try:
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(index, dict):
        return False
    if index.get("_class_name") == "ScratchDDPMPipeline":
        return True
    return any(isinstance(v, list) and v and isinstance(v[0], str) and v[0].split(".")[0] == _PACKAGE
               for v in index.values())


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------
class ScratchDDPMPipeline(DiffusionPipeline):
    """Image generation with DDPM ancestral sampling, unconditional or class-conditional with classifier-free
    guidance.

    Components: ``unet`` (a ``UNet2DModel``: (B, C, H, W) x_t and t -> (B, C or 2C, H, W)) and ``scheduler``
    (``ScratchDDPMScheduler`` or any scheduler with the DDPMScheduler API). ``class_names`` (a conditional UNet
    only, one per class) is stored in ``model_index.json`` (as {"0": name, ...}), so labels can be given by name
    after loading; ``pipe.class_names`` is the list.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin,
                 class_names: Sequence[str] | dict[str, str] | None = None):
        super().__init__()
        if unet is not None:
            class_names = guidance.check_class_names(class_names, guidance.num_classes_of(unet.config))
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(class_names=guidance.class_names_to_config(class_names))

    @property
    def class_names(self) -> list[str] | None:
        """The class names (index = label) of a conditional model, or None."""
        stored = self.config.get("class_names")
        return None if stored is None else [stored[str(i)] for i in range(len(stored))]

    # -- generation -------------------------------------------------------------------------------
    def check_inputs(self, batch_size, generator, num_inference_steps, output_type, latents,
                     callback_on_step_end, callback_on_step_end_tensor_inputs) -> None:
        """Raise ValueError/TypeError naming the bad argument; called once before the loop."""
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not _is_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        train_steps = getattr(self.scheduler.config, "num_train_timesteps", None)
        if train_steps is not None and num_inference_steps > train_steps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} exceeds the scheduler's num_train_timesteps={train_steps}"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        _check_generator(generator, batch_size)
        shape = _image_shape(self.unet.config, batch_size)
        if output_type == "pil" and shape[1] not in (1, 3, 4):
            raise ValueError(f"output_type='pil' supports 1, 3 or 4 channels, the UNet has {shape[1]}; use 'np' or 'pt'")
        if latents is not None:
            if not isinstance(latents, torch.Tensor):
                raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape} (batch_size, C, H, W), got {tuple(latents.shape)}")
            if not bool(torch.isfinite(latents).all()):
                raise ValueError("latents (x_T) hold NaN or infinite values")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError("callback_on_step_end must be callable or None")
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {bad} are not allowed; allowed: {self._callback_tensor_inputs}"
            )
        _check_variance_output(self.unet.config, self.scheduler.config)
        check_dtype_device(self.unet.dtype, self._execution_device)

    def prepare_latents(self, shape, dtype, device, generator, latents=None) -> torch.Tensor:
        """x_T ~ N(0, I) of ``shape`` (B, C, H, W), scaled by the scheduler's init_noise_sigma (1 for DDPM)."""
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        sigma = getattr(self.scheduler, "init_noise_sigma", 1.0)
        return latents if sigma == 1.0 else latents * sigma

    @property
    def num_timesteps(self) -> int:
        """Number of denoising steps of the last call."""
        return self._num_timesteps

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        latents: torch.Tensor | None = None,
        class_labels: int | str | Sequence[int | str] | torch.Tensor | None = None,
        guidance_scale: float | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate ``batch_size`` images by ancestral sampling x_T -> x_0 (DDPM Algorithm 2).

        batch_size: default len(class_labels) for a list of labels, else 1.
        class_labels (conditional UNet): one class for all images or one per image, as indices or names from
        ``pipe.class_names``; None samples unconditionally (the null class). guidance_scale s (default 1):
        classifier-free guidance out_u + s (out_c - out_u) in the model's output space (guidance.py), the
        conditional and null halves in one batched forward; s = 1 is conditional, s = 0 unconditional, and those
        two need only one half.
        generator: one generator, or a list of ``batch_size`` generators (image i depends only on generator i).
        latents: optional x_T, shape (batch_size, C, H, W). output_type: "pil" (grayscale 'L' for one channel),
        "np" (B, H, W, C) float32 in [0, 1], or "pt" (B, C, H, W) float32 in [0, 1].
        callback_on_step_end(pipe, i, t, callback_kwargs) -> dict may replace ``latents`` after each step.

        Raises ``NonFiniteSampleError`` (a ValueError) instead of returning samples that hold NaN/inf, and
        ValueError for a UNet dtype that cannot sample on its device (a warning for float16 on a CPU: it works,
        emulated and slowly).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        batch_size = guidance.infer_batch_size(batch_size, class_labels)
        self.check_inputs(batch_size, generator, num_inference_steps, output_type, latents,
                          callback_on_step_end, callback_on_step_end_tensor_inputs)
        labels, guidance_scale = guidance.sampling_labels(self.unet.config, class_labels, guidance_scale, batch_size,
                                                          self.class_names)
        device = self._execution_device
        shape = _image_shape(self.unet.config, batch_size)
        latents = self.prepare_latents(shape, self.unet.dtype, device, generator, latents)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        step = self.scheduler.step
        denoise = guidance.guided_denoiser(self.unet, None if labels is None else labels.to(device), guidance_scale,
                                           guidance.num_classes_of(self.unet.config))

        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                model_output = denoise(latents, t)
                latents = step(model_output, t, latents, generator=generator, return_dict=False)[0]
                if callback_on_step_end is not None:
                    callback_kwargs = {k: latents for k in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = outputs.pop("latents", latents)
                progress.update()

        check_finite_samples(latents, self.unet, len(timesteps), callback_on_step_end is not None)
        images = (latents.float() / 2 + 0.5).clamp(0, 1)  # [-1, 1] -> [0, 1]
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    # -- loading and saving ----------------------------------------------------------------------
    @classmethod
    def download(cls, pretrained_model_name, **kwargs) -> str:
        """Snapshot-download a pipeline repo with huggingface_hub and return the local folder.

        Pickle weights are not downloaded unless ``use_safetensors=False``. Accepts cache_dir, revision, token,
        local_files_only and force_download like ``DiffusionPipeline.download``.
        """
        use_safetensors = kwargs.pop("use_safetensors", None)
        if kwargs.pop("proxies", None) is not None:
            logger.warning("proxies is ignored: configure proxies through huggingface_hub's environment instead")
        kwargs.pop("variant", None)  # every safetensors file is fetched; the loader picks the variant
        unknown = sorted(set(kwargs) - {"cache_dir", "force_download", "local_files_only", "token", "revision"})
        if unknown:
            raise TypeError(f"download() got unexpected keyword arguments {unknown}")
        ignore = list(_FOREIGN_PATTERNS)
        if use_safetensors is not False:
            ignore += _PICKLE_PATTERNS
        return snapshot_download(
            pretrained_model_name,
            cache_dir=kwargs.get("cache_dir"),
            revision=kwargs.get("revision"),
            token=kwargs.get("token"),
            local_files_only=bool(kwargs.get("local_files_only") or False),
            force_download=bool(kwargs.get("force_download") or False),
            ignore_patterns=ignore,
            user_agent={"pipeline_class": cls.__name__},
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "ScratchDDPMPipeline":
        """Load from a local folder or a Hub repo id (``"user/name"``), safetensors only unless
        ``use_safetensors=False``. Other kwargs (dtype, revision, cache_dir, token, local_files_only,
        component overrides such as ``scheduler=``) behave as in ``DiffusionPipeline.from_pretrained``."""
        if not isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            raise TypeError(
                "pretrained_model_name_or_path must be a folder path or a Hub repo id, "
                f"got {type(pretrained_model_name_or_path).__name__}"
            )
        source = os.fspath(pretrained_model_name_or_path)
        use_safetensors = kwargs.pop("use_safetensors", None)
        download_kwargs = {k: kwargs.pop(k) for k in _DOWNLOAD_KWARGS if k in kwargs}
        if os.path.isdir(source):
            folder = source
        else:
            if os.path.exists(source):
                raise ValueError(f"pretrained_model_name_or_path={source!r} is a file; pass the pipeline's folder")
            try:
                validate_repo_id(source)
            except HFValidationError as err:
                raise ValueError(
                    f"pretrained_model_name_or_path={source!r} is neither an existing folder nor a Hub repo id "
                    "('user/name')"
                ) from err
            folder = cls.download(source, use_safetensors=use_safetensors, **download_kwargs)
        check_safetensors_only(folder, use_safetensors)
        pipe = super().from_pretrained(folder, use_safetensors=use_safetensors is not False, **kwargs)
        pipe.register_to_config(_name_or_path=source)
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True, **kwargs):
        """Write model_index.json, the UNet as safetensors and the scheduler config to ``save_directory``."""
        if safe_serialization is not True:
            raise ValueError("safe_serialization must be True: this project writes weights only as safetensors")
        return super().save_pretrained(save_directory, safe_serialization=True, **kwargs)


# ----------------------------------------------------------------------------------------------
# Registration with diffusers
# ----------------------------------------------------------------------------------------------
DIFFUSERS_WRITTEN_FOR = "0.42"  # the diffusers release series whose private loader API this section was written against
_LOADER_PARAMS = ("cached_folder", "name", "use_safetensors", "pipeline_class")
_GUARD_MARK = "_ddpm_from_scratch_pickle_guard"


class DiffusersIntegrationError(ImportError):
    """diffusers' private loader API is not what ``register_with_diffusers`` was written against."""


def _what_to_do(installed: str) -> str:
    return (f"Either install the diffusers it was written for (pip install 'diffusers=={DIFFUSERS_WRITTEN_FOR}.*') or "
            f"upgrade ddpm-from-scratch; ScratchDDPMPipeline.from_pretrained(...) still loads this package's "
            f"pipelines with diffusers {installed}, but diffusers.DiffusionPipeline.from_pretrained may not.")


def diffusers_integration_problem(installed_version: str, loading_utils=None, pipeline_utils=None) -> tuple[str, str] | None:
    """None when diffusers' private loader API is as written for; else (kind, message) with kind "api" (the
    private names are missing or changed: registration would break) or "version" (the API looks the same, but
    the version is not the one written for: registration goes ahead with a warning)."""
    from diffusers.pipelines import pipeline_utils as default_pipeline_utils

    loading_utils = pipeline_loading_utils if loading_utils is None else loading_utils
    pipeline_utils = default_pipeline_utils if pipeline_utils is None else pipeline_utils
    written = f"diffusers {DIFFUSERS_WRITTEN_FOR}.x"
    loadable = getattr(loading_utils, "LOADABLE_CLASSES", None)
    loader = getattr(pipeline_utils, "load_sub_model", None)
    missing = []
    if not isinstance(loadable, dict) or not all(isinstance(v, dict) for v in loadable.values()):
        missing.append("diffusers.pipelines.pipeline_loading_utils.LOADABLE_CLASSES (a dict of dicts)")
    if not callable(loader):
        missing.append("diffusers.pipelines.pipeline_utils.load_sub_model")
    else:
        import inspect

        try:
            params = inspect.signature(getattr(loader, "__wrapped__", loader)).parameters
        except (TypeError, ValueError):
            params = {}
        absent = [p for p in _LOADER_PARAMS if p not in params]
        if absent:
            missing.append(f"the parameters {absent} of diffusers.pipelines.pipeline_utils.load_sub_model")
    if missing:
        return "api", (f"ddpm_from_scratch cannot register ScratchDDPMPipeline with diffusers {installed_version}: it "
                       f"was written against {written} and relies on {'; '.join(missing)}, which this diffusers does "
                       f"not have. {_what_to_do(installed_version)}")
    try:
        same = _version.parse(installed_version).release[:2] == _version.parse(DIFFUSERS_WRITTEN_FOR).release[:2]
    except _version.InvalidVersion:
        same = False
    if not same:
        return "version", (f"ddpm_from_scratch's diffusers registration was written against {written} (it extends "
                           f"the private LOADABLE_CLASSES and wraps load_sub_model); diffusers {installed_version} is "
                           f"installed. It is registered anyway, as the private names are still there; if "
                           f"DiffusionPipeline.from_pretrained fails on a ScratchDDPMPipeline folder: "
                           f"{_what_to_do(installed_version)}")
    return None


def _pickle_guarded(load_sub_model):
    """Wrap diffusers' ``load_sub_model`` so that, in a folder of this package's pipelines, a model component
    without safetensors weights is refused before anything is unpickled (unless ``use_safetensors=False``)."""
    if getattr(load_sub_model, _GUARD_MARK, False):
        return load_sub_model

    @functools.wraps(load_sub_model)
    def guarded(*args, **kwargs):
        folder, name = kwargs.get("cached_folder"), kwargs.get("name")
        if folder is not None and name is not None and is_our_pipeline_folder(os.fspath(folder)):
            sub = os.path.join(os.fspath(folder), name)
            if os.path.isfile(os.path.join(sub, "config.json")):
                check_component_safetensors(name, sub, kwargs.get("use_safetensors"))
        return load_sub_model(*args, **kwargs)

    setattr(guarded, _GUARD_MARK, True)
    return guarded


def register_with_diffusers(strict: bool = True) -> bool:
    """Let diffusers' generic loaders handle checkpoints of this package, without trust_remote_code.

    - ``DiffusionPipeline.from_pretrained`` looks ``model_index.json``'s ``_class_name`` up as an attribute
      of the ``diffusers`` module: expose ``diffusers.ScratchDDPMPipeline``.
    - ``DiffusionPipeline.download`` (repo ids) accepts a component library only if it is a key of
      ``LOADABLE_CLASSES``; diffusers records our scheduler's library as its module path
      (``ddpm_from_scratch.scheduling_ddpm``), so that path becomes a key whose loadable base class is
      ``SchedulerMixin`` (which the module imports, as diffusers' loader looks it up there).
    - diffusers' ``load_sub_model`` is wrapped so that a folder of this package's pipelines whose model weights
      are only pickle is refused by every diffusers loader too (``use_safetensors=False`` opts in).

    Both diffusers names are private: the installed version is checked first (``DIFFUSERS_WRITTEN_FOR``). A
    different version with the same private API registers with a warning; a changed API registers nothing (so
    that no generic loader can reach a pickle unguarded) and raises ``DiffusersIntegrationError`` saying what to
    do, or with ``strict=False`` (on import) warns and returns False. Idempotent; True when registered.
    """
    from diffusers.pipelines import pipeline_utils

    problem = diffusers_integration_problem(getattr(diffusers, "__version__", "unknown"))
    if problem is not None:
        kind, message = problem
        if kind == "api":
            if strict:
                raise DiffusersIntegrationError(message)
            warnings.warn(message, UserWarning, stacklevel=2)
            return False
        warnings.warn(message, UserWarning, stacklevel=2)
    for module in _COMPONENT_MODULES:
        if not hasattr(module, "SchedulerMixin"):
            raise ImportError(f"{module.__name__} must import SchedulerMixin for diffusers' loader to find it")
        pipeline_loading_utils.LOADABLE_CLASSES.setdefault(
            module.__name__, {"SchedulerMixin": ["save_pretrained", "from_pretrained"]}
        )
    pipeline_utils.load_sub_model = _pickle_guarded(pipeline_utils.load_sub_model)
    setattr(diffusers, ScratchDDPMPipeline.__name__, ScratchDDPMPipeline)
    return True


register_with_diffusers(strict=False)

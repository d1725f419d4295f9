"""ddpm-from-scratch: DDPM written from the posterior of the forward process, for diffusers."""

from . import diffusion_math
from .scheduling_ddpm import ScratchDDPMScheduler, ScratchDDPMSchedulerOutput
from .unet_presets import PRESETS, build_unet, parameter_count, preset_table, unet_config
from .pipeline_ddpm import ScratchDDPMPipeline  # also makes diffusers resolve our pipeline by name
from .hub import model_card_text, push_folder, write_model_card
from .likelihood import BoundResult, bits_per_dim, estimate_analytic_gamma, sample_images, with_analytic_variance
from .losses import ImportanceTimestepSampler, training_loss
from .metrics import digits_feature_extractor, frechet_distance, kernel_inception_distance

__version__ = "0.1.0"

__all__ = [
    "ScratchDDPMScheduler",
    "ScratchDDPMSchedulerOutput",
    "ScratchDDPMPipeline",
    "PRESETS",
    "unet_config",
    "build_unet",
    "parameter_count",
    "preset_table",
    "bits_per_dim",
    "BoundResult",
    "estimate_analytic_gamma",
    "with_analytic_variance",
    "sample_images",
    "training_loss",
    "ImportanceTimestepSampler",
    "frechet_distance",
    "kernel_inception_distance",
    "digits_feature_extractor",
    "model_card_text",
    "push_folder",
    "write_model_card",
    "diffusion_math",
]

"""ddpm-from-scratch: DDPM written from the posterior of the forward process, for diffusers."""

from . import diffusion_math
from .scheduling_ddpm import ScratchDDPMScheduler, ScratchDDPMSchedulerOutput

__version__ = "0.1.0"

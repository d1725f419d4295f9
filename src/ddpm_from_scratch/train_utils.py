"""Deprecated: the training machinery moved to ``ddpm_from_scratch.trainer`` (ema, steps, checkpoints, sampling,
export) and grids to ``ddpm_from_scratch.images``. Only the name ``cli.py`` still imports is kept here; it delegates.
"""

from .images import image_grid as _image_grid


def image_grid(images, nrow=None, pad: int = 2, scale: int = 1):
    """``images.image_grid`` with the old default scale 1 (no enlargement). Use ``images.image_grid``."""
    return _image_grid(images, nrow=nrow, pad=pad, scale=scale)

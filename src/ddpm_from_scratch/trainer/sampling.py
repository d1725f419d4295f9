"""Sample grids during and after training, drawn with ScratchDDPMPipeline (the one sampling loop)."""

import os

import numpy as np
import torch


def generate_samples(unet, scheduler, num_images: int, num_inference_steps: int, seed: int, device=None,
                     class_labels=None, guidance_scale=None):
    """(N, H, W, C) float in [0, 1] from the pipeline with ``unet`` (EMA weights or not) and ``scheduler``
    (``class_labels``: one per image, for a class-conditional UNet, guided with ``guidance_scale``)."""
    from ..pipeline_ddpm import ScratchDDPMPipeline

    pipe = ScratchDDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    was_training = unet.training
    unet.eval()
    try:
        out = pipe(batch_size=num_images, num_inference_steps=num_inference_steps, generator=gen, output_type="np",
                   class_labels=class_labels, guidance_scale=guidance_scale)
    finally:
        unet.train(was_training)
    return np.asarray(out.images)


def class_grid_labels(num_classes: int, num_images: int) -> tuple[list[int], int]:
    """(labels, images per row) of a conditional model's grid: one row per class, num_images // classes each."""
    per_row = max(1, num_images // num_classes)
    return [k for k in range(num_classes) for _ in range(per_row)], per_row


def save_sample_grid(images: np.ndarray, path: str, nrow: int | None = None) -> str:
    """Writes the grid PNG atomically (images.save_image_grid: >= 512 px wide). Returns ``path``."""
    from ..images import save_image_grid

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return save_image_grid(images, path, nrow=nrow)

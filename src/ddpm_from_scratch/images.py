"""Image grids: the one routine behind the training grids, the CLI's `sample --out` and the model card."""

from __future__ import annotations

import numpy as np

MIN_GRID_WIDTH = 512  # px: a grid narrower than this is enlarged (nearest) by default, so that people can see it


def to_uint8_nhwc(images) -> np.ndarray:
    """(N, H, W, C) float in [0, 1] or uint8, or a torch (N, C, H, W) tensor in [-1, 1] -> (N, H, W, C) uint8."""
    if hasattr(images, "detach"):  # torch tensor, pipeline "pt" layout
        t = images.detach().float().cpu()
        if t.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(t.shape)}")
        images = ((t.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    if images.dtype != np.uint8:
        if not np.isfinite(images).all():
            raise ValueError("images hold NaN or infinite values; refusing to write a grid of them")
        images = np.rint(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)
    return images


def grid_layout(num_images: int, nrow: int | None = None) -> tuple[int, int]:
    """(images per row, rows): square-ish by default."""
    if num_images < 1:
        raise ValueError(f"a grid needs at least one image, got {num_images}")
    nrow = int(nrow) if nrow else int(np.ceil(np.sqrt(num_images)))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    return nrow, int(np.ceil(num_images / nrow))


def default_scale(num_images: int, width: int, nrow: int | None = None, pad: int = 2,
                  min_width: int = MIN_GRID_WIDTH) -> int:
    """The smallest integer enlargement that makes the grid at least ``min_width`` px wide."""
    per_row, _ = grid_layout(num_images, nrow)
    grid_width = per_row * (width + pad) + pad
    return max(1, int(np.ceil(min_width / grid_width)))


def image_grid(images, nrow: int | None = None, pad: int = 2, scale: int | None = None):
    """Images -> one PIL image, ``nrow`` per row, ``pad`` px white gaps, each pixel enlarged ``scale`` times
    (nearest; default: ``default_scale``, so the grid is at least 512 px wide)."""
    from PIL import Image

    images = to_uint8_nhwc(images)
    n, h, w, c = images.shape
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {c}")
    per_row, rows = grid_layout(n, nrow)
    grid = np.full((rows * (h + pad) + pad, per_row * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, per_row)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    img = Image.fromarray(grid[:, :, 0] if c == 1 else grid, mode="L" if c == 1 else "RGB")
    scale = default_scale(n, w, per_row, pad) if scale is None else int(scale)
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_image_grid(images, path: str, nrow: int | None = None, pad: int = 2, scale: int | None = None) -> str:
    """Writes ``image_grid(...)`` to ``path`` atomically (format from the extension). Returns ``path``."""
    from .fileio import atomic_save_image

    return atomic_save_image(image_grid(images, nrow=nrow, pad=pad, scale=scale), path)


def image_file_names(num_images: int, ext: str = ".png") -> list[str]:
    """``0000.png``, ``0001.png``, ... (at least 4 digits, so that names sort in sampling order)."""
    width = max(4, len(str(num_images - 1)))
    return [f"{i:0{width}d}{ext}" for i in range(num_images)]


def save_images(images, folder: str, ext: str = ".png") -> list[str]:
    """Writes each image at its own resolution (no enlargement, as a pipeline's PIL output) to
    ``folder/0000.png``, ... atomically; same-named files are replaced. ``folder`` must exist. Returns the paths."""
    import os

    from PIL import Image

    from .fileio import atomic_save_image

    pixels = to_uint8_nhwc(images)
    if pixels.shape[-1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {pixels.shape[-1]}")
    paths = []
    for name, p in zip(image_file_names(len(pixels), ext), pixels):
        img = Image.fromarray(p[:, :, 0] if p.shape[-1] == 1 else p)  # 'L' or 'RGB' from the uint8 shape
        paths.append(atomic_save_image(img, os.path.join(folder, name)))
    return paths

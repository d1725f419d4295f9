"""Class conditioning and classifier-free guidance (Ho & Salimans 2022).

Convention (one place): a class-conditional ``UNet2DModel`` has ``num_class_embeds = K + 1``. Labels ``0..K-1``
are the K classes, label ``K`` is the "null" class: training replaces a label by it with probability
``class_dropout_prob``, so the same network also models the unconditional distribution. The class names
(index = label) travel in the pipeline's config (``model_index.json``, key ``class_names``, stored as
``{"0": name_0, ...}``; ``ScratchDDPMPipeline.class_names`` gives the list).

Guidance combines the conditional and the null-class outputs as ``out_u + s * (out_c - out_u)``:
s = 1 is the conditional model, s = 0 the unconditional one, s > 1 sharpens towards the class. The combination is
done in the model's own output space (epsilon, x_0 or v, whichever ``prediction_type`` the model has). For a fixed
x_t and t, x_0 and v are affine functions of epsilon whose weights do not depend on the prediction, and weights
(1 - s, s) summing to 1 commute with an affine map, so guiding any of the three gives the same sampler as guiding
epsilon. With a learned variance (2C output channels) only the prediction half (the first C channels) is guided;
the variance half is the conditional one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch


def num_classes_of(unet_config) -> int | None:
    """K, the number of real classes of a UNet2DModel config (``num_class_embeds - 1``), or None when it is
    unconditional. ValueError for class conditioning this package does not produce (other class_embed_type)."""
    n = getattr(unet_config, "num_class_embeds", None)
    embed_type = getattr(unet_config, "class_embed_type", None)
    if n is None:
        if embed_type is not None:
            raise ValueError(f"unet.config.class_embed_type={embed_type!r} is not supported: class conditioning here "
                             "is an embedding table (num_class_embeds = classes + 1 null class)")
        return None
    if embed_type is not None:
        raise ValueError(f"unet.config.class_embed_type={embed_type!r} is not supported with num_class_embeds")
    if int(n) < 3:
        raise ValueError(f"unet.config.num_class_embeds={n}: a conditional UNet needs >= 2 classes + the null class")
    return int(n) - 1


def null_label(num_classes: int) -> int:
    """Index of the null ("no class") embedding: the one after the K real classes."""
    return int(num_classes)


def class_names_to_config(class_names: list[str] | None) -> dict[str, str] | None:
    """The form stored in model_index.json: {"0": name_0, "1": name_1, ...}. Not a list: diffusers reads every list
    value of model_index.json as a (library, class) component when it downloads a repo."""
    return None if class_names is None else {str(i): name for i, name in enumerate(class_names)}


def check_class_names(class_names, num_classes: int | None) -> list[str] | None:
    """``class_names`` (a list of names, or the stored {"index": name} mapping) as a list of distinct non-empty
    strings, one per class; None passes through."""
    if class_names is None:
        return None
    if isinstance(class_names, Mapping):
        expected = [str(i) for i in range(len(class_names))]
        if set(map(str, class_names)) != set(expected):
            raise ValueError(f"class_names as a mapping needs the keys 0..{len(class_names) - 1}, "
                             f"got {sorted(map(str, class_names))}")
        class_names = [{str(k): v for k, v in class_names.items()}[k] for k in expected]
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise TypeError(f"class_names must be a list of strings, got {type(class_names).__name__}")
    names = list(class_names)
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"class_names must be non-empty strings, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be distinct, got {names!r}")
    if num_classes is None:
        raise ValueError("class_names were given but the UNet is unconditional (unet.config.num_class_embeds is None)")
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names but the UNet has {num_classes} classes "
                         f"(num_class_embeds={num_classes + 1}, the last being the null class)")
    return names


def _label_index(label, num_classes: int, class_names: list[str] | None) -> int:
    """One label (an int class index or a class name) -> its index, or ValueError naming class_labels."""
    if isinstance(label, str):
        if class_names is None:
            raise ValueError(f"class_labels: got the name {label!r} but this model has no class names; "
                             f"pass class indices 0..{num_classes - 1}")
        if label in class_names:
            return class_names.index(label)
        raise ValueError(f"class_labels: unknown class name {label!r}; known names: {class_names}")
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        raise TypeError(f"class_labels must be ints or class names, got {label!r} ({type(label).__name__})")
    if not 0 <= int(label) < num_classes:
        allowed = f"0..{num_classes - 1}" + (f" or a name in {class_names}" if class_names else "")
        raise ValueError(f"class_labels: label {int(label)} is out of range; allowed: {allowed} "
                         f"(index {num_classes} is the null class, reached with guidance_scale=0)")
    return int(label)


def infer_batch_size(batch_size, class_labels):
    """The batch size of a sampling call: ``batch_size`` when given, else the number of ``class_labels`` when they
    are a list / tuple / 1-D tensor, else 1."""
    if batch_size is not None:
        return batch_size
    if isinstance(class_labels, (list, tuple)) or (isinstance(class_labels, (torch.Tensor, np.ndarray))
                                                   and class_labels.ndim == 1):
        return max(len(class_labels), 1)
    return 1


def resolve_class_labels(class_labels, batch_size: int, num_classes: int,
                         class_names: list[str] | None = None) -> torch.Tensor:
    """int64 (batch_size,) class indices from ``class_labels``: one int / name for every image, or exactly one per
    image (a list, tuple, 1-D tensor or array of ints and / or names)."""
    if isinstance(class_labels, (torch.Tensor, np.ndarray)):
        if class_labels.ndim > 1:
            raise ValueError(f"class_labels must be 1-D, got shape {tuple(class_labels.shape)}")
        if class_labels.dtype.is_floating_point if isinstance(class_labels, torch.Tensor) else \
                not np.issubdtype(class_labels.dtype, np.integer):
            raise TypeError(f"class_labels must hold integers, got dtype {class_labels.dtype}")
        class_labels = [int(v) for v in class_labels.reshape(-1).tolist()] if class_labels.ndim else int(class_labels)
    if isinstance(class_labels, (str, int, np.integer)) and not isinstance(class_labels, bool):
        labels = [_label_index(class_labels, num_classes, class_names)] * batch_size
    elif isinstance(class_labels, (list, tuple)):
        if not class_labels:
            raise ValueError("class_labels must not be empty")
        if len(class_labels) != batch_size:
            raise ValueError(f"class_labels has {len(class_labels)} labels but batch_size={batch_size}; give one label "
                             "per image, a single label for all, or leave batch_size unset")
        labels = [_label_index(v, num_classes, class_names) for v in class_labels]
    else:
        raise TypeError(f"class_labels must be an int, a class name or a list of them, got {type(class_labels).__name__}")
    return torch.tensor(labels, dtype=torch.int64)


def check_guidance_scale(guidance_scale) -> float:
    """guidance_scale as a float; ValueError unless it is a finite number >= 0."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")
    if not math.isfinite(float(guidance_scale)) or float(guidance_scale) < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0 (0: unconditional, 1: conditional, "
                         f"> 1: guided), got {guidance_scale!r}")
    return float(guidance_scale)


def combine(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance of two predictions of the same shape: uncond + s * (cond - uncond)."""
    return uncond + guidance_scale * (cond - uncond)


def guided_output(model_output: torch.Tensor, guidance_scale: float, channels: int) -> torch.Tensor:
    """(2B, C', H, W) -> (B, C', H, W): rows [0, B) are conditional and [B, 2B) null-class outputs of the same
    x_t. The first ``channels`` channels (the prediction) are combined; any further ones (a learned variance,
    C' = 2 * channels) are taken from the conditional half."""
    if model_output.shape[0] % 2:
        raise ValueError(f"guided_output needs the conditional and null halves, got batch {model_output.shape[0]}")
    cond, uncond = model_output.chunk(2)
    pred = combine(cond[:, :channels], uncond[:, :channels], guidance_scale)
    return pred if model_output.shape[1] == channels else torch.cat([pred, cond[:, channels:]], dim=1)


def forward_labels(labels: torch.Tensor, guidance_scale: float, num_classes: int) -> torch.Tensor:
    """Labels of the one batched forward: (2B,) ``[labels, null]`` for guidance, or (B,) when one half suffices
    (s = 1: the conditional model alone; s = 0: the null class alone)."""
    null = torch.full_like(labels, null_label(num_classes))
    if guidance_scale == 1.0:
        return labels
    if guidance_scale == 0.0:
        return null
    return torch.cat([labels, null])


def guided_denoiser(unet, labels: torch.Tensor | None, guidance_scale: float,
                    num_classes: int | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A function (x_t (B, C, H, W), t) -> model output (B, C', H, W) for the sampling loop.

    Unconditional UNet (``num_classes`` None, ``labels`` None): ``unet(x_t, t)``. Conditional: ``labels`` int64 (B,)
    on the UNet's device; one forward of ``unet`` per call, on ``[x_t, x_t]`` with labels ``[labels, null]``
    (only one half for s in {0, 1}), combined by ``guided_output``."""
    if num_classes is None:
        return lambda x, t: unet(x, t, return_dict=False)[0]
    fwd = forward_labels(labels, guidance_scale, num_classes)
    channels = unet.config.in_channels

    def denoise(x: torch.Tensor, t) -> torch.Tensor:
        if fwd.shape[0] == x.shape[0]:
            return unet(x, t, class_labels=fwd, return_dict=False)[0]
        out = unet(torch.cat([x, x]), t, class_labels=fwd, return_dict=False)[0]
        return guided_output(out, guidance_scale, channels)

    return denoise


def sampling_labels(unet_config, class_labels, guidance_scale, batch_size: int,
                    class_names: list[str] | None = None) -> tuple[torch.Tensor | None, float | None]:
    """Checks the conditioning arguments of a sampling call -> (labels int64 (batch_size,) or None, scale).

    Unconditional UNet: class_labels and guidance_scale must be None -> (None, None). Conditional UNet:
    class_labels None samples the null class (unconditional, as guidance_scale=0; a guidance_scale then is an
    error); guidance_scale None means 1 (the conditional model)."""
    k = num_classes_of(unet_config)
    if k is None:
        for name, value in (("class_labels", class_labels), ("guidance_scale", guidance_scale)):
            if value is not None:
                raise ValueError(f"{name} needs a class-conditional UNet; this one is unconditional "
                                 "(unet.config.num_class_embeds is None)")
        return None, None
    if class_labels is None:
        if guidance_scale is not None:
            raise ValueError("guidance_scale needs class_labels (the classes to guide towards)")
        return torch.full((batch_size,), null_label(k), dtype=torch.int64), 0.0
    labels = resolve_class_labels(class_labels, batch_size, k, class_names)
    scale = 1.0 if guidance_scale is None else check_guidance_scale(guidance_scale)
    return labels, scale


def drop_labels(labels: torch.Tensor, prob: float, num_classes: int, seed: int, micro_batch: int, global_batch: int,
                process_index: int = 0) -> torch.Tensor:
    """Classifier-free guidance training: this process's labels (B,) with each replaced by the null class with
    probability ``prob``.

    The Bernoulli draws are made on the CPU for the whole global micro-batch ``micro_batch`` from a generator seeded
    by (seed, micro_batch) (like the per-step noise), then sliced for this process, so that a resumed run and any
    process count see the same dropped labels."""
    from .data import mix_seed

    if not 0.0 <= prob < 1.0:
        raise ValueError(f"class_dropout_prob must be in [0, 1), got {prob!r}")
    per_process = labels.shape[0]
    gen = torch.Generator().manual_seed(mix_seed(seed, 4, micro_batch))
    drop = torch.rand(global_batch, generator=gen) < prob
    mine = drop[process_index * per_process:(process_index + 1) * per_process].to(labels.device)
    return torch.where(mine, torch.full_like(labels, null_label(num_classes)), labels)

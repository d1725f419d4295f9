"""UNet2DModel configurations: the DDPM paper's networks (Ho et al. 2020, App. B) and small CPU presets.

A preset is described in the paper's own vocabulary (base channels, channel multipliers, residual blocks
per level, the resolutions that get self-attention) and translated into the keyword arguments of
``diffusers.UNet2DModel``. The translation that reproduces the paper's network:

- sinusoidal timestep embedding as in the Transformer: ``[sin, cos]`` order (``flip_sin_to_cos=False``),
  frequencies ``exp(-log(10000) k / (d/2 - 1))`` (``freq_shift=1``), MLP to ``4 * base_channels``;
- GroupNorm with 32 groups and eps 1e-6, SiLU, residual blocks adding the time embedding (``"default"``);
- single-head self-attention (``attention_head_dim=None``: one head as wide as the feature map), at the
  listed resolutions and in the middle block;
- stride-2 convolution downsampling with TF "SAME"-style asymmetric padding (``downsample_padding=0``),
  nearest-neighbour upsampling followed by a convolution; ``layers_per_block + 1`` residual blocks per
  level on the way up.

With these, ``ddpm-cifar10`` has 35,746,307 parameters (paper: 35.7M) and ``ddpm-256`` 113,673,219
(paper: 114M).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields, replace

import torch
from diffusers import UNet2DModel

from . import diffusion_math as dm
from .diffusion_math import VARIANCE_TYPES

LEARNED_VARIANCE_TYPES = dm.LEARNED_VARIANCE_TYPES


@dataclass(frozen=True)
class UNetPreset:
    """A UNet in the paper's vocabulary; ``attention_resolutions`` are feature-map sizes (e.g. 16 = 16x16)."""

    sample_size: int
    base_channels: int
    channel_mult: tuple[int, ...]
    layers_per_block: int
    attention_resolutions: tuple[int, ...]
    dropout: float
    in_channels: int = 3
    norm_num_groups: int = 32
    description: str = ""


PRESETS: dict[str, UNetPreset] = {
    "ddpm-cifar10": UNetPreset(
        sample_size=32, base_channels=128, channel_mult=(1, 2, 2, 2), layers_per_block=2,
        attention_resolutions=(16,), dropout=0.1,
        description="DDPM paper, CIFAR10 32x32 network (35.7M parameters)",
    ),
    "ddpm-256": UNetPreset(
        sample_size=256, base_channels=128, channel_mult=(1, 1, 2, 2, 4, 4), layers_per_block=2,
        attention_resolutions=(16,), dropout=0.0,
        description="DDPM paper, 256x256 network for LSUN / CelebA-HQ (114M parameters)",
    ),
    "digits": UNetPreset(
        sample_size=8, base_channels=32, channel_mult=(1, 2), layers_per_block=2,
        attention_resolutions=(4,), dropout=0.1, in_channels=1, norm_num_groups=8,
        description="built-in 8x8 grayscale digits; trains in minutes on a 2-core CPU",
    ),
    "tiny": UNetPreset(
        sample_size=8, base_channels=8, channel_mult=(1, 2), layers_per_block=1,
        attention_resolutions=(4,), dropout=0.0, norm_num_groups=4,
        description="tests only: a few thousand parameters, every block type exercised",
    ),
}

# UNet2DModel arguments shared by every preset: the paper's architecture choices (module docstring).
_PAPER_STYLE = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_padding": 0,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "attention_head_dim": None,
    "norm_eps": 1e-6,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
}

_SPEC_KEYS = tuple(f.name for f in fields(UNetPreset) if f.name != "description")
_EXTRA_KEYS = ("out_channels", "variance_type", "num_classes")
# Derived from the spec; overriding them directly would desynchronise block types and channel lists.
_DERIVED_KEYS = ("block_out_channels", "down_block_types", "up_block_types")
_UNET_KEYS = tuple(k for k in inspect.signature(UNet2DModel.__init__).parameters if k != "self")


def valid_override_keys() -> tuple[str, ...]:
    """The keyword arguments ``unet_config`` accepts: preset fields, ``out_channels``, ``variance_type`` and
    any other ``UNet2DModel`` argument that is not derived from the preset."""
    raw = tuple(k for k in _UNET_KEYS if k not in _DERIVED_KEYS and k not in _SPEC_KEYS + _EXTRA_KEYS)
    return _SPEC_KEYS + _EXTRA_KEYS + raw


def _get_preset(preset) -> UNetPreset:
    """The named preset (or a UNetPreset passed through)."""
    if isinstance(preset, UNetPreset):
        return preset
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return PRESETS[preset]


def _check_overrides(overrides: dict) -> None:
    """Raise ValueError naming any key ``unet_config`` does not accept."""
    valid = valid_override_keys()
    for key in overrides:
        if key in _DERIVED_KEYS:
            raise ValueError(
                f"override {key!r} is derived from the preset; set base_channels, channel_mult, "
                f"layers_per_block and attention_resolutions instead (valid keys: {list(valid)})"
            )
        if key not in valid:
            raise ValueError(f"unknown override {key!r} for unet_config; valid keys: {list(valid)}")


def _out_channels(in_channels: int, out_channels, variance_type) -> int:
    """Output channels: in_channels, doubled when the model also predicts the variance (Nichol & Dhariwal 2021)."""
    if variance_type is not None and variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {list(VARIANCE_TYPES)}, got {variance_type!r}")
    expected = 2 * in_channels if variance_type in LEARNED_VARIANCE_TYPES else in_channels
    if out_channels is None:
        return expected
    if variance_type is not None and out_channels != expected:
        raise ValueError(
            f"out_channels={out_channels} contradicts variance_type={variance_type!r} with in_channels={in_channels}"
            f" (expected {expected})"
        )
    return int(out_channels)


def _class_embeds(num_classes, raw_num_class_embeds) -> int | None:
    """``num_class_embeds`` for ``num_classes`` classes: one embedding per class plus the "null" class of
    classifier-free guidance (index ``num_classes``; see guidance.py). None for an unconditional UNet."""
    if num_classes is None:
        return raw_num_class_embeds
    if raw_num_class_embeds is not None:
        raise ValueError("give num_classes (classes; the null class is added) or num_class_embeds, not both")
    if not _is_pos_int(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (or None for an unconditional UNet), got {num_classes!r}")
    return num_classes + 1


def _is_pos_int(value) -> bool:
    """True for an int >= 1 (bools excluded)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _validate_spec(spec: UNetPreset) -> None:
    """Raise ValueError for a spec UNet2DModel cannot build (resolution not halvable, groups not dividing)."""
    for name in ("sample_size", "base_channels", "layers_per_block", "in_channels", "norm_num_groups"):
        value = getattr(spec, name)
        if not _is_pos_int(value):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    mult = tuple(spec.channel_mult)
    if not mult or not all(_is_pos_int(m) for m in mult):
        raise ValueError(f"channel_mult must be a non-empty sequence of positive ints, got {spec.channel_mult!r}")
    if spec.sample_size % 2 ** (len(mult) - 1):
        raise ValueError(
            f"sample_size={spec.sample_size} must be divisible by 2**(len(channel_mult)-1) = {2 ** (len(mult) - 1)}"
        )
    levels = [spec.sample_size // 2**i for i in range(len(mult))]
    bad = [r for r in spec.attention_resolutions if r not in levels]
    if bad:
        raise ValueError(f"attention_resolutions {bad} are not feature-map sizes of this UNet; allowed: {levels}")
    channels = [spec.base_channels * m for m in mult]
    if any(c % spec.norm_num_groups for c in channels):
        raise ValueError(f"norm_num_groups={spec.norm_num_groups} must divide every block's channels {channels}")
    if not 0.0 <= float(spec.dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {spec.dropout!r}")


def _block_types(spec: UNetPreset) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Down block types from high to low resolution and the mirrored up block types."""
    levels = [spec.sample_size // 2**i for i in range(len(spec.channel_mult))]
    attn = [r in spec.attention_resolutions for r in levels]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return down, up


def unet_config(preset, **overrides) -> dict:
    """The ``UNet2DModel(**config)`` keyword arguments of a preset, with overrides applied.

    ``preset``: a name in ``PRESETS``. ``overrides``: preset fields (``sample_size``, ``base_channels``,
    ``channel_mult``, ``layers_per_block``, ``attention_resolutions``, ``dropout``, ``in_channels``,
    ``norm_num_groups``; a new ``sample_size`` scales the preset's attention resolutions with it unless
    ``attention_resolutions`` is given too), ``out_channels``, ``variance_type`` (``"learned"``/``"learned_range"`` double
    ``out_channels``), ``num_classes`` (a class-conditional UNet: ``num_class_embeds = num_classes + 1``, the last
    embedding being guidance's null class) or any other non-derived UNet2DModel argument (e.g. ``norm_eps``).
    """
    spec = _get_preset(preset)
    _check_overrides(overrides)
    overrides = dict(overrides)
    out_channels = overrides.pop("out_channels", None)
    variance_type = overrides.pop("variance_type", None)
    num_class_embeds = _class_embeds(overrides.pop("num_classes", None), overrides.pop("num_class_embeds", None))
    spec_over = {k: overrides.pop(k) for k in list(overrides) if k in _SPEC_KEYS}
    if "channel_mult" in spec_over:
        spec_over["channel_mult"] = tuple(spec_over["channel_mult"])
    if "attention_resolutions" in spec_over:
        spec_over["attention_resolutions"] = tuple(spec_over["attention_resolutions"])
    if "sample_size" in spec_over and "attention_resolutions" not in spec_over and _is_pos_int(spec_over["sample_size"]):
        # keep attention at the same depth: scale the preset's resolutions with the image size
        ratio = (spec_over["sample_size"], spec.sample_size)
        spec_over["attention_resolutions"] = tuple(r * ratio[0] // ratio[1] for r in spec.attention_resolutions)
    spec = replace(spec, **spec_over)
    _validate_spec(spec)
    down, up = _block_types(spec)
    config = dict(_PAPER_STYLE)
    config.update(
        sample_size=spec.sample_size,
        in_channels=spec.in_channels,
        out_channels=_out_channels(spec.in_channels, out_channels, variance_type),
        block_out_channels=tuple(spec.base_channels * m for m in spec.channel_mult),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=spec.layers_per_block,
        dropout=float(spec.dropout),
        norm_num_groups=spec.norm_num_groups,
    )
    if num_class_embeds is not None:
        config["num_class_embeds"] = num_class_embeds
    config.update(overrides)  # remaining raw UNet2DModel arguments
    return config


def build_unet(preset, **overrides) -> UNet2DModel:
    """A freshly initialised ``diffusers.UNet2DModel`` for ``unet_config(preset, **overrides)``."""
    return UNet2DModel(**unet_config(preset, **overrides))


def parameter_count(preset, **overrides) -> int:
    """Number of parameters of the preset's UNet, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = UNet2DModel(**unet_config(preset, **overrides))
    return sum(p.numel() for p in model.parameters())


def preset_table() -> str:
    """A Markdown table of the presets: resolution, channels, multipliers, attention, parameters."""
    rows = [
        "| preset | resolution | in channels | base channels | multipliers | res blocks | attention at | dropout | parameters |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, spec in PRESETS.items():
        attn = ", ".join(f"{r}x{r}" for r in spec.attention_resolutions)
        rows.append(
            f"| `{name}` | {spec.sample_size}x{spec.sample_size} | {spec.in_channels} | {spec.base_channels} | "
            f"{spec.channel_mult} | {spec.layers_per_block} | {attn} | {spec.dropout} | {parameter_count(name):,} |"
        )
    return "\n".join(rows)

"""The UNet a run trains: a preset of ``unet_presets``, the UNet of diffusers' example, or a UNet2DModel config."""

import json
import os

DIFFUSERS_EXAMPLE = "diffusers-example"


def preset_names() -> list[str]:
    """Allowed ``--unet_preset`` values."""
    from ..unet_presets import PRESETS

    return sorted([*PRESETS, DIFFUSERS_EXAMPLE])


def diffusers_example_config(resolution: int, channels: int, out_channels: int) -> dict:
    """The UNet2DModel keyword arguments of diffusers' train_unconditional.py default model (6 levels 128-512
    channels, attention at the 5th level, UNet2DModel defaults otherwise)."""
    return dict(sample_size=resolution, in_channels=channels, out_channels=out_channels, layers_per_block=2,
                block_out_channels=(128, 128, 256, 256, 512, 512),
                down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)


def _config_file(name_or_path: str) -> str:
    return os.path.join(name_or_path, "config.json") if os.path.isdir(name_or_path) else name_or_path


def model_config_problem(name_or_path: str, cache_dir: str | None = None) -> str | None:
    """Why ``--model_config_name_or_path`` cannot be loaded (None when it can): a local folder / config.json, or a
    Hub repo id (fetched now, so that an offline or missing repo fails before training)."""
    try:
        load_model_config(name_or_path, cache_dir)
    except ValueError as exc:
        return str(exc)
    return None


def load_model_config(name_or_path: str, cache_dir: str | None = None) -> dict:
    """The UNet2DModel config dict of a folder (its config.json), a config.json file or a Hub repo id."""
    flag = f"--model_config_name_or_path {name_or_path!r}"
    local = os.path.exists(name_or_path) or name_or_path.startswith(("./", "../", "/", "~"))
    if local:
        path = _config_file(os.path.expanduser(name_or_path))
        if not os.path.isfile(path):
            raise ValueError(f"{flag}: no UNet config.json there")
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{flag}: {path} is not a readable JSON config ({exc})") from exc
    else:
        try:
            from diffusers import UNet2DModel

            config = dict(UNet2DModel.load_config(name_or_path, cache_dir=cache_dir))
        except Exception as exc:
            raise ValueError(f"{flag}: could not load a UNet config from the Hub ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from exc
    if not isinstance(config, dict) or "in_channels" not in config or "block_out_channels" not in config:
        raise ValueError(f"{flag}: not a UNet2DModel config (needs in_channels and block_out_channels)")
    return config


def build_model(config, channels: int, resolution: int, logger=None, num_classes: int | None = None):
    """The UNet2DModel for a resolved TrainConfig, for ``channels``-channel images of ``resolution`` px.
    A learned variance doubles the output channels; ``num_classes`` adds the class embedding (+ the null class)."""
    from diffusers import UNet2DModel

    from ..diffusion_math import LEARNED_VARIANCE_TYPES
    from ..unet_presets import build_unet

    out_channels = channels * (2 if config.variance_type in LEARNED_VARIANCE_TYPES else 1)
    if config.model_config_name_or_path is not None:
        spec = {k: v for k, v in load_model_config(config.model_config_name_or_path, config.cache_dir).items()
                if not k.startswith("_")}
        if int(spec.get("out_channels", spec["in_channels"])) != out_channels or int(spec["in_channels"]) != channels:
            raise ValueError(f"--model_config_name_or_path {config.model_config_name_or_path!r} has in_channels "
                             f"{spec['in_channels']} / out_channels {spec.get('out_channels')}; these "
                             f"{channels}-channel images with --variance_type {config.variance_type} need "
                             f"{channels} / {out_channels} (set --image_channels to match)")
        if spec.get("sample_size") != resolution and logger is not None:
            logger.info("model config sample_size %s -> %d (--resolution)", spec.get("sample_size"), resolution)
        spec["sample_size"] = resolution
        if num_classes is not None:
            spec.update(num_class_embeds=num_classes + 1, class_embed_type=None)
        return UNet2DModel.from_config(spec)
    if config.unet_preset == DIFFUSERS_EXAMPLE:
        extra = {} if num_classes is None else {"num_class_embeds": num_classes + 1}
        return UNet2DModel(**diffusers_example_config(resolution, channels, out_channels), **extra)
    return build_unet(config.unet_preset, sample_size=resolution, in_channels=channels,
                      variance_type=config.variance_type, num_classes=num_classes)


def default_resolution(config) -> int:
    """--resolution, else the preset's sample_size, else the model config's sample_size, else 64."""
    from ..unet_presets import PRESETS

    if config.resolution is not None:
        return int(config.resolution)
    if config.unet_preset in PRESETS:
        return int(PRESETS[config.unet_preset].sample_size)
    if config.model_config_name_or_path is not None:
        size = load_model_config(config.model_config_name_or_path, config.cache_dir).get("sample_size")
        if isinstance(size, int):
            return size
    return 64


def model_channels(config) -> int | None:
    """The image channels a --model_config_name_or_path fixes (None: the data decides)."""
    if config.model_config_name_or_path is None:
        return None
    return int(load_model_config(config.model_config_name_or_path, config.cache_dir)["in_channels"])

"""UNet presets: the DDPM paper's networks (parameter counts, attention placement, embedding) and the CPU presets."""

import math

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

from ddpm_from_scratch.unet_presets import PRESETS, build_unet, parameter_count, preset_table, unet_config

PAPER_CIFAR10_PARAMS = 35.7e6  # Ho et al. 2020, Appendix B
PAPER_256_PARAMS = 114e6


def meta_unet(preset, **overrides) -> UNet2DModel:
    """The preset's UNet with parameters on the meta device (shapes only, nothing allocated)."""
    with torch.device("meta"):
        return UNet2DModel(**unet_config(preset, **overrides))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset,paper", [("ddpm-cifar10", PAPER_CIFAR10_PARAMS), ("ddpm-256", PAPER_256_PARAMS)])
def test_paper_parameter_counts(preset, paper):
    count = n_params(meta_unet(preset))
    assert abs(count - paper) / paper < 0.005
    assert parameter_count(preset) == count


def test_cifar10_architecture_matches_paper():
    model = meta_unet("ddpm-cifar10")
    cfg = model.config
    assert cfg.sample_size == 32 and cfg.in_channels == cfg.out_channels == 3
    assert tuple(cfg.block_out_channels) == (128, 256, 256, 256)
    assert cfg.layers_per_block == 2
    resnets = [m for m in model.modules() if isinstance(m, ResnetBlock2D)]
    assert resnets and all(r.dropout.p == 0.1 for r in resnets)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(n.num_groups == 32 and n.eps == 1e-6 for n in norms)
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert attentions and all(a.heads == 1 for a in attentions)  # single-head self-attention
    # 2 resnets per level down, 3 per level up (the extra one eats the skip of the downsampler)
    assert [len(b.resnets) for b in model.down_blocks] == [2] * 4
    assert [len(b.resnets) for b in model.up_blocks] == [3] * 4


def test_cifar10_attention_runs_at_16x16_only():
    """Self-attention sees 16x16 feature maps (down and up path) and the 4x4 middle, nothing else."""
    torch.manual_seed(0)
    model = build_unet("ddpm-cifar10").eval()
    sizes = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: sizes.append(tuple(args[0].shape[-2:])))
        for m in model.modules() if isinstance(m, Attention)
    ]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), torch.tensor(10)).sample
    for h in hooks:
        h.remove()
    assert out.shape == (1, 3, 32, 32)
    mid = len(model.mid_block.attentions)
    assert mid == 1
    assert sorted(set(sizes)) == [(4, 4), (16, 16)]
    assert sizes.count((16, 16)) == 2 + 3  # 2 resnets down, 3 up at the 16x16 level
    assert sizes.count((4, 4)) == mid


def test_256_attention_only_at_16x16():
    model = meta_unet("ddpm-256")
    assert tuple(model.config.block_out_channels) == (128, 128, 256, 256, 512, 512)
    # feature-map size of each down level: 256 / 2**i; attention only where it is 16
    has_attn = [bool(getattr(b, "attentions", None)) for b in model.down_blocks]
    assert has_attn == [256 // 2**i == 16 for i in range(6)]
    has_attn_up = [bool(getattr(b, "attentions", None)) for b in model.up_blocks]
    assert has_attn_up == list(reversed(has_attn))


def test_timestep_embedding_is_the_transformer_sinusoid():
    """emb(t)_k = sin(t w_k), emb(t)_{k+d/2} = cos(t w_k), w_k = 10000^(-k/(d/2-1)) (DDPM App. B / Vaswani)."""
    model = build_unet("tiny")
    d = model.config.block_out_channels[0]
    t = torch.tensor([0.0, 1.0, 37.0, 999.0])
    half = d // 2
    k = torch.arange(half, dtype=torch.float64)
    w = torch.exp(-math.log(10000.0) * k / (half - 1))
    expected = torch.cat([torch.sin(t.double()[:, None] * w), torch.cos(t.double()[:, None] * w)], dim=1)
    got = model.time_proj(t).double()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert model.time_embedding.linear_1.out_features == 4 * d


def test_digits_preset_is_small_grayscale():
    cfg = unet_config("digits")
    assert cfg["in_channels"] == cfg["out_channels"] == 1
    assert cfg["sample_size"] in (8, 16)
    assert 0.5e6 <= parameter_count("digits") <= 2e6


def test_tiny_forward_and_overrides():
    torch.manual_seed(0)
    model = build_unet("tiny", in_channels=1, sample_size=16, norm_eps=1e-5)
    assert model.config.norm_eps == 1e-5
    # a new sample_size keeps attention at the same depth (tiny: the second level)
    assert tuple(model.config.down_block_types) == ("DownBlock2D", "AttnDownBlock2D")
    assert n_params(model) < 200_000
    out = model(torch.randn(2, 1, 16, 16), torch.tensor([3, 900])).sample
    assert out.shape == (2, 1, 16, 16)


@pytest.mark.parametrize("variance_type,factor", [("learned", 2), ("learned_range", 2), ("fixed_small", 1), (None, 1)])
def test_learned_variance_doubles_out_channels(variance_type, factor):
    cfg = unet_config("digits", variance_type=variance_type)
    assert cfg["out_channels"] == factor * cfg["in_channels"]
    model = build_unet("tiny", in_channels=2, variance_type=variance_type)
    out = model(torch.randn(1, 2, 8, 8), torch.tensor(5)).sample
    assert out.shape == (1, 2 * factor, 8, 8)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="preset") as err:
        unet_config("ddpm-cifar100")
    for name in PRESETS:
        assert name in str(err.value)


def test_bad_override_names_key_and_valid_keys():
    with pytest.raises(ValueError) as err:
        unet_config("tiny", base_chanels=16)
    msg = str(err.value)
    assert "base_chanels" in msg and "base_channels" in msg and "attention_resolutions" in msg


@pytest.mark.parametrize(
    "overrides,word",
    [
        (dict(block_out_channels=(8, 16)), "block_out_channels"),
        (dict(attention_resolutions=(3,)), "attention_resolutions"),
        (dict(norm_num_groups=3), "norm_num_groups"),
        (dict(sample_size=7), "sample_size"),
        (dict(channel_mult=()), "channel_mult"),
        (dict(variance_type="learnt"), "variance_type"),
        (dict(variance_type="learned", out_channels=3), "out_channels"),
        (dict(dropout=1.5), "dropout"),
        (dict(layers_per_block=0), "layers_per_block"),
    ],
)
def test_invalid_overrides_raise(overrides, word):
    with pytest.raises(ValueError, match=word):
        unet_config("tiny", **overrides)


def test_config_is_a_fresh_dict():
    cfg = unet_config("tiny")
    cfg["in_channels"] = 99
    assert unet_config("tiny")["in_channels"] == 3


def test_preset_table_lists_every_preset():
    table = preset_table()
    for name in PRESETS:
        assert f"`{name}`" in table
    assert f"{parameter_count('ddpm-cifar10'):,}" in table


def test_num_classes_adds_the_null_class_embedding():
    config = unet_config("digits", num_classes=10)
    assert config["num_class_embeds"] == 11 and config.get("class_embed_type") is None
    model = build_unet("tiny", num_classes=3)
    emb = model.class_embedding
    assert isinstance(emb, torch.nn.Embedding) and emb.num_embeddings == 4
    assert emb.embedding_dim == model.time_embedding.linear_2.out_features  # added to the time embedding
    extra = parameter_count("tiny", num_classes=3) - parameter_count("tiny")
    assert extra == 4 * emb.embedding_dim
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        a = model(x, 5, class_labels=torch.tensor([0, 1])).sample
        b = model(x, 5, class_labels=torch.tensor([3, 3])).sample
    assert a.shape == (2, 3, 8, 8) and not torch.allclose(a, b)


@pytest.mark.parametrize(
    "overrides,word",
    [
        (dict(num_classes=1), "num_classes must be an int >= 2"),
        (dict(num_classes=2.0), "num_classes must be an int >= 2"),
        (dict(num_classes=True), "num_classes must be an int >= 2"),
        (dict(num_classes=3, num_class_embeds=4), "not both"),
    ],
)
def test_bad_num_classes(overrides, word):
    with pytest.raises(ValueError, match=word):
        unet_config("tiny", **overrides)

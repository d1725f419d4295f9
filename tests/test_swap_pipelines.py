"""ScratchDDPMScheduler swapped into diffusers' own pipelines gives the images diffusers.DDPMScheduler gives.

Every pipeline is built offline from tiny configs (UNet2DConditionModel, AutoencoderKL, CLIP text encoders
and an in-memory CLIP BPE tokenizer); the reference is the same pipeline object with
``diffusers.DDPMScheduler.from_config(pipe.scheduler.config)`` and the same seed.
"""

import json
import os
import tempfile

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDPMPipeline,
    DDPMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ddpm_from_scratch import ScratchDDPMScheduler
from ddpm_from_scratch.unet_presets import build_unet

STEPS = 4
SIZE = 32  # pixels; the VAE halves it to 16x16 latents
ATOL = 1e-4  # our tables are float64 then cast; diffusers' are float32

# A latent-diffusion style scheduler config, as shipped with Stable Diffusion checkpoints.
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
)


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over lowercase letters plus the merges c+a -> ca, ca+t</w> -> cat</w>."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters] + ["ca", "cat</w>"]
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({tok: i for i, tok in enumerate(tokens)}, f)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\nc a\nca t</w>\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=77, local_files_only=True)


def tiny_text_encoder(tokenizer, with_projection=False):
    """A 2-layer, 32-wide CLIP text transformer whose special-token ids match ``tokenizer``."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def tiny_vae():
    """A 2-level AutoencoderKL: (B, 3, 32, 32) <-> (B, 4, 16, 16)."""
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()


def tiny_cond_unet(in_channels=4, cross_attention_dim=32, **extra):
    """A 2-level UNet2DConditionModel with cross-attention at the lower level."""
    return UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, **extra,
    ).eval()


def sd_components(unet_in_channels=4):
    """Components shared by the Stable Diffusion 1.x pipelines."""
    tokenizer = tiny_tokenizer()
    return dict(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer,
        unet=tiny_cond_unet(unet_in_channels), scheduler=DDPMScheduler(**SD_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def sdxl_components():
    """Two text encoders (32 + 32 = 64 wide context) and a text_time-conditioned UNet."""
    tokenizer = tiny_tokenizer()
    unet = tiny_cond_unet(
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text embeds + 6 size/crop conditions
    )
    return dict(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer,
        text_encoder_2=tiny_text_encoder(tokenizer, with_projection=True), tokenizer_2=tiny_tokenizer(),
        unet=unet, scheduler=DDPMScheduler(**SD_SCHEDULER),
    )


def input_image(seed=0) -> Image.Image:
    """A deterministic 32x32 RGB test image."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def mask_image() -> Image.Image:
    """White (repaint) on the right half, black (keep) on the left."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, SIZE // 2 :] = 255
    return Image.fromarray(mask)


def run_both(pipe, **call_kwargs):
    """The pipeline's output with diffusers.DDPMScheduler, then with ScratchDDPMScheduler, same seed."""
    config = pipe.scheduler.config
    outputs = []
    for scheduler_cls in (DDPMScheduler, ScratchDDPMScheduler):
        pipe.scheduler = scheduler_cls.from_config(config)
        out = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **call_kwargs)
        outputs.append(out.images)
    assert isinstance(pipe.scheduler, ScratchDDPMScheduler)
    return outputs


def assert_same_images(reference, ours):
    assert reference.shape == ours.shape
    assert np.isfinite(ours).all()
    assert reference.std() > 1e-3  # the comparison is not between two constant images
    np.testing.assert_allclose(ours, reference, rtol=0, atol=ATOL)


@pytest.fixture(scope="module", autouse=True)
def _seed():
    torch.manual_seed(0)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


SD_CALL = dict(prompt="a cat", num_inference_steps=STEPS, height=SIZE, width=SIZE, guidance_scale=5.0)


def test_stable_diffusion():
    pipe = _quiet(StableDiffusionPipeline(**sd_components()))
    assert_same_images(*run_both(pipe, **SD_CALL))


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_stable_diffusion_img2img(spacing):
    pipe = _quiet(StableDiffusionImg2ImgPipeline(**sd_components()))
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, timestep_spacing=spacing)
    call = {k: v for k, v in SD_CALL.items() if k not in ("height", "width")}
    assert_same_images(*run_both(pipe, image=input_image(), strength=0.6, **call))


@pytest.mark.parametrize("unet_in_channels", [9, 4])  # 9: inpainting UNet; 4: blends with scheduler.add_noise
def test_stable_diffusion_inpaint(unet_in_channels):
    pipe = _quiet(StableDiffusionInpaintPipeline(**sd_components(unet_in_channels)))
    assert_same_images(*run_both(pipe, image=input_image(), mask_image=mask_image(), strength=0.8, **SD_CALL))


@pytest.mark.parametrize("denoising_end", [None, 0.5])
def test_stable_diffusion_xl(denoising_end):
    pipe = _quiet(StableDiffusionXLPipeline(**sdxl_components()))
    assert_same_images(*run_both(pipe, denoising_end=denoising_end, **SD_CALL))


def test_stable_diffusion_xl_denoising_end_stops_early():
    """denoising_end=0.5 runs only the timesteps >= 500 with our scheduler too (so the case above differs)."""
    pipe = _quiet(StableDiffusionXLPipeline(**sdxl_components()))
    pipe.scheduler = ScratchDDPMScheduler.from_config(pipe.scheduler.config)
    seen = []

    def record(p, i, t, kwargs):
        seen.append(int(t))
        return kwargs

    pipe(denoising_end=0.5, callback_on_step_end=record, output_type="latent", **SD_CALL)
    reference = DDPMScheduler.from_config(pipe.scheduler.config)
    reference.set_timesteps(STEPS)
    expected = [int(t) for t in reference.timesteps if t >= 500]
    assert seen == expected and 0 < len(seen) < STEPS


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_pipeline(variance_type):
    pipe = _quiet(DDPMPipeline(unet=build_unet("tiny").eval(), scheduler=DDPMScheduler(variance_type=variance_type)))
    assert_same_images(*run_both(pipe, batch_size=2, num_inference_steps=10))

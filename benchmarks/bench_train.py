"""Training throughput: this project's training step (training/train.py) against a loop built like diffusers'
examples/unconditional_image_generation/train_unconditional.py, same UNet, data, batch and optimizer.

Both loops run in one process, interleaved in blocks (ours, theirs, ours, ...), so machine load hits both alike;
the figure is the ratio of median block throughputs (ours / diffusers-style; goal >= 1.0).

    OMP_NUM_THREADS=1 python benchmarks/bench_train.py                      # digits preset, batch 64, CPU
    python benchmarks/bench_train.py --preset ddpm-cifar10 --channels 3 --batch 128 --bf16 --channels_last

What each side does per optimizer step:
- diffusers-style: DataLoader(shuffle=True) over a datasets.Dataset whose with_transform decodes each PIL image
  and applies Resize / CenterCrop / ToTensor / Normalize per item (the example uses torchvision; it is written
  here with PIL + numpy, the same work), ``torch.randn`` noise, ``DDPMScheduler.add_noise``, MSE on eps,
  ``accelerator.backward``, clip 1.0, AdamW step, LR scheduler step, ``diffusers.training_utils.EMAModel.step``.
- ours: ``PositionBatchSampler`` over the cached ``ImageTrainingDataset``, ``trainer.steps.step_noise``,
  ``trainer.steps.train_micro_step`` (losses.training_loss + clip + AdamW), LR scheduler step, ``trainer.ema.EMA``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


class _ListWithTransform(torch.utils.data.Dataset):
    """Stand-in for ``datasets.Dataset.with_transform`` where datasets is not installed (the GPU image)."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {k: v[0] for k, v in self.transform({"image": [self.images[i]]}).items()}


def load_images(channels):
    """The digits as PIL images: (datasets.Dataset or list, our ImageTrainingDataset builder input)."""
    try:
        from ddpm_from_scratch.data import load_digits_dataset

        return load_digits_dataset()
    except ImportError:
        from PIL import Image
        from sklearn.datasets import load_digits

        pixels = np.rint(load_digits().images * (255.0 / 16.0)).astype(np.uint8)
        return [Image.fromarray(p, mode="L") for p in pixels]


def ours_dataset(images, resolution, channels):
    """Our cached ImageTrainingDataset (scan_images when images is a datasets.Dataset)."""
    from ddpm_from_scratch import data as D

    if not isinstance(images, list):
        prepared = D.scan_images(images, "image", resolution, channels)
        return D.ImageTrainingDataset(images, "image", prepared, resolution), prepared.channels
    cache = [np.asarray(D.resize_shorter_side(D.to_channels(img, channels), resolution)) for img in images]
    prepared = D.PreparedImages(indices=list(range(len(images))), channels=channels, cache=cache)
    return D.ImageTrainingDataset(None, "image", prepared, resolution), channels


def diffusers_style_data(ds, resolution, batch, channels, seed):
    """The example's pipeline: per-item PIL transforms in with_transform, shuffled DataLoader."""
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"

    def transform(examples):
        out = []
        for img in examples["image"]:
            img = img.convert(mode)
            w, h = img.size
            s = resolution / min(w, h)
            img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BILINEAR)
            left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
            img = img.crop((left, top, left + resolution, top + resolution))
            arr = np.asarray(img, dtype=np.float32) / 255.0
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            out.append((torch.from_numpy(np.ascontiguousarray(arr)) - 0.5) / 0.5)
        return {"input": out}

    data = _ListWithTransform(ds, transform) if isinstance(ds, list) else ds.with_transform(transform)
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, generator=gen,
                                       collate_fn=lambda rows: torch.stack([r["input"] for r in rows]))


def endless(loader):
    while True:
        yield from loader


def build(args, device):
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from ddpm_from_scratch import ScratchDDPMScheduler
    from ddpm_from_scratch.trainer.ema import EMA
    from ddpm_from_scratch.trainer.steps import step_noise, train_micro_step
    from ddpm_from_scratch.data import PositionBatchSampler
    from ddpm_from_scratch.unet_presets import PRESETS, build_unet

    resolution = PRESETS[args.preset].sample_size
    images = load_images(args.channels)
    dataset, channels = ours_dataset(images, resolution, args.channels)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if args.bf16 else "no")

    def make_model():
        torch.manual_seed(0)
        model = build_unet(args.preset, sample_size=resolution, in_channels=channels)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def make_opt(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)

    # --- ours ---
    ours_model = make_model()
    ours_opt = make_opt(ours_model)
    ours_lr = get_scheduler("cosine", optimizer=ours_opt, num_warmup_steps=10, num_training_steps=100000)
    ours_ema = EMA(ours_model, max_decay=0.9999)
    ours_model, ours_opt = accelerator.prepare(ours_model, ours_opt)
    ours_ema.shadow = [s.to(accelerator.device) for s in ours_ema.shadow]
    ours_sched = ScratchDDPMScheduler(num_train_timesteps=1000)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=PositionBatchSampler(len(dataset), args.batch),
                                         generator=torch.Generator().manual_seed(0),
                                         pin_memory=accelerator.device.type == "cuda")
    ours_iter = iter(loader)
    shape = (channels, resolution, resolution)
    state = {"micro": 0}

    def ours_step():
        x0 = next(ours_iter).to(accelerator.device, non_blocking=True)
        if args.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        t, eps, _ = step_noise(0, state["micro"], args.batch, shape, 1000, device=accelerator.device, dtype=x0.dtype)
        loss, _, _ = train_micro_step(accelerator, ours_model, ours_opt, ours_sched, x0, t, eps, max_grad_norm=1.0)
        ours_lr.step()
        ours_ema.update(accelerator.unwrap_model(ours_model))
        state["micro"] += 1
        return loss

    # --- diffusers-style ---
    their_model = make_model()
    their_opt = make_opt(their_model)
    their_lr = get_scheduler("cosine", optimizer=their_opt, num_warmup_steps=10, num_training_steps=100000)
    their_ema = EMAModel(their_model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75,
                         model_cls=type(their_model), model_config=their_model.config)
    their_model, their_opt, their_lr = accelerator.prepare(their_model, their_opt, their_lr)
    their_ema.to(accelerator.device)
    their_sched = DDPMScheduler(num_train_timesteps=1000)
    their_iter = endless(accelerator.prepare(diffusers_style_data(images, resolution, args.batch, channels, 0)))

    def their_step():
        clean = next(their_iter)
        if args.channels_last:
            clean = clean.contiguous(memory_format=torch.channels_last)
        noise = torch.randn(clean.shape, dtype=clean.dtype, device=clean.device)
        bsz = clean.shape[0]
        timesteps = torch.randint(0, their_sched.config.num_train_timesteps, (bsz,), device=clean.device).long()
        noisy = their_sched.add_noise(clean, noise, timesteps)
        with accelerator.accumulate(their_model):
            with accelerator.autocast():
                pred = their_model(noisy, timesteps).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(their_model.parameters(), 1.0)
            their_opt.step()
            their_lr.step()
            their_opt.zero_grad()
        if accelerator.sync_gradients:
            their_ema.step(their_model.parameters())
        return loss.detach()

    if args.compile:
        for m in (ours_model, their_model):
            m.compile()
    sync = torch.cuda.synchronize if accelerator.device.type == "cuda" else (lambda: None)
    return ours_step, their_step, sync, accelerator


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="digits")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--channels", type=int, default=1, choices=[1, 3], help="3: digits as RGB (CIFAR-10's shape)")
    p.add_argument("--block", type=int, default=10, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=7, help="blocks per side")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    ours, theirs, sync, acc = build(args, args.device)
    for _ in range(args.warmup):
        ours(), theirs()
    sync()
    rates = {"ours": [], "diffusers-style": []}
    for _ in range(args.rounds):
        for name, step in (("ours", ours), ("diffusers-style", theirs)):
            sync()
            t0 = time.perf_counter()
            for _ in range(args.block):
                loss = step()
            float(loss)
            sync()
            rates[name].append(args.block / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"device {acc.device} ({torch.cuda.get_device_name() if acc.device.type == 'cuda' else 'cpu'}), "
          f"threads {torch.get_num_threads()}, preset {args.preset}, batch {args.batch}, bf16 {args.bf16}, "
          f"channels_last {args.channels_last}, compile {args.compile}, {args.rounds} x {args.block} steps per side")
    for k, v in rates.items():
        print(f"{k:16s} median {med[k]:8.2f} steps/s   blocks: {' '.join(f'{r:.2f}' for r in v)}")
    print(f"ratio ours / diffusers-style = {med['ours'] / med['diffusers-style']:.3f}")


if __name__ == "__main__":
    main()

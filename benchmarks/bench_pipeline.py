"""Sampling wall time: ScratchDDPMPipeline against diffusers' DDPMPipeline, same UNet, steps and seed.

Three set-ups run interleaved (round-robin, ``--repeats`` rounds, median reported):

- ``scratch``:  ScratchDDPMPipeline + ScratchDDPMScheduler (what this package ships)
- ``diffusers``: DDPMPipeline + DDPMScheduler (the reference)
- ``scratch-loop``: ScratchDDPMPipeline + DDPMScheduler (isolates the pipeline loop from the scheduler)

For each run the UNet's forward passes are timed with forward hooks; loop overhead = pipeline wall time /
sum of UNet forward times (1.0 = the loop costs nothing beyond the network). Goals: scratch/diffusers
time ratio <= 1.0, scratch overhead <= 1.02.

    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline.py --preset digits --batch-size 64 --steps 100 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DDPMPipeline, DDPMScheduler

from ddpm_from_scratch import ScratchDDPMScheduler
from ddpm_from_scratch.pipeline_ddpm import ScratchDDPMPipeline
from ddpm_from_scratch.unet_presets import PRESETS, build_unet


class ForwardTimer:
    """Sums the wall time of a module's forward calls (CPU: synchronous, so perf_counter is exact)."""

    def __init__(self, module: torch.nn.Module):
        self.total = 0.0
        self._start = 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, module, args):
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        self.total += time.perf_counter() - self._start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_run(pipe, timer: ForwardTimer, batch_size: int, steps: int, seed: int, device) -> tuple[float, float]:
    """(pipeline wall seconds, UNet forward seconds) of one seeded sampling run."""
    timer.total = 0.0
    generator = torch.Generator(device="cpu").manual_seed(seed)
    _sync(device)
    start = time.perf_counter()
    pipe(batch_size=batch_size, generator=generator, num_inference_steps=steps, output_type="np")
    _sync(device)
    return time.perf_counter() - start, timer.total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    unet = build_unet(args.preset).eval().to(device)
    timer = ForwardTimer(unet)
    setups = {
        "scratch": ScratchDDPMPipeline(unet, ScratchDDPMScheduler()),
        "diffusers": DDPMPipeline(unet, DDPMScheduler()),
        "scratch-loop": ScratchDDPMPipeline(unet, DDPMScheduler()),
    }
    for pipe in setups.values():
        pipe.set_progress_bar_config(disable=True)
        time_run(pipe, timer, args.batch_size, min(args.steps, 5), args.seed, device)  # warm-up

    walls = {name: [] for name in setups}
    unets = {name: [] for name in setups}
    for _ in range(args.repeats):
        for name, pipe in setups.items():
            wall, net = time_run(pipe, timer, args.batch_size, args.steps, args.seed, device)
            walls[name].append(wall)
            unets[name].append(net)

    print(f"preset={args.preset} batch={args.batch_size} steps={args.steps} repeats={args.repeats} "
          f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'setup':<14}{'median wall s':>15}{'median UNet s':>15}{'overhead':>10}{'non-UNet ms/step':>18}")
    for name in setups:
        overhead = statistics.median(w / u for w, u in zip(walls[name], unets[name]))
        rest = statistics.median((w - u) / args.steps * 1e3 for w, u in zip(walls[name], unets[name]))
        print(f"{name:<14}{statistics.median(walls[name]):>15.4f}{statistics.median(unets[name]):>15.4f}"
              f"{overhead:>10.4f}{rest:>18.4f}")
    for name in ("scratch", "scratch-loop"):
        # paired per round (the set-ups of one round ran back to back), then the median over rounds
        ratio = statistics.median(a / b for a, b in zip(walls[name], walls["diffusers"]))
        print(f"time ratio {name} / diffusers (median of paired rounds) = {ratio:.4f}")


if __name__ == "__main__":
    main()

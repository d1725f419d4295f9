"""Per-step cost of ScratchDDPMScheduler.step against diffusers.DDPMScheduler, in one process.

Interleaved repetitions (ours, diffusers, ours, ...) so that machine noise hits both alike; reports the
median time per step, the spread (interquartile range) and the ratio ours / diffusers.

    OMP_NUM_THREADS=1 python benchmarks/bench_scheduler.py [--device cuda] [--repeats 15] [--only loop]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DDPMScheduler

from ddpm_from_scratch import ScratchDDPMScheduler


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(sched, shape, device, steps=100, dtype=torch.float32):
    """Seconds per step over one pass of `steps` steps (timesteps as the pipelines pass them: 0-d tensors)."""
    sched.set_timesteps(steps, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device, dtype=dtype)
    eps = torch.randn(shape, generator=g, device=device, dtype=dtype)
    _sync(device)
    start = time.perf_counter()
    for t in sched.timesteps:
        x = sched.step(eps, t, x, generator=g).prev_sample
    _sync(device)
    return (time.perf_counter() - start) / steps


def full_loop(sched, shape, device, steps=1000):
    """Seconds for a whole 1000-step sampling loop with a trivial model (eps = 0.1 x)."""
    sched.set_timesteps(steps, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device)
    _sync(device)
    start = time.perf_counter()
    for t in sched.timesteps:
        x = sched.step(0.1 * x, t, x, generator=g).prev_sample
    _sync(device)
    return time.perf_counter() - start


def short_loop(sched, shape, device, steps=100):
    """Seconds for the whole loop a pipeline runs: set_timesteps(steps), then x = step(0.1 x, t, x) for t in
    scheduler.timesteps (the chain's coefficients are built inside this window, on whichever call builds them)."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device)
    _sync(device)
    start = time.perf_counter()
    sched.set_timesteps(steps, device=device)
    for t in sched.timesteps:
        x = sched.step(0.1 * x, t, x, generator=g).prev_sample
    _sync(device)
    return time.perf_counter() - start


def set_timesteps_only(sched, device, steps=100, calls=50):
    """Seconds per set_timesteps(steps) call, alone."""
    start = time.perf_counter()
    for _ in range(calls):
        sched.set_timesteps(steps, device=device)
    return (time.perf_counter() - start) / calls


def compare(fn, repeats):
    ours, ref = [], []
    for _ in range(repeats):
        ours.append(fn(ScratchDDPMScheduler()))
        ref.append(fn(DDPMScheduler()))
    q = lambda v: statistics.quantiles(v, n=4)  # noqa: E731
    return {
        "ours_median": statistics.median(ours),
        "ours_iqr": q(ours)[2] - q(ours)[0],
        "diffusers_median": statistics.median(ref),
        "diffusers_iqr": q(ref)[2] - q(ref)[0],
        "ratio": statistics.median(ours) / statistics.median(ref),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this text")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}")
    print("| case | ours (median, IQR) | diffusers (median, IQR) | ratio ours/diffusers |")
    print("|---|---|---|---|")
    cases = [
        ("step, batch 1x3x64x64", lambda s: time_steps(s, (1, 3, 64, 64), device), 1e6, "us/step"),
        ("step, batch 64x3x32x32", lambda s: time_steps(s, (64, 3, 32, 32), device), 1e6, "us/step"),
        ("1000-step loop, 1x3x64x64, trivial model", lambda s: full_loop(s, (1, 3, 64, 64), device), 1e3, "ms"),
        ("set_timesteps(100) + 100 steps, 1x3x64x64", lambda s: short_loop(s, (1, 3, 64, 64), device), 1e3, "ms"),
        ("set_timesteps(100) alone", lambda s: set_timesteps_only(s, device), 1e6, "us"),
    ]
    for name, fn, scale, unit in cases:
        if args.only and args.only not in name:
            continue
        fn(ScratchDDPMScheduler())  # warm-up (allocator, caches)
        fn(DDPMScheduler())
        r = compare(fn, args.repeats)
        print(
            f"| {name} | {r['ours_median'] * scale:.1f} {unit} (±{r['ours_iqr'] * scale:.1f}) "
            f"| {r['diffusers_median'] * scale:.1f} {unit} (±{r['diffusers_iqr'] * scale:.1f}) | {r['ratio']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

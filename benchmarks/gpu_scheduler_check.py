"""GPU check of the scheduler (run on a CUDA machine; CI never runs it).

1. No host-device synchronisation in step / add_noise / get_velocity: the loop runs under
   torch.cuda.set_sync_debug_mode("error"), which raises on any synchronising CUDA call.
2. Same results as diffusers.DDPMScheduler on the GPU (same generator), float32 and float16.

    python benchmarks/gpu_scheduler_check.py
"""

import torch
from diffusers import DDPMScheduler

from ddpm_from_scratch import ScratchDDPMScheduler


def main():
    assert torch.cuda.is_available(), "needs a CUDA device"
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(0), torch.__version__)
    for variance_type in ("fixed_small", "fixed_large", "learned_range"):
        for pred in ("epsilon", "v_prediction"):
            ours = ScratchDDPMScheduler(variance_type=variance_type, prediction_type=pred)
            ours.set_timesteps(50, device=dev)
            ch = 6 if variance_type == "learned_range" else 3
            g = torch.Generator(device=dev).manual_seed(0)
            x = torch.randn(8, 3, 32, 32, device=dev, generator=g)
            out = torch.randn(8, ch, 32, 32, device=dev, generator=g).tanh()
            t_cpu = torch.randint(0, 1000, (8,))
            t_dev = t_cpu.to(dev)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # from the very first call: table uploads included
            try:
                for t in ours.timesteps:
                    x = ours.step(out, t, x, generator=g).prev_sample
                noisy = ours.add_noise(x, out[:, :3], t_dev)
                vel = ours.get_velocity(x, out[:, :3], t_dev)
                noisy_cpu_t = ours.add_noise(x, out[:, :3], t_cpu)  # timesteps on the CPU (pipelines do this)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert torch.isfinite(x).all() and torch.isfinite(noisy).all() and torch.isfinite(vel).all()
            torch.testing.assert_close(noisy_cpu_t, noisy)
            print(f"no sync: variance_type={variance_type} prediction_type={pred} OK")

    for dtype in (torch.float32, torch.float16):
        results = []
        for cls in (ScratchDDPMScheduler, DDPMScheduler):
            s = cls()
            s.set_timesteps(50, device=dev)
            g = torch.Generator(device=dev).manual_seed(1)
            x = torch.randn(4, 3, 32, 32, device=dev, generator=g, dtype=dtype)
            for t in s.timesteps:
                x = s.step(0.1 * x, t, x, generator=g).prev_sample
            results.append(x.float())
        err = (results[0] - results[1]).abs().max().item()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        print(f"parity with diffusers on GPU, {dtype}: max abs diff {err:.2e} (tol {tol})")
        assert err < tol


if __name__ == "__main__":
    main()

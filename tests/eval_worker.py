"""Run by tests/test_evaluation.py under `accelerate launch` (and plainly): evaluates a fixed random `tiny` UNet
and writes this process's metrics and UNet forward count to OUT/rank<r>.json."""

import json
import os
import sys

import torch
from accelerate import Accelerator

from ddpm_from_scratch import ScratchDDPMScheduler
from ddpm_from_scratch.evaluation import evaluate_model
from ddpm_from_scratch.unet_presets import build_unet


def main(out_dir: str) -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    unet = build_unet("tiny", in_channels=1)
    calls = []
    unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    result = evaluate_model(unet, ScratchDDPMScheduler(num_train_timesteps=20), num_samples=12, num_inference_steps=4,
                            seed=11, bound_num_images=10, bound_num_inference_steps=3, batch_size=3,
                            accelerator=accelerator, keep_samples=12)
    record = {"world": accelerator.num_processes, "metrics": result.metrics, "images_through_unet": sum(calls), "work": result.work,
              "samples": result.samples.tolist()}
    with open(os.path.join(out_dir, f"rank{accelerator.process_index}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1])

#!/usr/bin/env python
"""Train a DDPM (Ho et al. 2020) with Accelerate; the result is a Hub-pushable ScratchDDPMPipeline folder.

    python training/train.py --output_dir output/digits            # built-in digits, minutes on a CPU
    accelerate launch training/train.py --dataset_name cifar10 --unet_preset ddpm-cifar10 ...

Flags: every field of ddpm_from_scratch.trainer.TrainConfig (``--help``), named as in diffusers'
train_unconditional.py where they overlap; ``--config FILE`` reads them from JSON or YAML. Wiring only.
"""

import os
import sys

# Threads must be chosen before torch is imported. Busy-waiting OpenMP threads on shared cores make every
# op wait for a descheduled spinner (measured 30x slower), so idle threads sleep (PASSIVE). Each local process
# gets its share of the cores minus one left for the OS, the data pipeline and neighbours (on a busy 2-core
# machine 1 thread ran the digits step 2.9x faster than 2); accelerate launch sets OMP_NUM_THREADS itself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if "OMP_NUM_THREADS" not in os.environ:
    _local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    os.environ["OMP_NUM_THREADS"] = str(max(1, ((os.cpu_count() or 1) - 1) // _local))
os.environ.setdefault("DIFFUSERS_NO_ADVISORY_WARNINGS", "1")


def main(argv=None) -> int:
    import logging

    from ddpm_from_scratch.trainer import CheckpointError, ConfigError, EvaluationError, NonFiniteError, Trainer
    from ddpm_from_scratch.trainer.config import parse_cli

    config = parse_cli(argv)  # argparse errors: one line, exit 2
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        result = Trainer(config).train()
    except (ConfigError, CheckpointError, NonFiniteError, EvaluationError) as exc:
        print(f"train.py: error: {exc}", file=sys.stderr, flush=True)
        return 2
    if not result["is_main_process"]:
        return 0
    print(f"Done: {result['final_step']} steps, final loss {result['final_loss']:.4f}. Model in "
          f"{result['output_dir']}; load it with ScratchDDPMPipeline.from_pretrained({result['output_dir']!r}) "
          "(from ddpm_from_scratch import ScratchDDPMPipeline).", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

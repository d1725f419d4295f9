#!/usr/bin/env python
"""Train a DDPM (Ho et al. 2020) with Accelerate; the result is a Hub-pushable ScratchDDPMPipeline folder.

    python training/train.py --output_dir output/digits            # built-in digits, minutes on a CPU
    accelerate launch training/train.py --dataset_name cifar10 --unet_preset ddpm-cifar10 ...

Flag names follow diffusers' examples/unconditional_image_generation/train_unconditional.py where they overlap.
This file only wires: data, loss, EMA, checkpoints and export live in the ddpm_from_scratch package.
"""

from __future__ import annotations

import os

# Threads must be chosen before torch is imported. Busy-waiting OpenMP threads on shared cores make every
# op wait for a descheduled spinner (measured 30x slower), so idle threads sleep (PASSIVE). Each local process
# gets its share of the cores minus one left for the OS, the data pipeline and neighbours (on a busy 2-core
# machine 1 thread ran the digits step 2.9x faster than 2); accelerate launch sets OMP_NUM_THREADS itself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if "OMP_NUM_THREADS" not in os.environ:
    _local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    os.environ["OMP_NUM_THREADS"] = str(max(1, ((os.cpu_count() or 1) - 1) // _local))
os.environ.setdefault("DIFFUSERS_NO_ADVISORY_WARNINGS", "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

DEFAULT_MAX_TRAIN_STEPS = 2000  # used when neither --max_train_steps nor --num_epochs is given


def parse_args(argv=None):
    from ddpm_from_scratch.diffusion_math import BETA_SCHEDULES, PREDICTION_TYPES, VARIANCE_TYPES
    from ddpm_from_scratch.losses import LOSS_TYPES
    from ddpm_from_scratch.unet_presets import PRESETS

    p = argparse.ArgumentParser(
        description="Train a DDPM on images. With no data flag it trains the `digits` UNet on the 1797 8x8 "
                    "handwritten digits shipped with scikit-learn (no download).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bool_flag = argparse.BooleanOptionalAction
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None,
                   help="A datasets Hub name or a local path (a saved dataset or a folder datasets can load). "
                        "With neither this nor --train_data_dir, the built-in scikit-learn digits are used.")
    g.add_argument("--dataset_config_name", default=None, help="The dataset's config name, if it has several.")
    g.add_argument("--train_data_dir", default=None,
                   help="A folder of images (datasets' imagefolder; subfolders become labels).")
    g.add_argument("--cache_dir", default=None, help="Where datasets caches downloaded/prepared data.")
    g.add_argument("--resolution", type=int, default=None,
                   help="Training image size (square). Default: the UNet preset's sample_size (8 for digits).")
    g.add_argument("--center_crop", action=bool_flag, default=True,
                   help="After resizing the shorter side to --resolution, crop the centre; --no-center_crop "
                        "crops at a random offset (a pure function of seed, epoch and image).")
    g.add_argument("--random_flip", action=bool_flag, default=False,
                   help="Flip images horizontally with probability 1/2 (off by default: flipped digits are not "
                        "digits).")
    g.add_argument("--image_channels", default="auto", choices=["auto", "1", "3"],
                   help="1 = grayscale, 3 = RGB; auto = 1 when every image is grayscale, else 3.")
    g.add_argument("--on_bad_image", default="error", choices=["error", "skip"],
                   help="An unreadable image stops the run naming the file (error) or is skipped and counted.")
    g.add_argument("--digits_split", default="train", choices=["train", "all"],
                   help="Built-in digits only: 'train' = 1438 of the 1797 digits, holding out the 359 that "
                        "`ddpm-from-scratch evaluate` and the FDD score; 'all' = every digit.")
    g.add_argument("--class_conditional", action="store_true",
                   help="Train a class-conditional model with classifier-free guidance: labels from the digits, "
                        "the --train_data_dir subfolders or a dataset's ClassLabel column (--label_column).")
    g.add_argument("--class_dropout_prob", type=float, default=0.1,
                   help="With --class_conditional: probability that a label is replaced by the null class, which "
                        "trains the unconditional model guidance needs (0 < p < 1).")
    g.add_argument("--label_column", default=None,
                   help="With --class_conditional: the dataset's label column (default: its only ClassLabel column).")
    g.add_argument("--eval_guidance_scale", type=float, default=2.0,
                   help="With --class_conditional: guidance scale of the sample grids (one row per class).")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="DataLoader worker processes (0 = load in the main process).")

    g = p.add_argument_group("model and diffusion")
    g.add_argument("--unet_preset", default="digits", choices=sorted(PRESETS),
                   help="UNet architecture (ddpm_from_scratch.unet_presets); in_channels and sample_size follow "
                        "the data and --resolution.")
    g.add_argument("--ddpm_num_steps", type=int, default=1000, help="Diffusion steps T of the forward process.")
    g.add_argument("--ddpm_beta_schedule", default="linear", choices=list(BETA_SCHEDULES), help="Beta schedule.")
    g.add_argument("--prediction_type", default="epsilon", choices=list(PREDICTION_TYPES),
                   help="What the UNet predicts: the noise eps (DDPM), x_0 ('sample') or v.")
    g.add_argument("--variance_type", default="fixed_small", choices=list(VARIANCE_TYPES),
                   help="Reverse-process variance; learned / learned_range double the UNet's output channels.")
    g.add_argument("--loss", default="simple", choices=None,
                   help="Training objective (ddpm_from_scratch.losses.LOSS_TYPES: " + ", ".join(LOSS_TYPES) + ").")
    g.add_argument("--importance_sampling", action="store_true",
                   help="With --loss vlb: draw t with probability proportional to sqrt(E[L_t^2]) over the last 10 "
                        "bound terms of each t, uniform until every t has them (Improved DDPM Sec. 3.3).")
    g.add_argument("--snr_gamma", type=float, default=None,
                   help="Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is the paper's choice. Off by default.")

    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=64, help="Batch size per process.")
    g.add_argument("--num_epochs", type=int, default=None,
                   help="Epochs to train (ignored when --max_train_steps is given).")
    g.add_argument("--max_train_steps", type=int, default=None,
                   help=f"Optimizer steps to train. Default {DEFAULT_MAX_TRAIN_STEPS} when --num_epochs is not "
                        "given either.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="Micro-batches per optimizer step.")
    g.add_argument("--learning_rate", type=float, default=2e-3, help="Peak learning rate (AdamW).")
    g.add_argument("--lr_scheduler", default="cosine",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                            "constant_with_warmup"], help="Learning-rate schedule (diffusers.optimization).")
    g.add_argument("--lr_warmup_steps", type=int, default=100, help="Linear warm-up steps of the LR schedule.")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    g.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW decoupled weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    g.add_argument("--max_grad_norm", type=float, default=1.0,
                   help="Clip the global gradient norm to this (0 = no clipping; the norm is still logged).")
    g.add_argument("--use_ema", action=bool_flag, default=True,
                   help="Keep an exponential moving average of the weights; the exported UNet holds it.")
    g.add_argument("--ema_max_decay", type=float, default=0.999, help="Largest EMA decay.")
    g.add_argument("--ema_min_decay", type=float, default=0.0, help="Smallest EMA decay.")
    g.add_argument("--ema_inv_gamma", type=float, default=1.0, help="EMA warm-up: decay = 1-(1+n/inv_gamma)^-power.")
    g.add_argument("--ema_power", type=float, default=0.75, help="EMA warm-up power.")
    g.add_argument("--ema_update_after_step", type=int, default=0, help="EMA copies the weights until this step.")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="Mixed precision (default: the accelerate config's choice, else no).")
    g.add_argument("--seed", type=int, default=0,
                   help="Seed of everything random: init, epoch order, noise, timesteps, crops, flips, samples.")
    g.add_argument("--num_threads", type=int, default=None,
                   help="torch CPU threads per process (default: cores / local processes).")

    g = p.add_argument_group("checkpoints, samples, logging")
    g.add_argument("--output_dir", default="output/digits",
                   help="Where the pipeline, model card, samples, logs and checkpoints go.")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Allow training into an output_dir that already holds a model (checkpoints are kept).")
    g.add_argument("--checkpointing_steps", type=int, default=500,
                   help="Save a resumable checkpoint-<step> every this many optimizer steps (0 = never).")
    g.add_argument("--checkpoints_total_limit", type=int, default=None,
                   help="Keep at most this many complete checkpoints (older ones are deleted after a new save).")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="A checkpoint path, or 'latest' for the newest complete one in output_dir.")
    g.add_argument("--save_images_steps", type=int, default=1000,
                   help="Write samples/step_<N>.png every this many steps (0 = only at the end).")
    g.add_argument("--eval_batch_size", type=int, default=64, help="Images in each sample grid.")
    g.add_argument("--ddpm_num_inference_steps", type=int, default=1000, help="Denoising steps for the samples.")
    g.add_argument("--eval_at_end", action="store_true",
                   help="Built-in digits only: after training, compute the bits/dim bound on the 359 held-out digits "
                        "and the Frechet digit distance of --eval_num_samples samples (--ddpm_num_inference_steps "
                        "steps), and put both on the model card.")
    g.add_argument("--eval_num_samples", type=int, default=256,
                   help="Samples for the end-of-training Frechet digit distance (0 = bits/dim only).")
    g.add_argument("--logger", default="tensorboard", choices=["tensorboard", "none"], help="Experiment tracker.")
    g.add_argument("--logging_dir", default="logs", help="TensorBoard directory, relative to output_dir.")
    g.add_argument("--logging_steps", type=int, default=10, help="Log scalars every this many steps.")

    g = p.add_argument_group("hub")
    g.add_argument("--push_to_hub", action="store_true",
                   help="Upload output_dir (without checkpoints and logs) to the Hub at the end.")
    g.add_argument("--hub_model_id", default=None, help="Repository id (default: output_dir's name).")
    g.add_argument("--hub_private_repo", action="store_true", help="Create the repository as private.")
    g.add_argument("--hub_token", default=None,
                   help="A Hub token; prefer `hf auth login` or HF_TOKEN (a token on the command line leaks into "
                        "shell history). Never written to the card or logs.")
    args = p.parse_args(argv)
    if args.loss not in LOSS_TYPES:
        p.error(f"--loss must be one of {list(LOSS_TYPES)}, got {args.loss!r}")
    for name in ("train_batch_size", "gradient_accumulation_steps", "eval_batch_size", "ddpm_num_steps",
                 "ddpm_num_inference_steps", "logging_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_train_steps", "num_epochs", "resolution", "checkpoints_total_limit", "num_threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.dataset_name and args.train_data_dir:
        p.error("give either --dataset_name or --train_data_dir, not both")
    if args.importance_sampling and args.loss != "vlb":
        p.error(f"--importance_sampling reweights the bound's terms: it needs --loss vlb, got --loss {args.loss}")
    if args.label_column is not None and not args.class_conditional:
        p.error("--label_column is only used with --class_conditional")
    if not 0.0 < args.class_dropout_prob < 1.0:
        p.error(f"--class_dropout_prob must be in (0, 1) (0 never trains the null class guidance needs), "
                f"got {args.class_dropout_prob}")
    if not (args.eval_guidance_scale >= 0.0 and args.eval_guidance_scale < float("inf")):
        p.error(f"--eval_guidance_scale must be a finite number >= 0, got {args.eval_guidance_scale}")
    if args.eval_at_end and (args.dataset_name or args.train_data_dir):
        p.error("--eval_at_end scores held-out built-in digits: use it without --dataset_name/--train_data_dir")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    import torch

    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    else:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from ddpm_from_scratch import ScratchDDPMScheduler
    from ddpm_from_scratch import train_utils as tu
    from ddpm_from_scratch.data import PositionBatchSampler, build_training_data
    from ddpm_from_scratch.hub import public_training_args
    from ddpm_from_scratch.unet_presets import PRESETS, build_unet

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger = get_logger("train")
    for noisy in ("accelerate", "diffusers", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    project = ProjectConfiguration(project_dir=args.output_dir,
                                   logging_dir=os.path.join(args.output_dir, args.logging_dir))
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.logger == "none" else args.logger,
        project_config=project,
    )
    main_proc = accelerator.is_main_process

    # Refuse to silently replace a finished model unless asked (checkpoints are never removed by this), also
    # when --resume_from_checkpoint finds nothing to resume from.
    resume = tu.resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if (not args.overwrite_output_dir and resume is None
            and os.path.exists(os.path.join(args.output_dir, "model_index.json"))):
        found = " and no complete checkpoint to resume from" if args.resume_from_checkpoint else ""
        raise ValueError(f"--output_dir {args.output_dir!r} already holds a trained pipeline{found}; pass "
                         "--overwrite_output_dir to train into it, or --resume_from_checkpoint latest")
    earlier = [os.path.basename(p) for _, p in tu.list_checkpoints(args.output_dir)] if resume is None else []
    if earlier and not args.overwrite_output_dir:
        raise ValueError(f"--output_dir {args.output_dir!r} holds checkpoints of an earlier run ({', '.join(earlier)}): "
                         "pass --resume_from_checkpoint latest to continue it, or --overwrite_output_dir to start a "
                         f"new run (they are then moved to {tu.PREVIOUS_PREFIX}<n>/, not deleted)")
    if earlier and main_proc:
        logger.info("moved the earlier run's checkpoints to %s", tu.set_aside_checkpoints(args.output_dir))
    accelerator.wait_for_everyone()

    # ---- data (before any model is built: a bad dataset costs seconds, not a model) ----
    preset = PRESETS[args.unet_preset]
    resolution = args.resolution or preset.sample_size
    dataset, prepared, source = build_training_data(
        args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir, resolution,
        args.center_crop, args.random_flip, args.image_channels, args.on_bad_image, args.seed,
        digits_split=args.digits_split, class_conditional=args.class_conditional, label_column=args.label_column)
    class_names = prepared.class_names
    world, rank, per_proc = accelerator.num_processes, accelerator.process_index, args.train_batch_size
    global_batch = per_proc * world
    micro_per_epoch = len(dataset) // global_batch
    if micro_per_epoch == 0:
        raise ValueError(f"the dataset has {len(dataset)} images, fewer than one global batch "
                         f"(--train_batch_size {per_proc} x {world} processes)")
    steps_per_epoch = max(1, micro_per_epoch // args.gradient_accumulation_steps)
    if args.max_train_steps is not None:
        max_steps = args.max_train_steps
    elif args.num_epochs is not None:
        max_steps = args.num_epochs * steps_per_epoch
    else:
        max_steps = DEFAULT_MAX_TRAIN_STEPS

    # ---- model, scheduler, optimizer ----
    set_seed(args.seed)  # model init and dropout use the global RNGs; load_state restores them on resume
    unet = build_unet(args.unet_preset, sample_size=resolution, in_channels=prepared.channels,
                      variance_type=args.variance_type, num_classes=len(class_names) if class_names else None)
    noise_scheduler = ScratchDDPMScheduler(num_train_timesteps=args.ddpm_num_steps,
                                           beta_schedule=args.ddpm_beta_schedule,
                                           prediction_type=args.prediction_type, variance_type=args.variance_type)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    # The LR scheduler is stepped once per optimizer step by us (not prepared: Accelerate would step it once per
    # process), and checkpointed through register_for_checkpointing.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_steps)
    ema = None
    if args.use_ema:
        ema = tu.EMA(unet, max_decay=args.ema_max_decay, min_decay=args.ema_min_decay, use_warmup=True,
                     inv_gamma=args.ema_inv_gamma, power=args.ema_power, update_after_step=args.ema_update_after_step)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    timestep_sampler = None
    if args.importance_sampling:
        from ddpm_from_scratch.losses import ImportanceTimestepSampler

        timestep_sampler = ImportanceTimestepSampler(args.ddpm_num_steps)
        accelerator.register_for_checkpointing(timestep_sampler)
    if ema is not None:
        ema.shadow = [s.to(accelerator.device) for s in ema.shadow]
        tu.register_ema(accelerator, ema)

    # ---- resume ----
    global_step = 0
    recent = []  # losses of the last (up to 100) optimizer steps, mean over all processes: the card's final loss
    if args.resume_from_checkpoint and resume is None:
        logger.info("no complete checkpoint in %s; starting a new run", args.output_dir, main_process_only=True)
    if resume is not None:
        accelerator.load_state(resume)
        state = tu.read_training_state(resume)
        global_step = int(state["step"])
        recent = [float(v) for v in state.get("recent_losses", [])]
        if state.get("global_batch") != global_batch:
            raise ValueError(f"{resume} was trained with global batch {state.get('global_batch')}, this run has "
                             f"{global_batch}; the data position cannot be continued")
        logger.info("resumed from %s at step %d", resume, global_step, main_process_only=True)

    sampler = PositionBatchSampler(len(dataset), per_proc, world, rank, seed=args.seed,
                                   start=global_step * args.gradient_accumulation_steps)
    # A private generator: creating the iterator would otherwise draw from the global RNG after load_state and
    # shift every later dropout mask of a resumed run.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.dataloader_num_workers,
                                         pin_memory=accelerator.device.type == "cuda",
                                         generator=torch.Generator().manual_seed(args.seed))

    if main_proc:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.logger != "none":
            accelerator.init_trackers("train", config={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                       for k, v in public_training_args(args).items()})
        run_info = {"distributed_type": str(accelerator.distributed_type), "num_processes": world,
                    "train_batch_size": per_proc, "global_batch": global_batch,
                    "gradient_accumulation_steps": args.gradient_accumulation_steps, "max_train_steps": max_steps,
                    "num_images": len(dataset), "skipped_images": len(prepared.skipped), "image_channels":
                    prepared.channels, "resolution": resolution, "dataset": source,
                    "resumed_from": resume, "start_step": global_step, "torch_threads": torch.get_num_threads(),
                    "class_names": class_names}
        logger.info("training %s on %s: %d images (%d skipped), %d process(es) [%s], global batch %d, %d steps",
                    args.unet_preset, source, len(dataset), len(prepared.skipped), world,
                    accelerator.distributed_type, global_batch * args.gradient_accumulation_steps, max_steps)

    from ddpm_from_scratch import guidance

    # a conditional model's grids: one row per class, eval_batch_size / classes samples each
    per_row = max(1, args.eval_batch_size // len(class_names)) if class_names else None
    grid_labels = [c for c in range(len(class_names)) for _ in range(per_row)] if class_names else None

    def save_samples(step):
        model = tu.ema_model_copy(accelerator.unwrap_model(unet), ema)
        images = tu.generate_samples(model, noise_scheduler, len(grid_labels) if grid_labels else args.eval_batch_size,
                                     args.ddpm_num_inference_steps, seed=args.seed, device=accelerator.device,
                                     class_labels=grid_labels,
                                     guidance_scale=args.eval_guidance_scale if grid_labels else None)
        path = os.path.join(args.output_dir, "samples", f"step_{step}.png")
        if grid_labels:
            from ddpm_from_scratch.images import save_image_grid

            os.makedirs(os.path.dirname(path), exist_ok=True)
            return save_image_grid(images, path, nrow=per_row)
        return tu.save_sample_grid(images, path)

    # ---- loop ----
    sample_shape = (prepared.channels, resolution, resolution)
    progress = tqdm(total=max_steps, initial=global_step, disable=not main_proc, desc="steps", dynamic_ncols=True)
    micro = global_step * args.gradient_accumulation_steps
    data_iter = iter(loader)
    window_t, window_steps, accum_loss, pending = time.perf_counter(), 0, 0.0, []
    unet.train()
    while global_step < max_steps:
        batch = next(data_iter)
        labels = None
        if class_names:
            batch, labels = batch
            labels = guidance.drop_labels(labels.to(accelerator.device), args.class_dropout_prob, len(class_names),
                                          args.seed, micro, global_batch, rank)
        x0 = batch.to(accelerator.device, non_blocking=True)
        t, eps, w = tu.step_noise(args.seed, micro, global_batch, sample_shape, args.ddpm_num_steps, rank, per_proc,
                                  device=accelerator.device, dtype=x0.dtype, timestep_sampler=timestep_sampler)
        loss, grad_norm = tu.train_micro_step(accelerator, unet, optimizer, noise_scheduler, x0, t, eps,
                                              loss_type=args.loss, snr_gamma=args.snr_gamma,
                                              max_grad_norm=args.max_grad_norm, timestep_weights=w,
                                              timestep_sampler=timestep_sampler, class_labels=labels)
        micro += 1
        accum_loss = accum_loss + loss.detach().float() / args.gradient_accumulation_steps
        if not accelerator.sync_gradients:
            continue
        if not accelerator.optimizer_step_was_skipped:
            lr_scheduler.step()
        if ema is not None:
            ema.update(accelerator.unwrap_model(unet))
        global_step += 1
        window_steps += 1
        pending.append(accum_loss)  # a device tensor: no host sync on every step
        accum_loss = 0.0
        progress.update(1)
        checkpoint_now = bool(args.checkpointing_steps) and global_step % args.checkpointing_steps == 0
        if global_step % args.logging_steps == 0 or global_step == max_steps or checkpoint_now:
            losses = torch.stack(pending)
            if world > 1:
                losses = accelerator.reduce(losses, "mean")
            recent, pending = (recent + losses.float().cpu().tolist())[-100:], []
            step_loss = recent[-1]
            if main_proc:
                progress.set_postfix(loss=f"{step_loss:.4f}", step=global_step)
        if global_step % args.logging_steps == 0 or global_step == max_steps:
            now = time.perf_counter()
            scalars = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0],
                       "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                       "steps_per_second": window_steps / max(now - window_t, 1e-9)}
            if ema is not None:
                scalars["ema_decay"] = ema.current_decay()
            accelerator.log(scalars, step=global_step)
            window_t, window_steps = now, 0
        if checkpoint_now:
            path = tu.save_checkpoint(accelerator, args.output_dir, global_step,
                                      {"micro_batch": micro, "global_batch": global_batch,
                                       "epoch": sampler.position(micro)[0], "recent_losses": recent},
                                      args.checkpoints_total_limit)
            logger.info("saved %s", path, main_process_only=True)
        if main_proc and args.save_images_steps and global_step % args.save_images_steps == 0 \
                and global_step != max_steps:
            save_samples(global_step)
        if args.save_images_steps and global_step % args.save_images_steps == 0:
            accelerator.wait_for_everyone()
    progress.close()

    # ---- export (main process only) ----
    accelerator.wait_for_everyone()
    final_loss = sum(recent) / len(recent) if recent else float("nan")
    if main_proc:
        from ddpm_from_scratch import hub

        import shutil

        grid = save_samples(global_step)
        shutil.copyfile(grid, os.path.join(args.output_dir, "samples.png"))  # beside README.md, for the card
        exported = tu.export_pipeline(accelerator.unwrap_model(unet), noise_scheduler, args.output_dir, ema,
                                      class_names=class_names)
        card_metrics = {"loss": final_loss}
        if args.eval_at_end:
            eval_metrics, run_info["eval"] = tu.evaluate_for_card(
                exported.unet, noise_scheduler, num_inference_steps=args.ddpm_num_inference_steps,
                num_samples=args.eval_num_samples, batch_size=args.eval_batch_size, seed=args.seed)
            card_metrics.update(eval_metrics)
            logger.info("held-out evaluation: %s", eval_metrics, main_process_only=True)
        run_info.update(final_step=global_step, final_loss=final_loss, last_losses=recent, ema=ema is not None)
        tu.write_json_atomically(os.path.join(args.output_dir, "run_info.json"), run_info)
        repo_id = args.hub_model_id or os.path.basename(os.path.normpath(os.path.abspath(args.output_dir)))
        hub.write_model_card(
            args.output_dir, repo_id=repo_id if args.push_to_hub else None, sample_grid="samples.png",
            dataset_name=source if source != "sklearn-digits" else "scikit-learn digits (sklearn.datasets.load_digits)",
            training_args=public_training_args(args), metrics=card_metrics,
            details={"UNet preset": args.unet_preset, "resolution": resolution, "channels": prepared.channels,
                     "training steps": global_step, "global batch": global_batch * args.gradient_accumulation_steps,
                     "EMA weights": ema is not None,
                     **({"class dropout (null class)": args.class_dropout_prob} if class_names else {})},
            num_inference_steps=args.ddpm_num_inference_steps, token=args.hub_token, class_names=class_names,
            guidance_scale=args.eval_guidance_scale if class_names else None)
        if args.push_to_hub:
            commit = hub.push_folder(args.output_dir, repo_id, private=args.hub_private_repo, token=args.hub_token,
                                     ignore_patterns=hub.DEFAULT_PUSH_IGNORE)
            logger.info("pushed %s to %s", args.output_dir, commit)
        print(f"Done: {global_step} steps, final loss {final_loss:.4f}. Model in {os.path.abspath(args.output_dir)}; "
              f"load it with ScratchDDPMPipeline.from_pretrained({args.output_dir!r}) "
              f"(from ddpm_from_scratch import ScratchDDPMPipeline).", flush=True)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Test-wide settings: one torch thread (2 shared cores), no network, deterministic algorithms."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

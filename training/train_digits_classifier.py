"""Train the Frechet-digit-distance feature network on scikit-learn's digits and ship it as safetensors.

Deterministic (fixed seeds, one thread), a few seconds on a CPU:
    OMP_NUM_THREADS=1 python training/train_digits_classifier.py
writes src/ddpm_from_scratch/digits_classifier.safetensors (atomically) and prints the held-out accuracy.
"""

import argparse

import torch
from safetensors.torch import save_file

from ddpm_from_scratch.fileio import atomic_write
from ddpm_from_scratch.metrics import DIGITS_CLASSIFIER_FILE, train_digits_classifier


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DIGITS_CLASSIFIER_FILE, help="where to write the safetensors weights")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_accuracy", type=float, default=0.95, help="refuse to write a worse network")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    net, acc = train_digits_classifier(epochs=args.epochs, seed=args.seed)
    print(f"held-out accuracy: {acc:.4f}")
    if acc < args.min_accuracy:
        raise SystemExit(f"accuracy {acc:.4f} < --min_accuracy {args.min_accuracy}; weights not written")
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    atomic_write(args.out, lambda tmp: save_file(tensors, tmp))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The background evaluation of ``--eval_async`` (trainer/evaluation.py's module docstring):

    python -m ddpm_from_scratch.trainer.eval_worker OUTPUT_DIR/.eval-pending/step-<N>

evaluates the pipeline in that folder as its request.json asks (``evaluation.run_pending``: the same
``evaluation_record`` as the training process) with one torch thread and writes samples.safetensors, then result.json.
Exit status 0 on success; any error is printed (last line: its type and message) with a non-zero status.
"""

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not os.path.isdir(args[0]):
        print("usage: python -m ddpm_from_scratch.trainer.eval_worker PENDING_FOLDER (an existing folder)",
              file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from .evaluation import run_pending

    out = run_pending(args[0])
    print(f"evaluated step {out['record']['step']} in {out['seconds']:.1f} s: {out['record']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

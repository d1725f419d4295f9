"""Training as a library: ``Trainer(TrainConfig(...)).train()``.

- ``config``: TrainConfig (every setting, validated whole) and the CLI parser built from it;
- ``trainer``: the loop and its callbacks;
- ``model``, ``ema``, ``steps``, ``checkpoints``, ``sampling``, ``export``: one job each.
"""

from .checkpoints import CheckpointError
from .config import ConfigError, TrainConfig
from .evaluation import EvaluationError
from .steps import NonFiniteError
from .trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "ConfigError", "CheckpointError", "NonFiniteError", "EvaluationError"]

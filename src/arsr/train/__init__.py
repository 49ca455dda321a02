"""The training engine shared by every training stage (see engine.py)."""

from arsr.train.checkpoint import CheckpointError, load_model_file, safe_load, save_model_file
from arsr.train.dist import DistInfo, cleanup, init_distributed, unwrap
from arsr.train.engine import (
    NonFiniteLossError,
    Trainer,
    TrainingInterrupted,
    TrainResult,
    micro_batch_size,
)
from arsr.train.logging import WandbRun, init_wandb
from arsr.train.optim import default_no_weight_decay

__all__ = [
    "CheckpointError",
    "DistInfo",
    "NonFiniteLossError",
    "TrainResult",
    "Trainer",
    "TrainingInterrupted",
    "WandbRun",
    "cleanup",
    "default_no_weight_decay",
    "init_distributed",
    "init_wandb",
    "load_model_file",
    "micro_batch_size",
    "safe_load",
    "save_model_file",
    "unwrap",
]

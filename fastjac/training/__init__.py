"""Training: data sets, atomic checkpoints, a resumable (and DDP-ready) trainer, the CLI."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import DATASETS, Dataset, load_dataset
from .errors import DataError, PeerError, RunFolderError, RunWarning, TrainingInterrupted, UsageError
from .threads import default_threads
from .trainer import BatchOrder, TrainConfig, train

__all__ = ["TrainConfig", "train", "BatchOrder", "load_dataset", "Dataset", "DATASETS",
           "save_checkpoint", "load_checkpoint", "CheckpointError", "UsageError", "DataError",
           "RunFolderError", "PeerError", "TrainingInterrupted", "RunWarning", "default_threads"]

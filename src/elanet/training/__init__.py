"""Training: configuration and presets, the staged ELA trainer, checkpoints and data-parallel set-up."""
from .checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint, save_checkpoint
from .config import PRESETS, TrainConfig, load_yaml, resolve_config
from .core import Context, Parts, Task, fit
from .layout import MEMORY_FORMATS, default_memory_format, resolve_memory_format, run_memory_format
from .trainer import Classification, evaluate, lr_at, train

__all__ = [
    "load_checkpoint", "model_from_checkpoint", "resolve_checkpoint", "save_checkpoint", "PRESETS", "TrainConfig",
    "load_yaml", "resolve_config", "Context", "Parts", "Task", "fit", "Classification", "evaluate", "lr_at", "train",
    "MEMORY_FORMATS", "default_memory_format", "resolve_memory_format", "run_memory_format",
]

"""ringlwm.train: the torchrun trainer (``python -m ringlwm.train RECIPE``), its typed config and checkpoints."""

from ringlwm.train.config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config"]

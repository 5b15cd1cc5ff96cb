"""Training: ``TrainConfig`` and ``Trainer(model, config, data)``, checkpoints and resume, model
selection, and data-parallel runs under torchrun.

==============  =====================================================================
module          what it holds
==============  =====================================================================
config.py       ``TrainConfig``, config files, the learning-rate schedule, the optimiser
trainer.py      ``Trainer``: the loop, evaluation, logs, the loss plot, MFU
state.py        checkpoints (written whole or not at all), ``find_checkpoints``, resume
selection.py    ``cross_validate`` (k folds by document), ``sweep`` (grid or random)
distributed.py  torchrun: process group, DDP or FSDP2, the whole state gathered to rank 0
==============  =====================================================================
"""
from .config import RECIPES, TrainConfig, load_config_file, lr_at, make_optimizer, resolve_device
from .selection import cross_validate, model_for_data, sweep, sweep_trials
from .state import OPTIMIZER_NAME, STATE_NAME, find_checkpoints
from .trainer import NonFiniteLossError, Trainer, flops_per_token

__all__ = [
    "Trainer",
    "TrainConfig",
    "RECIPES",
    "NonFiniteLossError",
    "load_config_file",
    "lr_at",
    "make_optimizer",
    "resolve_device",
    "find_checkpoints",
    "flops_per_token",
    "cross_validate",
    "sweep",
    "sweep_trials",
    "model_for_data",
    "STATE_NAME",
    "OPTIMIZER_NAME",
]

"""Configuration: typed dataclasses, YAML + overrides, resolution of epochs into steps."""

from .loader import build_config, config_to_dict, load_config, parse_override
from .plan import StepPlan, resolve_plan
from .schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    SparseConfig,
    TicketsConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "SparseConfig",
    "StepPlan",
    "TicketsConfig",
    "TrainConfig",
    "build_config",
    "config_to_dict",
    "load_config",
    "parse_override",
    "resolve_plan",
]

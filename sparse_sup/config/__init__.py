"""Configuration: typed dataclasses, YAML + overrides, resolution of epochs into steps."""

from .errors import ConfigError
from .loader import (
    build_config,
    config_to_dict,
    load_config,
    parse_override,
    preset_names,
    resolve_config_path,
)
from .plan import StepPlan, check_batch_split, resolve_plan
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
    "ConfigError",
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
    "check_batch_split",
    "config_to_dict",
    "load_config",
    "parse_override",
    "preset_names",
    "resolve_config_path",
    "resolve_plan",
]

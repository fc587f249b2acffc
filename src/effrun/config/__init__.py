"""Typed configuration: dataclasses registered in Hydra's ConfigStore."""
from effrun.config.schema import (  # noqa: F401
    Config, DataConfig, HardwareConfig, LinkLevel, LoggerConfig, ModelConfig,
    ParallelismConfig, RunConfig,
)

"""Typed configuration: dataclasses registered in Hydra's ConfigStore (core groups here; model and
data dataclasses come from each task family)."""
from effrun.config.schema import (  # noqa: F401
    Config, HardwareConfig, LinkLevel, LoggerConfig, ParallelismConfig, RunConfig,
)

"""Run configuration: the structured schema (``schema.py``) and the loader (``load.py``)."""

from stepdistill.config.load import (
    CONFIGS_DIR,
    configs_dir,
    list_configs,
    load_config,
    resolve_config_path,
    to_dataclass,
)
from stepdistill.config.schema import (
    Config,
    DataConfig,
    ExportConfig,
    ModelConfig,
    RoleConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "CONFIGS_DIR",
    "Config",
    "DataConfig",
    "ExportConfig",
    "ModelConfig",
    "RoleConfig",
    "RunConfig",
    "TrainConfig",
    "configs_dir",
    "list_configs",
    "load_config",
    "resolve_config_path",
    "to_dataclass",
]

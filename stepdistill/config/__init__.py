"""Run configuration: the structured schema (``schema.py``) and the method-free loader machinery
(``load.py``). ``stepdistill.runconfig.load_config`` types a config by its method."""

from stepdistill.config.load import (
    CONFIGS_DIR,
    configs_dir,
    list_configs,
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
    "resolve_config_path",
    "to_dataclass",
]

"""The parameter schema: the ``finetune``, ``predict`` and ``tune`` parameters as typed objects.

Parameters arrive as plain dicts (from ``conf/*/parameters_*.yml`` and ``kedro run
--params``); :func:`parse_finetune` (and :func:`parse_predict`, :func:`parse_tune`) validate
them once, before any work starts, and every error names the key, the value that was given
and what is allowed. One default per key, in the schema; the YAML files show the same ones.
"""

from headswap.project.config.finetune import PHASE_DEFAULTS, FinetuneConfig, state_dir
from headswap.project.config.parse import (
    ParameterError,
    from_scratch_parameters,
    merge_parameters,
    parameter_keys,
    parse_finetune,
    parse_predict,
    parse_tune,
)
from headswap.project.config.predict import PredictConfig
from headswap.project.config.sections import (
    BaseConfig,
    CalibrationConfig,
    DataConfig,
    EvaluationConfig,
    ExportConfig,
    HeadConfig,
    PhaseConfig,
    RegistryConfig,
    TrainingConfig,
)
from headswap.project.config.tune import SearchDimension, TuneConfig

__all__ = [
    "PHASE_DEFAULTS", "BaseConfig", "CalibrationConfig", "DataConfig", "EvaluationConfig",
    "ExportConfig", "FinetuneConfig", "HeadConfig", "ParameterError", "PhaseConfig",
    "PredictConfig", "RegistryConfig", "SearchDimension", "TrainingConfig", "TuneConfig",
    "from_scratch_parameters", "merge_parameters", "parameter_keys", "parse_finetune",
    "parse_predict", "parse_tune", "state_dir",
]

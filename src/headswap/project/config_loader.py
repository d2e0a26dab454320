"""The project's configuration loader: Kedro's ``OmegaConfigLoader`` with one resolver more,
``${params:<dotted key>}``, so that a catalog entry can take its location from the parameters
(``finetune.data.path``, ``finetune.base.path``, ``predict.path``). The parameters are the
merged ones of the run: conf/base, the environment (conf/local) and ``--params``."""

from __future__ import annotations

from typing import Any

from kedro.config import OmegaConfigLoader
from omegaconf import OmegaConf

_UNSET = object()


class ConfigLoader(OmegaConfigLoader):
    def __getitem__(self, key: str) -> dict[str, Any]:
        if key not in ("parameters", "globals"):
            OmegaConf.register_resolver("params", self._parameter, replace=True)
        return super().__getitem__(key)

    def _parameter(self, key: str, default: Any = _UNSET) -> Any:
        value: Any = self["parameters"]
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                if default is _UNSET:
                    raise KeyError(f"${{params:{key}}}: there is no parameter {key}")
                return default
            value = value[part]
        return value

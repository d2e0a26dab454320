"""Project settings. There is no need to edit this file unless you want to change values
from the Kedro defaults. For further information, including these default values, see
https://docs.kedro.org/en/stable/configure/configuration_basics/#configuration"""

import warnings

# Upstream warnings that tell a user of this project nothing they can act on:
# - OmegaConf deprecates register_new_resolver(), which Kedro's config loader and kedro-mlflow
#   call on every start; they are the ones to move to register_resolver().
warnings.filterwarnings("ignore", r"register_new_resolver\(\) is deprecated", UserWarning)

from headswap.project.hooks import (  # noqa: E402 - after the filters, which must come first
    MlflowArtifactHook,
    MultiWorkerHook,
    UserErrorHook,
)
from headswap.project.mlflow_run import MlflowRunHook  # noqa: E402

# Next to kedro-mlflow's own hook (registered by the plugin); what must come before it is
# marked tryfirst, what needs its MLflow run trylast.
HOOKS = (
    MultiWorkerHook(),
    UserErrorHook(),
    MlflowArtifactHook(),
    MlflowRunHook(),
)

# Class that manages the KedroSession.
# from kedro.framework.session import KedroSession
# SESSION_CLASS = KedroSession

# Class that manages storing KedroSession data.
# from kedro.framework.session.store import BaseSessionStore
# SESSION_STORE_CLASS = BaseSessionStore
# Keyword arguments to pass to the `SESSION_STORE_CLASS` constructor.
# SESSION_STORE_ARGS = {
#     "path": "./sessions"
# }

# Directory that holds configuration.
# CONF_SOURCE = "conf"

# Class that manages how configuration is loaded: Kedro's, with ${params:...} in the catalog.
from headswap.project.config_loader import ConfigLoader  # noqa: E402

CONFIG_LOADER_CLASS = ConfigLoader

# Keyword arguments to pass to the `CONFIG_LOADER_CLASS` constructor.
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # An environment (e.g. conf/test) overrides single keys, not whole sections.
    # conf/local/catalog.yml may add single keys (e.g. `credentials`) to an entry.
    "merge_strategy": {"parameters": "soft", "globals": "soft", "catalog": "soft"},
    # "config_patterns": {
    #     "spark" : ["spark*/"],
    #     "parameters": ["parameters*", "parameters*/**", "**/parameters*"],
    # }
}

# Class that manages Kedro's library components.
# from kedro.framework.context import KedroContext
# CONTEXT_CLASS = KedroContext

# Class that manages the Data Catalog.
# from kedro.io import DataCatalog
# DATA_CATALOG_CLASS = DataCatalog

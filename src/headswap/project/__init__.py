"""The Kedro side of headswap: the parameter schema, the catalog's datasets, the hooks, MLflow
tracking, serving and the registry, tuning, the embedded example. The library it builds on is
:mod:`headswap.core`, which imports none of it."""

"""headswap: fine-tune pretrained Keras image classifiers on your own image folders."""

import os
import re
import sys
import tempfile
import warnings

# TensorFlow's C++ start-up chatter (CUDA probing, CPU features) hides the run's own log.
# This package is imported before TensorFlow by every entry point (`kedro` loads it through
# settings.py), so the level is set in time; it hides the CPU-feature notice.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# What the level does not reach: TensorFlow's shared libraries log through absl before
# absl::InitializeLog() runs, straight to the process's stderr, whatever the level: an
# "All log messages before absl::InitializeLog()" banner, oneDNN's "custom operations are on"
# and "Could not find cuda drivers", once per library (twice). These are left out of the
# import below and everything else it writes to stderr is passed on. Later lines of the same
# kind stay, since they are written at first use, not at import: "failed call to cuInit" (CUDA
# libraries without a GPU driver) and oneDNN's "DT_UINT8 only on platforms with AVX-512".
_START_UP = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|^I0000 .*\] (oneDNN custom operations are on|Could not find cuda drivers)"
)


def _import_tensorflow_quietly() -> None:
    if "tensorflow" in sys.modules:
        return
    try:
        stderr = os.dup(2)
    except OSError:  # no stderr to filter
        return
    with tempfile.TemporaryFile() as caught:
        sys.stderr.flush()
        os.dup2(caught.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(stderr, 2)
            os.close(stderr)
            caught.seek(0)
            lines = caught.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not _START_UP.search(line)))
            sys.stderr.flush()


_import_tensorflow_quietly()

# MLflow asks for type hints on `predict` (to validate inputs against) as each PythonModel
# subclass without them is defined: at every `kedro` command, for kedro-mlflow's
# KedroPipelineModel, which its plugin defines after this package is imported (this project's
# model, headswap.project.serving, has them). MLflow shows it under its own "once" filter, which
# overrides any warnings filter set here, so under `kedro` that module is imported here with
# this one warning held back and every other shown as usual; MLflow's "once" then keeps it
# from coming back.
_TYPE_HINTS = re.compile(r"Add type hints to the `predict` method")


def _import_kedro_mlflow_quietly() -> None:
    try:
        with warnings.catch_warnings(record=True) as caught:
            import kedro_mlflow.mlflow  # noqa: F401
    except ImportError:
        return
    for warning in caught:
        if not (issubclass(warning.category, UserWarning)
                and _TYPE_HINTS.search(str(warning.message))):
            warnings.showwarning(warning.message, warning.category, warning.filename,
                                 warning.lineno, warning.file, warning.line)


if "kedro.framework.cli" in sys.modules:  # a `kedro` command
    _import_kedro_mlflow_quietly()

__version__ = "0.1.0"

"""Shared helpers of the benchmarks: the command line, the example's files and model, the
project's parameters as ``kedro run`` reads them, a throw-away copy of the project to run
``kedro run`` in, timed subprocesses with their peak memory, medians, tables and JSON.

Each benchmark prints a table and writes ``benchmarks/results/<name>.json`` with
:func:`write_result`: its figures (what docs/benchmarks.md shows, generated from the file by
docs/hooks/benchmarks.py), the per-repeat details, the UTC date, the machine (CPU model, logical
cores, memory, GPUs), the library versions, the load averages before and after, and the exact
command. The results are committed, so that every figure in the documentation can be checked.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras

    from headswap.project.config import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLE = ROOT / "data" / "01_raw" / "fashion-mnist-target"
PRETRAINED = ROOT / "data" / "06_models" / "pretrained_base.keras"
ENV = {"KEDRO_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2"}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def medians(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The median of each numeric key over ``runs`` (dicts with the same keys)."""
    keys = [k for k, v in runs[0].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: median([r[k] for r in runs]) for k in keys}


def load() -> list[float]:
    """1, 5 and 15-minute load averages: other work on the machine skews timings."""
    return [round(x, 2) for x in os.getloadavg()]


# The versions every result records; a benchmark adds those it depends on beyond these.
LIBRARIES = ("tensorflow", "keras", "kedro", "mlflow", "numpy", "scikit-learn", "headswap")
# The keys every result carries besides its figures (tests/test_docs.py checks them).
METADATA = ("benchmark", "date", "command", "machine", "versions", "load_average")


def _proc_field(path: str, name: str) -> str | None:
    """The value of the first ``name: value`` line of a /proc file (None where unreadable)."""
    try:
        with open(path) as lines:
            for line in lines:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def gpus() -> list[str]:
    """The machine's GPUs: ``nvidia-smi``'s names and memory, else the GPUs TensorFlow sees
    when a benchmark has imported it already ([] when there are none)."""
    if shutil.which("nvidia-smi"):
        try:
            found = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30, check=True).stdout
            return [", ".join(part.strip() for part in line.split(","))
                    for line in found.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    if "tensorflow" in sys.modules:
        tf = sys.modules["tensorflow"]
        return [device.name for device in tf.config.list_physical_devices("GPU")]
    return []


def machine() -> dict[str, Any]:
    """CPU model (/proc/cpuinfo), logical cores, memory (/proc/meminfo), GPUs, platform."""
    memory_kb = _proc_field("/proc/meminfo", "MemTotal")
    return {
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or None,
        "logical_cores": os.cpu_count(),
        "memory_gib": round(int(memory_kb.split()[0]) / 2**20, 1) if memory_kb else None,
        "gpu": gpus(),
        "platform": platform.platform(),
    }


def versions(libraries: Iterable[str] = ()) -> dict[str, str | None]:
    """Python's version and each installed distribution's of :data:`LIBRARIES` and
    ``libraries`` (None for one that is not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in dict.fromkeys([*LIBRARIES, *libraries]):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def this_command() -> str:
    """The command that runs this process, from the project's root, quoted for a shell."""
    script, *args = sys.argv
    path = Path(script).resolve()
    if path.is_relative_to(ROOT):
        script = str(path.relative_to(ROOT))
    return shlex.join(["python", script, *args])


def latest_model_file(path: Path) -> Path:
    """A model file, or the newest version in a Kedro-versioned folder of that name."""
    if path.is_file():
        return path
    versions = sorted(path.glob(f"*/{path.name}"))
    if not versions:
        raise SystemExit(f"{path} not found. {EXAMPLE_HINT}")
    return versions[-1]


EXAMPLE_HINT = (
    "Prepare the example first: kedro run --pipeline data && kedro run --pipeline pretrain"
)


def require_example() -> None:
    if not EXAMPLE.is_dir() or not PRETRAINED.exists():
        raise SystemExit(f"The example's image folder or base is missing. {EXAMPLE_HINT}")


def argument_parser(doc: str, repeats: int) -> argparse.ArgumentParser:
    """A benchmark's command line: described by its docstring's first line, with ``--repeats``
    (default ``repeats``); add its own options, then :func:`start`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser


def start(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, list[float]]:
    """The parsed command line and the load averages before any work, once the example's image
    folder and base are known to be there."""
    args = parser.parse_args()
    require_example()
    return args, load()


def project_parameters(section: str = "finetune") -> dict[str, Any]:
    """``params:<section>`` as ``kedro run --env example`` sees it: read by the project's own
    config loader with its settings (``CONFIG_LOADER_ARGS``: soft merges, globals), conf/base
    with conf/example (the example's folder and base)."""
    from kedro.framework.project import settings
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(ROOT)
    loader = settings.CONFIG_LOADER_CLASS(
        conf_source=str(ROOT / settings.CONF_SOURCE), env="example", **settings.CONFIG_LOADER_ARGS
    )
    return loader["parameters"][section]


def write_example_folder(out: Path, labels_per_class: int) -> Path:
    """The example's target folder with ``labels_per_class`` training images per class,
    written by the data pipeline's own node (test: all official test images)."""
    from headswap.project.datasets import ImageFolderDataset
    from headswap.project.example import target_folder

    params = project_parameters("example")
    dirs = [str(ROOT / d) if not Path(d).is_absolute() else d for d in params["fashion_mnist_dirs"]]
    files, _ = target_folder(
        {**params, "fashion_mnist_dirs": dirs, "target_path": str(out),
         "labels_per_class": labels_per_class}
    )
    ImageFolderDataset(str(out), overwrite=True).save(files)
    return out


def example_model(
    dense: Sequence[int] = (64,), dropout: float = 0.3, classes: int = 5
) -> keras.Model:
    """The example's pretrained base (its latest version) cut at its last feature map, with a
    new head of ``dense`` hidden units and ``dropout`` for ``classes`` classes."""
    from headswap.core import bases, heads

    base = bases.cut_model(bases.load_model_file(latest_model_file(PRETRAINED)))
    return heads.attach_head(base, classes, dense=list(dense), dropout=dropout)


@contextmanager
def project_copy() -> Iterator[Path]:
    """A throw-away copy of the project (conf, pyproject, src, the example's images and base)
    in which ``kedro run`` writes its versioned outputs and MLflow runs, not into the real one."""
    with tempfile.TemporaryDirectory(prefix="headswap-bench-") as tmp:
        project = Path(tmp)
        shutil.copytree(ROOT / "conf", project / "conf")
        shutil.copy(ROOT / "pyproject.toml", project)
        shutil.copytree(ROOT / "src", project / "src",
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        (project / "data" / "01_raw").mkdir(parents=True)
        (project / "data" / "01_raw" / EXAMPLE.name).symlink_to(EXAMPLE)
        base = latest_model_file(PRETRAINED)
        target = project / PRETRAINED.relative_to(ROOT) / base.parent.name / base.name
        target.parent.mkdir(parents=True)
        shutil.copy(base, target)
        yield project


@dataclass
class Measured:
    """What a finished subprocess took: wall time, its peak resident memory, its output."""

    wall_s: float
    peak_rss_mb: float
    returncode: int
    output: str = field(repr=False)

    def check(self, what: str) -> Measured:
        if self.returncode != 0:
            raise SystemExit(f"{what} failed (exit {self.returncode}):\n{self.output[-4000:]}")
        return self


def run_measured(command: Sequence[str], cwd: Path = ROOT) -> Measured:
    """Run ``command``; its wall time and peak RSS (``wait4``: of that process alone, with
    any children it waited for)."""
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        process = subprocess.Popen(
            list(command), cwd=cwd, env={**os.environ, **ENV}, stdout=log,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read().decode(errors="replace")
    # ru_maxrss is in KiB on Linux
    return Measured(wall, usage.ru_maxrss / 1024, process.returncode, output)


def kedro_command(*args: str) -> list[str]:
    """``kedro <args>``; a run is in the example's environment unless ``args`` name one."""
    env = ["--env", "example"] if args[:1] == ("run",) and "--env" not in args else []
    return [sys.executable, "-m", "kedro", *args, *env]


def finetune_command(overrides: dict[str, Any]) -> list[str]:
    """``kedro run --pipeline finetune`` with ``finetune.<key>=<value>`` for each override."""
    params = ",".join(f"finetune.{key}={value}" for key, value in overrides.items())
    return kedro_command("run", "--pipeline", "finetune", "--params", params)


def repeat(times: int, measure: Callable[[int], dict[str, Any]]) -> list[dict[str, Any]]:
    """``measure(i)`` for each repeat, with the load average when each started."""
    runs = []
    for i in range(times):
        started = load()
        runs.append({**measure(i), "load_at_start": started[0]})
        print(f"  repeat {i + 1}/{times}: "
              + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in runs[-1].items()), flush=True)
    return runs


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table; floats with 4 significant digits."""
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(items: Iterable[Any]) -> str:
        return "  ".join(str(s).rjust(w) for s, w in zip(items, widths, strict=True))

    return "\n".join([line(headers), line("-" * w for w in widths), *map(line, cells)])


def write_result(
    name: str, figures: dict[str, Any], *, command: str | None = None,
    details: dict[str, Any] | None = None, libraries: Iterable[str] = (),
    load_before: list[float] | None = None,
) -> Path:
    """Write ``benchmarks/results/<name>.json``: ``figures`` (what the benchmark found, shown
    in docs/benchmarks.md), ``details`` (the per-repeat figures behind them, in the file only),
    and where they come from: the UTC date, :func:`machine`, :func:`versions` (with the
    ``libraries`` the benchmark depends on), the load averages before (``load_before``) and
    after, and ``command`` (default: the command line of this process)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {
        "benchmark": name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command or this_command(),
        "machine": machine(),
        "versions": versions(libraries),
        "load_average": {"before": load_before, "after": load()},
        "figures": figures,
        **({"details": details} if details is not None else {}),
    }
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"written {path.relative_to(ROOT)}")
    return path


def write_results(name: str, payload: dict[str, Any], load_before: list[float]) -> Path:
    """:func:`write_result` for a benchmark that hands over one ``payload``: its per-repeat
    lists (keys ending in ``runs``) go to the details, the rest to the figures; the libraries
    of a ``machine`` entry in it are added to the versions."""
    payload = dict(payload)
    own = payload.pop("machine", None)
    libraries = list((own or {}).get("libraries") or ()) if isinstance(own, dict) else []
    details = {k: payload.pop(k) for k in list(payload) if k.endswith("runs")}
    return write_result(name, payload, details=details or None, libraries=libraries,
                        load_before=load_before)


def plain_command(
    cfg: FinetuneConfig, epochs1: int, epochs2: int, folder: Path, base: Path,
    color_mode: str = "grayscale",
) -> list[str]:
    """``benchmarks/plain_keras.py`` doing what the finetune parameters ``cfg`` ask, on
    ``folder`` with the base model file ``base``; refuses settings it does not mirror."""
    from headswap.core import LayerSelection

    head, phase1, phase2 = cfg.head, cfg.phase1, cfg.phase2
    unsupported = {
        "head.dense": head.dense if len(head.dense) != 1 else None,
        "head.pooling": head.pooling if head.pooling != "avg" else None,
        "phase1.stages": len(phase1.stages) or None,
        "phase2.stages": len(phase2.stages) or None,
        "phase1.optimizer": phase1.optimizer if phase1.optimizer not in ("adam", "rmsprop")
        else None,
        "phase1.schedule": (phase1.schedule, phase1.warmup_epochs)
        if (phase1.schedule, phase1.warmup_epochs) != ("constant", 0) else None,
        "phase2.optimizer": phase2.optimizer if phase2.optimizer != "adam" else None,
        "phase2.train": phase2.train if phase2.train != LayerSelection(all=True) else None,
        "base.source": cfg.base.source if cfg.base.source != "file" else None,
    }
    unsupported = {k: v for k, v in unsupported.items() if v is not None}
    if unsupported:
        raise SystemExit(f"The plain Keras program mirrors the example's settings only; the "
                         f"parameters set {unsupported}.")
    cut = cfg.base.cut_at
    return [
        sys.executable, str(ROOT / "benchmarks" / "plain_keras.py"),
        "--folder", str(folder), "--base", str(base), "--color-mode", color_mode,
        "--cut-at", "features" if cut == "auto" else str(cut),
        "--image-size", *map(str, cfg.data.image_size),
        "--batch-size", str(cfg.data.batch_size), "--val-fraction", str(cfg.data.val_fraction),
        "--dense", str(head.dense[0]), "--dropout", str(head.dropout),
        "--epochs1", str(epochs1), "--rate1", str(phase1.learning_rate),
        "--optimizer1", phase1.optimizer,
        "--epochs2", str(epochs2), "--rate2", str(phase2.learning_rate),
        "--warmup2", str(phase2.warmup_epochs),
        *(["--cosine2"] if phase2.schedule == "cosine" else []),
        "--seed", str(cfg.seed),
        *(["--export", *cfg.export.formats] if cfg.export.formats else []),
    ]


def node_seconds(output: str) -> dict[str, float]:
    """Seconds between each node's "Running node" and "Completed node" log lines (the log's
    timestamps have whole seconds), and the runner's own total."""
    started, spans = {}, {}
    for clock, what, node in re.findall(
        r"^(\d\d:\d\d:\d\d) .*?(Running|Completed) node: (\w+)", output, re.MULTILINE
    ):
        h, m, sec = map(int, clock.split(":"))
        at = h * 3600 + m * 60 + sec
        if what == "Running":
            started[node] = at
        elif node in started:
            spans[f"node {node}"] = float((at - started[node]) % 86400)
    total = re.search(r"Pipeline execution completed successfully in ([0-9.]+) sec", output)
    if total:
        spans["runner total"] = float(total.group(1))
    return spans


def pipeline_accuracy(output: str) -> float | None:
    found = re.findall(r"accuracy\s+([0-9.]+)\s+\d+", output)  # the classification report
    return float(found[-1]) if found else None


def alternate_with_plain(
    pipeline: list[str], plain: list[str], project: Path, repeats: int
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """:func:`measure_against_plain` ``repeats`` times: each repeat's figures, and the median
    time of each of the pipeline's nodes ({} when its log has none)."""
    nodes: list[dict[str, float]] = []

    def measure(_: int) -> dict[str, Any]:
        result, breakdown = measure_against_plain(pipeline, plain, project)
        nodes.append(breakdown)
        return result

    runs = repeat(repeats, measure)
    return runs, medians(nodes) if nodes and nodes[0] else {}


def measure_against_plain(
    pipeline: list[str], plain: list[str], project: Path
) -> tuple[dict[str, Any], dict[str, float]]:
    """Run ``pipeline`` (``kedro run`` in ``project``), then the ``plain`` Keras program; their
    wall times, ratio, test accuracies and peak RSS, and the pipeline's time per node."""
    loads = {"pipeline_load_at_start": load()[0]}
    ran = run_measured(pipeline, project).check("kedro run")
    loads["plain_keras_load_at_start"] = load()[0]
    keras_run = run_measured(plain + ["--out", str(project / "plain_keras")]).check(
        "plain Keras program")
    inside = json.loads(keras_run.output.strip().splitlines()[-1])
    nodes = node_seconds(ran.output)
    # the exports on each side: the pipeline's export_model node (exports and their check),
    # the plain program's exports by hand (the same formats, unchecked)
    exports = {"pipeline_export_s": nodes.get("node export_model", 0.0),
               "plain_keras_export_s": inside.get("export_s", 0.0)}
    return {
        "pipeline_s": ran.wall_s, "plain_keras_s": keras_run.wall_s,
        "ratio": ran.wall_s / keras_run.wall_s,
        "ratio_without_exports": (ran.wall_s - exports["pipeline_export_s"])
        / (keras_run.wall_s - exports["plain_keras_export_s"]),
        **exports,
        "difference_s": ran.wall_s - keras_run.wall_s,
        "pipeline_accuracy": pipeline_accuracy(ran.output),
        "plain_keras_accuracy": inside["test_accuracy"],
        "plain_keras_training_s": inside["phase1_s"] + inside["phase2_s"],
        # beside the pipeline's train_head and fine_tune nodes in its breakdown
        "plain_keras_phase1_s": inside["phase1_s"], "plain_keras_phase2_s": inside["phase2_s"],
        "pipeline_peak_rss_mb": ran.peak_rss_mb, "plain_keras_peak_rss_mb": keras_run.peak_rss_mb,
        **loads,
    }, nodes

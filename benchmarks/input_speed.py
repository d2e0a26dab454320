"""Images per second of the project's image input path against Keras' own, on the same files.

A folder of ``--images`` RGB JPEGs (200-500 px a side, quality 85, 10 class sub-folders) is
generated once under ``--folder``. Then, each side in its own subprocess (so that each has its
own peak RSS), alternating sides on each repeat:

* project, local: ``headswap.core.manifests.ingest_image_folder(folder)`` (lists the files, decodes
  every image once to find unreadable ones, splits), then one epoch of the training input
  (``make_dataset(manifest, "train", (160, 160), 3, batch_size=32, shuffle=True, seed=0,
  cache_bytes=0)``, iterated fully); run twice with the same, at first empty,
  ``HEADSWAP_CACHE``: the first run of a folder, whose ingest decodes every file, and a later
  run, whose ingest finds them in the memo of decodable files and only lists them (the epoch
  figure is the median over both runs);
* Keras, local: ``keras.utils.image_dataset_from_directory(folder, image_size=(160, 160),
  batch_size=32, shuffle=True, seed=0, validation_split=0.2, subset="training")`` (lists the
  files, decodes none), iterated over as many images as the project's training split has;
* both, local, epoch after epoch in one process, as a training runs: both datasets built
  once, then ``--pairs`` epochs of each, alternately; each pair's ratio (Keras' epoch time
  over the project's) compares two epochs run seconds apart, at the machine's speed of the
  moment (the same epoch's CPU time here drifts by up to half from one minute to the next);
* project, S3: the folder uploaded to moto's S3 server (setup, not timed), then the project's
  ingest + one epoch on ``s3://<bucket>/<folder>`` with an empty ``HEADSWAP_CACHE`` (cold),
  and again with the same cache (warm).

Times are taken inside each subprocess after its imports. Prints a table of the medians, the
fastest epoch of each side over all repeats and the paired ratios of the epochs in one
process; writes benchmarks/results/input_speed.json.

    python benchmarks/input_speed.py [--images 20000] [--folder /tmp/headswap-input-speed]
        [--repeats 1] [--pairs 4] [--skip-s3]
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import argument_parser, load, median, medians, run_measured, table, write_results

CLASSES = 10
IMAGE_SIZE = (160, 160)
BATCH_SIZE = 32
BUCKET = "input-speed"
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1"}
# the project's ingest splits with these (its defaults): the training split is what remains
VAL_FRACTION, TEST_FRACTION = 0.2, 0.2


# --- the image folder ---------------------------------------------------------------------


def _write_images(job: tuple[str, int, int]) -> int:
    """Write images ``start``..``stop`` (exclusive) of the folder: a class colour, a gradient,
    a few shapes and mild noise, so that the JPEGs have structure and realistic sizes."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder, start, stop = job
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        label = i % CLASSES
        width, height = (int(x) for x in rng.integers(200, 501, size=2))
        base = np.array([(label * 25) % 256, (label * 70 + 40) % 256, (label * 130 + 90) % 256])
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * x / width + np.sin(angle) * y / height)[..., None]
        pixels = base + 80 * ramp + rng.normal(0, 8, size=(height, width, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 9))):
            x0, x1 = sorted(int(v) for v in rng.integers(0, width, size=2))
            y0, y1 = sorted(int(v) for v in rng.integers(0, height, size=2))
            fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
            shape = draw.ellipse if (label + int(rng.integers(0, 3))) % 2 else draw.rectangle
            shape((x0, y0, x1 + 1, y1 + 1), fill=fill)
        target = Path(folder) / f"class_{label:02d}" / f"img_{i:06d}.jpg"
        image.save(target, "JPEG", quality=85)
    return stop - start


def image_folder(root: Path, count: int) -> Path:
    """``root/images-<count>``: ``count`` JPEGs in :data:`CLASSES` class folders, written once
    (a ``.done`` file beside it marks a complete folder)."""
    folder = root / f"images-{count}"
    done = root / f"images-{count}.done"
    if done.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for label in range(CLASSES):
        (folder / f"class_{label:02d}").mkdir(parents=True)
    print(f"Writing {count} JPEGs into {folder} (once) ...", flush=True)
    started = time.perf_counter()
    step = 500
    jobs = [(str(folder), s, min(s + step, count)) for s in range(0, count, step)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        written = sum(pool.map(_write_images, jobs))
    size = sum(f.stat().st_size for f in folder.rglob("*.jpg"))
    done.write_text(json.dumps({"images": written, "bytes": size}))
    print(f"  {written} images, {size / 2**20:.0f} MiB, in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return folder


def train_count(count: int) -> int:
    """How many images the project's training split has for ``count`` readable images
    (scikit-learn's ``train_test_split`` takes ``ceil(fraction * n)`` for the carved part)."""
    rest = count - math.ceil(TEST_FRACTION * count)
    return rest - math.ceil(VAL_FRACTION / (1 - TEST_FRACTION) * rest)


# --- the two sides, each run as a subprocess of this script ---------------------------------


def project_dataset(manifest: Any) -> Any:
    from headswap.core import data

    return data.make_dataset(manifest, "train", IMAGE_SIZE, 3, batch_size=BATCH_SIZE,
                             shuffle=True, seed=0, cache_bytes=0)


def keras_dataset(location: str, count: int) -> Any:
    import keras

    return keras.utils.image_dataset_from_directory(
        location, image_size=IMAGE_SIZE, batch_size=BATCH_SIZE, shuffle=True, seed=0,
        validation_split=0.2, subset="training", verbose=False,
    ).take(math.ceil(count / BATCH_SIZE))


def epoch(dataset: Any) -> tuple[int, float, float]:
    """One pass over ``dataset``: its images, wall and CPU seconds (to its end)."""
    started, cpu = time.perf_counter(), time.process_time()
    images = 0
    for batch, _ in dataset:
        images += int(batch.shape[0])
    return images, time.perf_counter() - started, time.process_time() - cpu


def side_project(location: str) -> dict[str, Any]:
    from headswap.core import manifests

    started, cpu = time.perf_counter(), time.process_time()
    manifest, skipped = manifests.ingest_image_folder(location)
    ingest_s, ingest_cpu_s = time.perf_counter() - started, time.process_time() - cpu
    started, cpu = time.perf_counter(), time.process_time()
    dataset = project_dataset(manifest)
    build_s, build_cpu_s = time.perf_counter() - started, time.process_time() - cpu
    images, epoch_s, epoch_cpu_s = epoch(dataset)
    # the build is part of the epoch: Keras builds its dataset in its listing
    return {"listed": len(manifest) + len(skipped), "skipped": len(skipped),
            "ingest_s": ingest_s, "ingest_cpu_s": ingest_cpu_s, "build_s": build_s,
            "epoch_images": images, "epoch_s": build_s + epoch_s,
            "epoch_cpu_s": build_cpu_s + epoch_cpu_s}


def side_keras(location: str, count: int) -> dict[str, Any]:
    started, cpu = time.perf_counter(), time.process_time()
    dataset = keras_dataset(location, count)
    listing_s, listing_cpu_s = time.perf_counter() - started, time.process_time() - cpu
    images, epoch_s, epoch_cpu_s = epoch(dataset)
    return {"listing_s": listing_s, "listing_cpu_s": listing_cpu_s, "epoch_images": images,
            "epoch_s": epoch_s, "epoch_cpu_s": epoch_cpu_s}


def side_both(location: str, count: int, pairs: int) -> dict[str, Any]:
    """Both datasets built once in one process, then ``pairs`` epochs of each, alternately
    (project first in even pairs, Keras first in odd ones), as a training runs epoch after
    epoch: each pair's two epochs run a few seconds apart, at the machine's speed of the
    moment."""
    from headswap.core import manifests

    sides = {"project": project_dataset(manifests.ingest_image_folder(location)[0]),
             "keras": keras_dataset(location, count)}
    runs: dict[str, list[dict[str, float]]] = {"project": [], "keras": []}
    for i in range(pairs):
        for side in ("project", "keras") if i % 2 == 0 else ("keras", "project"):
            images, wall, cpu = epoch(sides[side])
            runs[side].append({"images": images, "epoch_s": wall, "epoch_cpu_s": cpu})
    return runs


def worker(side: str, location: str, count: int, pairs: int) -> None:
    import tensorflow as tf  # noqa: F401 - imported before the clock starts

    if side == "both":
        result = side_both(location, count, pairs)
    else:
        result = side_project(location) if side == "project" else side_keras(location, count)
    print(json.dumps(result))


def epochs_in_one_process(folder: Path, count: int, pairs: int) -> dict[str, Any]:
    """:func:`side_both` in its own process: each side's epochs and medians, and the median
    over the pairs of Keras' epoch time over the project's (above 1: the project is faster)."""
    command = [sys.executable, __file__, "--side", "both", "--location", str(folder),
               "--count", str(count), "--pairs", str(pairs)]
    ran = run_measured(command).check("both sides in one process")
    runs = json.loads(ran.output.strip().splitlines()[-1])
    pairs_of = list(zip(runs["project"], runs["keras"], strict=True))
    result = {
        "pairs": pairs,
        "project_epoch_s": median([r["epoch_s"] for r in runs["project"]]),
        "keras_epoch_s": median([r["epoch_s"] for r in runs["keras"]]),
        "speed_ratio": median([k["epoch_s"] / p["epoch_s"] for p, k in pairs_of]),
        "cpu_ratio": median([p["epoch_cpu_s"] / k["epoch_cpu_s"] for p, k in pairs_of]),
        "runs": runs,
    }
    print(f"  {pairs} epochs of each side in one process, alternately: project median "
          f"{result['project_epoch_s']:.2f} s, Keras {result['keras_epoch_s']:.2f} s; paired "
          f"speed ratio {result['speed_ratio']:.3f}, CPU ratio {result['cpu_ratio']:.3f}",
          flush=True)
    return result


def run_side(side: str, location: str, count: int,
             env: dict[str, str] | None = None) -> dict[str, Any]:
    """One side in its own process: its figures, its peak RSS and the load when it started."""
    started_load = load()[0]
    command = [sys.executable, __file__, "--side", side, "--location", location,
               "--count", str(count)]
    with environment(env or {}):
        ran = run_measured(command).check(f"the {side} side on {location}")
    result = json.loads(ran.output.strip().splitlines()[-1])
    result.update(process_s=ran.wall_s, peak_rss_mb=ran.peak_rss_mb, load_at_start=started_load)
    if side == "project":
        result["ingest_images_per_s"] = result["listed"] / result["ingest_s"]
        result["ingest_cpu_ms_per_image"] = 1000 * result["ingest_cpu_s"] / result["listed"]
        result["total_s"] = result["ingest_s"] + result["epoch_s"]
    else:
        result["total_s"] = result["listing_s"] + result["epoch_s"]
    result["epoch_images_per_s"] = result["epoch_images"] / result["epoch_s"]
    # CPU time of the process (all its threads): what the work costs, whatever else runs
    result["epoch_cpu_ms_per_image"] = 1000 * result["epoch_cpu_s"] / result["epoch_images"]
    # the rate at which the first epoch is delivered, listing (and ingest) included
    result["total_images_per_s"] = result["epoch_images"] / result["total_s"]
    return result


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- S3 (moto's server) -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def moto_server(log: Path) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (its own process group); its endpoint URL."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("moto's server did not start:\n"
                                     + log.read_text()[-3000:]) from None
                time.sleep(0.5)
        yield endpoint
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
                server.wait()


def upload(folder: Path, endpoint: str) -> str:
    """``folder`` put into the bucket (setup, not timed in the figures); its URL."""
    import s3fs

    fs = s3fs.S3FileSystem(key=KEYS["AWS_ACCESS_KEY_ID"], secret=KEYS["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": endpoint})
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    print(f"Uploading {folder} to s3://{BUCKET}/{folder.name} (setup) ...", flush=True)
    started = time.perf_counter()
    fs.put(str(folder), f"{BUCKET}/{folder.name}", recursive=True)
    print(f"  uploaded in {time.perf_counter() - started:.0f} s", flush=True)
    return f"s3://{BUCKET}/{folder.name}"


# --- the report ------------------------------------------------------------------------------


def machine_details() -> dict[str, Any]:
    import importlib.metadata as metadata

    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as info:
        memory_kb = int(next(line for line in info if line.startswith("MemTotal")).split()[1])
    versions = {}
    for name in ("tensorflow", "keras", "numpy", "pandas", "kedro", "fsspec", "s3fs", "moto",
                 "pillow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory_kb / 2**20, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "libraries": versions}


def main() -> None:
    parser = argument_parser(__doc__, repeats=1)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/headswap-input-speed"))
    parser.add_argument("--skip-s3", action="store_true", help="measure the local sides only")
    parser.add_argument("--pairs", type=int, default=4,
                        help="epochs of each side in one process, alternately")
    parser.add_argument("--side", choices=["project", "keras", "both"], help=argparse_hidden())
    parser.add_argument("--location", help=argparse_hidden())
    parser.add_argument("--count", type=int, default=0, help=argparse_hidden())
    args = parser.parse_args()
    if args.side:
        worker(args.side, args.location, args.count, args.pairs)
        return
    before = load()
    started_date = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    args.folder.mkdir(parents=True, exist_ok=True)
    folder = image_folder(args.folder, args.images)
    count = train_count(args.images)
    print(f"{args.images} images in {CLASSES} classes; the project's training split: {count} "
          f"images; {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}x3, batch size {BATCH_SIZE}, "
          f"{args.repeats} repeats; load average {before}", flush=True)

    local: list[dict[str, Any]] = []
    for i in range(args.repeats):
        # the project's first ingest of the folder decodes every file (an empty memo of
        # decodable files); its later ingests (the memo kept) only list them
        with tempfile.TemporaryDirectory(prefix="headswap-memo-") as memo:
            env = {"HEADSWAP_CACHE": memo}
            if i % 2 == 0:
                runs = {"project": run_side("project", str(folder), count, env),
                        "project_later": run_side("project", str(folder), count, env),
                        "keras": run_side("keras", str(folder), count)}
            else:
                runs = {"keras": run_side("keras", str(folder), count),
                        "project": run_side("project", str(folder), count, env),
                        "project_later": run_side("project", str(folder), count, env)}
        project, later, keras_side = runs["project"], runs["project_later"], runs["keras"]
        if project["epoch_images"] != count:
            print(f"  note: the project's epoch had {project['epoch_images']} images, "
                  f"not {count}", flush=True)
        row = {f"project_{k}": v for k, v in project.items()}
        row.update({f"later_{k}": v for k, v in later.items()})
        row.update({f"keras_{k}": v for k, v in keras_side.items()})
        keras_rate = keras_side["epoch_images_per_s"]
        row["epoch_ratio"] = median([project["epoch_images_per_s"],
                                     later["epoch_images_per_s"]]) / keras_rate
        row["total_ratio"] = project["total_images_per_s"] / keras_side["total_images_per_s"]
        row["later_total_ratio"] = later["total_images_per_s"] / keras_side["total_images_per_s"]
        local.append(row)
        print(f"  local repeat {i + 1}/{args.repeats}: project first ingest "
              f"{project['ingest_s']:.1f} s + epoch {project['epoch_s']:.1f} s, later ingest "
              f"{later['ingest_s']:.1f} s + epoch {later['epoch_s']:.1f} s; Keras listing "
              f"{keras_side['listing_s']:.1f} s + epoch {keras_side['epoch_s']:.1f} s; "
              f"epoch ratio {row['epoch_ratio']:.3f}", flush=True)

    in_process = epochs_in_one_process(folder, count, args.pairs)

    remote: list[dict[str, Any]] = []
    upload_s = None
    if not args.skip_s3:
        with tempfile.TemporaryDirectory(prefix="headswap-s3-") as tmp, \
                moto_server(Path(tmp) / "moto.log") as endpoint:
            started = time.perf_counter()
            url = upload(folder, endpoint)
            upload_s = time.perf_counter() - started
            for i in range(args.repeats):
                cache = Path(tmp) / f"cache-{i}"
                env = {**KEYS, "AWS_ENDPOINT_URL": endpoint, "HEADSWAP_CACHE": str(cache)}
                cold = run_side("project", url, count, env)
                warm = run_side("project", url, count, env)
                row = {f"cold_{k}": v for k, v in cold.items()}
                row.update({f"warm_{k}": v for k, v in warm.items()})
                remote.append(row)
                print(f"  S3 repeat {i + 1}/{args.repeats}: cold ingest {cold['ingest_s']:.1f} s"
                      f" + epoch {cold['epoch_s']:.1f} s; warm ingest {warm['ingest_s']:.1f} s"
                      f" + epoch {warm['epoch_s']:.1f} s", flush=True)
                shutil.rmtree(cache, ignore_errors=True)

    m = medians(local)
    m["epoch_cpu_ratio"] = median([m["project_epoch_cpu_ms_per_image"],
                                   m["later_epoch_cpu_ms_per_image"]]) / m[
                                       "keras_epoch_cpu_ms_per_image"]
    # the machine's speed drifts from one minute to the next: the fastest epoch of each side
    # over all repeats compares them when both ran unhindered, as timeit's minimum does
    fastest_project = min(min(row["project_epoch_s"], row["later_epoch_s"]) for row in local)
    fastest_keras = min(row["keras_epoch_s"] for row in local)
    m["fastest_project_epoch_s"], m["fastest_keras_epoch_s"] = fastest_project, fastest_keras
    m["fastest_epoch_ratio"] = fastest_keras / fastest_project
    r = medians(remote) if remote else {}
    rows = [
        *project_rows(m, "project", "project local, first run", m["total_ratio"]),
        *project_rows(m, "later", "project local, later run", m["later_total_ratio"]),
        ["Keras local: listing", m["keras_listing_s"], "", "", "", m["keras_peak_rss_mb"],
         m["keras_load_at_start"]],
        ["Keras local: epoch", m["keras_epoch_s"], m["keras_epoch_images_per_s"], 1.0,
         m["keras_epoch_cpu_ms_per_image"], "", ""],
        ["Keras local: listing + epoch", m["keras_total_s"], m["keras_total_images_per_s"],
         1.0, "", "", ""],
    ]
    summary: dict[str, Any] = {"local": m, "in_one_process": {
        k: v for k, v in in_process.items() if k != "runs"}}
    if r:
        for phase in ("cold", "warm"):
            epoch_vs_local = r[f"{phase}_epoch_images_per_s"] / m["project_epoch_images_per_s"]
            total_vs_local = r[f"{phase}_total_images_per_s"] / m["project_total_images_per_s"]
            r[f"{phase}_epoch_vs_local"] = epoch_vs_local
            r[f"{phase}_total_vs_local"] = total_vs_local
            rows += [
                [f"project S3 {phase}: ingest", r[f"{phase}_ingest_s"],
                 r[f"{phase}_ingest_images_per_s"], "", r[f"{phase}_ingest_cpu_ms_per_image"],
                 r[f"{phase}_peak_rss_mb"], r[f"{phase}_load_at_start"]],
                [f"project S3 {phase}: epoch", r[f"{phase}_epoch_s"],
                 r[f"{phase}_epoch_images_per_s"], f"{epoch_vs_local:.4g} (x local)",
                 r[f"{phase}_epoch_cpu_ms_per_image"], "", ""],
                [f"project S3 {phase}: ingest + epoch", r[f"{phase}_total_s"],
                 r[f"{phase}_total_images_per_s"], f"{total_vs_local:.4g} (x local)", "", "",
                 ""],
            ]
        summary["s3"] = r
    print(f"\nMedians of {args.repeats} repeat(s); images/s: ingest over all {args.images} "
          f"images, epoch and totals over the {count} training images. Ratio: x Keras' "
          "figure unless marked. CPU: the process's CPU time (all threads) per image. Load: "
          "1-minute load average when the side started.")
    print(table(["", "seconds", "images/s", "ratio", "CPU ms/image", "peak RSS MiB",
                 "load at start"], rows))
    print(f"epoch CPU per image, project / Keras: {m['epoch_cpu_ratio']:.3f}")
    print(f"fastest epoch of {args.repeats} repeat(s): project {fastest_project:.2f} s, Keras "
          f"{fastest_keras:.2f} s, ratio {m['fastest_epoch_ratio']:.3f}")
    print(f"epoch after epoch in one process ({args.pairs} of each, alternately): project "
          f"{in_process['project_epoch_s']:.2f} s, Keras {in_process['keras_epoch_s']:.2f} s "
          f"(medians); paired speed ratio {in_process['speed_ratio']:.3f}, CPU ratio "
          f"{in_process['cpu_ratio']:.3f}")
    goals = {"local_epoch_at_least_keras": m["epoch_ratio"] >= 1.0,
             "local_fastest_epoch_at_least_keras": m["fastest_epoch_ratio"] >= 1.0,
             "local_epoch_cpu_at_most_keras": m["epoch_cpu_ratio"] <= 1.0,
             "local_later_ingest_plus_epoch_at_least_keras": m["later_total_ratio"] >= 1.0,
             "local_first_ingest_plus_epoch_at_least_keras": m["total_ratio"] >= 1.0,
             "local_epochs_in_one_process_at_least_keras": in_process["speed_ratio"] >= 1.0}
    if r:
        goals["warm_s3_epoch_within_10pct_of_local"] = r["warm_epoch_vs_local"] >= 1 / 1.1
    print("goals: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in goals.items()))
    write_results("input_speed", {
        "started": started_date, "machine": machine_details(),
        "images": args.images, "training_images": count, "classes": CLASSES,
        "image_size": list(IMAGE_SIZE), "batch_size": BATCH_SIZE, "repeats": args.repeats,
        "folder": str(folder), "s3_upload_s": upload_s, "medians": summary, "goals": goals,
        "epochs_in_one_process": in_process, "local_runs": local, "s3_runs": remote,
    }, before)


def project_rows(m: dict[str, float], side: str, label: str,
                 total_ratio: float) -> list[list[Any]]:
    """The table's ingest, epoch and ingest + epoch rows of one run of the project's side
    (``side``: the prefix of its figures in ``m``)."""
    return [
        [f"{label}: ingest", m[f"{side}_ingest_s"], m[f"{side}_ingest_images_per_s"], "",
         m[f"{side}_ingest_cpu_ms_per_image"], m[f"{side}_peak_rss_mb"],
         m[f"{side}_load_at_start"]],
        [f"{label}: epoch", m[f"{side}_epoch_s"], m[f"{side}_epoch_images_per_s"],
         m[f"{side}_epoch_images_per_s"] / m["keras_epoch_images_per_s"],
         m[f"{side}_epoch_cpu_ms_per_image"], "", ""],
        [f"{label}: ingest + epoch", m[f"{side}_total_s"], m[f"{side}_total_images_per_s"],
         total_ratio, "", "", ""],
    ]


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()

"""Memory: peak resident memory of every stage at the quick start's sizes, and of the
distance stage as the training set grows.

Each stage runs as its own process through its entry script, in a scratch folder, on the
quick start's model and sample sizes (configs/quickstart.yaml: 16x16 Fashion-MNIST,
dim 32, 128 DDIM samples, K = 1024) with few training steps, because memory does not grow
with the number of steps. Two numbers are read from /proc/<pid>/status, polled every
20 ms while the process runs:

- peak RSS: `VmHWM`, the kernel's high-water mark of the resident memory, which includes
  the file pages the process maps (shared libraries such as torch's, and the
  memory-mapped embedding cache of the distance stage). It misses only growth in the
  last poll interval before the exit;
- peak anonymous RSS: the largest `RssAnon` seen, memory that the kernel cannot drop
  without swap. Sampling may miss a peak that lasts less than the polling interval.

`ru_maxrss` from `wait4` would not do here. A child started by a large parent process
(run_all.py runs the training benchmark in process) inherits the parent's high-water mark
through fork and exec.

A process that only imports torch and memgen gives the floor that every stage pays.

The distance stage then runs on the same 128 samples against N and 4N training images
(N = 1024), both with `--memory-gb 0.0625` and an empty embedding cache. Its anonymous
memory should stay nearly flat, because the search works in tiles of that size and the
training embedding goes to a memory-mapped file.

    python benchmarks/bench_memory.py              # K = 1024, distances at 1024 and 4096
    python benchmarks/bench_memory.py --quick      # K = 256, distances at 256 and 1024
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from timing import REPO, Row, format_table, machine_description

MIB = 1024 * 1024
DISTANCE_MEMORY_GB = 0.0625
POLL_SECONDS = 0.02


@dataclass
class PeakMemory:
    """Peak memory of one finished process, in bytes, and its wall time in seconds."""

    max_rss: int
    max_anonymous: int
    seconds: float


def read_memory_status(pid: int) -> tuple[int, int]:
    """Return (VmHWM, RssAnon) of a running process in bytes; (0, 0) once it has exited."""
    values = {"VmHWM:": 0, "RssAnon:": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(maxsplit=1)[0] if line else ""
            if key in values:
                values[key] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return values["VmHWM:"], values["RssAnon:"]


def run_measured(command: list[str], log_path: Path, environment: dict | None = None) -> PeakMemory:
    """Run `command` in the repository root, poll its memory until it exits and return the peaks.

    Raises RuntimeError, with the end of its log, when the process fails.
    """
    started = time.perf_counter()
    peak_rss, peak_anonymous = 0, 0
    with open(log_path, "w") as log:
        # Popen returns after the exec, so every poll reads the new program's memory.
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(environment or {})})
        while process.poll() is None:
            high_water, anonymous = read_memory_status(process.pid)
            peak_rss, peak_anonymous = max(peak_rss, high_water), max(peak_anonymous, anonymous)
            time.sleep(POLL_SECONDS)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}; end of its log:\n{tail}")
    return PeakMemory(max_rss=peak_rss, max_anonymous=peak_anonymous, seconds=seconds)


def quickstart_sections(work: Path, data_path: str) -> Path:
    """Write the data, train and model sections of configs/quickstart.yaml as a training config."""
    config = yaml.safe_load((REPO / "configs/quickstart.yaml").read_text())
    training = {name: config[name] for name in ("data", "train", "model")}
    training["data"]["data_path"] = data_path
    path = work / "train.yaml"
    path.write_text(yaml.safe_dump(training))
    return path


def write_references(work: Path, data_path: str, image_size: int) -> Path:
    """Write 8 Fashion-MNIST test images as the energy stage's references."""
    from memgen.data import load_dataset, load_images
    from memgen.files import save_npz

    test_set = load_dataset("fashionmnist", data_path, image_size=image_size, train=False)
    path = work / "references.npz"
    save_npz(path, meta={"data_name": "fashionmnist", "split": "test", "indices": list(range(8))},
             images=load_images(test_set, list(range(8))).numpy())
    return path


def with_train_size(sample_file: Path, train_size: int, folder: Path) -> Path:
    """Copy a sample file to `<folder>/<train_size>.npz` with its metadata's train_size replaced."""
    from memgen.files import load_npz, read_meta, save_npz

    arrays = load_npz(sample_file, required=["samples"])
    meta = read_meta(arrays, sample_file)
    meta["train_size"] = train_size
    folder.mkdir(parents=True, exist_ok=True)
    return save_npz(folder / f"{train_size}.npz", meta=meta, samples=arrays["samples"])


def stage_commands(work: Path, data_path: str, train_size: int, config: Path, references: Path) -> list[tuple[str, list[str]]]:
    """Return (stage, command) for every stage, in pipeline order, each reading the previous outputs."""
    python = sys.executable
    checkpoints, samples = work / "checkpoints", work / "samples"
    return [
        ("import torch + memgen", [python, "-c", "import torch, memgen.unet, memgen.sampling"]),
        ("train", [python, "train_unet.py", "--config_path", str(config), "--train-size", str(train_size),
                   "--iterations", "10", "--log-every", "5", "--ckpt-every", "10", "--grid-samples", "0",
                   "--results-path", str(work / "train"), "--final-ckpt-dir", str(checkpoints), "--device", "cpu"]),
        ("generate", [python, "run_generate.py", "--ckpt-path", str(checkpoints / f"{train_size}.pt"),
                      "--result-path", str(samples), "--num-samples", "128", "--batch-size", "128",
                      "--sampler", "ddim", "--steps", "50", "--device", "cpu"]),
        ("distances", [python, "run_distances.py", "--synth-path", str(samples), "--data-path", data_path,
                       "--result-path", str(work / "distances"), "--device", "cpu"]),
        ("classify", [python, "run_classify.py", "--dist-path", str(work / "distances"), "--eval-path", str(samples),
                      "--data-path", data_path, "--result-path", str(work / "classify"), "--device", "cpu"]),
        ("critical times", [python, "run_critical_times.py", "--ckpt-path", str(checkpoints), "--data-path", data_path,
                            "--result-path", str(work / "critical_times"), "--sample-size", "8", "--p-trials", "4",
                            "--stride", "50", "--ddim-steps", "10", "--device", "cpu"]),
        ("energy", [python, "run_energy.py", "--ref-path", str(references), "--ckpt-path", str(checkpoints),
                    "--data-path", data_path, "--result-path", str(work / "energy"), "--sample-size", "8",
                    "--device", "cpu"]),
    ]


def stage_rows(work: Path, data_path: str, train_size: int) -> tuple[list[Row], Path]:
    """Measure every stage; return the rows and the sample file for the scaling runs."""
    config = quickstart_sections(work, data_path)
    references = write_references(work, data_path, image_size=16)
    environment = {"MEMGEN_CACHE": str(work / "cache")}
    rows = []
    for stage, command in stage_commands(work, data_path, train_size, config, references):
        peak = run_measured(command, work / f"{stage.replace(' ', '_')}.log", environment)
        rows.append(Row(stage="memory", measure=f"peak RSS, {stage}", memgen=f"{peak.max_rss / MIB:.0f} MiB",
                        alternative="", ratio=None, target="report (no target)",
                        note=f"peak anonymous RSS {peak.max_anonymous / MIB:.0f} MiB; {peak.seconds:.0f} s; "
                             f"K = {train_size}, 128 samples"))
    return rows, work / "samples" / f"{train_size}.npz"


def scaling_row(work: Path, data_path: str, sample_file: Path, base_size: int) -> Row:
    """Run the distance stage against N and 4N training images with the same --memory-gb; return one row."""
    peaks = {}
    for size in (base_size, 4 * base_size):
        folder = work / f"scaling-{size}"
        with_train_size(sample_file, size, folder / "samples")
        command = [sys.executable, "run_distances.py", "--synth-path", str(folder / "samples"),
                   "--data-path", data_path, "--result-path", str(folder / "distances"),
                   "--memory-gb", str(DISTANCE_MEMORY_GB), "--device", "cpu"]
        peaks[size] = run_measured(command, folder / "distances.log", {"MEMGEN_CACHE": str(folder / "cache")})
    small, large = peaks[base_size], peaks[4 * base_size]
    growth = large.max_anonymous / small.max_anonymous
    return Row(
        stage="memory", measure=f"distances at N = {base_size} and 4N = {4 * base_size} training images, "
                                f"--memory-gb {DISTANCE_MEMORY_GB}",
        memgen=f"4N: anon {large.max_anonymous / MIB:.0f} MiB, RSS {large.max_rss / MIB:.0f} MiB",
        alternative=f"N: anon {small.max_anonymous / MIB:.0f} MiB, RSS {small.max_rss / MIB:.0f} MiB",
        ratio=growth, target="anon(4N)/anon(N) <= 1.25", met=growth <= 1.25,
        note=f"peak RSS ratio {large.max_rss / small.max_rss:.2f} (includes the mapped embedding file); "
             f"{small.seconds:.0f} s and {large.seconds:.0f} s")


def run(quick: bool = False, data_path: str = "data", work_path: str | None = None) -> list[Row]:
    """Run the memory benchmark and return its table rows."""
    train_size = 256 if quick else 1024
    data_path = str(Path(data_path).resolve())
    with tempfile.TemporaryDirectory(prefix="memgen-bench-memory-") as scratch:
        work = Path(work_path) if work_path else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        rows, sample_file = stage_rows(work, data_path, train_size)
        rows.append(scaling_row(work, data_path, sample_file, train_size))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="K = 256 instead of 1024")
    parser.add_argument("--data-path", default="data", help="dataset root holding FashionMNIST/raw (default: data)")
    parser.add_argument("--work-path", default=None, help="keep the stages' outputs and logs here (default: a temporary folder)")
    args = parser.parse_args()
    print(machine_description())
    print(format_table(run(args.quick, args.data_path, args.work_path)))


if __name__ == "__main__":
    main()

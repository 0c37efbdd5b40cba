"""report.md of the quick-start pipeline: phase table, figures, critical times, energies, timings."""

import dataclasses
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from memgen import __version__
from memgen.files import atomic_path, load_npz

CLASSES = ("memorized", "spurious", "generalized")

# Fashion-MNIST settings of Pham et al. 2025 (arXiv:2505.21777), for the report's comparison table.
PAPER_SETTINGS = {
    "image size": "28 x 28",
    "UNet": "dim 128, mults 1,2,2, 2 res blocks, dropout 0.1 (24.5M parameters)",
    "iterations": "400,000, batch 128, EMA 0.9999",
    "prediction": "epsilon (the noise)",
    "K": "38 sizes from 2 to 60,000",
    "samples per K": "10,000, DDPM 1000 steps",
    "distance": "LPIPS alex, k = 5",
    "thresholds": "delta_m 0.03, delta_s 0.02",
}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_description(device: torch.device) -> str:
    """Describe the machine and device in one line."""
    if device.type == "cuda":
        accelerator = torch.cuda.get_device_name(device.index or 0)
    else:
        accelerator = "no GPU"
    return (f"{_cpu_name()}, {os.cpu_count()} cores, {accelerator}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, memgen {__version__}")


def read_summary(classify_dir: Path) -> list[dict]:
    path = classify_dir / "summary.json"
    if not path.is_file():
        return []
    content = json.loads(path.read_text())
    rows = content["rows"] if isinstance(content, dict) else content
    return sorted(rows, key=lambda row: int(row["K"]))


def check_targets(rows: list[dict]) -> list[tuple[str, bool, str]]:
    """Check the quick start's three targets on the phase table; return (target, met, measured)."""
    if len(rows) < 2:
        return []
    first, last = rows[0], rows[-1]
    spurious = [float(row["spurious_fraction"]) for row in rows]
    peak = int(np.argmax(spurious))
    return [
        (f"at the smallest K ({first['K']}) at least 90 % memorized",
         float(first["memorized_fraction"]) >= 0.9, f"{100 * float(first['memorized_fraction']):.1f} %"),
        (f"at the largest K ({last['K']}) at most 10 % memorized",
         float(last["memorized_fraction"]) <= 0.1, f"{100 * float(last['memorized_fraction']):.1f} %"),
        ("spurious fraction highest at an intermediate K",
         0 < peak < len(rows) - 1 and spurious[peak] > 0,
         f"highest at K = {rows[peak]['K']} ({100 * spurious[peak]:.1f} %)"),
    ]


def _class_results(result: Path, stage: str, key: str):
    """Yield (class, K, arrays) for every non-empty `<result>/<stage>/<class>/<K>.npz`, sorted by class and K."""
    for name in CLASSES:
        paths = [path for path in (result / stage / name).glob("*.npz") if path.stem.isdigit()]
        for path in sorted(paths, key=lambda p: int(p.stem)):
            arrays = load_npz(path, required=[key])
            if arrays[key].size:
                yield name, int(path.stem), arrays


def critical_time_table(result: Path) -> list[str]:
    """Return markdown rows: mean critical time (and radius) per class and K."""
    lines = []
    for name, k, arrays in _class_results(result, "critical_times", "time"):
        times = arrays["time"].astype(np.float64)
        lines.append(f"| {name} | {k} | {times.shape[0]} | {times.mean():.1f} | "
                     f"{np.median(times):.0f} | {arrays['radius'].astype(np.float64).mean():.2f} |")
    return lines


def energy_table(result: Path) -> list[str]:
    """Return markdown rows: mean and spread of the relative energy per class and K."""
    lines = []
    for name, k, arrays in _class_results(result, "energy", "potential"):
        potential = arrays["potential"].astype(np.float64)
        lines.append(f"| {name} | {k} | {potential.shape[1]} | {potential.mean():.4g} | {potential.std():.3g} |")
    return lines


def thresholds_text(rows: list[dict], options) -> str:
    """Describe the thresholds the classification used, with the calibration rule when there was one."""
    if not rows:
        return f"delta_m {options.delta_m}, delta_s {options.delta_s}"
    first = rows[0]
    text = f"delta_m {float(first['delta_m']):.4g}, delta_s {float(first['delta_s']):.4g}"
    if first.get("calibration"):
        text += f" (calibrated: {first['calibration']})"
    return text


def _settings_rows(train, model, options, rows: list[dict]) -> list[str]:
    ours = {
        "image size": f"{model.image_size} x {model.image_size}",
        "UNet": (f"dim {model.dim}, mults {','.join(map(str, model.dim_mults))}, {model.num_res_blocks} res "
                 f"block(s), dropout {model.dropout}"),
        "iterations": f"{train.iterations:,}, batch {train.global_batch_size}, EMA {train.ema_decay}",
        "prediction": "x0 (the image)" if train.prediction_type == "sample" else "epsilon (the noise)",
        "K": ", ".join(str(k) for k in sorted(options.train_sizes)),
        "samples per K": (f"{options.num_samples}, "
                          + (f"DDIM {options.sampler_steps} steps" if options.sampler == "ddim"
                             else "DDPM 1000 steps")),
        "distance": f"{'LPIPS ' + options.network if options.metric == 'lpips' else 'L2'}, k = {options.k}",
        "thresholds": thresholds_text(rows, options),
    }
    return [f"| {key} | {ours[key]} | {PAPER_SETTINGS[key]} |" for key in PAPER_SETTINGS]


def _figure(result: Path, path: Path, caption: str) -> list[str]:
    if not path.is_file():
        return []
    return [f"![{caption}]({path.relative_to(result).as_posix()})", ""]


def write_report(result: Path, data, train, model, options, timings: dict, device: torch.device) -> Path:
    """Write `<result>/report.md` from the stage outputs and return its path."""
    classify_dir = result / "classify"
    rows = read_summary(classify_dir)
    lines = [
        "# memgen quick start: memorization to generalization on Fashion-MNIST",
        "",
        f"Written {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} by `{' '.join(sys.argv) or 'run_pipeline.py'}`.",
        f"Machine: {machine_description(device)}.",
        "",
        "## Phase table",
        "",
        "A sample is memorized when its nearest training image is within delta_m, spurious when it is not "
        "memorized but another sample is within delta_s, and generalized otherwise "
        f"({options.metric.upper() if options.metric == 'l2' else 'LPIPS ' + options.network}; "
        f"{thresholds_text(rows, options)}).",
        "",
        "| K | samples | memorized | spurious | generalized |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(f"| {row['K']} | {row['num_samples']} | {100 * float(row['memorized_fraction']):.1f} % | "
                     f"{100 * float(row['spurious_fraction']):.1f} % | "
                     f"{100 * float(row['generalized_fraction']):.1f} % |")
    lines.append("")
    targets = check_targets(rows)
    if targets:
        lines += ["Targets of the quick start:", ""]
        lines += [f"- {'met' if met else 'MISSED'}: {target} (measured {measured})"
                  for target, met, measured in targets]
        lines.append("")
    lines += _figure(result, classify_dir / "fractions.png", "class fractions against K")

    lines += ["## Samples beside their nearest training images and samples", ""]
    for name in CLASSES:
        for row in rows:
            if int(row[name]) == 0:
                continue
            lines += [f"{name}, K = {row['K']} ({row[name]} samples):", ""]
            lines += _figure(result, classify_dir / "grids" / f"{name}-{row['K']}.png",
                             f"{name} samples at K = {row['K']}")

    lines += ["## Critical times (basins of attraction)", "",
              "Largest noise step from which a DDIM denoiser still returns the image within the recovery "
              f"threshold ({options.critical_delta}, {options.metric}), per image and trial.", "",
              "| class | K | images | mean critical time | median | mean radius |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += critical_time_table(result)
    lines.append("")
    for name in CLASSES:
        lines += _figure(result, result / "critical_times" / name / "critical_times.png",
                         f"critical times of {name} samples")

    lines += ["## Relative energy", "",
              f"Energy of {options.energy_references} held-out test images relative to each sample: "
              "u(reference) - u(sample), integrated along the quarter circle between them at t = 0. "
              "A larger value means the sample sits deeper in the learned landscape.", "",
              "| class | K | samples | mean | std |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += energy_table(result)
    lines.append("")

    lines += ["## Settings against the paper's", "", "| setting | this run | paper (Fashion-MNIST) |",
              "| --- | --- | --- |"]
    lines += _settings_rows(train, model, options, rows)
    lines += ["", "The quick start is a small-scale rerun sized for a CPU in minutes: smaller images, a smaller "
              "UNet trained for far fewer steps, few K, few samples and DDIM sampling. The fractions show the "
              "same transition, not the paper's numbers. x0 prediction lets the small UNet memorize a few "
              "images within the step budget, and the thresholds are calibrated because at this image size "
              "the paper's LPIPS values call most samples of any model memorized. DDIM and DDPM samples of "
              "the same model can fall into different classes (BENCHMARKS.md measures how far), so compare "
              "with the paper's numbers only under `--sampler ddpm`.", ""]

    lines += ["## Wall time of this run", "", "| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in timings.items()]
    lines.append("")
    lines += ["Configuration of this run:", "", "```json",
              json.dumps({"data": dataclasses.asdict(data), "train": dataclasses.asdict(train),
                          "model": dataclasses.asdict(model), "pipeline": dataclasses.asdict(options)}, indent=1),
              "```", ""]

    path = result / "report.md"
    with atomic_path(path) as temporary:
        temporary.write_text("\n".join(lines))
    return path

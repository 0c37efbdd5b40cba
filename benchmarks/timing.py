"""Helpers shared by the benchmark scripts: interleaved timing, result rows and the table.

Timings on a shared machine drift with the load of other processes, so the benchmarks
time the methods they compare in alternating order within one run (A B, B A, A B, ...)
and report the median of each. Ratios of medians measured this way are far steadier than
single timings.
"""

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def synchronize() -> None:
    """Wait for queued CUDA work, so that wall-clock times include it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_seconds(functions: dict[str, Callable[[], object]], repeats: int,
                        warmup: int = 1) -> dict[str, list[float]]:
    """Time each function `repeats` times, alternating the order every round.

    Every function first runs `warmup` times untimed. Round r runs the functions in the
    given order for even r and in reverse order for odd r. Returns the seconds of each run.
    """
    for function in functions.values():
        for _ in range(warmup):
            function()
    seconds = {name: [] for name in functions}
    names = list(functions)
    for round_index in range(repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            synchronize()
            started = time.perf_counter()
            functions[name]()
            synchronize()
            seconds[name].append(time.perf_counter() - started)
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """Return the median, minimum and maximum of numerator[r] / denominator[r] over rounds r.

    Both runs of a round see nearly the same machine load, so the ratio within a round
    varies less than either timing across rounds.
    """
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return statistics.median(ratios), min(ratios), max(ratios)


@dataclass
class Row:
    """One line of the benchmark table: a measure of memgen against an alternative.

    `ratio` is memgen's value over the alternative's, oriented so that above 1 favours
    memgen (for example memgen's steps per second over the alternative's, or the
    alternative's seconds over memgen's). `target` is the condition stated for the ratio,
    and `met` is None where no target applies.
    """

    stage: str
    measure: str
    memgen: str
    alternative: str
    ratio: float | None
    target: str = ""
    met: bool | None = None
    note: str = ""


def format_table(rows: list[Row]) -> str:
    """Return the rows as a Markdown table."""
    header = ["stage", "measure", "memgen", "alternative", "ratio", "target", "met", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.3g}"
        met = "" if row.met is None else ("yes" if row.met else "NO")
        cells = [row.stage, row.measure, row.memgen, row.alternative, ratio, row.target, met, row.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_description() -> str:
    """Return the CPU model, core count, torch version and accelerator of this machine."""
    import os
    import platform

    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{model}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, {accelerator}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")

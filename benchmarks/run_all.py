"""Run every memgen benchmark and print one table of measured ratios against their targets.

Stages: train (bench_train.py), sample (bench_sampling.py), basins (bench_basins.py),
distances (bench_distances.py, run as its own process) and memory (bench_memory.py).
A stage that fails gets a row saying so, the others still run, and the exit status is 1.

    python benchmarks/run_all.py                  # full sizes; 20 minutes with --threads 1 on 2 cores
    python benchmarks/run_all.py --quick          # small sizes
    python benchmarks/run_all.py --stages train basins --output bench.md
    python benchmarks/run_all.py --ckpt-path results/quickstart/checkpoints

With --ckpt-path (default: results/quickstart/checkpoints when it exists) the sampling
stage compares the class fractions of DDIM and DDPM samples of those models, and the
basin stage also runs on them. On the four quick-start models this added 24 and 19
minutes on 2 cores with --threads 1.
"""

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from timing import REPO, Row, format_table, machine_description

STAGES = ("train", "sample", "basins", "distances", "memory")
QUICKSTART_CHECKPOINTS = REPO / "results" / "quickstart" / "checkpoints"
# A baseline's line of bench_distances.py's table: name, samples run, wall s, CPU s,
# wall s for all samples, CPU s for all, x wall, x CPU (times over memgen's).
BASELINE_LINE = re.compile(r"^(lpips\.LPIPS per pair|paper's scheme)\s+\d+(?:\s+[\d.,]+){4}\s+([\d.,]+)\s+([\d.,]+)",
                           re.MULTILINE)


def distance_rows(quick: bool, device: str, data_path: str) -> list[Row]:
    """Run bench_distances.py as a process, echo its output and turn its two baseline lines into rows."""
    command = [sys.executable, str(REPO / "benchmarks" / "bench_distances.py"), "--data-path", data_path,
               "--device", device]
    if quick:
        command += ["--num-samples", "256", "--num-train", "256", "--pair-samples", "4", "--paper-samples", "32",
                    "--repeats", "2"]
    if os.environ.get("OMP_NUM_THREADS"):
        command += ["--threads", os.environ["OMP_NUM_THREADS"]]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    print(completed.stdout, end="")
    if completed.returncode != 0:
        raise RuntimeError(f"bench_distances.py exited with {completed.returncode}: {completed.stderr[-2000:]}")
    found = {name: (float(wall.replace(",", "")), float(cpu.replace(",", "")))
             for name, wall, cpu in BASELINE_LINE.findall(completed.stdout)}
    if len(found) != 2:
        raise RuntimeError("bench_distances.py printed no table lines for 'lpips.LPIPS per pair' and "
                           "\"paper's scheme\"; its output format changed, so update BASELINE_LINE in run_all.py")
    size = "256 x 256" if quick else "default sizes"
    rows = []
    for name in ("lpips.LPIPS per pair", "paper's scheme"):
        wall, cpu = found[name]
        rows.append(Row(stage="distances", measure=f"time of LPIPS k-NN, {size}",
                        memgen="embed once + tiled exact search", alternative=f"{name} (extrapolated)",
                        ratio=wall, target="memgen faster (> 1)", met=wall > 1,
                        note=f"wall-time ratio; CPU-time ratio {cpu:g}; timings in bench_distances.py's output"))
    return rows


def run_stage(stage: str, args: argparse.Namespace) -> list[Row]:
    ckpt_path = args.ckpt_path
    if stage == "train":
        import bench_train
        return bench_train.run(quick=args.quick, device=args.device, speed_options=True)
    if stage == "sample":
        import bench_sampling
        return bench_sampling.run(quick=args.quick, device=args.device, ckpt_path=ckpt_path,
                                  data_path=args.data_path)
    if stage == "basins":
        import bench_basins
        return bench_basins.run(quick=args.quick, device=args.device, data_path=args.data_path, ckpt_path=ckpt_path)
    if stage == "distances":
        return distance_rows(args.quick, args.device, args.data_path)
    import bench_memory
    return bench_memory.run(quick=args.quick, data_path=args.data_path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats in every stage")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="stages to run (default: all)")
    parser.add_argument("--device", default="cpu", help="torch device of the speed stages (default: cpu)")
    parser.add_argument("--data-path", default="data", help="dataset root holding FashionMNIST/raw (default: data)")
    parser.add_argument("--ckpt-path", default=None,
                        help="folder of trained checkpoints <K>.pt for the class-fraction and basin comparisons "
                             "(default: results/quickstart/checkpoints when it exists)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads here and OMP_NUM_THREADS of the stage processes; 0 keeps the "
                             "default (one per core). On a CPU shared with other busy processes, 1 avoids "
                             "threads waiting for each other and gives steadier timings")
    parser.add_argument("--output", default=None, help="also write the table (Markdown) to this file")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.ckpt_path is None and QUICKSTART_CHECKPOINTS.is_dir():
        args.ckpt_path = str(QUICKSTART_CHECKPOINTS)

    machine = machine_description()
    print(machine, flush=True)
    rows, failed = [], False
    for stage in args.stages:
        started = time.perf_counter()
        print(f"--- {stage} ---", flush=True)
        try:
            stage_rows = run_stage(stage, args)
        # A failing stage becomes a row of the table, so the stages after it still run.
        except Exception as error:  # noqa: BLE001
            failed = True
            stage_rows = [Row(stage=stage, measure="failed", memgen="", alternative="", ratio=None,
                              note=f"{type(error).__name__}: {str(error)[:300]}")]
        rows += stage_rows
        print(format_table(stage_rows), flush=True)
        print(f"({stage}: {time.perf_counter() - started:.0f} s)", flush=True)

    table = format_table(rows)
    command = "python benchmarks/run_all.py " + " ".join(sys.argv[1:])
    print(f"\n{machine}\n{command}\n\n{table}")
    if args.output:
        Path(args.output).write_text(f"{machine}\n\n`{command.strip()}`\n\n{table}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

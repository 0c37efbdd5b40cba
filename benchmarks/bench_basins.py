"""Basins of attraction: network evaluations and time of the scan against bisection.

`memgen.critical_times.find_critical_times` finds each trial's first failure either by
scanning the grid t = 1, 1 + stride, ... in order (`search="scan"`, the protocol of Pham et
al. 2025) or by bisection on the same grid (`search="bisect"`). Both run here on the same
networks, images, trial noise and settings, in alternating order, and the table shows the
images passed through the network (`evaluations`), the median seconds, and how many
trials get the same critical time from both.

Networks: the ideal memorizer (memgen.ideal, the exact denoiser of a training set) of the
first K Fashion-MNIST training images at 16x16, for a small and a large K. With
`--ckpt-path`, every checkpoint `<K>.pt` of a folder (for example the quick start's
models) runs as well. Each network is probed on its own training images. The recovery
distance is LPIPS (AlexNet) with the stage's default delta 0.1.

    python benchmarks/bench_basins.py
    python benchmarks/bench_basins.py --ckpt-path results/quickstart/checkpoints --data-path data
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from timing import Row, format_table, interleaved_seconds, machine_description, median, paired_ratio

from memgen.config import PAPER_SEED
from memgen.critical_times import find_critical_times, lpips_distance
from memgen.diffusion import NoiseSchedule

IMAGE_SIZE = 16


@dataclass
class BasinSettings:
    """Images and trials probed, and timing rounds."""

    sample_size: int
    p_trials: int
    repeats: int
    ideal_train_sizes: tuple[int, ...]


SETTINGS = {False: BasinSettings(sample_size=8, p_trials=10, repeats=3, ideal_train_sizes=(16, 1024)),
            True: BasinSettings(sample_size=4, p_trials=4, repeats=2, ideal_train_sizes=(16, 1024))}


def ideal_memorizer(data_path: str, train_size: int):
    """Return (network, schedule, training images) of the ideal memorizer of K Fashion-MNIST images."""
    from memgen.data import load_training_images
    from memgen.ideal import IdealDenoiser

    images = load_training_images("fashionmnist", data_path, train_size, PAPER_SEED, image_size=IMAGE_SIZE)
    schedule = NoiseSchedule(prediction_type=IdealDenoiser.prediction_type)
    return IdealDenoiser(images, schedule.alphas_cumprod), schedule, images


def trained_model(path: Path, data_path: str, device: str):
    """Return (network, schedule, training images) of a checkpoint."""
    from memgen.checkpoint import load_model
    from memgen.data import training_images_from_meta

    model = load_model(path, device, data_path=data_path)
    images = training_images_from_meta(model.data_meta(), data_path)
    return model.network, model.schedule, images


def compare_searches(label: str, network, schedule, images: torch.Tensor, embedding, settings: BasinSettings,
                     device: str) -> Row:
    """Run scan and bisection on the same inputs; return one table row."""
    images = images[:settings.sample_size].to(device)
    distance = lpips_distance(embedding, images, batch_size=256)
    results = {}

    def search(kind: str):
        def run() -> None:
            results[kind] = find_critical_times(network, schedule, images, distance, p_trials=settings.p_trials,
                                                search=kind, device=device)
        return run

    seconds = interleaved_seconds({"scan": search("scan"), "bisect": search("bisect")}, repeats=settings.repeats,
                                  warmup=0)
    scan, bisect = results["scan"], results["bisect"]
    same = int(np.count_nonzero(scan.time == bisect.time))
    ratio, lowest, highest = paired_ratio(seconds["scan"], seconds["bisect"])
    return Row(
        stage="basins", measure=f"evaluations and s, {label}, {len(images)} images x {settings.p_trials} trials",
        memgen=f"bisect {bisect.evaluations} evals, {median(seconds['bisect']):.3g} s",
        alternative=f"scan {scan.evaluations} evals, {median(seconds['scan']):.3g} s",
        ratio=scan.evaluations / bisect.evaluations, target="scan/bisect evaluations > 1, same times",
        met=scan.evaluations > bisect.evaluations and same == scan.time.size,
        note=(f"time ratio scan/bisect {ratio:.2f} ({lowest:.2f} to {highest:.2f}); same critical time for "
              f"{same} of {scan.time.size} trials; mean critical time {scan.time.mean():.0f}"))


def run(quick: bool = False, device: str = "cpu", data_path: str = "data", ckpt_path: str | None = None) -> list[Row]:
    """Run the basin benchmark and return its table rows."""
    from memgen.files import list_k_files
    from memgen.lpips import LPIPSEmbedding

    settings = SETTINGS[quick]
    embedding = LPIPSEmbedding.from_pretrained("alex").to(device)
    rows = []
    for train_size in settings.ideal_train_sizes:
        network, schedule, images = ideal_memorizer(data_path, train_size)
        rows.append(compare_searches(f"ideal memorizer K = {train_size}", network.to(device), schedule, images,
                                     embedding, settings, device))
    if ckpt_path is not None:
        for k, path in list_k_files(ckpt_path, "pt"):
            network, schedule, images = trained_model(path, data_path, device)
            rows.append(compare_searches(f"{path.parent.name}/{path.name} (K = {k})", network, schedule, images,
                                         embedding, settings, device))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images, trials and rounds")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--data-path", default="data", help="dataset root holding FashionMNIST/raw (default: data)")
    parser.add_argument("--ckpt-path", default=None, help="also compare on every checkpoint <K>.pt of this folder")
    args = parser.parse_args()
    print(machine_description())
    print(format_table(run(args.quick, args.device, args.data_path, args.ckpt_path)))


if __name__ == "__main__":
    main()

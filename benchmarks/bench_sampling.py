"""Sampling: speed of DDPM (1000 steps) and DDIM (50 steps), and how DDIM changes the class fractions.

Speed. memgen's `sample_images` draws samples with per-sample noise streams. The
alternative is the loop a diffusers user writes: `DDPMScheduler` / `DDIMScheduler` with
their defaults, `randn_tensor` and `scheduler.step` with one CPU generator per sample,
which tests/test_sampling.py checks against memgen step by step. Both drive the same
network, the UNet of configs/fashionmnist-cpu.yaml with its initial weights (the speed
does not depend on the weights). The four runs (two samplers, two libraries) are timed in alternating
order and the table shows median samples per second.

Class fractions. This part needs a folder of checkpoints `<K>.pt`, for example the quick
start's `results/quickstart/checkpoints`, and their dataset. Each model is sampled with
DDPM 1000 and with DDIM 50 from the same sample seeds. Each sample set then goes through
the distance and classification stages with the same thresholds. The table shows the fractions of
memorized, spurious and generalized samples per K and sampler, their difference and the
standard error of that difference from the finite number of samples.

    python benchmarks/bench_sampling.py                                   # speed only
    python benchmarks/bench_sampling.py --ckpt-path results/quickstart/checkpoints --data-path data
"""

import argparse
import math
import tempfile
from pathlib import Path

import torch

from timing import REPO, Row, format_table, interleaved_seconds, machine_description, median, paired_ratio

from memgen.config import TRAINING_SECTIONS, load_yaml_sections
from memgen.diffusion import NoiseSchedule
from memgen.sampling import PerSampleNoise, ddim_timesteps, run_chain, sample_images, sample_seed
from memgen.unet import build_unet

DDIM_STEPS = 50
DDPM_QUICK_STEPS = 100
SEED = 0
CLASSES = ("memorized", "spurious", "generalized")


def memgen_sample(network: torch.nn.Module, schedule: NoiseSchedule, sampler: str, image_shape: tuple[int, ...],
                  count: int, seed: int, max_steps: int | None) -> torch.Tensor:
    """Sample with `sample_images`, or run only the first `max_steps` steps of its chain."""
    steps = DDIM_STEPS if sampler == "ddim" else None
    device = next(network.parameters()).device
    if max_steps is None:
        return sample_images(network, schedule, image_shape, range(count), seed, sampler, steps=steps, device=device)
    noise = PerSampleNoise(seed, range(count))
    timesteps = list(reversed(range(schedule.timesteps))) if sampler == "ddpm" else ddim_timesteps(1000, DDIM_STEPS)
    with torch.no_grad():
        x, _ = run_chain(network, schedule, noise.draw(image_shape).to(device), timesteps[:max_steps], sampler,
                         noise_fn=noise)
    return x.cpu()


def diffusers_sample(network: torch.nn.Module, sampler: str, image_shape: tuple[int, ...], count: int,
                     seed: int, max_steps: int | None) -> torch.Tensor:
    """Sample with a default diffusers scheduler, per-sample CPU generators seeded as memgen seeds them.

    With `max_steps`, only the first `max_steps` steps of the chain run.
    """
    from diffusers import DDIMScheduler, DDPMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    scheduler = DDPMScheduler(num_train_timesteps=1000) if sampler == "ddpm" else DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(1000 if sampler == "ddpm" else DDIM_STEPS)
    generators = [torch.Generator().manual_seed(sample_seed(seed, index)) for index in range(count)]
    device = next(network.parameters()).device
    x = randn_tensor((count, *image_shape), generator=generators, dtype=torch.float32).to(device)
    extra = {"eta": 0.0} if sampler == "ddim" else {}
    with torch.no_grad():
        for t in scheduler.timesteps[:max_steps]:
            output = network(x, torch.full((count,), int(t)))
            x = scheduler.step(output, t, x, generator=generators, **extra).prev_sample
    return x.cpu()


def speed_rows(quick: bool, device: str) -> list[Row]:
    """Time DDPM and DDIM sampling with memgen and with diffusers' schedulers; return table rows.

    In quick mode the DDPM chains stop after DDPM_QUICK_STEPS of their 1000 steps, and the
    rate is scaled to the whole chain. Every step makes one network call of the same shape,
    so the scaling misses only the fixed costs of a run.
    """
    model = load_yaml_sections(REPO / "configs/fashionmnist-cpu.yaml", TRAINING_SECTIONS)["model"]
    torch.manual_seed(0)
    network = build_unet(model).to(device).eval()
    schedule = NoiseSchedule()
    image_shape = (model.in_channels, model.image_size, model.image_size)
    count, repeats = (4, 3) if quick else (8, 3)
    ddpm_steps = DDPM_QUICK_STEPS if quick else None

    def timed_run(library: str, sampler: str):
        max_steps = ddpm_steps if sampler == "ddpm" else None

        def run() -> None:
            if library == "memgen":
                memgen_sample(network, schedule, sampler, image_shape, count, SEED, max_steps)
            else:
                diffusers_sample(network, sampler, image_shape, count, SEED, max_steps)
        return run

    # A DDIM chain is 20 times shorter than a DDPM one, so it gets more rounds to average
    # over the same stretch of machine load.
    seconds = {}
    for sampler, rounds in (("ddpm", repeats), ("ddim", 3 * repeats)):
        functions = {f"{library} {sampler}": timed_run(library, sampler) for library in ("memgen", "diffusers")}
        seconds.update(interleaved_seconds(functions, repeats=rounds, warmup=0))
    # Seconds of one whole chain: a truncated DDPM chain is scaled to 1000 steps.
    scale = {"ddpm": 1000 / ddpm_steps if ddpm_steps else 1.0, "ddim": 1.0}
    rate = {name: count / (median(values) * scale[name.split()[1]]) for name, values in seconds.items()}
    timed_note = f"DDPM timed on its first {ddpm_steps} steps and scaled to 1000; " if ddpm_steps else ""

    rows = []
    for sampler, label in (("ddpm", "DDPM 1000 steps"), ("ddim", f"DDIM {DDIM_STEPS} steps")):
        ratio, lowest, highest = paired_ratio(seconds[f"diffusers {sampler}"], seconds[f"memgen {sampler}"])
        rows.append(Row(
            stage="sample", measure=f"samples/s, {label}, small config, {count} samples",
            memgen=f"{rate[f'memgen {sampler}']:.3g}",
            alternative=f"diffusers {'DDPMScheduler' if sampler == 'ddpm' else 'DDIMScheduler'} loop "
                        f"{rate[f'diffusers {sampler}']:.3g}",
            ratio=ratio, target="none stated",
            note=f"{timed_note if sampler == 'ddpm' else ''}per-round ratios {lowest:.2f} to {highest:.2f}"))
    ratio = rate["memgen ddim"] / rate["memgen ddpm"]
    rows.append(Row(
        stage="sample", measure=f"samples/s, memgen DDIM {DDIM_STEPS} over DDPM 1000",
        memgen=f"DDIM {rate['memgen ddim']:.3g}", alternative=f"DDPM {rate['memgen ddpm']:.3g}",
        ratio=ratio, target=f"about 1000/{DDIM_STEPS} = {1000 // DDIM_STEPS} (network calls)",
        note=f"{timed_note}ratio of the medians of {repeats} DDPM and {3 * repeats} DDIM runs"))
    return rows


def classify_with_sampler(ckpt_path: Path, data_path: str, work: Path, sampler: str, num_samples: int,
                          batch_size: int, device: str) -> dict[int, dict]:
    """Generate, compute distances and classify every `<K>.pt` with one sampler; return summary rows by K."""
    from memgen.classify import ClassifyOptions, classify
    from memgen.distances import DistanceOptions, compute_distances
    from memgen.files import list_k_files
    from memgen.generate import GenerateOptions, generate

    sample_dir, dist_dir, classify_dir = work / sampler / "samples", work / sampler / "distances", work / sampler / "classify"
    for _, checkpoint in list_k_files(ckpt_path, "pt"):
        generate(GenerateOptions(ckpt_path=str(checkpoint), result_path=str(sample_dir), num_samples=num_samples,
                                 batch_size=batch_size, sampler=sampler,
                                 steps=DDIM_STEPS if sampler == "ddim" else None, seed=SEED,
                                 data_path=data_path, device=device))
    compute_distances(DistanceOptions(synth_path=str(sample_dir), data_path=data_path, result_path=str(dist_dir),
                                      metric="lpips", network="alex", k=5, device=device))
    # The thresholds of configs/quickstart.yaml: calibrated on the training set's own
    # nearest-neighbour distances, the same for both samplers.
    rows = classify(ClassifyOptions(dist_path=str(dist_dir), eval_path=str(sample_dir), data_path=data_path,
                                    result_path=str(classify_dir), k=5, grid_rows=0, device=device,
                                    calibrate=True, calibrate_quantile=0.05, calibrate_scale=1.0))
    return {int(row["K"]): row for row in rows}


def fraction_rows(ckpt_path: Path, data_path: str, work: Path, num_samples: int, batch_size: int,
                  device: str) -> list[Row]:
    """Compare the class fractions of DDIM 50 samples with those of DDPM 1000 samples, per K."""
    by_sampler = {sampler: classify_with_sampler(ckpt_path, data_path, work, sampler, num_samples, batch_size, device)
                  for sampler in ("ddpm", "ddim")}
    rows = []
    largest_gap = 0.0
    for k in sorted(by_sampler["ddpm"]):
        ddpm, ddim = by_sampler["ddpm"][k], by_sampler["ddim"][k]
        cells, notes = [], []
        for name in CLASSES:
            p, q = float(ddpm[f"{name}_fraction"]), float(ddim[f"{name}_fraction"])
            n, m = int(ddpm["num_samples"]), int(ddim["num_samples"])
            # Standard error of q - p for two independent binomial proportions.
            error = math.sqrt(p * (1 - p) / n + q * (1 - q) / m)
            cells.append((name, p, q))
            notes.append(f"{name} {q - p:+.3f} (s.e. {error:.3f})")
            largest_gap = max(largest_gap, abs(q - p))
        rows.append(Row(
            stage="sample", measure=f"class fractions m/s/g, K = {k}, {num_samples} samples",
            memgen="DDIM 50: " + "/".join(f"{q:.3f}" for _, _, q in cells),
            alternative="DDPM 1000: " + "/".join(f"{p:.3f}" for _, p, _ in cells),
            ratio=None, target="report (no target)", note="DDIM - DDPM: " + "; ".join(notes)))
    return rows


def run(quick: bool = False, device: str = "cpu", ckpt_path: str | None = None, data_path: str = "data",
        num_samples: int = 128, work_path: str | None = None, speed: bool = True) -> list[Row]:
    """Run the sampling benchmark and return its table rows; class fractions only with `ckpt_path`."""
    rows = speed_rows(quick, device) if speed else []
    if ckpt_path is None:
        rows.append(Row(stage="sample", measure="class fractions DDIM 50 vs DDPM 1000", memgen="pending",
                        alternative="pending", ratio=None, target="report (no target)",
                        note="needs trained checkpoints: pass --ckpt-path (e.g. results/quickstart/checkpoints)"))
        return rows
    if work_path is None:
        with tempfile.TemporaryDirectory(prefix="memgen-bench-sampling-") as work:
            rows += fraction_rows(Path(ckpt_path), data_path, Path(work), num_samples, num_samples, device)
    else:
        rows += fraction_rows(Path(ckpt_path), data_path, Path(work_path), num_samples, num_samples, device)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples in the speed runs")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--ckpt-path", default=None,
                        help="folder of checkpoints <K>.pt whose DDIM and DDPM class fractions are compared")
    parser.add_argument("--data-path", default="data", help="dataset root of those models (default: data)")
    parser.add_argument("--num-samples", type=int, default=128,
                        help="samples per K and sampler for the class fractions (default: 128, as the quick start)")
    parser.add_argument("--work-path", default=None,
                        help="folder for the samples, distances and classes of the comparison (default: a temporary one)")
    parser.add_argument("--skip-speed", action="store_true", help="only compare the class fractions")
    args = parser.parse_args()
    print(machine_description())
    rows = run(args.quick, args.device, args.ckpt_path, args.data_path, args.num_samples, args.work_path,
               speed=not args.skip_speed)
    print(format_table(rows))


if __name__ == "__main__":
    main()

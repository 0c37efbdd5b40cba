"""The quick-start pipeline: every stage for a sweep of K, then one report.

For each K it trains a small UNet (train.py), samples it (generate.py), finds the nearest
training images and samples (distances.py), labels the samples (classify.py), measures
critical times of each class (critical_times.py) and relative energies (energy.py), and
writes `<result_path>/report.md`. Each stage is called through the same function as its
script, and each skips the work whose results exist, so a rerun resumes.
"""

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memgen.config import DataOptions, ModelOptions, TrainOptions
from memgen.errors import MemgenError
from memgen.files import ensure_writable_dir, load_npz, save_npz
from memgen.runtime import pick_device, setup_logging

logger = logging.getLogger(__name__)

CLASSES = ("memorized", "spurious", "generalized")


@dataclass
class PipelineOptions:
    """Options of run_pipeline.py that are not options of one training run."""

    train_sizes: tuple[int, ...] = (2, 16, 128, 1024)
    """The sweep of K: one model is trained per training-set size."""
    result_path: str = "results/quickstart"
    """Folder for every stage's output and report.md."""
    num_samples: int = 128
    """Samples generated per K."""
    sample_batch_size: int = 128
    """Samples per network call during generation."""
    sampler: str = "ddim"
    """Sampler of the generation stage: ddpm (all T steps, the protocol of Pham et al. 2025) or ddim."""
    sampler_steps: int = 50
    """DDIM steps of the generation stage (ignored by DDPM)."""
    metric: str = "lpips"
    """Distance of the distance, classification and critical-time stages: lpips or l2."""
    network: str = "alex"
    """LPIPS backbone."""
    k: int = 5
    """Nearest neighbours stored per sample."""
    delta_m: float = 0.03
    """Memorization threshold on the distance to the nearest training image."""
    delta_s: float = 0.02
    """Spurious threshold on the distance to the nearest other sample."""
    calibrate: bool = False
    """Derive delta_m and delta_s from the training set's nearest-neighbour distances instead (see run_classify.py)."""
    calibrate_quantile: float = 0.05
    """With calibrate: delta_m = calibrate_scale x this quantile of those distances."""
    calibrate_scale: float = 0.5
    """With calibrate: the factor on the quantile; delta_s = delta_m x 2/3."""
    critical_sample_size: int = 8
    """Images of each class probed per K in the critical-time stage."""
    critical_p_trials: int = 4
    """Noisy copies of each probed image."""
    critical_stride: int = 50
    """Spacing of the scanned noise steps."""
    critical_ddim_steps: int = 10
    """DDIM steps from the noised image back to t = 0."""
    critical_delta: float = 0.1
    """Recovery threshold of the critical-time stage, in units of the metric."""
    energy_sample_size: int = 8
    """Samples of each class whose energy relative to the references is computed per K."""
    energy_references: int = 8
    """Held-out test images used as energy references (the same for every K)."""
    energy_num_points: int = 20
    """Quadrature nodes on the quarter circle between a sample and a reference."""


PIPELINE_SECTIONS = {"data": DataOptions, "train": TrainOptions, "model": ModelOptions,
                     "pipeline": PipelineOptions}


class StageTimer:
    """Record the wall time of each stage for the report, and log to `log_file` between stages.

    Each stage sends its own log to a file in its result folder; the pipeline's log file
    is restored after every stage.
    """

    def __init__(self, log_file: Path):
        self.seconds: dict[str, float] = {}
        self.log_file = log_file

    def run(self, name: str, function, *args, **kwargs):
        start = time.perf_counter()
        logger.info("stage %s: started", name)
        result = function(*args, **kwargs)
        setup_logging(self.log_file)
        elapsed = time.perf_counter() - start
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        logger.info("stage %s: finished in %.1f s", name, elapsed)
        return result


def _check_options(options: PipelineOptions, train: TrainOptions) -> None:
    """Raise MemgenError for settings of any stage that would fail, before the first model is trained."""
    from memgen.distances import METRICS
    from memgen.lpips import BACKBONES
    from memgen.sampling import SAMPLERS
    from memgen.train import check_train_options

    if not options.train_sizes or any(k < 1 for k in options.train_sizes):
        raise MemgenError(f"--train-sizes {list(options.train_sizes)} is invalid; give one or more K >= 1")
    if len(set(options.train_sizes)) != len(options.train_sizes):
        raise MemgenError(f"--train-sizes {list(options.train_sizes)} repeats a K; give each K once")
    check_train_options(train)
    if options.metric not in METRICS:
        raise MemgenError(f"--metric {options.metric!r} is invalid; use one of {', '.join(METRICS)}")
    if options.metric == "lpips" and options.network not in BACKBONES:
        raise MemgenError(f"--network {options.network!r} is invalid; use one of {', '.join(BACKBONES)}")
    if options.sampler not in SAMPLERS:
        raise MemgenError(f"--sampler {options.sampler!r} is invalid; use one of {', '.join(SAMPLERS)}")
    if options.sampler == "ddim" and not 1 <= options.sampler_steps <= train.timesteps:
        raise MemgenError(f"--sampler-steps {options.sampler_steps} is invalid; use 1 to --timesteps "
                          f"{train.timesteps}")
    counts = {"--num-samples": options.num_samples, "--sample-batch-size": options.sample_batch_size,
              "--k": options.k, "--critical-sample-size": options.critical_sample_size,
              "--critical-p-trials": options.critical_p_trials, "--critical-stride": options.critical_stride,
              "--critical-ddim-steps": options.critical_ddim_steps,
              "--energy-sample-size": options.energy_sample_size, "--energy-references": options.energy_references}
    for flag, value in counts.items():
        if value < 1:
            raise MemgenError(f"{flag} {value} is invalid; use 1 or more")
    if options.energy_num_points < 2:
        raise MemgenError(f"--energy-num-points {options.energy_num_points} is invalid; use 2 or more")
    if options.calibrate and not (0 <= options.calibrate_quantile <= 1 and options.calibrate_scale > 0):
        raise MemgenError(f"--calibrate-quantile {options.calibrate_quantile} and --calibrate-scale "
                          f"{options.calibrate_scale} are invalid; use a quantile in [0, 1] and a positive scale")
    distances = {"--delta-m": options.delta_m, "--delta-s": options.delta_s,
                 "--critical-delta": options.critical_delta}
    for flag, value in distances.items():
        if not value >= 0:
            raise MemgenError(f"{flag} {value} is invalid; pass a non-negative distance")


def train_models(data: DataOptions, train: TrainOptions, model: ModelOptions, options: PipelineOptions,
                 timer: StageTimer) -> Path:
    """Train one UNet per K into `<result>/train/K<k>` and copy each final checkpoint to `<result>/checkpoints`."""
    from memgen.train import train as train_one

    ckpt_dir = ensure_writable_dir(Path(options.result_path) / "checkpoints")
    for k in sorted(options.train_sizes):
        if (ckpt_dir / f"{k}.pt").is_file():
            logger.info("keeping the trained model '%s'", ckpt_dir / f"{k}.pt")
            continue
        run_data = dataclasses.replace(data, results_path=str(Path(options.result_path) / "train" / f"K{k}"))
        run_train = dataclasses.replace(train, train_size=k, final_ckpt_dir=str(ckpt_dir))
        timer.run("train", train_one, run_data, run_train, model)
    return ckpt_dir


def generate_samples(ckpt_dir: Path, data: DataOptions, options: PipelineOptions, device_name: str,
                     timer: StageTimer) -> Path:
    """Sample every trained model into `<result>/samples/<K>.npz`."""
    from memgen.generate import GenerateOptions, generate

    sample_dir = Path(options.result_path) / "samples"
    for k in sorted(options.train_sizes):
        stage = GenerateOptions(ckpt_path=str(ckpt_dir / f"{k}.pt"), result_path=str(sample_dir),
                                num_samples=options.num_samples, batch_size=options.sample_batch_size,
                                sampler=options.sampler,
                                steps=options.sampler_steps if options.sampler == "ddim" else None,
                                data_path=data.data_path, device=device_name)
        timer.run("generate", generate, stage)
    return sample_dir


def write_references(data: DataOptions, model: ModelOptions, train: TrainOptions, options: PipelineOptions) -> Path:
    """Write `options.energy_references` test-split images, which no model was trained on, as references."""
    from memgen.data import load_dataset, load_images

    path = Path(options.result_path) / "references.npz"
    if path.is_file():
        return path
    test_set = load_dataset(data.data_name, data.data_path, image_size=model.image_size,
                            centercrop=train.centercrop, train=False)
    count = min(options.energy_references, len(test_set))
    images = load_images(test_set, np.arange(count)).numpy()
    save_npz(path, meta={"data_name": data.data_name, "split": "test", "indices": list(range(count))},
             images=images)
    return path


def class_has_samples(classify_dir: Path, name: str) -> bool:
    """Tell whether any K has at least one sample of class `name`."""
    folder = classify_dir / "identified" / name
    for path in folder.glob("*.npz"):
        if int(load_npz(path, required=["size"])["size"]) > 0:
            return True
    return False


def run(data: DataOptions, train: TrainOptions, model: ModelOptions, options: PipelineOptions) -> Path:
    """Run every stage for the sweep of K and write the report; return the path of report.md."""
    from memgen.classify import ClassifyOptions, classify
    from memgen.critical_times import CriticalTimesOptions, run_critical_times
    from memgen.distances import DistanceOptions, compute_distances
    from memgen.energy import EnergyOptions, run_energy
    from memgen.report import write_report

    _check_options(options, train)
    result = ensure_writable_dir(options.result_path)
    setup_logging(result / "pipeline.log")
    device_name = train.device
    device = pick_device(device_name)
    logger.info("quick-start pipeline for K = %s into '%s'", list(options.train_sizes), result)
    timer = StageTimer(result / "pipeline.log")
    started = time.perf_counter()

    ckpt_dir = train_models(data, train, model, options, timer)
    sample_dir = generate_samples(ckpt_dir, data, options, device_name, timer)

    dist_dir = result / "distances"
    timer.run("distances", compute_distances, DistanceOptions(
        synth_path=str(sample_dir), data_path=data.data_path, result_path=str(dist_dir), metric=options.metric,
        network=options.network, k=options.k, device=device_name))

    classify_dir = result / "classify"
    timer.run("classify", classify, ClassifyOptions(
        dist_path=str(dist_dir), eval_path=str(sample_dir), data_path=data.data_path,
        result_path=str(classify_dir), k=options.k,
        delta_m=None if options.calibrate else options.delta_m,
        delta_s=None if options.calibrate else options.delta_s,
        calibrate=options.calibrate, calibrate_quantile=options.calibrate_quantile,
        calibrate_scale=options.calibrate_scale,
        device=device_name))

    references = write_references(data, model, train, options)
    present = [name for name in CLASSES if class_has_samples(classify_dir, name)]
    for name in present:
        class_dir = classify_dir / "identified" / name
        timer.run("critical_times", run_critical_times, CriticalTimesOptions(
            ckpt_path=str(ckpt_dir), sample_path=str(class_dir), result_path=str(result / "critical_times" / name),
            data_path=data.data_path, sample_size=options.critical_sample_size, metric=options.metric,
            network=options.network, p_trials=options.critical_p_trials, stride=options.critical_stride,
            ddim_steps=options.critical_ddim_steps, delta=options.critical_delta, device=device_name))
        timer.run("energy", run_energy, EnergyOptions(
            ref_path=str(references), ckpt_path=str(ckpt_dir), sample_path=str(class_dir),
            result_path=str(result / "energy" / name), data_path=data.data_path,
            sample_size=options.energy_sample_size, num_points=options.energy_num_points, device=device_name))

    timings = {**timer.seconds, "total": time.perf_counter() - started}
    report = write_report(result, data, train, model, options, timings, device)
    logger.info("wrote '%s' after %.1f s", report, timings["total"])
    return report

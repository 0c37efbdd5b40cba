"""Time memgen's LPIPS nearest-neighbour search against two baselines on the same images.

The three methods find the k nearest training images of every sample:

- memgen: embed each image once (memgen.lpips), then exact tiled search (memgen.neighbours);
- per pair: `lpips.LPIPS` called on every (sample, training image) pair, in batches of pairs;
- paper's scheme, as in the code released with Pham et al. 2025 ("Memorization to
  Generalization"): for every batch of samples, recompute the features of the whole
  training set and broadcast the (samples x training images x C x H x W) feature
  differences of each layer.

memgen's time includes embedding the training images (no cache). No method runs the
sample-to-sample search here.

Samples are Fashion-MNIST test images, and every 97th is replaced by a training image,
so exact copies (distance 0) occur. The training set is the first images of the seeded
permutation of the training split. All methods share one AlexNet (ImageNet weights when
installed, else a seeded random one). The baselines are slow, so they may run on the
first `--pair-samples` / `--paper-samples` samples only; their time for all samples is
then extrapolated linearly in the number of samples, and the output says so.

    python benchmarks/bench_distances.py                       # 2,048 x 2,048, CPU
    python benchmarks/bench_distances.py --num-samples 512 --num-train 512 --repeats 1
"""

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memgen.data import load_dataset, load_images, load_training_images  # noqa: E402
from memgen.errors import MemgenError  # noqa: E402
from memgen.lpips import LPIPSEmbedding, build_features  # noqa: E402
from memgen.neighbours import knn  # noqa: E402

PAPER_SEED = 3407


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", default="data", help="dataset root holding FashionMNIST/raw (default: data)")
    parser.add_argument("--num-samples", type=int, default=2048, help="samples (queries) (default: 2048)")
    parser.add_argument("--num-train", type=int, default=2048, help="training images (references) (default: 2048)")
    parser.add_argument("--k", type=int, default=5, help="neighbours per sample (default: 5)")
    parser.add_argument("--network", default="alex", choices=["alex", "vgg"], help="LPIPS backbone (default: alex)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="images per network call, and samples per batch of the paper's scheme (default: 256)")
    parser.add_argument("--pair-batch", type=int, default=1024, help="pairs per lpips.LPIPS call (default: 1024)")
    parser.add_argument("--pair-samples", type=int, default=16,
                        help="samples timed with the per-pair baseline, extrapolated to all (default: 16)")
    parser.add_argument("--paper-samples", type=int, default=256,
                        help="samples timed with the paper's scheme, extrapolated to all (default: 256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of memgen; the median is shown (default: 3)")
    parser.add_argument("--baseline-repeats", type=int, default=1,
                        help="timed runs of each baseline; the median is shown (default: 1)")
    return parser.parse_args()


def load_images_for_benchmark(args) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (samples, training images), both float32 (N, 1, 28, 28) in [-1, 1]."""
    train = load_training_images("fashionmnist", args.data_path, args.num_train, PAPER_SEED)
    test = load_dataset("fashionmnist", args.data_path, train=False)
    samples = load_images(test, torch.arange(min(args.num_samples, len(test))))
    copies = torch.arange(0, len(samples), 97)
    samples[copies] = train[copies % len(train)]
    return samples, train


def build_models(args) -> tuple[LPIPSEmbedding, object, str]:
    """Return memgen's embedding and an lpips.LPIPS with the same backbone, and the weights' name."""
    import lpips

    try:
        embedding = LPIPSEmbedding.from_pretrained(args.network, allow_download=False)
        weights = f"ImageNet ({embedding.source})"
    except MemgenError:
        torch.manual_seed(0)
        embedding = LPIPSEmbedding.from_state_dict(args.network, build_features(args.network).state_dict())
        weights = "seeded random (no ImageNet weights installed)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reference = lpips.LPIPS(net=args.network, pretrained=True, pnet_rand=True, verbose=False)
    features = embedding.features.state_dict()
    slices = {key.split(".", 1)[1]: key for key in reference.net.state_dict()}
    reference.net.load_state_dict({slices[key]: value for key, value in features.items()})
    return embedding.to(args.device), reference.to(args.device).eval(), weights


def lpips_input(images: torch.Tensor) -> torch.Tensor:
    """Grey to RGB and nearest resize to 32 px, as memgen does before the backbone."""
    images = images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images
    if min(images.shape[-2:]) < 32:
        images = torch.nn.functional.interpolate(images, size=(32, 32), mode="nearest")
    return images


def top_k(distances: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    indices = np.broadcast_to(np.arange(distances.shape[1]), distances.shape)
    order = np.lexsort((indices, distances), axis=-1)[:, :k]
    return np.take_along_axis(distances, order, axis=1), order


def run_memgen(embedding, samples, train, args):
    phi_samples = embedding.embed(samples, batch_size=args.batch_size).numpy()
    phi_train = embedding.embed(train, batch_size=args.batch_size).numpy()
    return knn(phi_samples, phi_train, args.k, device=args.device)


@torch.no_grad()
def run_per_pair(reference, samples, train, args):
    """lpips.LPIPS on every (sample, training image) pair, `--pair-batch` pairs per call."""
    samples, train = lpips_input(samples), lpips_input(train)
    distances = np.empty((len(samples), len(train)), dtype=np.float64)
    pairs = torch.cartesian_prod(torch.arange(len(samples)), torch.arange(len(train)))
    for start in range(0, len(pairs), args.pair_batch):
        chunk = pairs[start:start + args.pair_batch]
        first = samples[chunk[:, 0]].to(args.device)
        second = train[chunk[:, 1]].to(args.device)
        values = reference(first, second).reshape(-1).double().cpu().numpy()
        distances[chunk[:, 0].numpy(), chunk[:, 1].numpy()] = values
    return top_k(distances, args.k)


@torch.no_grad()
def run_paper_scheme(reference, samples, train, args):
    """Per batch of samples, recompute every training feature and broadcast the differences."""
    import lpips

    samples, train = lpips_input(samples), lpips_input(train)
    batch = args.batch_size
    distances = np.empty((len(samples), len(train)), dtype=np.float64)
    for sample_start in range(0, len(samples), batch):
        query = samples[sample_start:sample_start + batch].to(args.device)
        query_features = [lpips.normalize_tensor(f) for f in reference.net(reference.scaling_layer(query))]
        for train_start in range(0, len(train), batch):
            block = train[train_start:train_start + batch].to(args.device)
            block_features = [lpips.normalize_tensor(f) for f in reference.net(reference.scaling_layer(block))]
            total = 0
            for layer, (first, second) in enumerate(zip(query_features, block_features)):
                difference = (first[:, None] - second[None]) ** 2
                rows, columns = difference.shape[:2]
                weighted = reference.lins[layer](difference.flatten(0, 1))
                total = total + weighted.mean(dim=(2, 3)).reshape(rows, columns)
            distances[sample_start:sample_start + len(query), train_start:train_start + len(block)] = (
                total.double().cpu().numpy())
    return top_k(distances, args.k)


def timed(function, repeats: int):
    """Run `function` `repeats` times; return (median wall seconds, median CPU seconds, last result).

    CPU seconds are summed over the process's threads, so on a shared machine they move
    less than wall-clock seconds when other processes compete for the cores.
    """
    wall, cpu, result = [], [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started, started_cpu = time.perf_counter(), time.process_time()
        result = function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return statistics.median(wall), statistics.median(cpu), result


def compare(name: str, found, expected, rows: int) -> str:
    """Describe how far a baseline's neighbours (first `rows` samples) agree with memgen's."""
    found_distances, found_indices = found
    expected_distances, expected_indices = expected[0][:rows], expected[1][:rows]
    same_rows = int(np.all(found_indices == expected_indices, axis=1).sum())
    gap = float(np.abs(found_distances - expected_distances).max())
    return (f"{name}: same {found_indices.shape[1]} neighbours in order for {same_rows} of {rows} samples; "
            f"max distance difference {gap:.2e}")


def main() -> None:
    args = parse_arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    samples, train = load_images_for_benchmark(args)
    embedding, reference, weights = build_models(args)
    count = len(samples)
    pair_rows = min(args.pair_samples, count)
    paper_rows = min(args.paper_samples, count)
    print(f"{count} samples x {len(train)} Fashion-MNIST training images, LPIPS {args.network}, k = {args.k}, "
          f"device {args.device}, {torch.get_num_threads()} CPU threads; weights: {weights}")

    # Untimed runs on a few images, so that one-time set-up (oneDNN kernels for each
    # batch shape) is not charged to the first timed method.
    warm = min(args.batch_size, count, len(train))
    run_memgen(embedding, samples[:warm], train[:warm], args)
    run_per_pair(reference, samples[:1], train[:warm], args)
    run_paper_scheme(reference, samples[:warm], train[:warm], args)

    memgen_wall, memgen_cpu, memgen_result = timed(lambda: run_memgen(embedding, samples, train, args), args.repeats)
    pair_wall, pair_cpu, pair_result = timed(lambda: run_per_pair(reference, samples[:pair_rows], train, args),
                                             args.baseline_repeats)
    paper_wall, paper_cpu, paper_result = timed(
        lambda: run_paper_scheme(reference, samples[:paper_rows], train, args), args.baseline_repeats)

    print(f"{'method':<28}{'samples run':>12}{'wall s':>10}{'CPU s':>10}{'wall s, all':>14}{'CPU s, all':>13}"
          f"{'x wall':>9}{'x CPU':>9}")
    rows = [("memgen (embed once + search)", count, memgen_wall, memgen_cpu),
            ("lpips.LPIPS per pair", pair_rows, pair_wall, pair_cpu),
            ("paper's scheme", paper_rows, paper_wall, paper_cpu)]
    for name, rows_run, wall, cpu in rows:
        wall_all, cpu_all = wall * count / rows_run, cpu * count / rows_run
        note = "" if rows_run == count else "  (extrapolated from the samples run)"
        print(f"{name:<28}{rows_run:>12}{wall:>10.2f}{cpu:>10.2f}{wall_all:>14.1f}{cpu_all:>13.1f}"
              f"{wall_all / memgen_wall:>9.1f}{cpu_all / memgen_cpu:>9.1f}{note}")
    print("x wall, x CPU: time for all samples divided by memgen's time (medians)")
    print(compare("per pair", pair_result, memgen_result, pair_rows))
    print(compare("paper's scheme", paper_result, memgen_result, paper_rows))


if __name__ == "__main__":
    main()

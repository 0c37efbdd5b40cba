"""Command-line interface of toy_example.py: one subcommand per step of the 2D toy model."""

import argparse
import logging
import time
from pathlib import Path

import torch

from memgen.errors import MemgenError
from memgen.runtime import pick_device, setup_logging
from memgen.toy import commands
from memgen.toy.data import DEFAULT_SEED
from memgen.toy.landscape import LandscapeOptions
from memgen.toy.model import ScoreNetConfig
from memgen.toy.sde import PRIOR_KINDS, VESDE
from memgen.toy.train import TrainConfig

logger = logging.getLogger(__name__)

DESCRIPTION = """\
2D toy model of memorization and generalization in a diffusion model.

K training points lie on the unit circle. A variance-exploding diffusion (marginal std
sigma sqrt(t), sigma = 1) with a small MLP score network is trained on them, and its energy
E = -2 sigma_t^2 log p_t is compared with the exact Dense Associative Memory energy of
the K points. Few points give one minimum per point (memorization), more points give
spurious minima where nearby points merge, and many points give a continuous ring
(generalization).
"""

EPILOG = """\
examples:
  python toy_example.py all                       # everything for K = 2, 9, 1000 in results/toy
  python toy_example.py data --ks 2 4 9 1000
  python toy_example.py exact --k 9 --beta 10
  python toy_example.py train --k 9 --iterations 4000
  python toy_example.py plots --k 9 --t 0.05
  python toy_example.py basin --k 9 --delta 0.1 --p 0.9

`all` with the defaults took {all_minutes}; see docs/toy_example.md.
"""

# Measured with the defaults: 2 min 28 s and 2 min 50 s wall in two runs, each 84 s of CPU
# time, on a 2-core x86 box that other jobs kept busy (load average about 8).
ALL_RUN_TIME = "about 3 minutes on a busy 2-core CPU"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def threshold_value(text: str) -> float | None:
    if text == "auto":
        return None
    return positive_float(text)


def common_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("output and device")
    group.add_argument("--out", type=Path, default=Path("results/toy"), metavar="DIR",
                       help="folder for all results; per-K results go to DIR/K<k>/ (default: %(default)s)")
    group.add_argument("--device", default="auto", metavar="DEVICE",
                       help="torch device: auto (CUDA when available, else CPU), cpu, cuda, cuda:1 "
                            "(default: %(default)s)")
    group.add_argument("--threads", type=positive_int, default=1, metavar="INT",
                       help="CPU threads of torch. The toy's tensors are small: on a busy 2-core machine "
                            "one thread trained about 15 times faster than two (default: %(default)s)")
    return parser


def prior_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("prior")
    group.add_argument("--prior", choices=PRIOR_KINDS, default="points",
                       help="distribution at t = 1 that starts sampling and ends the likelihood ODE: "
                            "'points' is the exact noised training set (1/K) sum N(xi, sigma^2 I); "
                            "'gaussian' is N(0, sigma^2 I), a rough stand-in when sigma = 1 is no larger "
                            "than the data (default: %(default)s)")
    return parser


def data_options(default_k: int | None = 2, seed: bool = True) -> argparse.ArgumentParser:
    """--k (unless default_k is None) and --data-seed (unless seed is False)."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("training points")
    if default_k is not None:
        group.add_argument("--k", type=positive_int, default=default_k, metavar="K",
                           help="number of training points on the unit circle (default: %(default)s)")
    if seed:
        group.add_argument("--data-seed", type=int, default=DEFAULT_SEED, metavar="INT",
                           help="seed of the random angles of the training points (default: %(default)s)")
    return parser


def train_options() -> argparse.ArgumentParser:
    defaults, model, sde = TrainConfig(), ScoreNetConfig(), VESDE()
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("training")
    group.add_argument("--iterations", type=positive_int, default=defaults.iterations, metavar="INT",
                       help="total optimizer steps; a rerun with more resumes from the checkpoint "
                            "(default: %(default)s)")
    group.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, metavar="INT",
                       help="training points per step, drawn with replacement (default: %(default)s)")
    group.add_argument("--lr", type=positive_float, default=defaults.lr, metavar="FLOAT",
                       help="Adam learning rate (default: %(default)s)")
    group.add_argument("--ema-decay", type=float, default=defaults.ema_decay, metavar="FLOAT",
                       help="decay of the weight average used for sampling, in [0, 1) (default: %(default)s)")
    group.add_argument("--ckpt-every", type=positive_int, default=defaults.ckpt_every, metavar="INT",
                       help="steps between checkpoints and sample plots (default: %(default)s)")
    group.add_argument("--train-seed", type=int, default=defaults.seed, metavar="INT",
                       help="seed of batches, noise times and noise (default: %(default)s)")
    group.add_argument("--hidden-dim", type=positive_int, default=model.hidden_dim, metavar="INT",
                       help="width of the hidden layers of the score MLP (default: %(default)s)")
    group.add_argument("--num-layers", type=positive_int, default=model.num_layers, metavar="INT",
                       help="hidden layers of the score MLP (default: %(default)s)")
    group.add_argument("--num-frequencies", type=positive_int, default=model.num_frequencies, metavar="INT",
                       help="Fourier frequencies of log t fed to the MLP (default: %(default)s)")
    group.add_argument("--sigma", type=positive_float, default=sde.sigma, metavar="FLOAT",
                       help="diffusion coefficient of the VE SDE; marginal std sigma sqrt(t) (default: %(default)s)")
    group.add_argument("--t-min", type=positive_float, default=sde.t_min, metavar="FLOAT",
                       help="smallest training time and end time of sampling (default: %(default)s)")
    group.add_argument("--num-steps", type=positive_int, default=sde.num_steps, metavar="INT",
                       help="Euler-Maruyama steps from t = 1 to t-min (default: %(default)s)")
    group.add_argument("--num-train-samples", type=positive_int, default=500, metavar="INT",
                       help="samples drawn for the plot at each checkpoint (default: %(default)s)")
    group.add_argument("--overwrite", action="store_true",
                       help="delete an existing checkpoint and train from scratch")
    return parser


def landscape_options() -> argparse.ArgumentParser:
    defaults = LandscapeOptions()
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("energy landscape")
    group.add_argument("--t", type=positive_float, default=0.05, metavar="FLOAT",
                       help="diffusion time of the landscape; beta = 1 / (2 sigma^2 t) (default: %(default)s)")
    group.add_argument("--num-samples", type=positive_int, default=defaults.num_samples, metavar="INT",
                       help="samples drawn down to t and carried to their attractors (default: %(default)s)")
    group.add_argument("--retrieval-iterations", type=positive_int, default=defaults.retrieval_iterations,
                       metavar="INT",
                       help="retrieval steps x <- x + sigma_t^2 s(x, t) per sample (default: %(default)s)")
    group.add_argument("--cluster-threshold", type=threshold_value, default=None, metavar="DIST|auto",
                       help="single-linkage distance (x units) below which retrieved samples share an "
                            "attractor; 'auto' cuts at the largest gap in the merge distances (default: auto)")
    group.add_argument("--grid-size", type=positive_int, default=defaults.grid_size, metavar="INT",
                       help="energy grid points per axis on [-1.5, 1.5] (default: %(default)s)")
    group.add_argument("--ode-steps", type=positive_int, default=defaults.ode_steps, metavar="INT",
                       help="RK4 steps of the probability-flow ODE from t to 1 (default: %(default)s)")
    group.add_argument("--sample-seed", type=int, default=defaults.seed, metavar="INT",
                       help="seed of the sampling noise (default: %(default)s)")
    return parser


def basin_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("basins of attraction")
    group.add_argument("--t-start", type=positive_float, default=2e-3, metavar="FLOAT",
                       help="first noise time of the scan (default: %(default)s)")
    group.add_argument("--t-stop", type=positive_float, default=1.0, metavar="FLOAT",
                       help="last noise time of the scan (default: %(default)s)")
    group.add_argument("--num-times", type=positive_int, default=30, metavar="INT",
                       help="geometrically spaced noise times in the scan (default: %(default)s)")
    group.add_argument("--trials", type=positive_int, default=20, metavar="INT",
                       help="noisy copies of each training point per time (default: %(default)s)")
    group.add_argument("--delta", type=positive_float, default=0.1, metavar="DIST",
                       help="a trial recovers when it ends within this distance of its point, in x units "
                            "(default: %(default)s)")
    group.add_argument("--p", type=positive_float, default=0.9, metavar="FRACTION",
                       help="fraction of trials that must recover for a time to count (default: %(default)s)")
    group.add_argument("--basin-seed", type=int, default=0, metavar="INT",
                       help="seed of the injected and sampling noise (default: %(default)s)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy_example.py", description=DESCRIPTION,
                                     epilog=EPILOG.format(all_minutes=ALL_RUN_TIME),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = common_options()

    data = subparsers.add_parser("data", parents=[common, data_options(default_k=None)],
                                 help="plot the training points for several K")
    data.add_argument("--ks", type=positive_int, nargs="+", default=[2, 4, 9, 1000], metavar="K",
                      help="numbers of training points, one panel each (default: 2 4 9 1000)")

    exact = subparsers.add_parser("exact", parents=[common, data_options(default_k=9)],
                                  help="plot the exact energy and force of K points and of the dense circle")
    level = exact.add_mutually_exclusive_group()
    level.add_argument("--beta", type=positive_float, metavar="FLOAT",
                       help="inverse temperature of the energy (default: from --t)")
    level.add_argument("--t", type=positive_float, metavar="FLOAT",
                       help="diffusion time, beta = 1 / (2 sigma^2 t) (default: 0.05 unless --beta is given)")
    exact.add_argument("--sigma", type=positive_float, default=1.0, metavar="FLOAT",
                       help="diffusion coefficient that relates t to beta (default: %(default)s)")

    subparsers.add_parser("train", parents=[common, data_options(), train_options(), prior_options()],
                          help="train the VE score model of K points (resumes from its checkpoint)")

    subparsers.add_parser("plots", parents=[common, data_options(seed=False), landscape_options(), prior_options()],
                          help="learned and exact energy landscape at time t with the attractors of samples")

    subparsers.add_parser("basin", parents=[common, data_options(seed=False), basin_options()],
                          help="critical noise time and basin radius of every training point")

    run_all = subparsers.add_parser("all", parents=[common, data_options(default_k=None), train_options(),
                                                     landscape_options(), prior_options(), basin_options()],
                                    help=f"everything for several K and a summary figure ({ALL_RUN_TIME})",
                                    description="Run data, exact, train, plots and basin for each K and write "
                                                "summary_t<t>.png with the regimes side by side. Training "
                                                "resumes from existing checkpoints. With the defaults this "
                                                f"took {ALL_RUN_TIME}.")
    run_all.add_argument("--ks", type=positive_int, nargs="+", default=[2, 9, 1000], metavar="K",
                         help="numbers of training points, one column each in the summary (default: 2 9 1000)")
    return parser


def train_config_from(args: argparse.Namespace) -> tuple[VESDE, TrainConfig]:
    if not 0 <= args.ema_decay < 1:
        raise MemgenError(f"--ema-decay {args.ema_decay} is invalid; use a value in [0, 1)")
    if not args.t_min < 1.0:
        raise MemgenError(f"--t-min {args.t_min} must be below the end time 1")
    sde = VESDE(sigma=args.sigma, t_min=args.t_min, t_max=1.0, num_steps=args.num_steps)
    model = ScoreNetConfig(hidden_dim=args.hidden_dim, num_layers=args.num_layers,
                           num_frequencies=args.num_frequencies, sigma=args.sigma)
    config = TrainConfig(iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
                         ema_decay=args.ema_decay, ckpt_every=args.ckpt_every, seed=args.train_seed, model=model)
    return sde, config


def landscape_options_from(args: argparse.Namespace) -> LandscapeOptions:
    return LandscapeOptions(grid_size=args.grid_size, num_samples=args.num_samples,
                            retrieval_iterations=args.retrieval_iterations,
                            cluster_threshold=args.cluster_threshold, ode_steps=args.ode_steps,
                            prior=args.prior, seed=args.sample_seed)


def run_basin_from(args: argparse.Namespace, k: int, device) -> None:
    commands.run_basin(args.out, k, args.t_start, args.t_stop, args.num_times, args.trials, args.delta,
                       args.p, args.basin_seed, device)


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` (default sys.argv) and run one subcommand."""
    args = build_parser().parse_args(argv)
    setup_logging(log_file=Path(args.out) / "toy.log")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    logger.info("toy_example.py %s, results in '%s'", args.command, args.out)

    if args.command == "data":
        commands.run_data(args.out, args.ks, args.data_seed)
    elif args.command == "exact":
        t = 0.05 if args.t is None and args.beta is None else args.t
        commands.run_exact(args.out, args.k, args.data_seed, t, args.beta, args.sigma)
    else:
        device = pick_device(args.device)
        if args.command == "train":
            sde, config = train_config_from(args)
            commands.run_train(args.out, args.k, args.data_seed, sde, config, device, args.num_train_samples,
                               args.prior, args.overwrite)
        elif args.command == "plots":
            commands.run_plots(args.out, args.k, args.t, landscape_options_from(args), device)
        elif args.command == "basin":
            run_basin_from(args, args.k, device)
        elif args.command == "all":
            sde, config = train_config_from(args)
            commands.run_all(args.out, args.ks, args.data_seed, sde, config, args.num_train_samples,
                             args.overwrite, args.t, landscape_options_from(args),
                             dict(t_start=args.t_start, t_stop=args.t_stop, num_times=args.num_times,
                                  num_trials=args.trials, delta=args.delta, fraction=args.p,
                                  seed=args.basin_seed), device)
    logger.info("toy_example.py %s finished in %.1f s", args.command, time.perf_counter() - started)

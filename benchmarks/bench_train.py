"""Training speed: memgen's UNet against diffusers' UNet2DModel of the same layout.

Both networks get the same channels (block_out_channels = dim * dim_mults), residual
blocks per level (layers_per_block = num_res_blocks), single-head attention at the same
resolutions (AttnDownBlock2D / AttnUpBlock2D there, DownBlock2D / UpBlock2D elsewhere,
attention in the middle block), GroupNorm with 32 groups, eps 1e-6, and dropout. One
step is what the training loop does with the network: q_sample, forward, MSE against the
noise, backward and an Adam step, on a fixed random batch in [-1, 1] with fresh t and noise.
The two networks are timed in alternating blocks of steps (see benchmarks/timing.py) and
the table shows median steps per second.

Configurations: `small` is configs/fashionmnist-cpu.yaml (28x28 grey, dim 32), `cifar10`
is configs/cifar10.yaml (32x32 colour, dim 128, 35.7M parameters), with a batch small
enough for a CPU. `--speed-options` also times memgen's bf16 autocast and channels-last
(and `--compile`, torch.compile) against float32 eager on the small configuration.

    python benchmarks/bench_train.py                    # both configurations
    python benchmarks/bench_train.py --quick            # fewer and smaller steps
    python benchmarks/bench_train.py --device cuda --speed-options --compile
"""

import argparse
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from timing import REPO, Row, format_table, interleaved_seconds, machine_description, median, paired_ratio

from memgen.config import TRAINING_SECTIONS, ModelOptions, load_yaml_sections
from memgen.diffusion import NoiseSchedule
from memgen.unet import build_unet, count_parameters

CONFIGS = {"small": "configs/fashionmnist-cpu.yaml", "cifar10": "configs/cifar10.yaml"}


@dataclass
class TrainSettings:
    """Batch and timing of one configuration."""

    batch_size: int
    steps_per_block: int
    repeats: int


SETTINGS = {
    ("small", False): TrainSettings(batch_size=64, steps_per_block=2, repeats=9),
    ("small", True): TrainSettings(batch_size=16, steps_per_block=1, repeats=5),
    ("cifar10", False): TrainSettings(batch_size=8, steps_per_block=1, repeats=7),
    ("cifar10", True): TrainSettings(batch_size=2, steps_per_block=1, repeats=3),
}


class DiffusersUNet(nn.Module):
    """diffusers' UNet2DModel behind memgen's network interface `forward(x_t, t) -> (B, C, H, W)`."""

    def __init__(self, model: ModelOptions):
        super().__init__()
        from diffusers import UNet2DModel

        resolutions = [model.image_size // 2 ** level for level in range(len(model.dim_mults))]
        with_attention = [resolution in model.attn_resolutions for resolution in resolutions]
        self.unet = UNet2DModel(
            sample_size=model.image_size,
            in_channels=model.in_channels,
            out_channels=model.in_channels,
            block_out_channels=tuple(model.dim * mult for mult in model.dim_mults),
            layers_per_block=model.num_res_blocks,
            down_block_types=tuple("AttnDownBlock2D" if attention else "DownBlock2D" for attention in with_attention),
            up_block_types=tuple("AttnUpBlock2D" if attention else "UpBlock2D" for attention in reversed(with_attention)),
            attention_head_dim=None,
            norm_num_groups=32,
            norm_eps=1e-6,
            dropout=model.dropout,
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t).sample


def model_options(name: str) -> ModelOptions:
    return load_yaml_sections(REPO / CONFIGS[name], TRAINING_SECTIONS)["model"]


class TrainingStep:
    """One optimiser step of a network on a fixed batch: q_sample, forward, MSE, backward, Adam."""

    def __init__(self, network: nn.Module, model: ModelOptions, batch_size: int, device: torch.device,
                 precision: str = "fp32", channels_last: bool = False, compile_network: bool = False):
        self.network = network.to(device).train()
        if channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=2e-4)
        self.forward = torch.compile(self.network) if compile_network else self.network
        self.schedule = NoiseSchedule()
        self.device = device
        self.precision = precision
        self.channels_last = channels_last
        self.generator = torch.Generator().manual_seed(0)
        shape = (batch_size, model.in_channels, model.image_size, model.image_size)
        self.x0 = (torch.rand(shape, generator=self.generator) * 2 - 1).to(device)
        if channels_last:
            self.x0 = self.x0.contiguous(memory_format=torch.channels_last)
        self.losses: list[float] = []

    def __call__(self) -> None:
        t = torch.randint(0, self.schedule.timesteps, (len(self.x0),), generator=self.generator).to(self.device)
        noise = torch.randn(self.x0.shape, generator=self.generator).to(self.device)
        if self.channels_last:
            noise = noise.contiguous(memory_format=torch.channels_last)
        x_t = self.schedule.q_sample(self.x0, t, noise)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            loss = F.mse_loss(self.forward(x_t, t).float(), noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.item())


def repeat_steps(step: TrainingStep, count: int):
    def run() -> None:
        for _ in range(count):
            step()
    return run


def steps_per_second(seconds: list[float], steps: int) -> list[float]:
    return [steps / value for value in seconds]


def compare_networks(name: str, quick: bool, device: torch.device) -> list[Row]:
    """Time memgen's UNet against diffusers' on configuration `name`; return one row."""
    model = model_options(name)
    settings = SETTINGS[(name, quick)]
    torch.manual_seed(0)
    memgen_net = build_unet(model)
    diffusers_net = DiffusersUNet(model)
    parameters = (count_parameters(memgen_net), count_parameters(diffusers_net))
    steps = {"memgen": TrainingStep(memgen_net, model, settings.batch_size, device),
             "diffusers": TrainingStep(diffusers_net, model, settings.batch_size, device)}
    seconds = interleaved_seconds({key: repeat_steps(step, settings.steps_per_block) for key, step in steps.items()},
                                  repeats=settings.repeats)
    rates = {key: median(steps_per_second(values, settings.steps_per_block)) for key, values in seconds.items()}
    ratio, lowest, highest = paired_ratio(seconds["diffusers"], seconds["memgen"])
    return [Row(
        stage="train", measure=f"steps/s, {name} config, batch {settings.batch_size}",
        memgen=f"{rates['memgen']:.3g} ({parameters[0] / 1e6:.2f}M params)",
        alternative=f"diffusers UNet2DModel {rates['diffusers']:.3g} ({parameters[1] / 1e6:.2f}M params)",
        ratio=ratio, target="memgen/diffusers >= 1", met=ratio >= 1.0,
        note=(f"median over {settings.repeats} rounds of {settings.steps_per_block} steps each; "
              f"per-round ratios {lowest:.2f} to {highest:.2f}"),
    )]


def compare_speed_options(quick: bool, device: torch.device, with_compile: bool) -> list[Row]:
    """Time memgen's UNet with bf16 autocast, channels-last (and torch.compile) against float32 eager."""
    model = model_options("small")
    settings = SETTINGS[("small", quick)]
    torch.manual_seed(0)
    network = build_unet(model)
    variants = {"fp32": {}, "bf16 autocast": {"precision": "bf16"}, "channels-last": {"channels_last": True}}
    if with_compile:
        variants["torch.compile"] = {"compile_network": True}
    steps = {key: TrainingStep(copy.deepcopy(network), model, settings.batch_size, device, **options)
             for key, options in variants.items()}
    seconds = interleaved_seconds({key: repeat_steps(step, settings.steps_per_block) for key, step in steps.items()},
                                  repeats=settings.repeats)
    rates = {key: median(steps_per_second(values, settings.steps_per_block)) for key, values in seconds.items()}
    rows = []
    for key in variants:
        if key == "fp32":
            continue
        # The first steps of every variant see the same weights, batch, t and noise.
        gap = max(abs(a - b) / abs(b) for a, b in zip(steps[key].losses[:3], steps["fp32"].losses[:3]))
        ratio, lowest, highest = paired_ratio(seconds["fp32"], seconds[key])
        rows.append(Row(
            stage="train", measure=f"steps/s, small config, batch {settings.batch_size}, {key}",
            memgen=f"{rates[key]:.3g}", alternative=f"memgen fp32 eager {rates['fp32']:.3g}",
            ratio=ratio, target="none on CPU (a GPU option)",
            note=(f"per-round ratios {lowest:.2f} to {highest:.2f}; max relative loss gap to fp32 "
                  f"over the first 3 steps {gap:.1e}")))
    return rows


def run(quick: bool = False, device: str = "cpu", speed_options: bool = True, with_compile: bool = False,
        configs: tuple[str, ...] = ("small", "cifar10")) -> list[Row]:
    """Run the training benchmark and return its table rows."""
    device = torch.device(device)
    rows = []
    for name in configs:
        rows += compare_networks(name, quick, device)
    if speed_options:
        rows += compare_speed_options(quick, device, with_compile)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller batches and fewer repeats")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="configurations to time (default: all)")
    parser.add_argument("--speed-options", action="store_true", help="also time bf16 autocast and channels-last")
    parser.add_argument("--compile", action="store_true",
                        help="with --speed-options, also time torch.compile (compiling takes minutes on a CPU)")
    args = parser.parse_args()
    print(machine_description())
    rows = run(args.quick, args.device, args.speed_options, args.compile, tuple(args.configs))
    print(format_table(rows))


if __name__ == "__main__":
    main()

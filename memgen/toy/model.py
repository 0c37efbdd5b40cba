"""MLP score network of the 2D toy model, conditioned on time through Fourier features."""

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class ScoreNetConfig:
    """Size of the score network.

    hidden_dim: width of every hidden layer.
    num_layers: number of hidden layers (each Linear + SiLU).
    num_frequencies: Fourier frequencies of log t; the time feature has twice as many entries.
    frequency_scale: std of the random Fourier frequencies, in cycles per unit of log t.
    sigma: diffusion coefficient of the VE SDE; the output is divided by sigma sqrt(t).
    """

    hidden_dim: int = 128
    num_layers: int = 3
    num_frequencies: int = 16
    frequency_scale: float = 1.0
    sigma: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


class FourierTimeFeatures(nn.Module):
    """[cos(2 pi f log t), sin(2 pi f log t)] for fixed random frequencies f ~ N(0, scale^2).

    The frequencies are a buffer, so they are saved in the state dict with the weights.
    """

    def __init__(self, num_frequencies: int, scale: float, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("frequencies", torch.randn(num_frequencies, generator=generator) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) times > 0; returns (B, 2 * num_frequencies)."""
        phase = 2 * torch.pi * torch.log(t)[:, None] * self.frequencies[None, :]
        return torch.cat([torch.cos(phase), torch.sin(phase)], dim=1)


class ScoreNet(nn.Module):
    """Score s(x, t) of the VE SDE: an MLP of (x, Fourier features of t), divided by sigma_t.

    Dividing by sigma_t = sigma sqrt(t) makes the network predict -z, the negative unit
    noise, whose size does not depend on t. forward(x, t) takes x (B, 2) and float times
    t (B,) in (0, 1] and returns the score (B, 2).
    """

    def __init__(self, config: ScoreNetConfig):
        super().__init__()
        self.config = config
        self.time_features = FourierTimeFeatures(config.num_frequencies, config.frequency_scale)
        layers: list[nn.Module] = []
        in_features = 2 + 2 * config.num_frequencies
        for _ in range(config.num_layers):
            layers += [nn.Linear(in_features, config.hidden_dim), nn.SiLU()]
            in_features = config.hidden_dim
        layers.append(nn.Linear(in_features, 2))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        features = torch.cat([x, self.time_features(t)], dim=1)
        marginal_std = self.config.sigma * torch.sqrt(t)
        return self.mlp(features) / marginal_std[:, None]

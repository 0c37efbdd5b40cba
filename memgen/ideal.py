"""The ideal memorizer: the exact optimal denoiser of the empirical training distribution.

For the K training images x_i, the minimiser of the denoising loss is

    E[x0 | x_t] = sum_i w_i(x_t) x_i,   w = softmax_i( -||x_t - sqrt(abar_t) x_i||^2 / (2 (1 - abar_t)) ),

so a sampler driven by it returns training images. It stands in for a trained network in
every stage (checkpoint format "memgen-ideal") and gives the classifier a known answer.
"""

import torch
from torch import nn


class IdealDenoiser(nn.Module):
    """Predict x0 as the softmax-weighted mean of the training images (prediction_type "sample")."""

    prediction_type = "sample"

    def __init__(self, train_images: torch.Tensor, alphas_cumprod: torch.Tensor):
        """`train_images`: (K, C, H, W) in [-1, 1]; `alphas_cumprod`: (T,) of the noise schedule."""
        super().__init__()
        flat = train_images.reshape(len(train_images), -1).to(torch.float64)
        self.register_buffer("train_flat", flat)
        self.register_buffer("train_sq_norms", (flat ** 2).sum(dim=1))
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64))
        self.image_shape = tuple(train_images.shape[1:])

    def posterior_weights(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Return the softmax weights (B, K) of the training images given x_t (B, C, H, W)."""
        abar = self.alphas_cumprod[t.to(self.alphas_cumprod.device)].unsqueeze(1)
        flat = x_t.reshape(len(x_t), -1).to(torch.float64)
        squared_distances = ((flat ** 2).sum(dim=1, keepdim=True) + abar * self.train_sq_norms
                             - 2 * abar.sqrt() * flat @ self.train_flat.T).clamp_min(0)
        return torch.softmax(-squared_distances / (2 * (1 - abar)), dim=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = self.posterior_weights(x_t, t) @ self.train_flat
        return x0.reshape(x_t.shape).to(x_t.dtype)

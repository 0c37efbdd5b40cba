"""memgen: memorization, spurious states and generalization in diffusion models."""

__version__ = "0.1.0"

"""2D toy model: K points on the unit circle, a VE diffusion trained on them, and its energy."""

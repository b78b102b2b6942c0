"""diffusion_lab: train diffusion models from scratch with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"

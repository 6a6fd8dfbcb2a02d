"""tailgen: sampling-time guidance for pretrained class-conditional diffusion models."""

__version__ = "0.1.0"

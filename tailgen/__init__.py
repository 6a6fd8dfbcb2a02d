"""tailgen: sampling-time guidance for pretrained class-conditional diffusion models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tailgen")
except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "0+unknown"

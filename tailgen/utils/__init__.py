"""Layer 0: errors, file helpers and small utilities shared by every layer."""

from tailgen.utils.errors import CheckpointError, ConfigError, DataError, SamplingError, TailgenError

__all__ = ["TailgenError", "CheckpointError", "ConfigError", "DataError", "SamplingError"]

"""One exception family: every message names the problem and the fix."""


class TailgenError(Exception):
    """Base of every user-facing tailgen error."""


class CheckpointError(TailgenError):
    """A weights file is missing, unreadable, unsafe or does not fit the network."""


class ConfigError(TailgenError, ValueError):
    """A configuration value is invalid (unknown name, out of range, inconsistent options)."""


class DataError(TailgenError):
    """A dataset or reference file is missing or malformed."""


class SamplingError(TailgenError):
    """Sampling produced invalid values (NaN / inf) or was asked to do something impossible."""

"""The exceptions spinelevel raises.

Every message names the file, tag or option at fault and, where there is one, the fix.
"""

__all__ = [
    "SpineLevelError",
    "ModelError",
    "CardError",
    "BackendUnavailableError",
    "InputError",
    "DecodeError",
    "OutputError",
]


class SpineLevelError(Exception):
    """Base class of every error spinelevel raises on purpose."""


class ModelError(SpineLevelError):
    """A model file cannot be read or does not fit the engine."""


class CardError(ModelError):
    """A model card is missing or invalid."""


class BackendUnavailableError(SpineLevelError):
    """An inference backend was asked for but its packages are not installed."""


class InputError(SpineLevelError):
    """An input path or option is unusable (fatal for the run)."""


class DecodeError(SpineLevelError):
    """One file's pixel data cannot be turned into Hounsfield units (not fatal)."""


class OutputError(SpineLevelError):
    """The output directory cannot be written."""

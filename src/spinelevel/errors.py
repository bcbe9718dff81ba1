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
    "DicomwebError",
    "RemoteReadError",
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


class DicomwebError(InputError):
    """A DICOMweb server cannot be used: unreachable, refused the credentials, or answered an error.

    Fatal when raised before a run starts (wrong URL, wrong credentials); during a run the series
    concerned is recorded as an error instead. The message names the URL, never a credential.
    """

    def __init__(self, message: str, status: int | None = None, transient: bool = False) -> None:
        super().__init__(message)
        # HTTP status of the last answer, None when there was none (connection refused, timeout).
        self.status = status
        # The failure may pass by itself (connection refused or reset, timeout, 408/429/5xx, truncated).
        self.transient = transient


class RemoteReadError(DecodeError):
    """One instance could not be retrieved from a DICOMweb server after retries (not fatal).

    Unlike a decode failure it says nothing about the file: the series is recorded as an error and
    redone by the next run.
    """

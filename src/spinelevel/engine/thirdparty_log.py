"""Log records of the DICOM libraries, without the header values they quote.

pydicom (and the decoder plugins) log problems with the offending value in the text ("Invalid value
for VR UI: '...'"); a value may be a patient's name or ID. :func:`install` takes those loggers over in
the process that calls it (the run's main process and every decode worker process): records stop
propagating to the root logger (and so never reach stderr through logging's last-resort handler),
are counted, and are passed on to ``spinelevel.thirdparty`` at DEBUG level with every quoted value
replaced by ``<value>``, so ``--verbose`` shows the tag and the problem but not the value. A worker
process (``install(collect=True)``) also keeps the redacted lines for the parent to show
(:func:`take_messages`, :func:`show`): the worker's own logging is not set up.
"""

from __future__ import annotations

import logging
import re
import threading

__all__ = ["THIRD_PARTY_LOGGERS", "install", "record_count", "redact", "show", "take_messages"]

# Loggers of the libraries that read DICOM headers and pixel data for the engine.
THIRD_PARTY_LOGGERS = ("pydicom", "pylibjpeg", "openjpeg", "libjpeg", "jpeg_ls", "gdcm", "highdicom")

_out = logging.getLogger("spinelevel.thirdparty")

# A quoted value: '...', "..." or b'...' (with escapes), or a value after "value" / "=".
_QUOTED = re.compile(r"""b?'(?:[^'\\]|\\.)*'|b?"(?:[^"\\]|\\.)*\"""")
_AFTER_EQUALS = re.compile(r"(=\s*)([^\s,;)]+)")
_MAX_CHARS = 300
# Redacted lines a worker keeps between two take_messages calls (the count goes on past it).
_MAX_KEPT = 20


def redact(text: str) -> str:
    """``text`` with every quoted value (and every ``=value``) replaced by ``<value>``."""
    text = _QUOTED.sub("<value>", text)
    text = _AFTER_EQUALS.sub(r"\1<value>", text)
    return text[:_MAX_CHARS]


class _Redactor(logging.Handler):
    """Counts the records of the third-party loggers and forwards them without values."""

    def __init__(self, collect: bool = False) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0
        self.collect = collect
        self.kept: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1  # emit runs under the handler's lock
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: keep the template only
            message = str(record.msg)
        line = f"{record.name} {record.levelname.lower()}: {redact(message)}"
        if self.collect:
            if len(self.kept) < _MAX_KEPT:
                self.kept.append(line)
        elif _out.isEnabledFor(logging.DEBUG):
            _out.debug("%s", line)


_lock = threading.Lock()
_handler: _Redactor | None = None


def install(collect: bool = False) -> None:
    """Take over the third-party loggers in this process (idempotent).

    ``collect``: keep the redacted lines for :func:`take_messages` instead of logging them (worker
    processes, whose parent shows them).
    """
    global _handler
    with _lock:
        if _handler is not None:
            return
        handler = _Redactor(collect)
        for name in THIRD_PARTY_LOGGERS:
            logger = logging.getLogger(name)
            logger.addHandler(handler)
            logger.propagate = False
            # WARNING and above are what the libraries report as problems; their debug chatter
            # is not worth the cost of formatting it
            logger.setLevel(logging.WARNING)
        _handler = handler


def record_count() -> int:
    """Third-party records seen in this process since :func:`install` (0 before)."""
    return _handler.count if _handler is not None else 0


def take_messages() -> tuple[str, ...]:
    """The redacted lines kept since the last call (collecting processes only), and forget them."""
    if _handler is None or not _handler.collect:
        return ()
    with _lock:
        kept, _handler.kept = tuple(_handler.kept), []
    return kept


def show(lines: tuple[str, ...]) -> None:
    """Log a worker's redacted lines here (DEBUG: ``--verbose`` shows them)."""
    if lines and _out.isEnabledFor(logging.DEBUG):
        for line in lines:
            _out.debug("%s", line)

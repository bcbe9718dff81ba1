"""spinelevel: vertebral levels and the L3 slice for every series of a CT archive."""

__all__ = ["__version__"]

__version__ = "0.1.0"

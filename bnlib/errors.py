"""The errors bnlib raises on purpose: a leaf module, so every layer can raise them without
importing the layer that defines the thing that was wrong."""
from __future__ import annotations

__all__ = ["ConfigError", "RecordError", "RunLocked"]


class ConfigError(ValueError):
    """A bad parameter set; the message lists every problem, one line each."""


class RecordError(ValueError):
    """A record file that parses but does not have the shape bnlib writes (a list where an
    object belongs, a string where metrics belong, ...); the message names the file."""


class RunLocked(RuntimeError):
    """Another process holds the run's lock (it is running that run now)."""

"""One run parameter: its type, default, accepted values and help, and the check of a value.

A leaf of the package. Every registry that owns parameters declares them with `Param`: the run
config's own table (bnlib.config), a norm's options (bnlib.norms) and a probe's parameters
(bnlib.probes), so `RunConfig` is assembled from them and a new norm or probe with parameters
is one registry entry. Types are strict: no silent coercion of strings to numbers, no bools as
numbers.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

__all__ = ["Param", "FP32_MAX", "SEED_MAX", "check_value", "plain", "TYPES"]

# What the code can really take (issue 15). Every number a run uses becomes a float32 tensor
# value or scalar somewhere (weights, optimizer hyper-parameters, the lr schedule; bf16 has the
# same range), and torch refuses a finite float beyond float32's range: such values are refused
# at validation, not crashed on after the run folder exists. Seeds: NumPy's legacy seed takes
# [0, 2**32 - 1].
FP32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max
SEED_MAX = 2**32 - 1
TYPES = ("str", "float", "int", "bool", "list")


@dataclass(frozen=True)
class Param:
    """A parameter's declaration. `type` is one of TYPES (inferred from a non-None default);
    `choices` a tuple or a callable giving one; range [lo, hi], open at an end with
    lo_open/hi_open; a list's `items` are "number", "int" or "str"; `path`: a folder name."""

    default: Any
    help: str
    type: str | None = None
    choices: tuple | Callable[[], Any] | None = None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    nullable: bool = False
    items: str = "number"
    path: bool = False

    def __post_init__(self):
        if self.type is None:
            if self.default is None:
                raise ValueError("a Param whose default is None needs an explicit type")
            t = type(self.default)
            inferred = {bool: "bool", int: "int", float: "float", str: "str", list: "list", tuple: "list"}.get(t)
            if inferred is None:
                raise ValueError(f"Param default {self.default!r}: type {t.__name__} is not one of {list(TYPES)}")
            object.__setattr__(self, "type", inferred)
        if self.type not in TYPES:
            raise ValueError(f"Param type {self.type!r}; valid types: {list(TYPES)}")

    def metadata(self) -> dict:
        return dict(help=self.help, choices=self.choices, lo=self.lo, hi=self.hi, lo_open=self.lo_open,
                    hi_open=self.hi_open, nullable=self.nullable, path=self.path, items=self.items)

    def dataclass_field(self):
        """A dataclasses.field with this default (lists copied per instance) and metadata."""
        if isinstance(self.default, (list, tuple)):
            default = list(self.default)
            return field(default_factory=lambda: list(default), metadata=self.metadata())
        return field(default=self.default, metadata=self.metadata())


def _typename(t: str, items: str = "number") -> str:
    return {"str": "a string", "float": "a number", "int": "an integer", "bool": "true/false",
            "list": {"number": "a list of numbers", "int": "a list of integers", "str": "a list of strings"}[items]}[t]


def _is_item(x, items: str) -> bool:
    if items == "str":
        return isinstance(x, str)
    if isinstance(x, bool):
        return False
    return isinstance(x, int) if items == "int" else isinstance(x, (int, float))


def check_value(name: str, t: str, md: dict, v) -> str | None:
    """An error line for value `v` of parameter `name` (type `t`, metadata `md` as
    Param.metadata() gives it), or None when it is accepted."""
    if md.get("path") and isinstance(v, str) and not v.strip():
        return f"{name}={v!r}: an empty path; name a folder ('.' for the current one)"
    if md.get("path") and isinstance(v, str) and "\0" in v:
        return f"{name}={v!r}: a path cannot contain a NUL character"
    if t == "list" and isinstance(v, str):  # papermill's -p passes a list as its text
        return (f"{name}={v!r} (str): must be {_typename(t, md['items'])}; from papermill pass a list with -y "
                f"(-y '{name}: [...]'), on the command line --{name} '[...]'")
    if v is None:
        return None if md["nullable"] else f"{name}={v!r}: must be {_typename(t, md['items'])}"
    ok = {"str": isinstance(v, str),
          "bool": isinstance(v, bool),
          "int": isinstance(v, int) and not isinstance(v, bool),
          "float": isinstance(v, (int, float)) and not isinstance(v, bool),
          "list": isinstance(v, (list, tuple)) and all(_is_item(x, md["items"]) for x in v)}[t]
    if not ok:
        return f"{name}={v!r} ({type(v).__name__}): must be {_typename(t, md['items'])}" + \
            (" or None" if md["nullable"] else "")
    choices = md["choices"]() if callable(md["choices"]) else md["choices"]
    if choices is not None and v not in choices:
        return f"{name}={v!r}: not a valid choice; valid choices: {list(choices)}"
    if t == "list" and md["items"] != "str":
        bad = [x for x in v if not math.isfinite(x) or abs(x) > FP32_MAX]
        if bad:
            return f"{name}={v!r}: {bad[0]!r} is not a finite number within float32's range (±{FP32_MAX:.3g})"
    if t in ("int", "float"):
        try:
            finite = math.isfinite(float(v))
        except OverflowError:
            finite = False
        if not finite:
            return f"{name}={v!r}: must be a finite number"
        if t == "float" and abs(v) > FP32_MAX:
            return (f"{name}={v!r}: out of range; must be within ±{FP32_MAX:.4g} (float32's range: training "
                    f"computes in float32, and torch cannot convert a larger value)")
        lo, hi = md["lo"], md["hi"]
        if lo is not None and (v <= lo if md["lo_open"] else v < lo) or \
                hi is not None and (v >= hi if md["hi_open"] else v > hi):
            lo_s = "" if lo is None else f"{'>' if md['lo_open'] else '>='} {lo}"
            hi_s = "" if hi is None else f"{'<' if md['hi_open'] else '<='} {hi}"
            return f"{name}={v!r}: out of range; must be {' and '.join(s for s in (lo_s, hi_s) if s)}"
    return None


def plain(v):
    """NumPy scalars and arrays as the Python numbers and lists they hold, path-like objects as
    their path string: accepted wherever a number, a list or a path is (the strict type check
    then sees what it would for the plain value)."""


    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray) and v.ndim == 1:
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return type(v)(x.item() if isinstance(x, np.generic) else x for x in v)
    if isinstance(v, os.PathLike):
        try:
            return os.fspath(v)
        except TypeError:
            return v
    return v

"""The probe registry and the runner: what a probe is, which ones a run asks for, and when each runs.

A probe is one registered function `fn(ctx) -> rows`, like a norm is one registry entry; the loop
calls every due probe through one hook (`ProbeRunner.at`) and the rows go to `probes.parquet`
(long format, `COLUMNS`; bnlib.probes describes them). A probe declares the run parameters it
reads (`ProbeSpec.params`, bnlib.params.Param) and their checks beyond type and range
(`ProbeSpec.check`): bnlib.config assembles RunConfig from `probe_params()` and validates through
`check_probe_params`. The runner's own parameters (probes, probe_every, probe_steps,
probe_batch_size) are bnlib.config's.
"""
from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..models import conv_layers, meta_model
from ..params import Param
from ..plugins import check_unique, entry_source
from ..rng import preserved

__all__ = ["ProbeContext", "ProbeSpec", "PROBES", "register_probe", "probe_names", "probe_params", "parse_probes",
           "check_probe_params", "ProbeRunner", "COLUMNS", "n_convs"]

COLUMNS = {"step": "int64", "epoch": "float64", "probe": "object", "layer": "object", "depth": "int64",
           "quantity": "object", "x": "float64", "value": "float64"}


@dataclass
class ProbeContext:
    model: nn.Module  # a deep copy of the training model, in train mode: the probe may change it
    x: torch.Tensor  # the current training batch as the step sees it (augmented, float, fp32)
    y: torch.Tensor
    loss_fn: Callable  # loss_fn(logits, y) -> the run's mean loss
    optimizer: torch.optim.Optimizer  # the run's optimizer: read it, never step it
    step: int  # optimizer updates done (0 = initialization)
    epoch: float  # step / steps per epoch
    cfg: dict
    probe_batch: tuple  # (images, labels): the first probe_batch_size training images, not augmented
    # id(a parameter of the training model) -> the same parameter of `model`: maps the
    # optimizer's parameter groups onto the copy (the P3 ICS probe replays the real update there)
    twin_params: dict = field(default_factory=dict)

    def row(self, probe: str, quantity: str, value, layer: str = "", depth: int = -1, x: float = math.nan) -> dict:
        return {"step": self.step, "epoch": self.epoch, "probe": probe, "layer": layer, "depth": int(depth),
                "quantity": quantity, "x": float(x), "value": float(value)}


@dataclass(frozen=True)
class ProbeSpec:
    name: str
    fn: Callable[[ProbeContext], list]
    doc: str
    default_every: int | None  # run every k steps by default (None: init and epoch ends only)
    # the run parameters this probe reads (RunConfig fields, bnlib.config assembles them)
    params: dict[str, Param] = field(default_factory=dict, hash=False)
    # check(cfg, bad) -> error lines for this probe's parameters beyond their type and range (e.g.
    # a conv index against the net's conv count); `bad`: the parameters that already failed. It
    # runs for every config, whether or not the probe is requested.
    check: Callable[[dict, set], list[str]] | None = None
    version: int = 1  # raise it when the probe measures something else under the same name (run ids follow)
    source: dict | None = field(default=None, compare=False)  # None: bnlib's own; else the plugin's file, sha256


PROBES: dict[str, ProbeSpec] = {}


def register_probe(name: str, *, doc: str, default_every: int | None = None, params: dict[str, Param] | None = None,
                   check: Callable[[dict, set], list[str]] | None = None, version: int = 1):
    """Register a probe (see ProbeSpec); a decorator on its function. Also from a plugin
    (bnlib.plugins): the entry then records the plugin's file and content hash."""
    params = dict(params or {})
    for k, p in params.items():
        if not isinstance(p, Param):
            raise ValueError(f"probe {name!r}: parameter {k!r} must be declared with bnlib.params.Param, "
                             f"not {type(p).__name__}")

    def deco(fn):
        source = entry_source(fn)
        check_unique("probe", PROBES, name, source)
        for other in PROBES.values():
            if other.name == name:
                continue  # one parameter, one declaration: RunConfig has one field for it
            for k in params.keys() & other.params.keys():
                if params[k] != other.params[k]:
                    raise ValueError(f"probes {other.name!r} and {name!r} both declare parameter {k!r}, "
                                     f"differently: {other.params[k]!r} vs {params[k]!r}; declare it once and "
                                     f"share the declaration")
        PROBES[name] = ProbeSpec(name, fn, doc, default_every, params, check, int(version), source)
        return fn

    return deco


def probe_names() -> list[str]:
    return sorted(PROBES)


def probe_params() -> dict[str, Param]:
    """Every registered probe's parameters, in registration order (a name shared by two probes,
    declared alike, once)."""
    out: dict[str, Param] = {}
    for spec in PROBES.values():
        for k, p in spec.params.items():
            out.setdefault(k, p)
    return out


# ----------------------------------------------------------------------------------------------
# parameters and cadence
# ----------------------------------------------------------------------------------------------

_ENTRY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:@(.*))?")


def parse_probes(entries) -> tuple[list[tuple[str, int | None]], list[str]]:
    """'name' or 'name@k' -> [(name, k or None)], plus error lines."""
    out, errors = [], []
    for e in entries:
        m = _ENTRY.fullmatch(e)
        name, k = (m.group(1), m.group(2)) if m else (e, None)
        if name not in PROBES:
            errors.append(f"probes: {e!r} is not a known probe; valid choices: {probe_names()} "
                          f"(optionally with '@k' to run it every k steps)")
            continue
        if k is not None and not (k.isdigit() and int(k) >= 1):
            errors.append(f"probes: {e!r}: the cadence after '@' must be a whole number of steps >= 1, "
                          f"e.g. '{name}@100'")
            continue
        if name in [n for n, _ in out]:
            errors.append(f"probes: {name!r} is requested twice; give it once (with '@k' for its cadence)")
            continue
        out.append((name, int(k) if k is not None else None))
    return out, errors


def check_probe_params(cfg: dict, bad: set) -> list[str]:
    """Error lines for the probe parameters of a config (called by bnlib.config.validate): the
    runner's (probes, probe_steps), then every registered probe's own check, requested or not."""
    errors = []
    if "probes" not in bad:
        errors += parse_probes(cfg["probes"])[1]
    if "probe_steps" not in bad and any(s < 0 for s in cfg["probe_steps"]):
        errors.append(f"probe_steps={cfg['probe_steps']!r}: each must be >= 0 (optimizer updates done; "
                      f"0 = initialization)")
    for spec in PROBES.values():
        if spec.check is not None:
            errors += spec.check(cfg, bad)
    return errors


def n_convs(cfg: dict) -> int | None:
    """Conv layers of the config's network (bnlib.models.conv_layers), or None when it cannot be
    built (for probes' checks of conv indices)."""
    try:
        return len(conv_layers(meta_model(cfg)))
    except Exception:  # noqa: BLE001 — a bad model parameter: validate reports it by its own line
        return None


class ProbeRunner:
    """Runs the requested probes when due and keeps their rows (`rows`, saved in checkpoints).
    `at(step, x, y)` is the loop's one hook: at the top of each step (before the update with
    index `step`) and, with `epoch_end=True`, after an epoch's last step. A (probe, step) pair
    is measured once, so the end of one epoch and the start of the next are one measurement."""

    def __init__(self, cfg: dict, model: nn.Module, optimizer, loss_fn, probe_batch, steps_per_epoch: int,
                 generators=()):
        self.cfg, self.model, self.optimizer, self.loss_fn = cfg, model, optimizer, loss_fn
        self.probe_batch, self.spe, self.generators = probe_batch, max(1, steps_per_epoch), tuple(generators)
        entries, errors = parse_probes(cfg.get("probes", []))
        if errors:
            raise ConfigError("invalid run parameters:\n  - " + "\n  - ".join(errors))
        self.every = {n: k or cfg.get("probe_every") or PROBES[n].default_every for n, k in entries}
        self.steps = set(cfg.get("probe_steps", []))
        self.rows: list[dict] = []
        self.done: set = set()
        self.seconds = 0.0  # time spent in probes since the last take_seconds()

    def __bool__(self) -> bool:
        return bool(self.every)

    def restore(self, rows: list[dict]) -> None:
        """Rows from a checkpoint: a resumed run neither loses nor repeats measurements."""
        self.rows = list(rows)
        self.done = {(r["probe"], r["step"]) for r in rows}

    def due(self, step: int, epoch_end: bool = False) -> list[str]:
        return [n for n, k in self.every.items()
                if (n, step) not in self.done
                and (epoch_end or step == 0 or step in self.steps or (k is not None and step % k == 0))]

    def at(self, step: int, x: torch.Tensor, y: torch.Tensor, epoch_end: bool = False) -> None:
        if not self.every:
            return
        names = self.due(step, epoch_end)
        if not names:
            return
        if x.is_cuda and not epoch_end:
            # mid-epoch, the queued training kernels belong to the epoch, not to this timer (whose
            # seconds the epoch's img/s leaves out); at an epoch's end its timer has stopped already
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        with preserved(self.generators), torch.autocast(x.device.type, enabled=False), torch.enable_grad():
            for name in names:
                self.rows += self.call(name, step, x, y)
                self.done.add((name, step))
        self.seconds += time.perf_counter() - t0  # probes read results back: the device has synchronized

    def take_seconds(self) -> float:
        """Seconds spent in probes since the last call (the loop leaves them out of its epoch timer)."""
        s, self.seconds = self.seconds, 0.0
        return s

    def frame(self):
        """The rows as the probes.parquet table (typed columns, also when empty)."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=list(COLUMNS)).astype(COLUMNS)

    def call(self, name: str, step: int, x, y) -> list[dict]:
        """One probe on a fresh copy of the model (no RNG or autocast handling: see `at`)."""
        twin = copy.deepcopy(self.model).train()
        ctx = ProbeContext(twin, x, y, self.loss_fn, self.optimizer, step, step / self.spe, self.cfg,
                           self.probe_batch, dict(zip(map(id, self.model.parameters()), twin.parameters())))
        return PROBES[name].fn(ctx)

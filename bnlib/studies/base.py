"""The study registry: `Study` (a named grid of run.ipynb parameters with presets, an analysis
notebook and a verdict function) and `Preset`; each paper's module registers one."""
from __future__ import annotations

import itertools
import json
import zlib
from dataclasses import dataclass, field
from typing import Callable

from ..plugins import check_unique, entry_source

__all__ = ["Preset", "Study", "STUDIES", "register_study", "get_study", "study_names", "cell_seed"]


def cell_seed(cell: dict, replicate: int) -> int:
    """The training seed of replicate `replicate` in a grid cell (e.g. {arch, batch_size}).
    A seed fixes the initial weights and the data order, so runs that share one are a single
    replicate whatever cell they sit in; cells meant to be independent replicates get seeds of
    their own: 1000·c + replicate, c a stable code of the cell's values (CRC-32 mod 10⁶)."""
    if not 0 <= int(replicate) < 1000:
        raise ValueError(f"replicate={replicate!r}; valid: 0..999")
    code = zlib.crc32(json.dumps(cell, sort_keys=True, default=str).encode()) % 1_000_000
    return code * 1000 + int(replicate)


@dataclass(frozen=True)
class Preset:
    base: dict  # run parameters shared by every grid point
    grid: dict  # axis name -> list of values; the runs are the product of the axes
    derive: Callable[[dict], dict] | None = None  # this preset's own derive (else the study's)
    # Sub-experiments with different grids (P5: depth x variant, batch size x lr): when given,
    # the runs are the union over sub-grids of the product of `grid` and that sub-grid (its axes
    # replace `grid`'s of the same name; a one-value axis fixes a parameter for that sub-grid
    # only), in order, a point that two sub-grids share counted once.
    subgrids: tuple = ()
    # each arm's learning-rate ladder as `derive` reads it (the rungs of the axis lr_rung): lets an
    # arm added with a ladder of its own (bnlib.arms, '+my_norm:0.01,0.03') be scaled as the study's
    ladders: dict | None = None


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    notebook: str | None  # analysis notebook, relative to notebooks/ (None: studies/generic_study.ipynb when the study has verdicts or comes from a plugin)
    presets: dict[str, Preset]
    derive: Callable[[dict], dict] | None = None  # point -> extra/overriding parameters
    doc: str = ""
    axes_note: dict = field(default_factory=dict)
    # verdicts(runs: bnlib.Runs) -> list[bnlib.stats.Verdict]: the study's claims, decided
    verdicts: Callable | None = None
    version: int = 1  # raise it when the study's grid or verdicts mean something else under the same name
    source: dict | None = field(default=None, compare=False)  # None: bnlib's; else the plugin's file, sha256
    # arms added to the study's own (bnlib.arms.with_arms: "+my_norm"), by name -> its ladder spec
    extra_arms: tuple = ()

    def points(self, preset: str, dataset: str | None = None) -> list[dict]:
        """Every run's parameters, in grid order (first axis slowest). `dataset` replaces the
        preset's data set in every point (the other parameters stay as the preset sets them)."""
        if preset not in self.presets:
            raise ValueError(f"preset={preset!r} is not defined for study {self.name!r}; "
                             f"valid choices: {sorted(self.presets)}")
        p = self.presets[preset]
        out = []
        for grid in ([{**p.grid, **g} for g in p.subgrids] or [p.grid]):
            keys = list(grid)
            for values in itertools.product(*(grid[k] for k in keys)):
                point = {**p.base, **dict(zip(keys, values))}
                if dataset is not None:
                    point["dataset"] = dataset
                derive = p.derive or self.derive
                if derive is not None:
                    point.update(derive(point))
                if not p.subgrids or point not in out:
                    out.append(point)
        return out

    def axes(self, preset: str) -> list[str]:
        p = self.presets[preset]
        return list(dict.fromkeys([*p.grid, *(k for g in p.subgrids for k in g)]))


STUDIES: dict[str, Study] = {}


def register_study(study: Study) -> Study:
    """Register a study (also from a plugin: it then records the plugin's file and content hash,
    bnlib.plugins). A name registered twice is an error unless the same file registers it again."""
    import dataclasses
    import sys

    src = study.source
    if src is None:  # the function that defines it, else the module that calls us
        fn = study.verdicts or study.derive
        src = entry_source(fn) if fn is not None else None
        if fn is None:
            caller = sys._getframe(1).f_globals
            src = entry_source(type("_", (), {"__module__": caller.get("__name__", "")})) if caller.get("__file__") \
                else None
        study = dataclasses.replace(study, source=src)
    check_unique("study", STUDIES, study.name, study.source)
    STUDIES[study.name] = study
    return study


def study_names() -> list[str]:
    return list(STUDIES)


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise ValueError(f"study={name!r} is not a known study; valid choices: {study_names() + ['all']}")
    return STUDIES[name]


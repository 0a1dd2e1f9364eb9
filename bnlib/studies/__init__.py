"""Studies: named grids of run.ipynb parameters, with presets, an analysis notebook and the
verdict function that turns the runs into the sentences a reader quotes.

A study is data: `base` parameters shared by every run, `grid` axes whose product gives the
runs, and an optional `derive` that computes parameters from a grid point (e.g. the learning
rate scaled with the batch size). Each paper is one module in this package (p1.py, ...) that
holds its grid and its verdict together and calls `register_study(...)`; the statistics the
verdicts share live in bnlib.stats. Presets: `quick` (real Fashion-MNIST images, narrow nets,
a few epochs: sized so the reference arm really learns, every study together within ~30 min on
a 2-core CPU) and `paper` (CIFAR-10, full widths, the papers' recipes, for GPU machines).
A study's data set can be overridden for every point (`python -m bnlib study p1 --dataset
synthetic`), e.g. where Fashion-MNIST cannot be had.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import STUDIES, Preset, Study, get_study, register_study, study_names

__all__ = ["Preset", "Study", "STUDIES", "register_study", "get_study", "study_names"]

# Every module of this package but the registry and a study's tables (*_tables.py, imported by
# their study) is a study: importing it registers it. Found, not listed; `study all` runs them in
# registration order (p3 imports p4, so: p1, p2, p4, p3, p5).
for _m in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base" and not m.name.endswith("_tables")):
    importlib.import_module(f"{__name__}.{_m}")

"""The studies' learning-rate ladders, read from the files a sweep wrote (issue 21, item 4: no
ladder is tuned on test data).

Each file bnlib/studies/ladders/<study>.json is written by `python scripts/ladders.py <study>`
(bnlib.ladders): for each arm, the study's own base point swept over a geometric grid of rates
with seeds and a data seed (hence a validation split) disjoint from the study's, the rate chosen
on validation accuracy only. This module only reads them, so that a study module can build its
grid from them without importing the sweep runner (which imports the studies).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

__all__ = ["LADDER_DIR", "ladder_path", "ladder_studies", "ladder_record", "ladders"]

LADDER_DIR = Path(__file__).resolve().parent / "studies" / "ladders"


def ladder_studies() -> list[str]:
    """The studies that have a ladder file."""
    return sorted(p.stem for p in LADDER_DIR.glob("*.json"))


def ladder_path(study: str) -> Path:
    path = LADDER_DIR / f"{study}.json"
    if not path.is_file():
        raise ValueError(f"study={study!r} has no ladder file ({path.name} in bnlib/studies/ladders/); valid "
                         f"choices: {ladder_studies()}. Write it with `python scripts/ladders.py {study}`")
    return path


@lru_cache(maxsize=None)
def _read(path: str, mtime_ns: int) -> dict:  # mtime in the key: a regenerated file is read again
    return json.loads(Path(path).read_text())


def ladder_record(study: str, preset: str = "quick") -> dict:
    """The whole record of one study's preset: its groups, each arm's sweep table (rate,
    validation accuracy per seed and its mean, diverged seeds), the chosen rungs, the seeds and
    data seed of the sweep and the command that regenerates it."""
    path = ladder_path(study)
    doc = _read(str(path), path.stat().st_mtime_ns)
    presets = doc.get("presets", {})
    if preset not in presets:
        raise ValueError(f"preset={preset!r} has no ladders for study {study!r} in {path.name}; valid choices: "
                         f"{sorted(presets)}")
    return presets[preset]


def ladders(study: str, preset: str = "quick") -> dict:
    """{key: rungs}: the rates each arm of `study` runs at `preset`, as a tuple of floats in the
    group's unit (`lr`, or `base_lr` at batch 128 where the study scales lr = base_lr·B/128).

    The key is the arm (e.g. "bn") where the arm has one ladder for every grid cell, and
    (arm, cell value) where it has one per cell, e.g. ("skipinit", "wrn1000_1") for P5's depth
    study or ("bn", 16) for its batch-size study. A tuple of 3 rungs is a ladder the study
    chooses on (best/4, best, best·4); a tuple of 1 is a rate the study runs without choosing."""
    out = {}
    for group in ladder_record(study, preset)["groups"]:
        for e in group["entries"]:
            key = e["arm"] if group["cell"] is None else (e["arm"], e["cell"])
            if key in out:
                raise ValueError(f"study={study!r} preset={preset!r}: the ladder file names {key!r} twice")
            out[key] = tuple(float(r) for r in e["rungs"])
    return out

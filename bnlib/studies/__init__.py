"""Studies: named grids of run.ipynb parameters, with presets, plus an analysis notebook.

A study is data: `base` parameters shared by every run, `grid` axes whose product gives the
runs, and an optional `derive` that computes parameters from a grid point (e.g. the learning
rate scaled with the batch size). Each paper is one more `register_study(...)`, not a new
mechanism. Presets: `quick` (embedded synthetic data, narrow nets, a few epochs: every study
together in ~20 min on a 2-core CPU) and `paper` (CIFAR-10, full widths, the papers' recipes
from shared/papers.md, for a GPU machine).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Preset", "Study", "STUDIES", "register_study", "get_study", "study_names"]


@dataclass(frozen=True)
class Preset:
    base: dict  # run parameters shared by every grid point
    grid: dict  # axis name -> list of values; the runs are the product of the axes


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    notebook: str | None  # analysis notebook, relative to notebooks/ (None: the summary covers it)
    presets: dict[str, Preset]
    derive: Callable[[dict], dict] | None = None  # point -> extra/overriding parameters
    doc: str = ""
    axes_note: dict = field(default_factory=dict)

    def points(self, preset: str) -> list[dict]:
        """Every run's parameters, in grid order (first axis slowest)."""
        if preset not in self.presets:
            raise ValueError(f"preset={preset!r} is not defined for study {self.name!r}; "
                             f"valid choices: {sorted(self.presets)}")
        p = self.presets[preset]
        keys = list(p.grid)
        out = []
        for values in itertools.product(*(p.grid[k] for k in keys)):
            point = {**p.base, **dict(zip(keys, values))}
            if self.derive is not None:
                point.update(self.derive(point))
            out.append(point)
        return out

    def axes(self, preset: str) -> list[str]:
        return list(self.presets[preset].grid)


STUDIES: dict[str, Study] = {}


def register_study(study: Study) -> Study:
    STUDIES[study.name] = study
    return study


def study_names() -> list[str]:
    return list(STUDIES)


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise ValueError(f"study={name!r} is not a known study; valid choices: {study_names() + ['all']}")
    return STUDIES[name]


# ----------------------------------------------------------------------------------------------
# P1 — Peerthum & Stamp 2023: BN vs BatchNorm-minus vs AffineLayer vs none, × depth × batch size
# ----------------------------------------------------------------------------------------------

def _lr_scaled_with_batch(point: dict) -> dict:
    # linear scaling rule (Goyal et al. 2017): lr = base_lr · B / 128, as in papers.md's P1 protocol
    return {"lr": round(point.pop("base_lr") * point["batch_size"] / 128, 6)}


register_study(Study(
    name="p1",
    title="P1 · shift and scale parameters of BatchNorm (Peerthum & Stamp 2023)",
    notebook="studies/p1_ablation.ipynb",
    doc="bn vs bn_minus vs affine vs none over ResNet depth and batch size; lr = base_lr·B/128.",
    derive=_lr_scaled_with_batch,
    presets={
        "quick": Preset(
            base=dict(dataset="synthetic", synthetic_size=1600, n_test=1000, width=0.125, epochs=2,
                      base_lr=0.1, weight_decay=5e-4, schedule="cosine", log_every=5, eval_batch_size=500),
            grid=dict(norm=["bn", "bn_minus", "affine", "none"], arch=["resnet18", "resnet34"],
                      batch_size=[32, 128], seed=[0, 1])),
        "paper": Preset(
            base=dict(dataset="cifar10", width=1.0, epochs=100, base_lr=0.1, weight_decay=5e-4,
                      momentum=0.9, schedule="cosine", n_train=None, n_test=None),
            grid=dict(norm=["bn", "bn_minus", "affine", "none"],
                      arch=["resnet18", "resnet34", "resnet50", "resnet101"],
                      batch_size=[16, 32, 64, 128, 256], seed=[0, 1, 2])),
    },
))

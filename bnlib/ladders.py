"""The learning-rate sweeps that make the studies' quick ladders (issue 21, item 4: no ladder is
tuned on test data). `python scripts/ladders.py p1` runs one and writes
bnlib/studies/ladders/p1.json, which the study reads through bnlib.ladder_file.

For each arm a study chooses a rate for (and each grid cell, where the ladder differs by cell),
the sweep runs the study's own point (same data, net, epochs and recipe as the preset) over a
geometric grid of rates, SWEEP_RATIO apart, with seeds and a data seed disjoint from the
study's (data_seed draws the validation split and the training and test subsets,
bnlib.data.load_data, so the images the sweep chooses on are not the study's validation
images). It chooses on validation accuracy only, by the rule the studies choose by
(bnlib.stats.select_lr): the highest mean `best_val_acc` over seeds, never a rate where a seed
diverged while another rate trained. When the best rate is an end of the sweep, the sweep is
extended one step beyond it and run again, up to MAX_EXTEND steps each way. The ladder: RUNGS
rates RUNG_STEPS sweep steps apart centred on the best (best/4, best, best·4: a neighbour rung
clearly worse at the quick budget, so a study choosing at a ladder's end means its optimum
moved, not noise), or the best rate alone where the study runs one rate without choosing.

The runs go through bnlib.grid (papermill, a Dask worker per process), under outputs/ladders/,
so a rerun reuses every finished run. Probes are left out of the sweep's points: they run on a
copy of the model with every RNG restored (bnlib.probes), so training does not depend on them.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from .grid import run_study
from .ladder_file import LADDER_DIR
from .records import FINISHED, atomic_write, load_study
from .studies import Preset, Study, get_study
from .studies.p5 import BATCH_ARCH, variant_of

__all__ = ["Group", "Sweep", "SPECS", "SWEEP_SEEDS", "SWEEP_DATA_SEED", "SWEEP_RATIO", "RUNG_STEPS", "MAX_EXTEND",
           "rate_at", "sweep_table", "pick", "rungs_of", "sweep", "write_ladders", "make_ladders", "command"]

SWEEP_SEEDS = (4_000_000_000, 4_000_000_001)  # above every study seed: 0-4, and cell_seed < 10⁹ (tests check)
SWEEP_DATA_SEED = 1  # the studies use data_seed 0: another validation split, other training images
SWEEP_RATIO = 2.0  # neighbouring rates of a sweep
RUNG_STEPS = 2  # a ladder's rungs are 2 sweep steps apart: ×4
MAX_EXTEND = 3  # extension steps beyond the first span, each way
SCRIPT = "scripts/ladders.py"
OUT = "outputs/ladders"


@dataclass(frozen=True)
class Group:
    """The ladders of one sub-experiment of a study's preset.

    `select(point)`: the preset's points it covers; `arm(point)`: the arm name; `cell`: the point
    parameter whose value gets its own ladder (None: one ladder per arm, swept at the points
    `select` keeps); `spans[arm]`: the sweep's first (lowest, highest) rate, in the group's unit;
    `per_batch`: rates are base_lr at batch 128 and lr = rate·batch_size/128 (else the rate is
    the lr); `rungs`: 3 (a ladder the study chooses on) or 1 (one rate, no choice); rates are
    `anchor`·SWEEP_RATIO^k."""
    name: str
    select: Callable[[dict], bool]
    arm: Callable[[dict], str]
    spans: dict
    cell: str | None = None
    per_batch: bool = False
    rungs: int = 3
    anchor: float = 0.01
    note: str = ""

    @property
    def unit(self) -> str:
        return "base_lr" if self.per_batch else "lr"


@dataclass(frozen=True)
class Sweep:
    """A study preset's sweep: its groups and the seeds every rate runs with (a prefix of
    SWEEP_SEEDS: more seeds where the grid is cheap enough for a 2-core machine)."""
    groups: tuple
    seeds: tuple = SWEEP_SEEDS


def _norm(p: dict) -> str:
    return p["norm"]


# The first span of each arm: the earlier hand-set quick ladder's range (docs/presets.md), widened
# ×4 each way and rounded to the grid. Only where the search starts: the rate is chosen on
# validation, and the extension rule moves the sweep past either end when the best sits there.
SPECS: dict[tuple[str, str], Sweep] = {
    ("p1", "quick"): Sweep((
        Group("arms", select=lambda p: p["batch_size"] == 32, arm=_norm, per_batch=True,
              note="swept at batch 32 (lr = base_lr·32/128); the study runs the same base_lr ladder at 32 and 64",
              spans={"bn": (0.01, 2.56), "bn_minus": (0.01, 2.56), "affine_bn_init": (0.0025, 0.64),
                     "affine": (0.00125, 0.32), "none": (0.00125, 0.32)}),)),
    # one seed: 10 arms (P3), 21 cells with depth-1000 nets (P5) are what a 2-core machine affords
    ("p3", "quick"): Sweep((
        Group("arms", select=lambda p: True, arm=_norm,
              note="the preset's point with QUICK_RECIPE (SkipInit, half-epoch warm-up) at batch 64",
              spans={**{a: (0.08, 5.12) for a in ("bn", "bn_minus", "noisy_bn", "ghost_bn")},
                     "batch_renorm": (0.02, 1.28), "group_norm": (0.04, 2.56), "layer_norm": (0.04, 2.56),
                     "ics_free": (0.01, 0.64), "affine": (0.02, 1.28), "none": (0.02, 1.28)}),),
        seeds=SWEEP_SEEDS[:1]),
    ("p5", "quick"): Sweep((
        Group("depth", select=lambda p: p["arch"] != BATCH_ARCH, arm=variant_of, cell="arch", rungs=1,
              note="each variant at each depth runs at one rate, the sweep's best (the study does not choose)",
              spans={"bn": (0.02, 0.64), "skipinit": (0.01, 0.32), "skipinit_inv_sqrt_d": (0.01, 0.32),
                     "none": (0.0025, 0.16), "fixed_inv_sqrt2": (0.0025, 0.16)}),
        Group("batch", select=lambda p: p["arch"] == BATCH_ARCH, arm=variant_of, cell="batch_size",
              per_batch=True, anchor=1.0, note="base_lr on powers of 2 as the paper's grid; lr = base_lr·B/128",
              spans={"bn": (2 ** -5, 2 ** 3), "skipinit": (2 ** -5, 2 ** 3)}),
    ), seeds=SWEEP_SEEDS[:1]),
}


def command(study: str) -> str:
    return f"python {SCRIPT} {study}"


def rate_at(anchor: float, k: int) -> float:
    """The sweep's k-th rate, anchor·SWEEP_RATIO^k, to 10 significant digits (stable run ids)."""
    return float(f"{anchor * SWEEP_RATIO ** k:.10g}")


def _k_of(anchor: float, rate: float) -> int:
    return int(round(math.log(rate / anchor, SWEEP_RATIO)))


# ----------------------------------------------------------------------------------------------
# the picking rule, on a sweep table
# ----------------------------------------------------------------------------------------------

def sweep_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One arm's sweep runs (columns rate, lr, seed, best_val_acc, status) -> one row per rate:
    rate, lr, val_acc (per seed, in seed order; None where a run diverged before any
    validation), val_acc_mean, diverged (seeds that diverged), runs."""
    rows = []
    for rate, g in runs.sort_values(["rate", "seed"]).groupby("rate", sort=True):
        v = pd.to_numeric(g["best_val_acc"], errors="coerce")
        rows.append({"rate": float(rate), "lr": float(g["lr"].iloc[0]),
                     "val_acc": [None if pd.isna(x) else round(float(x), 6) for x in v],
                     "val_acc_mean": None if v.isna().all() else round(float(v.mean()), 6),
                     "diverged": int(g["status"].eq("diverged").sum()), "runs": len(g)})
    return pd.DataFrame(rows, columns=["rate", "lr", "val_acc", "val_acc_mean", "diverged", "runs"])


def pick(table: pd.DataFrame) -> dict:
    """The best rate of a sweep table and where to extend it: {best, trained, extend} with
    extend -1 / +1 when the best sits at the lowest / highest rate (the optimum may lie beyond),
    else 0. The rule is bnlib.stats.select_lr's: among the rates at which no seed diverged, the
    highest mean validation accuracy (ties: the lower rate); a rate where a seed diverged only
    when every rate diverged somewhere (`trained` False), and then the sweep goes lower."""
    if table.empty:
        raise ValueError("pick: an empty sweep table (no finished runs)")
    t = table.sort_values("rate").reset_index(drop=True)
    lo, hi = t["rate"].iloc[0], t["rate"].iloc[-1]
    ok = t[t["diverged"] == 0]
    if ok.empty:
        return {"best": float(lo), "trained": False, "extend": -1}
    v = pd.to_numeric(ok["val_acc_mean"], errors="coerce").fillna(-math.inf)
    best = float(ok.loc[v.idxmax(), "rate"])  # idxmax: the first maximum, i.e. the lower rate
    return {"best": best, "trained": True, "extend": -1 if best == lo else 1 if best == hi else 0}


def rungs_of(best: float, group: Group) -> list[float]:
    """A ladder of `group.rungs` rates RUNG_STEPS sweep steps apart, centred on `best`."""
    k, half = _k_of(group.anchor, best), (group.rungs - 1) // 2
    return [rate_at(group.anchor, k + RUNG_STEPS * i) for i in range(-half, half + 1)]


# ----------------------------------------------------------------------------------------------
# the sweep: the study's own points, other seeds, through bnlib.grid
# ----------------------------------------------------------------------------------------------

_FREE = ("seed", "lr", "data_seed")  # what a sweep sets in a study's point


def _strip(point: dict) -> dict:
    """A point without its seed, rate and probes (see the module docstring)."""
    return {k: v for k, v in point.items() if k not in _FREE and not k.startswith("probe")}


def _cells(study: Study, preset: str, group: Group, dataset: str | None) -> dict:
    """{(arm, cell value or None): the point every seed and rate of it shares}."""
    out = {}
    for p in study.points(preset, dataset):
        if not group.select(p):
            continue
        arm = group.arm(p)
        if arm not in group.spans:
            raise ValueError(f"study {study.name!r} group {group.name!r}: arm {arm!r} has no sweep span; valid "
                             f"choices: {sorted(group.spans)} (add it to bnlib.ladders.SPECS)")
        key = (arm, p[group.cell] if group.cell else None)
        base = _strip(p)
        if out.setdefault(key, base) != base:  # a grid axis the sweep does not know: refuse, not guess
            diff = sorted(k for k in {*base, *out[key]} if base.get(k) != out[key].get(k))
            raise ValueError(f"study {study.name!r} group {group.name!r}: the points of {key} differ in {diff}, "
                             f"not only in seed and learning rate; give the group a `cell` for them")
    if not out:
        raise ValueError(f"study {study.name!r} preset {preset!r}: group {group.name!r} selects no point")
    return out


def _point(base: dict, group: Group, k: int, seed: int, data_seed: int) -> dict:
    rate = rate_at(group.anchor, k)
    lr = rate * base["batch_size"] / 128 if group.per_batch else rate
    return {**base, "lr": float(f"{lr:.10g}"), "seed": seed, "data_seed": data_seed}


def _run_round(name: str, todo: list[tuple], out: Path, workers: int, progress: bool) -> pd.DataFrame:
    """Run every (meta, point) through bnlib.grid as one ad-hoc study; return one row per run
    with its meta (key, arm, cell, rate), seed, lr, status and best_val_acc."""
    study = Study(name=name, title=f"learning-rate sweep {name}", notebook=None,
                  presets={"sweep": Preset(base={}, grid={},
                                           subgrids=tuple({k: [v] for k, v in p.items()} for _, p in todo))})
    run_study(study, "sweep", out, workers=workers, analyze=False, progress=progress)
    runs, manifest = load_study(out, name)
    if len(manifest["run_ids"]) != len(todo):
        raise RuntimeError(f"sweep {name}: {len(todo)} points but {len(manifest['run_ids'])} runs (two points "
                           f"the same?)")
    have = runs.runs.set_index("run_id") if not runs.runs.empty else pd.DataFrame()
    rows, missing = [], []
    for (meta, p), rid in zip(todo, manifest["run_ids"]):
        if rid not in have.index or have.loc[rid, "status"] not in FINISHED:
            missing.append(f"{rid} ({meta}, seed {p['seed']})")
            continue
        r = have.loc[rid]
        rows.append({**meta, "seed": p["seed"], "lr": p["lr"], "status": r["status"],
                     "best_val_acc": r.get("best_val_acc")})
    if missing:
        raise RuntimeError(f"sweep {name}: {len(missing)} run(s) did not finish (failed: see their folders under "
                           f"{out / 'runs'}; rerun to resume): " + "; ".join(missing[:10]))
    return pd.DataFrame(rows)


def sweep(study: Study, preset: str, groups: tuple[Group, ...], out=OUT, workers: int = 2,
          seeds=SWEEP_SEEDS, data_seed: int = SWEEP_DATA_SEED, max_extend: int = MAX_EXTEND,
          dataset: str | None = None, progress: bool = True) -> dict:
    """Sweep every (group, arm, cell) of `study` at `preset`, extending each sweep while its best
    rate sits at an end (at most `max_extend` steps each way); return the preset's record for
    the ladder file (bnlib.ladder_file): groups with each entry's point, sweep table and rungs."""
    out = Path(out).resolve()
    cells = {(g.name, *key): (g, base) for g in groups for key, base in _cells(study, preset, g, dataset).items()}
    ks = {}
    for key, (g, _) in cells.items():
        lo, hi = g.spans[key[1]]
        ks[key] = set(range(_k_of(g.anchor, lo), _k_of(g.anchor, hi) + 1))
    first = {key: (min(k), max(k)) for key, k in ks.items()}
    name = f"ladders_{study.name}_{preset}"
    while True:
        todo = [({"key": i, "arm": key[1], "cell": key[2], "rate": rate_at(g.anchor, k)},
                 _point(base, g, k, s, data_seed))
                for i, (key, (g, base)) in enumerate(cells.items()) for k in sorted(ks[key]) for s in seeds]
        runs = _run_round(name, todo, out, workers, progress)
        picks, grew = {}, False
        for i, (key, (g, _)) in enumerate(cells.items()):
            table = sweep_table(runs[runs["key"] == i])
            picks[key] = (table, pick(table))
            e = picks[key][1]["extend"]
            nxt = (min(ks[key]) - 1) if e < 0 else (max(ks[key]) + 1) if e > 0 else None
            if nxt is not None and first[key][0] - max_extend <= nxt <= first[key][1] + max_extend:
                ks[key].add(nxt)
                grew = True
        if not grew:
            break
    rec_groups = []
    for g in groups:
        entries = []
        for key, (table, p) in ((k, v) for k, v in picks.items() if k[0] == g.name):
            entries.append({"arm": key[1], "cell": key[2], "rungs": rungs_of(p["best"], g), "best": p["best"],
                            "trained": p["trained"], "best_at_end": p["extend"] != 0,
                            "point": cells[key][1], "sweep": _records(table)})
        rec_groups.append({"name": g.name, "unit": g.unit, "cell": g.cell, "rungs": g.rungs, "note": g.note,
                           "entries": entries})
    return {"command": command(study.name), "seeds": list(seeds), "data_seed": data_seed,
            "sweep_ratio": SWEEP_RATIO, "rung_ratio": SWEEP_RATIO ** RUNG_STEPS, "max_extend": max_extend,
            "rule": "validation accuracy only (best_val_acc on a split drawn with data_seed "
                    f"{data_seed}), mean over seeds {list(seeds)}; never a rate where a seed diverged while another "
                    "rate trained (ties: the lower rate); a best rate at an end of the sweep extends it one step "
                    f"(x{SWEEP_RATIO:g}) and reruns, at most {max_extend} step(s) each way (best_at_end: the limit "
                    f"was hit); rungs best/{SWEEP_RATIO ** RUNG_STEPS:g}, best, best*{SWEEP_RATIO ** RUNG_STEPS:g} "
                    "where the study chooses, the best rate alone where it does not",
            "groups": rec_groups}


def _records(table: pd.DataFrame) -> list[dict]:
    """A sweep table as JSON rows: plain numbers, None for a missing accuracy."""
    return [{"rate": float(r.rate), "lr": float(r.lr), "val_acc": list(r.val_acc),
             "val_acc_mean": None if pd.isna(r.val_acc_mean) else float(r.val_acc_mean),
             "diverged": int(r.diverged), "runs": int(r.runs)} for r in table.itertuples()]


def write_ladders(study: str, preset: str, record: dict, path: Path | None = None) -> Path:
    """Put `record` as `preset`'s entry of the study's ladder file (other presets kept)."""
    path = Path(path) if path is not None else LADDER_DIR / f"{study}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc = {"study": study, "script": SCRIPT, "presets": {**doc.get("presets", {}), preset: record}}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, _dump(doc).encode())
    return path


def _dump(doc: dict) -> str:
    """JSON, indented, with each sweep row, rung list and point on one line (a table to read)."""
    flat = {}

    def mark(obj):
        flat[f"@{len(flat)}@"] = json.dumps(obj, allow_nan=False, ensure_ascii=False)
        return f"@{len(flat) - 1}@"

    shown = json.loads(json.dumps(doc, allow_nan=False))  # a copy
    for rec in shown["presets"].values():
        rec["seeds"] = mark(rec["seeds"])
        for g in rec["groups"]:
            for e in g["entries"]:
                e.update(rungs=mark(e["rungs"]), point=mark(e["point"]), sweep=[mark(r) for r in e["sweep"]])
    text = json.dumps(shown, indent=1, ensure_ascii=False)
    for k, v in flat.items():
        text = text.replace(f'"{k}"', v)
    return text + "\n"


def make_ladders(study: str, preset: str = "quick", out=OUT, workers: int = 2, progress: bool = True) -> Path:
    """Run `study`'s sweeps at `preset` (SPECS) and write its ladder file; print the wall time."""
    if (study, preset) not in SPECS:
        raise ValueError(f"study={study!r} preset={preset!r} has no sweep; valid choices: "
                         f"{sorted(f'{s} --preset {p}' for s, p in SPECS)}")
    t0 = time.perf_counter()
    spec = SPECS[study, preset]
    rec = sweep(get_study(study), preset, spec.groups, out, workers, seeds=spec.seeds, progress=progress)
    path = write_ladders(study, preset, rec)
    print(f"ladders {study} [{preset}]: {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path

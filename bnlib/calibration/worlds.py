"""The simulated worlds of bnlib.calibration: a study's design (its preset's points as a runs table,
each run with its arm, seed, rung and grid cell), the variance components measured on the quick
presets, and per claim the scenarios (at the threshold: null; at twice its distance: power) from
which tables of runs are drawn."""
from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from ..records import Runs
from ..studies import get_study
from ..studies import p2 as P2
from ..studies import p5 as P5

__all__ = ["Sigma", "Scenario", "Design", "SIGMA", "CLAIMS", "SCENARIOS", "PENALTY", "NULL_TABLES", "POWER_TABLES", "power_tables",
           "BOOT", "design", "simulate"]

PENALTY = 0.15  # accuracy lost per rung away from the best: the middle rung is chosen on validation
def power_tables(null_tables: int) -> int:
    """Power tables beside `null_tables` null tables: 2/5 of them, at least 1."""
    return max(1, null_tables * 2 // 5)


NULL_TABLES = 1000  # the error rate's simulation noise: ±0.7% at 5% (docs/calibration.md)
POWER_TABLES = power_tables(NULL_TABLES)
BOOT = 1000  # bootstrap resamples per interval, both evaluators


@dataclass(frozen=True)
class Sigma:
    """SDs of a run's accuracy components: u[seed] (every arm), v[arm, seed] (every cell and rung
    of the arm), e[run], and the validation and test noise (each)."""

    seed: float
    arm_seed: float
    run: float
    eval: float

    def scaled(self, k: float) -> "Sigma":
        return Sigma(self.seed * k, self.arm_seed * k, self.run * k, self.eval * k)

    @property
    def pair(self) -> float:
        """SD of one replicate's paired difference between two arms in one cell."""
        return math.sqrt(2 * (self.arm_seed ** 2 + self.run ** 2 + self.eval ** 2))


# Variance components (accuracy as a fraction), from the quick presets' real spread: P1, the
# per-seed BN − none gains of a fresh-clone run (issue 21: 0.45/0.50, 0.23/0.39, 0.66/0.69 at
# batch 32/64: 0.18 across seeds, 0.05 per run within one); P2, the README's intervals (paired SDs
# 0.013-0.092 over 5 seeds; 0.048 used); P3, BN − none (paired SD 0.065, 3 seeds); P5, SkipInit −
# α = 1 and − BN at depth 1000 (0.056-0.12, 3 seeds; 0.095 used); P4's accuracy spread is not
# measured (P2's used); eval: the binomial SE of a ~1 000-image set.
SIGMA = {"p1": Sigma(0.02, 0.13, 0.05, 0.012), "p2": Sigma(0.014, 0.03, 0.01, 0.01),
         "p3": Sigma(0.02, 0.045, 0.01, 0.013), "p4": Sigma(0.02, 0.03, 0.01, 0.013),
         "p5": Sigma(0.02, 0.06, 0.02, 0.022)}
LOG_LR_SD = 0.3  # P4: log10 of the largest stable rate per (arm, seed); its quick paired SD: 0.42

# claim key -> text found in the claim or its short form (lower case): keys survive small rewordings
CLAIMS = {
    "p1": {"ref": "bn beats no normalization", "init": "p1's claim", "bn_minus": "normalization step alone",
           "affine": "learned shift and scale alone"},
    "p2": {"gamma0": "γ₀ < 1 helps", "lr/c": "lr/c helps", "recipe": "the recipe helps",
           "input_bn": "input normalization helps"},
    "p3": {"ref": "reference: bn", "ics": "less ics goes with higher accuracy", "beta": "β-smoothness tracks",
           "lr_star": "largest stable learning rate tracks", "ics_free": "ics-free scheme",
           "noisy": "noisy bn trains nearly like bn"},
    "p4": {"lr_star": "largest stable learning rate exceeds", "confined": "confined to large learning rates",
           "step": "one sgd step"},
    "p5": {"noninf": "recovers bn's trainability", "beats": "skipinit beats", "batch": "confined to large batch"},
}


# --- the design: the study's points as a runs table, with each run's arm, seed, rung and group ---

def _p2_arm(t: pd.DataFrame) -> pd.Series:
    return pd.Series([P2.arm_name(g, round(1 / m, 6), i) for g, m, i in
                      zip(t["gamma0"], t["gamma_lr_mult"], t["input_norm"])], index=t.index)


ARM: dict[str, Callable] = {"p1": lambda t: t["norm"], "p2": _p2_arm, "p3": lambda t: t["norm"],
                            "p4": lambda t: t["norm"], "p5": lambda t: t.apply(P5.variant_of, axis=1)}
CELL = {"p1": ["arch", "batch_size"], "p2": [], "p3": [], "p4": [], "p5": ["arch", "batch_size"]}


@dataclass
class Design:
    runs: pd.DataFrame  # every point's parameters, run_id, status: load_runs' shape
    arm: np.ndarray  # label per run
    arm_ix: np.ndarray
    seed_ix: np.ndarray  # position of the run's seed among the sorted seeds
    rung: np.ndarray  # position of the run's lr in its (arm, cell, seed) ladder
    best: np.ndarray  # the ladder's best rung: the middle one (L // 2), the lower one of two
    groups: pd.DataFrame  # one row per (arm, cell): what the verdicts choose a rate for
    slots: np.ndarray  # (group, rung, seed) -> run index, −1 where there is none

    @property
    def cells(self) -> tuple[int, int]:
        """(arms, seeds): the shape of an arm × seed effect."""
        return int(self.arm_ix.max()) + 1, int(self.seed_ix.max()) + 1

    def where(self, **means) -> np.ndarray:
        """Arm means per run: means[arm], 0 for an arm not named."""
        return np.array([means.get(a, 0.0) for a in self.arm], float)

    def g(self, arm: str, **cell) -> np.ndarray:
        """The groups of `arm` (in every cell, or those matching `cell`), in group order."""
        m = self.groups["arm"].eq(arm)
        for k, v in cell.items():
            m &= self.groups[k].eq(v)
        return np.flatnonzero(m.to_numpy())


@functools.lru_cache(maxsize=None)
def design(study: str, preset: str) -> Design:
    t = pd.DataFrame(get_study(study).points(preset))  # the points' parameters, as load_runs has them
    t.insert(0, "run_id", [f"{study}-{preset}-{i:05d}" for i in range(len(t))])
    t["status"] = "completed"
    arm = ARM[study](t).astype(str).to_numpy()
    cell = [t[c] for c in CELL[study]]
    g = t.groupby([arm, *(c.astype(str) for c in cell), t["seed"].astype(str)], sort=False)["lr"]
    rung = (g.rank(method="dense") - 1).to_numpy(int)
    n = g.transform("nunique").to_numpy(int)
    seed_ix = pd.factorize(t["seed"], sort=True)[0]
    grp = pd.DataFrame({"arm": arm, **{c.name: c for c in cell}})
    gix = pd.factorize(pd.MultiIndex.from_frame(grp.astype(str)))[0]
    first = pd.Series(np.arange(len(t))).groupby(gix).first().to_numpy()
    slots = np.full((len(first), rung.max() + 1, seed_ix.max() + 1), -1)
    slots[gix, rung, seed_ix] = np.arange(len(t))
    assert (slots >= 0).sum() == len(t), "two runs share a (group, rung, seed)"
    return Design(t, arm, pd.factorize(arm)[0], seed_ix, rung, np.where(n >= 3, n // 2, 0),
                  grp.iloc[first].reset_index(drop=True), slots)


# --- worlds: per scenario, the arm means (and what else the verdicts read) for n tables ---

@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "null": each listed claim's effect at its threshold; "power": at twice the distance
    claims: tuple
    world: Callable  # (Design, rng, n) -> {"mean": (R,) or (n, R), optional "diverged", "ics", "beta", "s_div"}
    note: str = ""


def _p1(x: float, bn: float = 0.80, none: float = 0.32) -> Callable:
    return lambda d, rng, n: {"mean": d.where(bn=bn, none=none, bn_minus=x, affine=x, affine_bn_init=x)}


_P1_GAIN = 0.80 - 0.32  # BN 0.806 at its chosen rate (docs/presets.md), gain 0.48 (issue 21's seeds)


def _p2(**arms) -> Callable:
    names = {"g01": "γ₀=0.1 c=1", "recipe": "γ₀=0.1 c=100", "input": "γ₀=0.1 c=100 inputBN"}
    return lambda d, rng, n: {"mean": 0.75 + d.where(**{names[k]: v for k, v in arms.items()})}


# P3: each arm's accuracy at its best rate (docs/presets.md, a 3-rung run of the quick recipe;
# none lowered from 0.48 to 0.40 so that the reference, BN beats none, rarely holds a claim back)
ACC3 = {"bn": 0.72, "bn_minus": 0.72, "ghost_bn": 0.71, "noisy_bn": 0.70, "ics_free": 0.60, "group_norm": 0.58,
        "batch_renorm": 0.52, "layer_norm": 0.51, "affine": 0.46, "none": 0.40}


def _arm_draw(d: Design, rng, n: int, arm_level: np.ndarray) -> np.ndarray:
    """(n, R): an arm-level value (n, A; SD 1 across arms) plus noise per (arm, seed), SD 0.3,
    and per run, SD 0.1: a probe measure (ICS, log10 β) of the run."""
    noise = rng.normal(0, 0.3, (n, *d.cells))[:, d.arm_ix, d.seed_ix] + rng.normal(0, 0.1, (n, len(d.arm)))
    return arm_level[:, d.arm_ix] + noise


def _stable_rung(d: Design, rng, n: int, vary: bool) -> np.ndarray:
    """(n, R): the largest stable rung of the run's (arm, seed): the best rung, or with `vary`
    one above it in 10% of (arm, seed) pairs (lr* then varies, censored at the ladder's top)."""
    if not vary:
        return np.broadcast_to(d.best, (n, len(d.best)))
    return d.best + (rng.random((n, *d.cells)) < 0.1)[:, d.arm_ix, d.seed_ix]


def _p3(ics: str = "iid", beta: str = "iid", acc: dict | None = None, lr_star: str = "fixed", **pair) -> Callable:
    """ics/beta: 'iid' (arm levels drawn independently of accuracy) or 'tracks' (latent correlation
    −0.9 with accuracy); lr_star 'copy': the largest stable rung varies per (arm, seed) and ICS is
    an independent copy of the same process, sign flipped (the two measures equally informative);
    'orders': accuracy ranked as the arms' largest stable rates."""
    def world(d: Design, rng, n):
        a = {**ACC3, **(acc or {}), **pair}
        top = pd.Series(d.rung).groupby(d.arm_ix).transform("max").to_numpy()
        out = {"diverged": d.rung[None, :] > np.minimum(_stable_rung(d, rng, n, lr_star == "copy"), top)}
        if lr_star == "orders":  # accuracy increases with the arm's largest stable rate (the design's)
            lr_best = pd.Series(d.runs["lr"].to_numpy()[d.rung == d.best]).groupby(d.arm[d.rung == d.best]).first()
            key = pd.DataFrame({"lr": lr_best, "bn": lr_best.index == "bn", "up": lr_best.index != "none"})
            order = key.sort_values(["lr", "up", "bn"]).index  # ties: none lowest, bn highest (the reference)
            a = {**a, **dict(zip(order, sorted(ACC3.values())))}
        out["mean"] = d.where(**a)
        lvl = np.array([a.get(arm, 0.6) for arm in pd.unique(d.arm)])  # in arm_ix order
        z = (lvl - lvl.mean()) / (lvl.std() or 1)
        for m, how in (("ics", ics), ("beta", beta)):
            draw = rng.normal(0, 1, (n, len(lvl)))
            out[m] = _arm_draw(d, rng, n, -0.9 * z[None] + 0.44 * draw if how == "tracks" else draw)
        if lr_star == "copy":  # ICS: minus the lr* of an independent copy of the stability process
            k2 = _stable_rung(d, rng, n, True)
            lr = np.full((d.cells[0], d.rung.max() + 2), np.nan)
            lr[d.arm_ix, d.rung] = d.runs["lr"].to_numpy(float)
            out["ics"] = -lr[d.arm_ix[None], k2]
        if "ics_free" in pair:  # the manipulation check holds: the ICS-free scheme has far more ICS than BN
            out["ics"] = out["ics"] + 5.0 * (d.arm == "ics_free")
        return out
    return world


def _p4_acc(small_gap: float, large_gap: float) -> Callable:
    """Accuracy of a stable run: best at lr 0.01, 3 points lower per decade away, for both arms;
    BN above none by small_gap at 1e-4 and by large_gap at 0.1 and above."""
    return lambda arm, lr: (0.8 - 0.03 * abs(math.log10(lr) + 2)
                            + (small_gap if lr <= 1e-4 else large_gap if lr >= 0.1 else 0) * (arm == "bn"))


def _p4(t_bn: float, t_none: float, acc: Callable | None = None) -> Callable:
    """log10 of the largest stable rate and of the one-step divergence size, per arm (mean over
    seeds), spread LOG_LR_SD per (arm, seed); acc(arm, lr) the accuracy of a stable run."""
    def world(d: Design, rng, n):
        mu = np.where(d.arm == "bn", t_bn, t_none)
        thr = (mu + rng.normal(0, 0.1, (n, d.cells[1]))[:, d.seed_ix]
               + rng.normal(0, LOG_LR_SD, (n, *d.cells))[:, d.arm_ix, d.seed_ix])
        s_div = mu + rng.normal(0, LOG_LR_SD, (n, *d.cells))[:, d.arm_ix, d.seed_ix]
        f = acc or _p4_acc(0.0, 0.0)
        return {"mean": np.array([f(a, lr) for a, lr in zip(d.arm, d.runs["lr"])]),
                "diverged": np.log10(d.runs["lr"].to_numpy(float))[None] > thr, "s_div": 10 ** s_div}
    return world


def _p5(depth: dict, small_gap: float, large_gap: float) -> Callable:
    """depth: accuracy per variant in the depth study; the batch study: BN − SkipInit = small_gap
    at the smallest batch size, large_gap at the largest (SkipInit at 0.70)."""
    def world(d: Design, rng, n):
        b = d.runs["batch_size"].to_numpy()
        batch = d.runs["arch"].eq(P5.BATCH_ARCH).to_numpy()
        gap = np.where(b == b[batch].min(), small_gap, np.where(b == b[batch].max(), large_gap, 0))
        return {"mean": np.where(batch, 0.70 + gap * (d.arm == "bn"), d.where(**depth))}
    return world


_S = SIGMA
SCENARIOS = {
    "p1": (Scenario("bn=none", "null", ("ref",), _p1(0.56, 0.56, 0.56)),
           Scenario("bn>none", "power", ("ref",), _p1(0.60, 0.40 + 2 * _S["p1"].pair, 0.40),
                    f"BN − none = 2·{_S['p1'].pair:.3f}"),
           Scenario("half", "null", ("init", "bn_minus", "affine"), _p1(0.32 + _P1_GAIN / 2),
                    "each arm recovers exactly half of BN's gain"),
           Scenario("all", "power", ("init", "bn_minus", "affine"), _p1(0.80), "each arm recovers all of it")),
    "p2": (Scenario("equal", "null", ("gamma0", "lr/c", "recipe", "input_bn"), _p2()),
           Scenario("steps", "power", ("gamma0", "lr/c", "input_bn"),
                    _p2(g01=2 * _S["p2"].pair, recipe=4 * _S["p2"].pair, input=6 * _S["p2"].pair),
                    f"each compared pair 2·{_S['p2'].pair:.3f} apart"),
           Scenario("recipe", "power", ("recipe",), _p2(g01=_S["p2"].pair, recipe=2 * _S["p2"].pair))),
    "p3": (Scenario("bn=none", "null", ("ref",), _p3(acc={"bn": 0.60, "none": 0.60})),
           Scenario("bn>none", "power", ("ref",), _p3(acc={"bn": 0.72, "none": 0.72 - 2 * _S["p3"].pair})),
           Scenario("no association", "null", ("ics", "beta"), _p3(),
                    "ICS and β drawn independently of accuracy, from one distribution"),
           Scenario("ICS tracks", "power", ("ics",), _p3(ics="tracks"), "latent ρ(ICS, acc) = −0.9"),
           Scenario("β tracks", "power", ("beta",), _p3(beta="tracks"), "latent ρ(β, acc) = −0.9, ICS independent"),
           Scenario("lr* ~ ICS", "null", ("lr_star",), _p3(lr_star="copy"),
                    "ICS an independent copy of the lr* process, sign flipped"),
           Scenario("lr* tracks", "power", ("lr_star",), _p3(lr_star="orders"),
                    "accuracy ranked as the arms' lr*, ICS independent"),
           Scenario("pairs at threshold", "null", ("ics_free", "noisy"), _p3(ics_free=0.72, noisy_bn=0.74),
                    "ICS-free as accurate as BN (with more ICS); noisy BN − BN = +0.02, the margin"),
           Scenario("pairs decided", "power", ("ics_free", "noisy"),
                    _p3(ics_free=0.72 - 2 * _S["p3"].pair, noisy_bn=0.72), "noisy BN = BN")),
    "p4": (Scenario("same limits", "null", ("lr_star", "step"), _p4(-1.25, -1.25)),
           Scenario("BN's limit higher", "power", ("lr_star", "step"), _p4(-1.25 + 0.42, -1.25 - 0.42),
                    "2 × 0.42 decades"),
           Scenario("no interaction", "null", ("confined",), _p4(2, 2, _p4_acc(0.0, 0.0)),
                    "BN − none the same at 1e-4 and 0.1 (both 0)"),
           Scenario("similar at the margin", "null", ("confined",), _p4(2, 2, _p4_acc(0.02, 0.3)),
                    "BN − none = 0.02 (the margin) at 1e-4, +0.3 at 0.1"),
           Scenario("confined", "power", ("confined",), _p4(2, 2, _p4_acc(0.0, 4 * math.hypot(0.01, 0.013))),
                    "equal at 1e-4; interaction 2 × its SD")),
    "p5": (Scenario("at thresholds", "null", ("noninf", "beats", "batch"),
                    _p5(dict(bn=0.43, skipinit=0.38, none=0.38, fixed_inv_sqrt2=0.10, skipinit_inv_sqrt_d=0.38), 0, 0),
                    "SkipInit − BN = −0.05 (the margin); SkipInit = α = 1; no batch interaction"),
           Scenario("other parts at thresholds", "null", ("beats", "batch"),
                    _p5(dict(bn=0.43, skipinit=0.38, none=0.10, fixed_inv_sqrt2=0.38, skipinit_inv_sqrt_d=0.38),
                        0.02, 0.32), "SkipInit = fixed 1/√2; BN − SkipInit = 0.02 (the margin) at the small batch"),
           Scenario("decided", "power", ("noninf", "beats", "batch"),
                    _p5(dict(bn=0.43, skipinit=0.48, none=0.48 - 2 * _S["p5"].pair,
                             fixed_inv_sqrt2=0.48 - 2 * _S["p5"].pair, skipinit_inv_sqrt_d=0.38),
                        0.0, 4 * math.hypot(_S["p5"].run, _S["p5"].eval)),
                    "SkipInit − BN = +0.05; SkipInit beats the others by 2 SD; interaction 2 SD")),
}


# --- tables ---

def _draw(study: str, preset: str, scenario: Scenario, n: int, rng, spread: float = 1.0) -> dict:
    """n tables as arrays (n, runs): `val`, `test` (NaN where diverged), `div`, and the world's
    probe measures. `spread` scales every accuracy SD of SIGMA (the effects stay as they are)."""
    d, s = design(study, preset), SIGMA[study].scaled(spread)
    w = scenario.world(d, rng, n)
    nr = len(d.arm)
    pen = 0.0 if study == "p4" else PENALTY  # P4's worlds set the accuracy per rate themselves
    true = (np.broadcast_to(w["mean"], (n, nr)) + rng.normal(0, s.seed, (n, d.cells[1]))[:, d.seed_ix]
            + rng.normal(0, s.arm_seed, (n, *d.cells))[:, d.arm_ix, d.seed_ix] + rng.normal(0, s.run, (n, nr))
            - pen * np.abs(d.rung - d.best))
    val, test = (true + rng.normal(0, s.eval, (n, nr)) for _ in range(2))
    div = np.broadcast_to(w.get("diverged", np.zeros((1, nr), bool)), (n, nr))
    return {**w, "div": div, "val": np.where(div, np.nan, val), "test": np.where(div, np.nan, test)}


def _probes(d: Design, w: dict, t: int) -> pd.DataFrame:
    """The probe rows the verdicts read: P3's ics and landscape summaries (one probe time after
    init, at the run's common probe step), P4's one-step relative loss at init."""
    r = d.runs
    cfg = r[["run_id", "norm", "seed", "lr"]]
    if "s_div" in w:
        has = r["probes"].map(lambda p: isinstance(p, (list, tuple)) and "step_size_loss" in p)
        x = r.loc[has, "probe_step_sizes"].explode().astype(float)
        rows = cfg.loc[x.index].assign(probe="step_size_loss", quantity="rel_loss", step=0, depth=-1, x=x.to_numpy())
        return rows.assign(value=np.where(x.to_numpy() < w["s_div"][t][x.index], 0.99, 5e3)).reset_index(drop=True)
    if "ics" not in w:
        return pd.DataFrame()
    step = r["probe_ics_lr"].fillna(r["lr"]).to_numpy(float) if "probe_ics_lr" in r else r["lr"].to_numpy(float)
    q = {("ics", "l2"): 10 + w["ics"][t], ("ics", "cos"): 0.9, ("ics", "grad_norm"): 1.0, ("ics", "step_lr"): step,
         ("landscape", "beta_smoothness"): 10.0 ** w["beta"][t], ("landscape", "grad_diff_max"): 1.0,
         ("landscape", "grad_norm"): 2.0, ("landscape", "loss_max"): 2.0, ("landscape", "loss_min"): 1.5}
    etas = r["probe_landscape_etas"] if "probe_landscape_etas" in r else pd.Series([None] * len(r))
    etas = pd.Series([e if isinstance(e, (list, tuple)) and e else [s] for e, s in zip(etas, step)]).explode()
    loss = cfg.loc[etas.index].assign(probe="landscape", quantity="loss", step=10, depth=-1,
                                      x=etas.to_numpy(float), value=1.8)  # Santurkar's η, one row each
    return pd.concat([cfg.assign(probe=p, quantity=k, step=10, depth=6 if p == "ics" else -1, x=np.nan, value=v)
                      for (p, k), v in q.items()] + [loss], ignore_index=True)


def _runs(d: Design, x: dict, t: int) -> Runs:
    r = d.runs.assign(status=np.where(x["div"][t], "diverged", "completed"), best_val_acc=x["val"][t],
                      test_acc_at_best_val=x["test"][t])
    return Runs(r, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), probes=_probes(d, x, t))


def _rng(study: str, preset: str, scenario: str, seed: int):
    return np.random.default_rng([seed, zlib.crc32(f"{study}/{preset}/{scenario}".encode())])


def _check_study(study: str) -> None:
    get_study(study)  # an unknown study: its own error, with the valid choices
    if study not in SCENARIOS:
        raise ValueError(f"study={study!r} has no calibration scenarios; valid choices: {list(SCENARIOS)}")


def _scenario(study: str, scenario) -> Scenario:
    _check_study(study)
    if isinstance(scenario, Scenario):
        return scenario
    by = {s.name: s for s in SCENARIOS[study]}
    if scenario not in by:
        raise ValueError(f"scenario={scenario!r} is not defined for study {study!r}; valid choices: {sorted(by)}")
    return by[scenario]


def simulate(study: str, preset: str, scenario, rng) -> Runs:
    """One table of the study's preset design under `scenario` (a Scenario or its name): a
    bnlib.Runs with `runs` shaped like load_runs' (every point's parameters, run_id, status,
    best_val_acc, test_acc_at_best_val) and the `probes` the study's verdicts read."""
    sc = _scenario(study, scenario)
    return _runs(design(study, preset), _draw(study, preset, sc, 1, rng), 0)

"""Calibration of the verdicts (issue 21, item 2): for every claim that pairs or correlates runs,
the share of tables it decides when its effect sits exactly at the claim's threshold (a
calibrated 95% rule: at most ~5%), and the share it decides the claimed way at twice that
distance (power). docs/calibration.md gives the figures and how each world is set.

A table is the study's own design, `study.points(preset)` run for run. A run's accuracy is
arm mean (the scenario's) + u[seed] + v[arm, seed] + e[run] − PENALTY·|rung − best rung|, seen
through validation and test noise; u and v are keyed on the run's `seed` parameter, shared by
every run with that seed whatever its grid cell (a seed fixes the initial weights and the data
order), so cells that share seeds are correlated here as in real runs. Each ladder's middle rung
is best on validation. What is counted is the statistics' outcome (Verdict.at_budget where the
budget rule holds a verdict back).

Two evaluators decide a table. `exact`: the study's own verdict function on a bnlib.Runs (about
0.1-1 s a table). The default: the same rules (selection on validation, ladder-edge and
learns-at-all guards, paired, stratified and contrast t intervals, equivalence margins, rank
correlations with their bootstrap) written over arrays of tables at once, so that 1 000 tables per
claim cost seconds; tests/test_calibration.py checks that the two agree table by table. Both use
BOOT bootstrap resamples (the verdicts' 4000 only steady the interval's ends).

Power effects: twice the threshold's distance from "no effect" (P1: a share of 1 for the
threshold ½; non-inferiority at −m: +m); for a threshold of 0, twice the SD of one replicate's
paired difference (Sigma.pair); equivalence: 0; a rank correlation: a latent ρ of 0.9.

    python -m bnlib.calibration [--markdown] [--study p1] [--preset quick] [--tables 1000] [--exact]
    python -m bnlib.calibration --margins [--markdown]   # margin claims as the run-to-run spread shrinks
"""
from __future__ import annotations

import argparse
import contextlib
import functools
from dataclasses import dataclass

import pandas as pd

import bnlib.effects as effects
from ..studies import get_study
from .rules import NAMES, RULES
from .worlds import (BOOT, CLAIMS, NULL_TABLES, POWER_TABLES, SCENARIOS, power_tables, SIGMA, Design, Scenario, Sigma, _check_study,
                     _draw, _rng, _runs, _scenario, design, simulate)

__all__ = ["Sigma", "Scenario", "Rate", "SIGMA", "CLAIMS", "SCENARIOS", "RULES", "BOOT", "NULL_TABLES", "POWER_TABLES",
           "Design", "design", "simulate", "outcomes", "error_rate", "power", "calibration_table", "markdown", "summary_markdown",
           "MARGIN_CLAIMS", "SPREADS", "margin_table", "margin_markdown", "main"]

# --- outcomes and rates ---

# causes that are the statistics' own (the interval, a compound claim's part outcomes), not a guard
_STATISTICS = ("", "interval crosses", "not significant", "no interval", "supported", "contradicted")


def _claim_of(verdicts, study: str, key: str):
    text = CLAIMS[study][key]
    return next((v for v in verdicts if text in v.claim.lower() or text in (v.short or "").lower()), None)


def _exact(study: str, key: str, verdicts) -> str:
    v = _claim_of(verdicts, study, key)
    if v is None:
        return "missing"
    out = v.at_budget or v.outcome
    held = [c for c in v.causes if c != "budget" and c not in _STATISTICS]
    return "guarded" if out == "inconclusive" and held else out


@contextlib.contextmanager
def _resamples(n: int):
    """The verdicts' bootstraps at n resamples (effects.N_BOOT), restored after."""
    old, effects.N_BOOT = effects.N_BOOT, n
    try:
        yield
    finally:
        effects.N_BOOT = old


@functools.lru_cache(maxsize=None)
def outcomes(study: str, preset: str, scenario: str, n_tables: int, seed: int = 0, exact: tuple = (),
             spread: float = 1.0) -> pd.DataFrame:
    """One row per table of the scenario's draw of n_tables, one column per claim it calibrates:
    'supported', 'contradicted', 'inconclusive', 'guarded' (inconclusive by a guard, not the
    interval) or 'missing' (no verdict for the claim); decided by RULES, or with `exact` (table
    numbers) those tables only, by the study's verdict function. `spread` scales the run-to-run
    SDs (SIGMA) and leaves the effects as they are."""
    sc = _scenario(study, scenario)
    x = _draw(study, preset, sc, n_tables, _rng(study, preset, sc.name, seed), spread)
    if not exact:
        got = RULES[study](design(study, preset), x, set(sc.claims))
        return pd.DataFrame({k: pd.Series(got[k]).map(NAMES) for k in sc.claims})
    rows = []
    with _resamples(BOOT):
        for t in exact:
            vs = get_study(study).verdicts(_runs(design(study, preset), x, t))
            rows.append({k: _exact(study, k, vs) for k in sc.claims})
    return pd.DataFrame(rows, columns=list(sc.claims), index=list(exact))


@dataclass(frozen=True)
class Rate:
    """Shares of tables: supported, contradicted, and inconclusive for a guard (not the interval)."""

    supported: float
    contradicted: float
    guarded: float
    n: int
    scenario: str
    missing: float = 0.0

    @property
    def decided(self) -> float:
        return self.supported + self.contradicted


def _rate(study, preset, key, kind, n_tables, seed, exact=False, spread=1.0) -> Rate:
    _check_study(study)
    if key not in CLAIMS[study]:
        raise ValueError(f"claim_key={key!r} is not a claim of study {study!r}; valid choices: {sorted(CLAIMS[study])}")
    rates = []
    for sc in (s for s in SCENARIOS[study] if s.kind == kind and key in s.claims):
        o = outcomes(study, preset, sc.name, n_tables, seed, tuple(range(n_tables)) if exact else (), spread)[key]
        rates.append(Rate(*(o.eq(w).mean() for w in ("supported", "contradicted", "guarded")), len(o), sc.name,
                          o.eq("missing").mean()))
    return max(rates, key=lambda r: r.decided) if kind == "null" else min(rates, key=lambda r: r.supported)


def error_rate(study: str, preset: str, claim_key: str, n_tables: int = NULL_TABLES, seed: int = 0,
               exact: bool = False, spread: float = 1.0) -> Rate:
    """The claim's verdict under its null scenario(s) (the effect at the threshold): shares of
    tables supported and contradicted (`decided`: their sum; the worst null where there are
    several, e.g. one per part of a compound claim)."""
    return _rate(study, preset, claim_key, "null", n_tables, seed, exact, spread)


def power(study: str, preset: str, claim_key: str, n_tables: int = POWER_TABLES, seed: int = 0,
          exact: bool = False, spread: float = 1.0) -> Rate:
    """The claim's verdict with the effect at twice the threshold distance: `supported` is the
    share decided in the claimed direction."""
    return _rate(study, preset, claim_key, "power", n_tables, seed, exact, spread)


# Claims whose threshold is an absolute margin, not a multiple of the run-to-run spread: their
# power depends on that spread, which SIGMA takes from the quick presets (a few hundred steps on a
# CPU). margin_table says how small the spread must be for the paper design to decide them.
MARGIN_CLAIMS = {"p3": ("noisy",), "p4": ("confined",), "p5": ("noninf", "batch")}
SPREADS = (1.0, 0.5, 0.25, 0.125, 0.0625)


def margin_table(preset: str = "paper", studies=None, spreads=SPREADS, null_tables: int = NULL_TABLES,
                 power_tables: int = POWER_TABLES, seed: int = 0) -> pd.DataFrame:
    """Per margin claim and spread (a multiple of SIGMA): the paired SD of one replicate, the
    error rate at the threshold and the power at twice its distance."""
    rows = []
    for study, keys in MARGIN_CLAIMS.items():
        for key in keys if study in (studies or MARGIN_CLAIMS) else ():
            for k in spreads:
                e = error_rate(study, preset, key, null_tables, seed, spread=k)
                p = power(study, preset, key, power_tables, seed, spread=k)
                rows.append({"study": study, "preset": preset, "claim": key, "spread": k,
                             "paired SD": SIGMA[study].scaled(k).pair, "error rate": e.decided, "power": p.supported})
    return pd.DataFrame(rows)


def margin_markdown(table: pd.DataFrame) -> str:
    spreads = sorted(set(table["spread"]), reverse=True)
    lines = ["| study | preset | claim | " + " | ".join(f"spread ×{k:g}: paired SD · errs · power" for k in spreads)
             + " |", "|---" * (3 + len(spreads)) + "|"]
    for (study, preset, claim), t in table.groupby(["study", "preset", "claim"], sort=False):
        r = t.set_index("spread")
        lines.append(f"| {study} | {preset} | {claim} | " + " | ".join(
            f"{r.at[k, 'paired SD']:.3f} · {100 * r.at[k, 'error rate']:.1f}% · {100 * r.at[k, 'power']:.0f}%"
            for k in spreads) + " |")
    return "\n".join(lines)


def calibration_table(studies=None, presets=("quick", "paper"), null_tables: int = NULL_TABLES,
                      power_tables: int = POWER_TABLES, seed: int = 0, exact: bool = False) -> pd.DataFrame:
    """Per study, preset and claim: supported and contradicted under the null, their sum, the
    share held back by a guard, and power."""
    rows = []
    for study in studies or list(CLAIMS):
        for preset in presets:
            for key, text in CLAIMS[study].items():
                e = error_rate(study, preset, key, null_tables, seed, exact)
                p = power(study, preset, key, power_tables, seed, exact)
                rows.append({"study": study, "preset": preset, "claim": key, "claim text": text,
                             "null supported": e.supported, "null contradicted": e.contradicted,
                             "error rate": e.decided, "null guarded": e.guarded, "null tables": e.n,
                             "power": p.supported, "power guarded": p.guarded, "power tables": p.n,
                             "missing": max(e.missing, p.missing)})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    def pct(v):
        return f"{100 * v:.1f}%"
    lines = ["| study | preset | claim | error rate (supported + contradicted) | power | held back by a guard "
             "(null / power) |", "|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        flag = " **> 7%**" if r["error rate"] > 0.07 else ""
        lines.append(f"| {r['study']} | {r['preset']} | {r['claim']} | {pct(r['error rate'])} "
                     f"({pct(r['null supported'])} + {pct(r['null contradicted'])}){flag} | {pct(r['power'])} | "
                     f"{pct(r['null guarded'])} / {pct(r['power guarded'])} |")
    return "\n".join(lines)


# the README's words for a claim where its matching text (CLAIMS) is not a phrase a reader knows
_LABELS = {("p1", "init"): "BN-init affine keeps ½ of the gain", ("p3", "ref"): "bn beats none"}


def summary_markdown(table: pd.DataFrame) -> str:
    """One row per study for the README: per claim, its error rate under the null and its power,
    for each preset in `table` (docs/calibration.md has the full table)."""
    presets = list(dict.fromkeys(table["preset"]))
    lines = ["| study | " + " | ".join(f"{p} preset: errs under the null · power, per claim" for p in presets) + " |",
             "|---" * (len(presets) + 1) + "|"]
    for study, t in table.groupby("study", sort=False):
        cells = []
        for p in presets:
            cells.append(" · ".join(f"{_LABELS.get((study, r['claim']), r['claim text'])} "
                                    f"{100 * r['error rate']:.1f}% · {100 * r['power']:.0f}%"
                                    for _, r in t[t["preset"] == p].iterrows()))
        lines.append(f"| {study.upper()} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bnlib.calibration", description=__doc__.split("\n\n")[0])
    ap.add_argument("--markdown", action="store_true", help="print a markdown table (docs/calibration.md)")
    ap.add_argument("--study", action="append", choices=list(CLAIMS), help="one study (repeatable); default all")
    ap.add_argument("--preset", action="append", choices=["quick", "paper"], help="default both")
    ap.add_argument("--tables", type=int, default=NULL_TABLES, help="null tables per scenario (power: 2/5 of it)")
    ap.add_argument("--exact", action="store_true", help="decide each table with the study's verdicts (slow)")
    ap.add_argument("--margins", action="store_true",
                    help="the margin claims' error rate and power as the run-to-run spread shrinks (margin_table)")
    a = ap.parse_args(argv)
    if a.tables < 1:
        ap.error(f"--tables={a.tables}: must be >= 1")
    if a.margins:
        t = pd.concat([margin_table(p, a.study, null_tables=a.tables, power_tables=power_tables(a.tables))
                       for p in a.preset or ("paper",)])
        print(margin_markdown(t) if a.markdown else t.to_string(index=False, float_format="{:.3f}".format))
        return 0
    t = calibration_table(a.study, a.preset or ("quick", "paper"), a.tables, power_tables(a.tables), exact=a.exact)
    print(markdown(t) if a.markdown else
          t.drop(columns=["claim text"]).to_string(index=False, float_format="{:.3f}".format))
    return 0


"""Statistics every study's verdict uses, in one place: learning-rate selection on validation,
paired effects over matched seeds with confidence intervals and p-values, and the
supported / contradicted / inconclusive decision with the sentence that states it.

A verdict is what a reader quotes, so the rules are strict and stated here once:
- arms are compared at their own learning rate, chosen by mean *validation* accuracy over
  seeds (`select_lr`); test accuracy is only reported at that choice;
- an effect is the mean of paired differences over matched units (seed, and the grid cell:
  depth, batch size ...), with a Student-t interval and a one- or two-sided paired t-test
  (scipy.stats.ttest_rel, as P2's authors use);
- a claim is `inconclusive` whenever a guard fails (the reference arm does not beat chance,
  or does not beat the no-normalization arm significantly, or too few pairs), or when the
  interval crosses the decision threshold; `supported` when the whole interval lies on the
  claimed side of the threshold (and p <= alpha), `contradicted` when it lies on the other.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from .records import atomic_write

__all__ = ["Effect", "Verdict", "select_lr", "at_selected_lr", "paired_effect", "contrast_effect",
           "ratio_interval", "rank_correlation", "rank_correlation_difference", "beats_chance", "decide",
           "decide_margin", "all_of", "verdict_table", "write_verdicts", "read_verdicts", "OUTCOMES"]

OUTCOMES = ("supported", "contradicted", "inconclusive")
ALPHA = 0.05  # significance level of every test (P2's authors: p <= 0.05)
LEVEL = 0.95  # confidence level of every interval


@dataclass
class Effect:
    """A paired effect: mean difference a − b over n matched pairs, its interval and p-value."""

    name: str
    mean: float
    lo: float
    hi: float
    p: float
    n: int
    alternative: str = "two-sided"
    a_mean: float = math.nan
    b_mean: float = math.nan
    n_unit: str = "matched pairs"  # what n counts (rank correlations: the units ranked, e.g. arms)

    def text(self, unit: str = "", pct: bool = False) -> str:
        f = (lambda v: f"{100 * v:+.1f}%") if pct else (lambda v: f"{v:+.3f}{unit}")
        ci = f"[{f(self.lo)}, {f(self.hi)}]" if math.isfinite(self.lo) else "[no interval: n < 2]"
        p = f"p={self.p:.2g}" if math.isfinite(self.p) else "p n/a"
        return f"{self.name} {f(self.mean)} (95% CI {ci}, {p}, n={self.n} {self.n_unit})"


@dataclass
class Verdict:
    """One claim's verdict: the outcome, the sentence a reader quotes, and the numbers behind it."""

    study: str
    claim: str
    outcome: str
    sentence: str
    effects: list = field(default_factory=list)
    reasons: list = field(default_factory=list)

    def __post_init__(self):
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome={self.outcome!r}; valid choices: {list(OUTCOMES)}")


# ----------------------------------------------------------------------------------------------
# learning-rate selection: on validation, never on test
# ----------------------------------------------------------------------------------------------

def select_lr(runs: pd.DataFrame, arm: list[str], val: str = "best_val_acc", lr: str = "lr") -> pd.DataFrame:
    """For each arm (combination of the `arm` columns, e.g. norm, arch, batch_size), the
    learning rate with the highest mean validation accuracy over seeds. A learning rate at which
    any seed diverged is chosen only when every value of the grid diverged somewhere: an arm is
    never compared at a rate where it diverged while another rate trains. Returns one row per
    arm: arm columns, `lr`, mean validation accuracy, seeds, and whether the choice diverged
    (`diverged_at_choice`) or sits at an end of the grid (`lr_at_grid_edge`: widen the grid)."""
    d = runs.assign(_div=runs["status"].eq("diverged") if "status" in runs else False)
    g = d.groupby([*arm, lr], dropna=False).agg(val_mean=(val, "mean"), seeds=(val, "size"), any_div=("_div", "any"))
    g = g.reset_index()
    rows = []
    for key, c in g.groupby(arm, dropna=False):
        c = c.assign(_v=c["val_mean"].fillna(-np.inf)).sort_values(["any_div", "_v", lr], ascending=[True, False, True])
        best = c.iloc[0]
        grid = sorted(c[lr])
        rows.append({**dict(zip(arm, key if isinstance(key, tuple) else (key,))), lr: best[lr],
                     "val_mean": best["val_mean"], "seeds": int(best["seeds"]), "diverged_at_choice": bool(best["any_div"]),
                     "lr_at_grid_edge": len(grid) > 1 and best[lr] in (grid[0], grid[-1]), "lr_grid": grid})
    return pd.DataFrame(rows)


def at_selected_lr(runs: pd.DataFrame, arm: list[str], val: str = "best_val_acc", lr: str = "lr") -> pd.DataFrame:
    """The runs at each arm's selected learning rate (see select_lr)."""
    sel = select_lr(runs, arm, val, lr)[[*arm, lr]]
    return runs.merge(sel, on=[*arm, lr], how="inner")


# ----------------------------------------------------------------------------------------------
# paired effects
# ----------------------------------------------------------------------------------------------

def _pairs(runs: pd.DataFrame, arm_col: str, arms: list, metric: str, pair_on: list[str]) -> pd.DataFrame:
    arms = list(dict.fromkeys(arms))  # an arm named twice (x is the reference itself) is one column
    piv = runs[runs[arm_col].isin(arms)].pivot_table(index=pair_on, columns=arm_col, values=metric, aggfunc="mean")
    return piv.reindex(columns=arms).dropna()


def _t_effect(name: str, diffs: np.ndarray, alternative: str, a_mean=math.nan, b_mean=math.nan,
              level: float = LEVEL) -> Effect:
    n = len(diffs)
    mean = float(np.mean(diffs)) if n else math.nan
    if n < 2:
        return Effect(name, mean, math.nan, math.nan, math.nan, n, alternative, a_mean, b_mean)
    se = float(np.std(diffs, ddof=1) / math.sqrt(n))
    if se == 0:  # identical differences (a discrete grid): the t-test is undefined. The interval is
        # the point, and the p-value that of a sign test (all n differences on one side: 0.5^n
        # one-sided), so 3 agreeing seeds give p = 0.125, not a false certainty of p = 0.
        side = mean > 0 if alternative == "greater" else mean < 0 if alternative == "less" else mean != 0
        p = min(1.0, (0.5 ** n) * (2 if alternative == "two-sided" else 1)) if side else 1.0
        return Effect(name, mean, mean, mean, p, n, alternative, a_mean, b_mean)
    h = float(sps.t.ppf(0.5 + level / 2, n - 1)) * se
    p = float(sps.ttest_1samp(diffs, 0.0, alternative=alternative).pvalue)
    return Effect(name, mean, mean - h, mean + h, p, n, alternative, a_mean, b_mean)


def paired_effect(runs: pd.DataFrame, arm_col: str, a, b, metric: str, pair_on: list[str],
                  alternative: str = "greater") -> Effect:
    """Effect of arm `a` over arm `b` on `metric`: the mean of paired differences over the units
    in `pair_on` (seed, and the grid cell) where both arms have a run, with a t interval and a
    paired t-test (equal to scipy.stats.ttest_rel on the pairs)."""
    piv = _pairs(runs, arm_col, [a, b], metric, pair_on)
    d = (piv[a] - piv[b]).to_numpy(float)
    return _t_effect(f"{a} − {b}", d, alternative, float(piv[a].mean()) if len(piv) else math.nan,
                     float(piv[b].mean()) if len(piv) else math.nan)


def contrast_effect(runs: pd.DataFrame, arm_col: str, weights: dict, metric: str, pair_on: list[str],
                    name: str, alternative: str = "greater") -> Effect:
    """A linear contrast Σ w_arm · metric_arm per matched unit, tested against 0: e.g.
    {x: 1, bn: −0.5, none: −0.5} asks whether arm x recovers more than half of BN's gain over
    none (x − none > 0.5·(bn − none))."""
    piv = _pairs(runs, arm_col, list(weights), metric, pair_on)
    d = sum(w * piv[k] for k, w in weights.items())
    return _t_effect(name, np.asarray(d, float), alternative)


def ratio_interval(runs: pd.DataFrame, arm_col: str, x, ref, base, metric: str, pair_on: list[str],
                   n_boot: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """Share of the reference arm's gain that arm x recovers: mean(x − base)/mean(ref − base)
    over matched units, with a percentile bootstrap interval (resampling units). NaN when the
    reference gain is not positive."""
    piv = _pairs(runs, arm_col, [x, ref, base], metric, pair_on)
    if len(piv) == 0:
        return math.nan, math.nan, math.nan
    gx, gr = (piv[x] - piv[base]).to_numpy(float), (piv[ref] - piv[base]).to_numpy(float)
    if gr.mean() <= 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(gx), size=(n_boot, len(gx)))
    num, den = gx[idx].mean(1), gr[idx].mean(1)
    ok = den > 0
    boots = num[ok] / den[ok]
    lo, hi = (np.quantile(boots, [(1 - LEVEL) / 2, (1 + LEVEL) / 2]) if len(boots) else (math.nan, math.nan))
    return float(gx.mean() / gr.mean()), float(lo), float(hi)


def beats_chance(values, chance: float, margin: float = 0.05) -> tuple[bool, str]:
    """Does an arm learn? Its accuracies (over seeds/cells) must exceed chance + margin with a
    one-sided t-test at ALPHA (one value: strictly above). Returns (ok, reason)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return False, "no finished runs"
    thr = chance + margin
    if len(v) == 1:
        ok = v[0] > thr
    else:
        ok = v.mean() > thr and (np.std(v, ddof=1) == 0 or
                                 sps.ttest_1samp(v, thr, alternative="greater").pvalue <= ALPHA)
    return bool(ok), f"mean accuracy {v.mean():.3f} over {len(v)} runs vs chance {chance:.2f} + margin {margin:.2f}"


# ----------------------------------------------------------------------------------------------
# rank correlations across arms
# ----------------------------------------------------------------------------------------------

def _unit_means_boot(table: pd.DataFrame, cols: list[str], unit: str, replicate: str | None, n_boot: int,
                     seed: int) -> tuple[dict, dict, int]:
    """Per column: the mean per unit (U,), and its bootstrap replicates (n_boot, U): units
    resampled with replacement and, in each round, one resample of the replicates shared by all
    units (replicates are matched: seed s of one arm pairs with seed s of another)."""
    rep = replicate or "_one"
    t = table.assign(_one=0) if replicate is None else table
    piv = {c: t.pivot_table(index=unit, columns=rep, values=c, aggfunc="mean") for c in cols}
    units = sorted(set.intersection(*(set(p.dropna(how="all").index) for p in piv.values())))
    reps = sorted(set.union(*(set(p.columns) for p in piv.values())))
    arr = {c: p.reindex(index=units, columns=reps).to_numpy(float) for c, p in piv.items()}
    rng = np.random.default_rng(seed)
    ui = rng.integers(0, len(units), size=(n_boot, len(units)))
    ri = rng.integers(0, len(reps), size=(n_boot, len(reps)))
    point, boots = {}, {}
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a unit without a drawn replicate: nan
        for c, a in arr.items():
            point[c] = np.nanmean(a, axis=1)
            boots[c] = np.nanmean(a[ui[:, :, None], ri[:, None, :]], axis=2)
    return point, boots, len(units)


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's ρ of each row pair of a, b (n, U): Pearson's r of average ranks; nan where a
    row has a missing value or no spread."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    # ±inf ranks at an end (e.g. an unbounded β-smoothness: the least smooth); only nan is missing
    ok = ~np.isnan(a).any(1) & ~np.isnan(b).any(1)
    ra = sps.rankdata(np.nan_to_num(a, nan=0.0, posinf=np.inf, neginf=-np.inf), axis=1)
    rb = sps.rankdata(np.nan_to_num(b, nan=0.0, posinf=np.inf, neginf=-np.inf), axis=1)
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    den = np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))
    with np.errstate(all="ignore"):
        r = (ra * rb).sum(1) / den
    return np.where(ok & (den > 0), r, np.nan)


def _boot_effect(name: str, point: float, boots: np.ndarray, n: int, alternative: str, level: float,
                 n_unit: str = "matched pairs") -> Effect:
    boots = boots[np.isfinite(boots)]
    if len(boots) < 100 or not math.isfinite(point):
        return Effect(name, point, math.nan, math.nan, math.nan, n, alternative, n_unit=n_unit)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    # bootstrap p-value: the share of resamples on the far side of 0 (+1 smoothing)
    below, above = (np.sum(boots <= 0) + 1) / (len(boots) + 1), (np.sum(boots >= 0) + 1) / (len(boots) + 1)
    p = below if alternative == "greater" else above if alternative == "less" else min(1.0, 2 * min(below, above))
    return Effect(name, float(point), float(lo), float(hi), float(p), n, alternative, n_unit=n_unit)


def rank_correlation(table: pd.DataFrame, x: str, y: str, unit: str, replicate: str | None = None,
                     alternative: str = "two-sided", n_boot: int = 4000, seed: int = 0,
                     level: float = LEVEL) -> Effect:
    """Spearman's ρ between x and y across units (e.g. arms), each unit's value the mean over
    its replicates (seeds), with a percentile bootstrap interval over units and replicates
    (both resampled with replacement; replicates matched across units) and a bootstrap p-value.
    `n` of the Effect is the number of units. With ~10 units the interval is wide: that is the
    information there is."""
    point, boots, n = _unit_means_boot(table, [x, y], unit, replicate, n_boot, seed)
    rho = float(_spearman_rows(point[x], point[y])[0]) if n >= 3 else math.nan
    return _boot_effect(f"Spearman ρ({x}, {y})", rho, _spearman_rows(boots[x], boots[y]), n, alternative, level,
                        n_unit=f"{unit} values ranked")


def rank_correlation_difference(table: pd.DataFrame, a: str, b: str, y: str, unit: str,
                                replicate: str | None = None, sign_a: float = 1.0, sign_b: float = 1.0,
                                alternative: str = "greater", n_boot: int = 4000, seed: int = 0,
                                level: float = LEVEL) -> Effect:
    """Does a track y better than b does? sign_a·ρ(a, y) − sign_b·ρ(b, y) across units, on the
    same bootstrap resamples as rank_correlation (signs: the direction each is expected to go,
    e.g. −1 for "lower is better"), with its interval and bootstrap p-value."""
    point, boots, n = _unit_means_boot(table, [a, b, y], unit, replicate, n_boot, seed)
    d = (sign_a * _spearman_rows(point[a], point[y]) - sign_b * _spearman_rows(point[b], point[y]))[0] \
        if n >= 3 else math.nan
    db = sign_a * _spearman_rows(boots[a], boots[y]) - sign_b * _spearman_rows(boots[b], boots[y])
    name = f"{'' if sign_a > 0 else '−'}ρ({a}, {y}) {'−' if sign_b > 0 else '+'} ρ({b}, {y})"
    return _boot_effect(name, float(d), db, n, alternative, level, n_unit=f"{unit} values ranked")


# ----------------------------------------------------------------------------------------------
# the decision
# ----------------------------------------------------------------------------------------------

def decide(study: str, claim: str, effect: Effect, threshold: float = 0.0, direction: str = "greater",
           guards: list[tuple[bool, str]] = (), min_pairs: int = 3, pct: bool = False,
           what: str = "") -> Verdict:
    """The verdict on `claim` from `effect` (a paired effect or contrast) against `threshold`.
    direction 'greater': the claim says effect > threshold. Every failed guard (ok, reason)
    makes it inconclusive and says why; so does an interval that crosses the threshold."""
    reasons = [why for ok, why in guards if not ok]
    if effect.n < min_pairs:
        reasons.append(f"only {effect.n} matched pairs (need >= {min_pairs})")
    sign = 1 if direction == "greater" else -1
    lo, hi = sorted((sign * (effect.lo - threshold), sign * (effect.hi - threshold)))
    if reasons:
        outcome = "inconclusive"
    elif not (math.isfinite(lo) and math.isfinite(hi)):
        outcome, reasons = "inconclusive", ["no confidence interval"]
    elif lo > 0 and effect.p <= ALPHA:
        outcome = "supported"
    elif hi < 0:
        outcome = "contradicted"
    elif lo > 0:
        outcome = "inconclusive"
        reasons.append(f"not significant (p={effect.p:.2g} > {ALPHA})")
    else:
        outcome = "inconclusive"
        reasons.append(f"the 95% interval crosses the threshold {threshold:+g}")
    word = {"supported": "SUPPORTED", "contradicted": "CONTRADICTED", "inconclusive": "INCONCLUSIVE"}[outcome]
    sentence = f"{claim}: {word} by these runs — {what + ': ' if what else ''}{effect.text(pct=pct)}"
    if reasons:
        sentence += "; " + "; ".join(reasons)
    return Verdict(study, claim, outcome, sentence + ".", [asdict(effect)], reasons)


def decide_margin(study: str, claim: str, effect: Effect, margin: float, guards: list[tuple[bool, str]] = (),
                  one_sided: bool = False, min_pairs: int = 3, what: str = "") -> Verdict:
    """A claim that two arms are alike rather than different, decided on the 95% interval of
    their paired difference: equivalence ("a matches b": the whole interval inside ±margin) or,
    with one_sided, non-inferiority ("a is not worse than b by more than margin": the whole
    interval above −margin). Contradicted when the interval lies wholly beyond the margin on the
    wrong side; inconclusive when it straddles it or a guard fails. The interval, not the p-value
    against 0 in the sentence, decides: a two-sided 95% interval inside the margin is the two
    one-sided tests at 2.5% each (TOST)."""
    reasons = [why for ok, why in guards if not ok]
    if effect.n < min_pairs:
        reasons.append(f"only {effect.n} matched pairs (need >= {min_pairs})")
    lo, hi = effect.lo, effect.hi
    if reasons or not (math.isfinite(lo) and math.isfinite(hi)):
        outcome = "inconclusive"
        reasons = reasons or ["no confidence interval"]
    elif lo > -margin and (one_sided or hi < margin):
        outcome = "supported"
    elif hi < -margin or (not one_sided and lo > margin):
        outcome = "contradicted"
    else:
        outcome = "inconclusive"
        reasons.append(f"the 95% interval reaches beyond {'−' if one_sided else '±'}{margin:g}")
    word = outcome.upper()
    sentence = f"{claim}: {word} by these runs — {what + ': ' if what else ''}{effect.text()}"
    if reasons:
        sentence += "; " + "; ".join(reasons)
    return Verdict(study, claim, outcome, sentence + ".", [asdict(effect)], reasons)


def all_of(study: str, claim: str, parts: list[Verdict]) -> Verdict:
    """A claim made of parts: supported when every part is, contradicted when any part is,
    inconclusive otherwise; the sentence carries each part's."""
    outs = [v.outcome for v in parts]
    outcome = ("contradicted" if "contradicted" in outs else "supported" if parts and set(outs) == {"supported"}
               else "inconclusive")
    reasons = [f"{v.claim}: {v.outcome}" for v in parts if v.outcome != outcome]
    sentence = f"{claim}: {outcome.upper()} by these runs — " + " ".join(v.sentence for v in parts)
    return Verdict(study, claim, outcome, sentence, [e for v in parts for e in v.effects], reasons)


def verdict_table(verdicts: list[Verdict]) -> pd.DataFrame:
    """One row per verdict: study, claim, outcome, effect, interval, p, pairs."""
    rows = []
    for v in verdicts:
        e = v.effects[0] if v.effects else {}
        rows.append({"study": v.study, "claim": v.claim, "outcome": v.outcome, "effect": e.get("mean"),
                     "ci_low": e.get("lo"), "ci_high": e.get("hi"), "p": e.get("p"), "pairs": e.get("n"),
                     "why": "; ".join(v.reasons)})
    return pd.DataFrame(rows, columns=["study", "claim", "outcome", "effect", "ci_low", "ci_high", "p", "pairs", "why"])


def write_verdicts(out, study: str, verdicts: list[Verdict]) -> Path:
    """outputs/studies/<study>/verdicts.json: read by the report's index and the summary."""
    path = Path(out) / "studies" / study / "verdicts.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps([asdict(v) for v in verdicts], indent=1, default=float).encode())
    return path


def read_verdicts(out) -> list[Verdict]:
    """Every study's verdicts under an outputs folder (unreadable files are skipped)."""
    found = []
    for p in sorted(Path(out).glob("studies/*/verdicts.json")):
        try:
            found += [Verdict(**v) for v in json.loads(p.read_text())]
        except (OSError, ValueError, TypeError):
            continue
    return found

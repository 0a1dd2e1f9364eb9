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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

__all__ = ["Effect", "Verdict", "select_lr", "at_selected_lr", "paired_effect", "contrast_effect",
           "ratio_interval", "beats_chance", "decide", "verdict_table", "write_verdicts", "read_verdicts",
           "OUTCOMES"]

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

    def text(self, unit: str = "", pct: bool = False) -> str:
        f = (lambda v: f"{100 * v:+.1f}%") if pct else (lambda v: f"{v:+.3f}{unit}")
        ci = f"[{f(self.lo)}, {f(self.hi)}]" if math.isfinite(self.lo) else "[no interval: n < 2]"
        p = f"p={self.p:.2g}" if math.isfinite(self.p) else "p n/a"
        return f"{self.name} {f(self.mean)} (95% CI {ci}, {p}, n={self.n} matched pairs)"


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
    from .records import atomic_write

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

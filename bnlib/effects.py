"""Effects and their intervals, the numbers every verdict (bnlib.stats) is decided on:
learning-rate selection on validation, paired effects and contrasts over replicates, the share
of a gain, whether an arm learns at all, and rank correlations across arms.

The unit of replication is the seed (REPLICATE): it fixes a run's initial weights and its data
order, so runs that share a seed in several grid cells are one replicate (`by_replicate`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

__all__ = ["Effect", "Share", "select_lr", "at_selected_lr", "by_replicate", "paired_effect", "contrast_effect",
           "ratio_interval", "beats_chance", "rank_correlation", "rank_correlation_difference", "ALPHA", "LEVEL",
           "REPLICATE", "N_BOOT"]

ALPHA = 0.05  # significance level of every test (P2's authors: p <= 0.05)
LEVEL = 0.95  # confidence level of every interval
REPLICATE = "seed"  # what is replicated: a seed fixes the initial weights and the data order
N_BOOT = 4000  # bootstrap resamples where a caller gives none (bnlib.calibration lowers it: many tables)


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
    n_unit: str = "seeds"  # what n counts: replicates (seeds), or the units ranked (arms)
    why_no_interval: str = ""  # set when lo/hi are nan: n < 2, identical differences, ...

    def text(self, unit: str = "", pct: bool = False) -> str:
        f = (lambda v: f"{100 * v:+.1f}%") if pct else (lambda v: f"{v:+.3f}{unit}")
        ci = (f"[{f(self.lo)}, {f(self.hi)}]" if math.isfinite(self.lo)
              else f"[no interval: {self.why_no_interval or 'n < 2'}]")
        p = f"p={self.p:.2g}" if math.isfinite(self.p) else "p n/a"
        return f"{self.name} {f(self.mean)} (95% CI {ci}, {p}, n = {self.n} {self.n_unit})"



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


def by_replicate(values: pd.DataFrame | pd.Series, replicate: str = REPLICATE):
    """Per-unit values (index: the pair_on columns) -> (replicate-level values, strata, n_unit).

    Runs that share a seed share initial weights and data order, whatever grid cell (depth,
    batch size ...) they sit in, so a seed that appears in several cells is one replicate: its
    values are averaged over its cells (strata None). Where each seed sits in exactly one cell
    and there are several cells, the seeds are independent and the cells are strata (returned,
    one label per row). Without a `replicate` level the rows are the units."""
    names = list(values.index.names)
    if replicate not in names:
        return values, None, "matched units"
    cells = [n for n in names if n != replicate]
    if not cells or len(values) == 0:
        return values, None, "seeds"
    flat = values.reset_index()
    cell = flat[cells].astype(str).agg("|".join, axis=1)
    n_cells = cell.nunique()
    if n_cells > 1 and (cell.groupby(flat[replicate]).nunique() == 1).all():
        return values, cell.to_numpy(), f"independent seeds in {n_cells} cells"
    per_seed = values.groupby(level=replicate).mean()
    return per_seed, None, (f"seeds (each the mean over its {n_cells} cells)" if n_cells > 1 else "seeds")


def _t_effect(name: str, diffs: np.ndarray, alternative: str, a_mean=math.nan, b_mean=math.nan,
              level: float = LEVEL, strata=None, n_unit: str = "seeds", meas_var: float = 0.0) -> Effect:
    """Mean difference with its t interval and p-value; with `strata` (a label per value), the
    stratified estimate: the mean of the strata's means, its variance from the pooled
    within-stratum variance, N − k degrees of freedom. `meas_var`: a known measurement variance
    of each difference (a value read off a grid: paired_effect's `resolution`), added to the
    variance the differences show."""
    diffs = np.asarray(diffs, float)
    n = len(diffs)
    base = dict(alternative=alternative, a_mean=a_mean, b_mean=b_mean, n_unit=n_unit)
    if strata is not None:
        g = pd.Series(diffs).groupby(np.asarray(strata))
        sizes, means = g.size().to_numpy(float), g.mean().to_numpy(float)
        k, mean = len(sizes), float(means.mean())
        dof = n - k
        resid = diffs - g.transform("mean").to_numpy(float)
        s2 = float((resid ** 2).sum() / dof) + meas_var if dof > 0 else math.nan
        se = math.sqrt(s2 * (1 / sizes).sum()) / k if dof > 0 else math.nan
    else:
        mean = float(np.mean(diffs)) if n else math.nan
        dof = n - 1
        se = float(math.sqrt((np.var(diffs, ddof=1) + meas_var) / n)) if n >= 2 else math.nan
    if dof < 1 or not math.isfinite(se):
        return Effect(name, mean, math.nan, math.nan, math.nan, n, why_no_interval="n < 2", **base)
    if se == 0:  # identical differences (a discrete measure): no spread to estimate, no interval;
        # a zero-width interval would "support" a claim on 3 agreeing seeds with false certainty
        return Effect(name, mean, math.nan, math.nan, math.nan, n,
                      why_no_interval=f"the {n} differences are identical", **base)
    h = float(sps.t.ppf(0.5 + level / 2, dof)) * se
    tstat = mean / se
    p = float({"greater": sps.t.sf(tstat, dof), "less": sps.t.cdf(tstat, dof)}.get(
        alternative, 2 * sps.t.sf(abs(tstat), dof)))
    return Effect(name, mean, mean - h, mean + h, p, n, **base)


def paired_effect(runs: pd.DataFrame, arm_col: str, a, b, metric: str, pair_on: list[str],
                  alternative: str = "greater", replicate: str = REPLICATE, resolution: str | None = None) -> Effect:
    """Effect of arm `a` over arm `b` on `metric`: paired differences on the units in `pair_on`
    (the grid cell and the seed) where both arms have a run, collapsed to replicates
    (by_replicate), with a t interval and a t-test over the replicates.

    `resolution`: a column giving the width Δ of the grid step each value was read off (e.g. a
    largest stable learning rate on a log sweep): the value is known only to within Δ, a uniform
    rounding error of variance Δ²/12 (Sheppard), so each difference carries (Δ_a² + Δ_b²)/12 on
    top of what the seeds show. Seeds that agree exactly on a coarse grid then give an interval
    as wide as the grid, not a zero-width one."""
    piv = _pairs(runs, arm_col, [a, b], metric, pair_on)
    d, strata, unit = by_replicate(piv[a] - piv[b], replicate)
    meas = 0.0
    if resolution is not None and len(piv):
        res = _pairs(runs, arm_col, [a, b], resolution, pair_on).reindex(piv.index)
        meas = float(((res[a] ** 2 + res[b] ** 2) / 12).mean())
    return _t_effect(f"{a} − {b}", d.to_numpy(float), alternative, float(piv[a].mean()) if len(piv) else math.nan,
                     float(piv[b].mean()) if len(piv) else math.nan, strata=strata, n_unit=unit, meas_var=meas)


def contrast_effect(runs: pd.DataFrame, arm_col: str, weights: dict, metric: str, pair_on: list[str],
                    name: str, alternative: str = "greater", replicate: str = REPLICATE) -> Effect:
    """A linear contrast Σ w_arm · metric_arm per matched unit, collapsed to replicates and
    tested against 0: e.g. {x: 1, bn: −0.5, none: −0.5} asks whether arm x recovers more than
    half of BN's gain over none (x − none > 0.5·(bn − none))."""
    piv = _pairs(runs, arm_col, list(weights), metric, pair_on)
    d, strata, unit = by_replicate(sum(w * piv[k] for k, w in weights.items()), replicate)
    return _t_effect(name, np.asarray(d, float), alternative, strata=strata, n_unit=unit)


@dataclass(frozen=True)
class Share:
    """The share of a reference arm's gain that an arm recovers, with its bootstrap interval;
    `why` says why it is undefined (nan)."""

    point: float
    lo: float
    hi: float
    why: str = ""

    def text(self) -> str:
        if not math.isfinite(self.point):
            return f"share undefined ({self.why})"
        ci = f"bootstrap 95% CI {self.lo:.0%} to {self.hi:.0%}" if math.isfinite(self.lo) else f"no interval: {self.why}"
        return f"it recovers {self.point:.0%} of BN's gain ({ci})"


def ratio_interval(runs: pd.DataFrame, arm_col: str, x, ref, base, metric: str, pair_on: list[str],
                   n_boot: int | None = None, seed: int = 0, replicate: str = REPLICATE) -> Share:
    """Share of the reference arm's gain that arm x recovers: mean(x − base)/mean(ref − base)
    over replicates (by_replicate), with a percentile bootstrap interval resampling replicates
    (within strata, where cells have seeds of their own). Undefined, and said so, when the
    reference's gain is not positive, or is not positive in some resample: dropping those
    resamples would bias the interval."""
    piv = _pairs(runs, arm_col, [x, ref, base], metric, pair_on)
    if len(piv) == 0:
        return Share(math.nan, math.nan, math.nan, "no matched runs")
    gx, strata, _ = by_replicate(piv[x] - piv[base], replicate)
    gr, _, _ = by_replicate(piv[ref] - piv[base], replicate)
    gx, gr = gx.to_numpy(float), gr.to_numpy(float)
    if gr.mean() <= 0:
        return Share(math.nan, math.nan, math.nan, f"{ref}'s gain over {base} is not positive")
    point = float(gx.mean() / gr.mean())
    rng, n_boot = np.random.default_rng(seed), N_BOOT if n_boot is None else int(n_boot)
    labels = np.zeros(len(gx), int) if strata is None else pd.factorize(strata)[0]
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == s), size=(n_boot, int((labels == s).sum())))
                          for s in np.unique(labels)], axis=1)
    num, den = gx[idx].mean(1), gr[idx].mean(1)
    if (den <= 0).any():
        return Share(point, math.nan, math.nan,
                     f"{ref}'s gain over {base} is not positive in {np.mean(den <= 0):.0%} of the resamples")
    lo, hi = np.quantile(num / den, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Share(point, float(lo), float(hi))


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

def _unit_means_boot(table: pd.DataFrame, cols: list[str], unit: str, replicate: str | None, n_boot: int | None,
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
    rng, n_boot = np.random.default_rng(seed), N_BOOT if n_boot is None else int(n_boot)
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


def _ranked_unit(unit: str, replicate: str | None) -> str:
    over = f"{unit} values and {replicate}s" if replicate else f"{unit} values"
    return f"{unit} values ranked (each the mean over its {replicate}s; the interval resamples {over})" if replicate \
        else f"{unit} values ranked (the interval resamples {over})"


def rank_correlation(table: pd.DataFrame, x: str, y: str, unit: str, replicate: str | None = None,
                     alternative: str = "two-sided", n_boot: int | None = None, seed: int = 0,
                     level: float = LEVEL) -> Effect:
    """Spearman's ρ between x and y across units (e.g. arms), each unit's value the mean over
    its replicates (seeds), with a percentile bootstrap interval over units and replicates
    (both resampled with replacement; replicates matched across units) and a bootstrap p-value.
    `n` of the Effect is the number of units. With ~10 units the interval is wide: that is the
    information there is."""
    point, boots, n = _unit_means_boot(table, [x, y], unit, replicate, n_boot, seed)
    rho = float(_spearman_rows(point[x], point[y])[0]) if n >= 3 else math.nan
    return _boot_effect(f"Spearman ρ({x}, {y})", rho, _spearman_rows(boots[x], boots[y]), n, alternative, level,
                        n_unit=_ranked_unit(unit, replicate))


def rank_correlation_difference(table: pd.DataFrame, a: str, b: str, y: str, unit: str,
                                replicate: str | None = None, sign_a: float = 1.0, sign_b: float = 1.0,
                                alternative: str = "greater", n_boot: int | None = None, seed: int = 0,
                                level: float = LEVEL) -> Effect:
    """Does a track y better than b does? sign_a·ρ(a, y) − sign_b·ρ(b, y) across units, on the
    same bootstrap resamples as rank_correlation (signs: the direction each is expected to go,
    e.g. −1 for "lower is better"), with its interval and bootstrap p-value."""
    point, boots, n = _unit_means_boot(table, [a, b, y], unit, replicate, n_boot, seed)
    d = (sign_a * _spearman_rows(point[a], point[y]) - sign_b * _spearman_rows(point[b], point[y]))[0] \
        if n >= 3 else math.nan
    db = sign_a * _spearman_rows(boots[a], boots[y]) - sign_b * _spearman_rows(boots[b], boots[y])
    name = f"{'' if sign_a > 0 else '−'}ρ({a}, {y}) {'−' if sign_b > 0 else '+'} ρ({b}, {y})"
    return _boot_effect(name, float(d), db, n, alternative, level, n_unit=_ranked_unit(unit, replicate))

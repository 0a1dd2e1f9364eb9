"""The verdicts' rules over arrays of tables (bnlib.calibration's fast evaluator): selection on
validation, the ladder-edge and learns-at-all guards, paired, stratified and contrast t intervals,
equivalence margins, rank correlations with their bootstrap, each written for many tables at once.
tests/test_calibration.py checks them against each study's own verdict function table by table."""
from __future__ import annotations

import warnings

import numpy as np
from scipy import stats as sps

import bnlib.effects as effects
from ..stats import ALPHA, LEVEL, MIN_RANKED
from ..studies import p2 as P2
from ..studies import p3 as P3
from ..studies import p4 as P4
from ..studies import p5 as P5
from .worlds import BOOT, CLAIMS, Design

__all__ = ["RULES", "NAMES", "SUP", "CON", "INC", "GUARD"]

# --- the rules over arrays of tables: outcome codes per table ---

SUP, CON, INC, GUARD = 1, -1, 0, 2  # GUARD: inconclusive because a guard (not the interval) held it back
NAMES = {SUP: "supported", CON: "contradicted", INC: "inconclusive", GUARD: "guarded"}
_E = dict(invalid="ignore", divide="ignore")


def _at(v: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """v (n, runs) at run indices ix (the same in every table), NaN where ix < 0."""
    return np.where(ix >= 0, v[:, np.maximum(ix, 0)], np.nan)


def _pick(v: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """v (n, runs) at run indices ix (n, ...) of each table's own, NaN where ix < 0."""
    out = np.take_along_axis(v, np.maximum(ix, 0).reshape(len(v), -1), 1).reshape(ix.shape)
    return np.where(ix >= 0, out, np.nan)


def _select(d: Design, x: dict):
    """stats.select_lr per table and group: the rung with the best mean validation accuracy
    over seeds, never one where a seed diverged while another trains (ties: the lower rate).
    Returns the runs at the choice (n, G, S), the choice's ladder-edge flag (n, G; a
    diverged-at-choice group is not flagged, as in stats.edge_guard) and per-group rungs (G,)."""
    s, ok = d.slots, d.slots >= 0
    has = ok.any(-1)
    dv = (x["div"][:, s] & ok).any(-1)
    with np.errstate(**_E), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        vm = np.nanmean(np.where(ok, x["val"][:, s], np.nan), -1)
    k1 = np.where(has, dv, 2)
    score = np.where(k1 == k1.min(-1, keepdims=True), np.nan_to_num(vm, nan=-1e300), -np.inf)
    ch = score.argmax(-1)
    top = has.sum(-1) - 1
    at_div = np.take_along_axis(dv, ch[..., None], -1)[..., 0]
    edge = ((ch == 0) | (ch == top)) & (top > 0) & ~at_div
    return s[np.arange(s.shape[0]), ch], edge, top


def _t(x: np.ndarray, alternative: str = "greater", meas=0.0) -> dict:
    """effects._t_effect per table: x (n, S) paired values over seeds, or (n, C, S) strata of
    seeds of their own (NaN: no pair); `meas` a known measurement variance per value."""
    with np.errstate(**_E), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if x.ndim == 3:
            cnt = np.isfinite(x).sum(-1)
            mc = np.nanmean(x, -1)
            k = (cnt > 0).sum(-1)
            n, mean = cnt.sum(-1), np.nansum(mc, -1) / k
            dof = n - k
            s2 = np.nansum((x - mc[..., None]) ** 2, (-1, -2)) / dof + meas
            se = np.sqrt(s2 * np.where(cnt > 0, 1 / cnt, 0).sum(-1)) / k
        else:
            n, mean = np.isfinite(x).sum(-1), np.nanmean(x, -1)
            dof = n - 1
            se = np.sqrt((np.nanvar(x, -1, ddof=1) + meas) / n)
        ok = (dof >= 1) & np.isfinite(se) & (se > 0)
        dof = np.maximum(dof, 1)
        h, ts = sps.t.ppf(0.5 + LEVEL / 2, dof) * se, mean / se
    p = {"greater": sps.t.sf(ts, dof), "less": sps.t.cdf(ts, dof)}.get(alternative, 2 * sps.t.sf(np.abs(ts), dof))
    nan = np.full_like(mean, np.nan)
    return {"lo": np.where(ok, mean - h, nan), "hi": np.where(ok, mean + h, nan), "p": np.where(ok, p, nan), "n": n}


def _decide(e: dict, guard, direction: str = "greater", min_n: int = 3) -> np.ndarray:
    """stats.decide against 0 per table."""
    lo, hi = (e["lo"], e["hi"]) if direction == "greater" else (-e["hi"], -e["lo"])
    out = np.where((lo > 0) & (e["p"] <= ALPHA), SUP, np.where(hi < 0, CON, INC))
    return np.where(np.asarray(guard) & (e["n"] >= min_n), out, GUARD)


def _margin(e: dict, guard, margin: float, one_sided: bool = False) -> np.ndarray:
    """stats.decide_margin per table."""
    lo, hi = e["lo"], e["hi"]
    out = np.where((lo > -margin) & (one_sided | (hi < margin)), SUP,
                   np.where((hi < -margin) | (~one_sided & (lo > margin)), CON, INC))
    return np.where(np.asarray(guard) & (e["n"] >= 3), out, GUARD)


def _all_of(*parts) -> np.ndarray:
    """stats.all_of: contradicted if a part is, supported if all are; held by a guard if a part is."""
    p = np.stack(parts)
    return np.where((p == CON).any(0), CON, np.where((p == SUP).all(0), SUP,
                                                     np.where((p == GUARD).any(0), GUARD, INC)))


def _learns(v: np.ndarray, chance: float = 0.1, margin: float = 0.05) -> np.ndarray:
    """stats.beats_chance per table over the values of the last axes."""
    v = v.reshape(len(v), -1)
    n, thr = np.isfinite(v).sum(-1), chance + margin
    with np.errstate(**_E), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m, sd = np.nanmean(v, -1), np.nanstd(v, -1, ddof=1)
        p = sps.t.sf((m - thr) / (sd / np.sqrt(n)), np.maximum(n - 1, 1))
    return np.where(n == 1, m > thr, (n > 0) & (m > thr) & ((sd == 0) | (p <= ALPHA)))


def _acc(x: dict, chance: float = 0.1) -> np.ndarray:
    """A diverged run's accuracy: chance (P3-P5's `accuracy`; its test value is NaN here)."""
    return np.where(x["div"], chance, x["test"])


def _p1_rules(d: Design, x: dict, need: set) -> dict:
    at, edge, _ = _select(d, x)
    a = _pick(x["test"], at)  # (n, G, S): every cell has seeds of its own, so cells are strata

    def contrast(w):  # (n, cells, S)
        return sum(c * a[:, d.g(arm)] for arm, c in w.items())
    bn_ok = _learns(a[:, d.g("bn")])
    e0 = _t(contrast({"bn": 1, "none": -1}))
    ref = _decide(e0, bn_ok & ~edge[:, np.r_[d.g("bn"), d.g("none")]].any(1))
    gain = _decide(e0, bn_ok) == SUP  # a BN gain to attribute: the reference without its edge guard
    out = {"ref": ref}
    for key, arm in (("init", "affine_bn_init"), ("bn_minus", "bn_minus"), ("affine", "affine")):
        e = _t(contrast({arm: 1, "bn": -0.5, "none": -0.5}))
        out[key] = _decide(e, bn_ok & gain & ~edge[:, np.r_[d.g(arm), d.g("bn"), d.g("none")]].any(1))
    return out


def _p2_rules(d: Design, x: dict, need: set) -> dict:
    a = _at(x["test"], d.slots[:, 0])  # one rate per arm: no choice
    ref = _learns(a[:, d.g(P2.arm_name(*P2.REFERENCE))])
    out = {}
    for key, (claim, (u, v)) in zip(CLAIMS["p2"], P2.COMPARISONS.items()):
        gu, gv = d.g(P2.arm_name(*u))[0], d.g(P2.arm_name(*v))[0]
        ok = ref & (_learns(a[:, gv]) if v != P2.REFERENCE else True)
        out[key] = _decide(_t(a[:, gu] - a[:, gv]), ok)
    return out


def _largest_stable(d: Design, x: dict):
    """P4's largest_stable_lr per (group, seed) over each group's ladder: (n, G, S) its rung
    (−1: even the lowest diverged) and whether it is the top (no rung diverged)."""
    s, ok = d.slots, d.slots >= 0
    bad = x["div"][:, s] & ok  # (n, G, K, S)
    k = np.where(bad.any(2), bad.argmax(2), ok.any(-1).sum(-1)[None, :, None]) - 1
    return k, k == ok.any(-1).sum(-1)[None, :, None] - 1


def _lr_at(d: Design, k: np.ndarray) -> np.ndarray:
    lr = d.runs["lr"].to_numpy(float)[np.where(d.slots >= 0, d.slots, 0).max(-1)]  # (G, K)
    return np.where(k >= 0, lr[np.arange(lr.shape[0])[None, :, None], np.maximum(k, 0)], np.nan)


class _RankBoot:
    """effects.rank_correlation(_difference) for many tables at once: units' values are the
    means over seeds, resampled as effects._unit_means_boot does (seed 0; BOOT draws of units,
    then of seeds). A round's drawn units are the U units with multiplicities `count`, so each
    unit's average rank among them and the ρ over them come from (tables, BOOT, U) arrays; with
    half-integer ranks the sums are exact, so ρ is the very number effects._spearman_rows gives."""

    def __init__(self, units: int, seeds: int):
        rng = np.random.default_rng(0)
        ui, self.ri = rng.integers(0, units, (BOOT, units)), rng.integers(0, seeds, (BOOT, seeds))
        self.count = np.zeros((BOOT, units))
        np.add.at(self.count, (np.arange(BOOT)[:, None], ui), 1)

    def ranks(self, v: np.ndarray) -> np.ndarray:
        """(n, U, S) values -> centred average ranks (n, BOOT, U) of each unit among the drawn:
        the drawn units below it, plus half of those tied with it (itself included), plus ½."""
        if not np.isfinite(v).all():
            raise ValueError("a unit without a value: the fast rules assume every arm measured in every seed")
        m = v[:, :, self.ri].mean(-1).transpose(0, 2, 1)  # (n, BOOT, U): each unit's mean over the drawn seeds
        order = np.argsort(m, -1)
        ms = np.take_along_axis(m, order, -1)
        c = np.take_along_axis(np.broadcast_to(self.count, m.shape), order, -1)
        upto = np.cumsum(c, -1)  # drawn units at or below each position, in sorted order
        start = np.concatenate([np.ones(m.shape[:-1] + (1,), bool), ms[..., 1:] != ms[..., :-1]], -1)
        below = np.maximum.accumulate(np.where(start, upto - c, 0), -1)  # below the tie group
        end = np.concatenate([start[..., 1:], np.ones(m.shape[:-1] + (1,), bool)], -1)
        group = np.minimum.accumulate(np.where(end, upto, np.inf)[..., ::-1], -1)[..., ::-1] - below
        out = np.empty(m.shape)
        np.put_along_axis(out, order, below + (group + 1) / 2 - (m.shape[-1] + 1) / 2, -1)
        return out

    def rho(self, rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
        c = self.count
        with np.errstate(**_E):
            den = np.sqrt((c * rx ** 2).sum(-1) * (c * ry ** 2).sum(-1))
            return np.where(den > 0, (c * rx * ry).sum(-1) / den, np.nan)


def _boot_effect(point: np.ndarray, boots: np.ndarray, alternative: str, units: int) -> dict:
    """effects._boot_effect per table: percentile interval and bootstrap p of Σ sign·ρ."""
    cnt = np.isfinite(boots).sum(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanquantile(boots, [(1 - LEVEL) / 2, (1 + LEVEL) / 2], axis=-1)
    p = (np.sum(boots >= 0 if alternative == "less" else boots <= 0, -1) + 1) / (cnt + 1)
    ok = (cnt >= 100) & np.isfinite(point)
    return {"lo": np.where(ok, lo, np.nan), "hi": np.where(ok, hi, np.nan), "p": np.where(ok, p, np.nan),
            "n": np.full(len(point), units)}


def _p3_rules(d: Design, x: dict, need: set) -> dict:
    at, edge, _ = _select(d, x)
    arms = list(d.groups["arm"])
    order = np.argsort(arms)  # the correlations' units, sorted by name
    a, ics = _pick(_acc(x, P3.CHANCE), at), _pick(10 + x["ics"], at)
    kstar, top = _largest_stable(d, x)
    g = {arm: d.g(arm)[0] for arm in arms}
    bn = _learns(a[:, g["bn"]])
    e0 = _t(a[:, g["bn"]] - a[:, g["none"]])
    out = {"ref": _decide(e0, bn & ~edge[:, [g["bn"], g["none"]]].any(1))}
    learns = np.stack([_learns(a[:, i]) for i in range(len(arms))], 1).all(1)
    corr = bn & (_decide(e0, bn) == SUP) & learns & ~edge.any(1)
    # the rank correlations across arms, units sorted by name (bootstraps: only where asked)
    cens = (top | (kstar < 0)).any(-1).sum(-1)  # arms whose lr* is a bound in some seed
    spec = {"ics": ([(1, "ics")], "less", corr), "beta": ([(-1, "beta"), (1, "ics")], "greater", corr),
            "lr_star": ([(1, "lr"), (1, "ics")], "greater", corr & (cens <= P3.CENSORED_MAX * len(arms)))}
    if need & set(spec):
        vals = {"ics": ics, "beta": _pick(x["beta"], at),
                "lr": np.broadcast_to(_lr_at(d, kstar), a.shape)}
        boot, memo = _RankBoot(len(arms), a.shape[-1]), {}
        r_acc, acc_mean = boot.ranks(a[:, order]), np.nanmean(a[:, order], -1)
        for key in need & set(spec):
            point, boots = 0.0, 0.0
            for sign, c in spec[key][0]:
                if c not in memo:
                    v = vals[c][:, order]
                    memo[c] = (effects._spearman_rows(np.nanmean(v, -1), acc_mean),
                               boot.rho(boot.ranks(v), r_acc))
                point, boots = point + sign * memo[c][0], boots + sign * memo[c][1]
            out[key] = _decide(_boot_effect(point, boots, spec[key][1], len(arms)), spec[key][2], spec[key][1],
                               MIN_RANKED)
    edge2 = edge[:, [g["bn"], g["ics_free"]]].any(1)
    check = _decide(_t(ics[:, g["ics_free"]] - ics[:, g["bn"]]), bn & ~edge2)
    trains = np.nanmean(~np.isnan(_pick(x["test"], at)[:, g["ics_free"]]), -1) >= 0.5
    out["ics_free"] = _all_of(check, _decide(_t(a[:, g["bn"]] - a[:, g["ics_free"]]), bn & trains & ~edge2))
    out["noisy"] = _margin(_t(a[:, g["noisy_bn"]] - a[:, g["bn"]], "two-sided"),
                           bn & ~edge[:, [g["bn"], g["noisy_bn"]]].any(1), P3.SIMILAR)
    return out


def _log_step(grid: np.ndarray, k: np.ndarray) -> np.ndarray:
    """p4._log_step: log10 distance from grid[k] to the next rate up (at the top: the one below)."""
    lg = np.log10(grid)
    j = np.where(k + 1 < len(grid), k + 1, k - 1)
    return np.where(k >= 0, np.abs(lg[j] - lg[np.maximum(k, 0)]), np.nan)


def _p4_rules(d: Design, x: dict, need: set) -> dict:
    acc = _acc(x, P4.CHANCE)
    bn, no = d.g("bn")[0], d.g("none")[0]
    lrs = d.runs["lr"].to_numpy(float)[d.slots[bn, :, 0]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        vm = np.nanmean(_at(x["val"], d.slots[bn]), -1)  # (n, K): bn's mean validation accuracy per rate
    best = np.nan_to_num(vm, nan=-np.inf).argmax(-1)
    ref = _learns(_pick(acc, d.slots[bn][best])) & np.isfinite(vm).any(-1)
    kstar, _ = _largest_stable(d, x)
    res = _log_step(lrs, kstar)
    star = np.log10(_lr_at(d, kstar))
    meas = np.nanmean(np.where(np.isfinite(star[:, bn] - star[:, no]), (res[:, bn] ** 2 + res[:, no] ** 2) / 12,
                               np.nan), -1)
    out = {"lr_star": _decide(_t(star[:, bn] - star[:, no], meas=meas), ref)}
    ks, kl = (int(np.flatnonzero(np.isclose(lrs, v))[0]) for v in (min(P4.PAPER_LRS), max(P4.PAPER_LRS)))
    a = {(g, k): _at(acc, d.slots[g, k]) for g in (bn, no) for k in (ks, kl)}
    small = _margin(_t(a[bn, ks] - a[no, ks], "two-sided"), ref & _learns(a[bn, ks]) & _learns(a[no, ks]),
                    P4.SIMILAR)
    out["confined"] = _all_of(small, _decide(_t(a[bn, kl] - a[no, kl] - a[bn, ks] + a[no, ks]), ref))
    # one step from init: the smallest size of the probe grid at or above the (arm, seed)'s limit
    grid = np.sort(np.asarray(d.runs["probe_step_sizes"].iloc[0], float))
    s_div = _at(x["s_div"], d.slots[[bn, no], 0])  # (n, 2, S): the same for every rate
    k = np.minimum(np.searchsorted(grid, s_div), len(grid) - 1)
    res = np.where(k > 0, np.log10(grid[k]) - np.log10(grid[np.maximum(k - 1, 0)]), np.log10(grid[1] / grid[0]))
    ls = np.log10(grid[k])
    out["step"] = _decide(_t(ls[:, 0] - ls[:, 1], meas=((res[:, 0] ** 2 + res[:, 1] ** 2) / 12).mean(-1)), ref)
    return out


def _p5_rules(d: Design, x: dict, need: set) -> dict:
    at, edge, _ = _select(d, x)
    a = _pick(_acc(x, P5.CHANCE), at)
    deep = f"wrn{max(int(s[3:].split('_')[0]) for s in d.groups['arch'] if s != P5.BATCH_ARCH)}_{P5.DEPTH_K}"

    def dg(v):
        return d.g(v, arch=deep)[0]
    ref = _learns(a[:, dg("bn")])
    out = {"noninf": _margin(_t(a[:, dg("skipinit")] - a[:, dg("bn")], "two-sided"),
                             ref & ~edge[:, [dg("skipinit"), dg("bn")]].any(1), P5.NONINFERIOR, one_sided=True)}
    parts = [_decide(_t(a[:, dg("skipinit")] - a[:, dg(o)]), ref & ~edge[:, [dg("skipinit"), dg(o)]].any(1))
             for o in ("none", "fixed_inv_sqrt2")
             if len(d.g(o, arch=deep)) and (o == "none" or (d.slots[dg(o)] >= 0).any(0).sum() >= P5.MIN_SEEDS)]
    out["beats"] = _all_of(*parts)
    bs = d.groups.loc[d.groups["arch"] == P5.BATCH_ARCH, "batch_size"]
    b = {(v, z): d.g(v, arch=P5.BATCH_ARCH, batch_size=z)[0] for v in ("bn", "skipinit") for z in (bs.min(), bs.max())}
    learn = {k: _learns(a[:, g]) for k, g in b.items()}
    ok = learn["bn", bs.min()] & learn["bn", bs.max()] & ~edge[:, list(b.values())].any(1)
    sm, lg = bs.min(), bs.max()
    small = _margin(_t(a[:, b["bn", sm]] - a[:, b["skipinit", sm]], "two-sided"), ok & learn["skipinit", sm],
                    P5.SIMILAR)
    inter = _decide(_t(a[:, b["bn", lg]] - a[:, b["skipinit", lg]] - a[:, b["bn", sm]] + a[:, b["skipinit", sm]]), ok)
    out["batch"] = _all_of(small, inter)
    return out


RULES = {"p1": _p1_rules, "p2": _p2_rules, "p3": _p3_rules, "p4": _p4_rules, "p5": _p5_rules}

"""Figures of the probes table (`runs.probes`, bnlib.probes) and of learning-rate sweeps.

Like bnlib.plots: every function takes tidy tables as `load_runs` returns them and a `hue`
column (the word the user typed, e.g. norm), and returns the matplotlib Figure. Diverged runs
are shown, marked, never dropped.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .plots import _theme

__all__ = ["acc_curves_by_lr", "acc_vs_lr_stability", "rel_loss_vs_step", "grad_histograms",
           "channel_moments_vs_depth", "ics_over_training", "landscape_bands", "arms_vs_accuracy",
           "signal_propagation_vs_block", "trainability_vs_depth", "batch_size_curves"]


def _colors(values) -> dict:
    return dict(zip(values, sns.color_palette(n_colors=max(1, len(values)))))


def acc_curves_by_lr(epochs: pd.DataFrame, runs: pd.DataFrame, lrs, y: str = "test_acc", hue: str = "norm"):
    """Accuracy per epoch, one panel per learning rate, one line per run (seeds share a colour);
    a run that diverged ends in a cross at its last recorded epoch."""
    _theme()
    lrs = list(lrs)
    fig, axes = plt.subplots(1, len(lrs), figsize=(4.2 * len(lrs), 3.4), sharey=True, squeeze=False)
    col = _colors(sorted(runs[hue].unique()))
    status = runs.set_index("run_id")["status"]
    for ax, lr in zip(axes[0], lrs):
        for rid, d in epochs[np.isclose(epochs["lr"], lr)].groupby("run_id"):
            d = d.sort_values("epoch")
            c = col[d[hue].iloc[0]]
            ax.plot(d["epoch"], d[y].fillna(0.0), color=c, alpha=0.8, marker="o", ms=3)
            if status.get(rid) == "diverged":
                ax.plot(d["epoch"].iloc[-1], np.nan_to_num(d[y].iloc[-1]), "x", color=c, ms=11, mew=2.5)
        ax.set_title(f"lr = {lr:g}")
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel(y.replace("_", " "))
    handles = [plt.Line2D([], [], color=c, label=k) for k, c in col.items()]
    handles.append(plt.Line2D([], [], color="gray", marker="x", ls="", ms=9, mew=2, label="diverged"))
    axes[0][-1].legend(handles=handles, loc="best")
    fig.tight_layout()
    return fig


def acc_vs_lr_stability(acc: pd.DataFrame, lr_star: pd.DataFrame, hue: str = "norm"):
    """Test accuracy of every run vs its learning rate (log x); diverged runs as crosses; a
    dashed line at each arm's largest stable rate (median over seeds)."""
    _theme()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    col = _colors(sorted(acc[hue].unique()))
    for arm, d in acc.groupby(hue):
        mean = d.groupby("lr")["acc"].mean()
        ax.plot(mean.index, mean.values, color=col[arm], label=f"{arm} (mean over seeds)")
        ok, bad = d[d["stable"]], d[~d["stable"]]
        ax.scatter(ok["lr"], ok["acc"], color=col[arm], s=18)
        ax.scatter(bad["lr"], bad["acc"], color=col[arm], marker="x", s=60, linewidths=2)
        star = lr_star.loc[lr_star[hue] == arm, "lr_star"].median()
        if np.isfinite(star):
            ax.axvline(star, color=col[arm], ls="--", lw=1)
    ax.scatter([], [], color="gray", marker="x", s=60, linewidths=2, label="diverged")
    ax.set(xscale="log", xlabel="learning rate", ylabel="test accuracy",
           title="accuracy vs learning rate (dashed: largest stable rate)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def rel_loss_vs_step(probes: pd.DataFrame, step: int = 0, hue: str = "norm", ceiling: float = 1e6):
    """P4 Fig. 4: L(after one SGD step of size s)/L(before) vs s, log-log, one line per run, with
    the 10³ divergence line. Values above `ceiling` or not finite are drawn at the ceiling."""
    _theme()
    p = probes[(probes["probe"] == "step_size_loss") & (probes["quantity"] == "rel_loss") & (probes["step"] == step)]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    col = _colors(sorted(p[hue].unique()))
    for rid, d in p.groupby("run_id"):
        d = d.sort_values("x")
        v = d["value"].where(np.isfinite(d["value"]) & (d["value"] < ceiling), ceiling)
        ax.plot(d["x"], v, color=col[d[hue].iloc[0]], alpha=0.7, marker="o", ms=3)
    ax.axhline(1e3, color="k", ls="--", lw=1)
    ax.text(p["x"].min() if len(p) else 1e-6, 1.3e3, "divergence (10³)", fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="step size s", ylabel="L(after) / L(before)",
           title=f"relative loss of one SGD step (step {step}; ≥ {ceiling:.0e} or non-finite drawn at the top)")
    ax.legend(handles=[plt.Line2D([], [], color=c, label=k) for k, c in col.items()], loc="upper left")
    fig.tight_layout()
    return fig


def grad_histograms(probes: pd.DataFrame, step: int = 0, hue: str = "norm"):
    """P4 Fig. 3: histogram of one layer's gradient entries, one panel per arm (each on its own
    x scale: they differ by orders of magnitude), log counts, summed over runs."""
    _theme()
    p = probes[(probes["probe"] == "layer_grads") & (probes["step"] == step)]
    arms = sorted(p[hue].unique())
    fig, axes = plt.subplots(1, max(1, len(arms)), figsize=(5 * max(1, len(arms)), 3.4), squeeze=False)
    for ax, arm in zip(axes[0], arms):
        d = p[p[hue] == arm]
        h = d[d["quantity"] == "hist_count"]
        if h.empty:
            continue
        one = h[h["run_id"] == h["run_id"].iloc[0]]  # bins differ by run: show one run
        width = d.loc[(d["quantity"] == "hist_bin_width") & (d["run_id"] == one["run_id"].iloc[0]), "value"]
        ax.bar(one["x"], one["value"], width=float(width.iloc[0]) if len(width) else 1.0, color="C0")
        kurt = d.loc[d["quantity"] == "hist_kurtosis", "value"]
        layer = one["layer"].iloc[0] if len(one) else "?"
        ax.set(yscale="log", xlabel="gradient entry", ylabel="count",
               title=f"{arm}: {layer} (kurtosis {kurt.median():.3g})")
    fig.tight_layout()
    return fig


def channel_moments_vs_depth(probes: pd.DataFrame, step: int = 0, site: str = "prenorm", hue: str = "norm"):
    """P4 Fig. 2: mean over channels of |channel mean| and of channel variance, per layer vs
    depth, log scale; the band is ± the spread over channels (median over runs)."""
    _theme()
    p = probes[(probes["probe"] == "channel_moments") & (probes["step"] == step)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    col = _colors(sorted(p[hue].unique()))
    for ax, q in zip(axes, ("mean_abs", "var")):
        for arm, d in p.groupby(hue):
            m = d[d["quantity"] == f"{site}_{q}"].groupby("depth")["value"].median()
            s = d[d["quantity"] == f"{site}_{q}_std"].groupby("depth")["value"].median().reindex(m.index)
            ax.plot(m.index, m.values, color=col[arm], marker="o", ms=3, label=arm)
            ax.fill_between(m.index, np.maximum(m - s, m * 1e-3), m + s, color=col[arm], alpha=0.15)
        ax.set(yscale="log", xlabel="conv index (depth)" if site == "prenorm" else "block index",
               title=f"channel {'|mean|' if q == 'mean_abs' else 'variance'} ({site}, step {step})")
        ax.legend(loc="best")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# P3 (Awais et al. 2021; Santurkar et al. 2018's measurements): ICS, landscape, arms side by side
# ----------------------------------------------------------------------------------------------

def ics_over_training(probes: pd.DataFrame, quantity: str = "l2", hue: str = "norm"):
    """Santurkar et al. Fig. 7 per arm: one panel per arm, ICS of each probed conv layer (colour:
    conv index) vs training step, mean over the runs given (e.g. seeds at the arm's chosen lr),
    the band their min-max. quantity: 'l2' (‖G − G'‖), 'cos' (cos(G, G')) or 'rel' (l2/‖G‖).
    The title gives the replayed step (step_lr); a time with a zero step has no ICS rows."""
    _theme()
    ics = probes[probes["probe"] == "ics"]
    steps = sorted({f"{v:g}" for v in ics.loc[ics["quantity"] == "step_lr", "value"] if v > 0})
    p = ics[ics["depth"] >= 0].pivot_table(index=[hue, "run_id", "step", "depth"], columns="quantity",
                                           values="value").reset_index()
    if quantity == "rel":
        p["rel"] = p["l2"] / p["grad_norm"].where(p["grad_norm"] > 0)
    arms = sorted(p[hue].unique())
    cols = min(5, max(1, len(arms)))
    rows = -(-len(arms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.8 * rows), sharex=True, sharey=True, squeeze=False)
    col = _colors(sorted(p["depth"].unique()))
    for ax, arm in zip(axes.flat, arms):
        for depth, d in p[p[hue] == arm].groupby("depth"):
            g = d.groupby("step")[quantity].agg(["mean", "min", "max"])
            ax.plot(g.index, g["mean"], color=col[depth], marker="o", ms=3, label=f"conv {depth}")
            ax.fill_between(g.index, g["min"], g["max"], color=col[depth], alpha=0.15)
        ax.set_title(arm, fontsize=10)
        ax.set_xlabel("step")
    for ax in axes.flat[len(arms):]:
        ax.axis("off")
    label = {"l2": "‖G − G'‖", "cos": "cos(G, G')", "rel": "‖G − G'‖ / ‖G‖"}[quantity]
    for ax in axes[:, 0]:
        ax.set_ylabel(label)
    if quantity in ("l2", "rel"):
        axes[0][0].set_yscale("symlog", linthresh=1e-4)
    axes[0][0].legend(fontsize=7, loc="best")
    at = (f"replayed step {steps[0]}" if len(steps) == 1 else f"replayed steps {', '.join(steps[:4])}"
          + (" …" if len(steps) > 4 else "")) if steps else "replayed step not recorded"
    fig.suptitle(f"ICS per layer over training ({label}; {at})", y=1.0)
    fig.tight_layout()
    return fig


def landscape_bands(probes: pd.DataFrame, hue: str = "norm"):
    """Santurkar et al. Fig. 4 per arm over training: (a) the band of L(θ − ηg) over the step
    sizes η (loss landscape), (b) the band of ‖∇L(θ) − ∇L(θ − ηg)‖ (gradient predictiveness),
    (c) effective β-smoothness; each the mean over the runs given at every probe step, log y."""
    _theme()
    p = probes[(probes["probe"] == "landscape") & probes["x"].isna()].pivot_table(
        index=[hue, "run_id", "step"], columns="quantity", values="value").reset_index()
    etas = sorted(probes.loc[(probes["probe"] == "landscape") & (probes["quantity"] == "loss"), "x"].unique())
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    col = _colors(sorted(p[hue].unique()))
    for arm, d in p.groupby(hue):
        g = d.replace([np.inf, -np.inf], np.nan).groupby("step").mean(numeric_only=True)
        axes[0].fill_between(g.index, g["loss_min"], g["loss_max"], color=col[arm], alpha=0.3, label=arm)
        axes[1].fill_between(g.index, g["grad_diff_min"], g["grad_diff_max"], color=col[arm], alpha=0.3, label=arm)
        axes[2].plot(g.index, g["beta_smoothness"], color=col[arm], marker="o", ms=3, label=arm)
    at = ("η ∈ {" + ", ".join(f"{e:g}" for e in etas) + "}") if len(etas) <= 4 else f"{len(etas)} step sizes η"
    for ax, t in zip(axes, (f"loss landscape: L(θ − ηg), {at}",
                            "gradient predictiveness: ‖∇L(θ) − ∇L(θ − ηg)‖", "effective β-smoothness")):
        ax.set(yscale="log", xlabel="step", title=t)
    axes[2].legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    return fig


def arms_vs_accuracy(sel: pd.DataFrame, measures: dict, y: str = "acc", hue: str = "norm"):
    """One panel per measure: each arm's mean accuracy vs its mean measure (error bars: the
    spread over seeds), the arms labelled; the title gives Spearman's ρ over the arm means.
    `measures` maps a column of `sel` to its axis label; sel: one row per (arm, seed)."""
    _theme()
    fig, axes = plt.subplots(1, len(measures), figsize=(4.6 * len(measures), 3.8), squeeze=False)
    g = sel.replace([np.inf, -np.inf], np.nan).groupby(hue)
    mean, lo, hi = g.mean(numeric_only=True), g.min(numeric_only=True), g.max(numeric_only=True)
    # equal values can put the mean a rounding error outside [min, max]: bars never negative
    lo, hi = np.minimum(lo, mean), np.maximum(hi, mean)
    col = _colors(list(mean.index))
    for ax, (m, label) in zip(axes[0], measures.items()):
        for arm in mean.index:
            ax.errorbar(mean.loc[arm, m], mean.loc[arm, y], color=col[arm], fmt="o",
                        xerr=[[mean.loc[arm, m] - lo.loc[arm, m]], [hi.loc[arm, m] - mean.loc[arm, m]]],
                        yerr=[[mean.loc[arm, y] - lo.loc[arm, y]], [hi.loc[arm, y] - mean.loc[arm, y]]])
            ax.annotate(arm, (mean.loc[arm, m], mean.loc[arm, y]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ok = mean[[m, y]].dropna()
        rho = ok[m].rank().corr(ok[y].rank()) if len(ok) > 2 else np.nan
        ax.set(xlabel=label, ylabel="test accuracy" if y == "acc" else y, title=f"Spearman ρ = {rho:.2f} over arms")
        if m == "lr_star":
            ax.set_xscale("log")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# P5 (De & Smith 2020): signal propagation at init, trainability vs depth, batch size × lr.
# Tables from bnlib.studies.p5 (signal, trainability, batch_table); `hue` is the variant.
# ----------------------------------------------------------------------------------------------

def signal_propagation_vs_block(sig: pd.DataFrame, hue: str = "variant", labels: dict | None = None):
    """P5 Fig. 2: mean square of the skip path (solid) and of the residual branch (dashed) per
    residual block at init, log scale, one panel per net depth; dotted vertical lines where a
    projection starts a stage. A branch that is exactly 0 (SkipInit, α₀ = 0) has no place on a
    log axis: its legend entry says so."""
    _theme()
    depths = sorted(sig["net_depth"].unique())
    fig, axes = plt.subplots(1, max(1, len(depths)), figsize=(5.2 * max(1, len(depths)), 3.8), squeeze=False)
    col = _colors(list(dict.fromkeys(sig[hue])))
    labels = labels or {}
    for ax, nd in zip(axes[0], depths):
        d = sig[sig["net_depth"] == nd]
        for v, g in d.groupby(hue, sort=False):
            g = g.sort_values("depth")
            name = labels.get(v, v)
            ax.plot(g["depth"], g["skip_ms"], color=col[v], lw=1.6, label=f"{name}: skip")
            br = g["branch_ms"].where(g["branch_ms"] > 0)
            zero = " (= 0, not drawn)" if br.isna().all() else ""
            ax.plot(g["depth"], br, color=col[v], lw=1.2, ls="--", label=f"{name}: branch{zero}")
        for x in d.loc[d["identity_skip"] == 0, "depth"].unique():
            ax.axvline(x, color="gray", ls=":", lw=1)
        ax.set(yscale="log", xlabel="residual block", ylabel="mean square at init",
               title=f"depth {int(nd)} ({d['depth'].max() + 1} blocks)")
    axes[0][-1].legend(loc="best", fontsize=7)
    fig.tight_layout()
    return fig


def trainability_vs_depth(table: pd.DataFrame, hue: str = "variant", chance: float = 0.1,
                          labels: dict | None = None):
    """Test accuracy at each variant's validated learning rate vs net depth (log x), mean ± std
    over seeds; a cell where every run at the chosen rate diverged is a cross at chance."""
    _theme()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    col = _colors(list(dict.fromkeys(table[hue])))
    labels = labels or {}
    for v, g in table.groupby(hue, sort=False):
        g = g.sort_values("net_depth")
        ok = g[g["diverged_at_lr"] < g["runs"]]
        ax.errorbar(ok["net_depth"], ok["acc_mean"], yerr=ok["acc_std"].fillna(0), color=col[v], marker="o",
                    capsize=3, label=labels.get(v, v))
        bad = g[g["diverged_at_lr"] == g["runs"]]
        ax.scatter(bad["net_depth"], [chance] * len(bad), color=col[v], marker="x", s=80, linewidths=2.5)
    ax.scatter([], [], color="gray", marker="x", s=60, linewidths=2, label="diverged")
    ax.axhline(chance, color="k", ls=":", lw=1)
    ax.set(xscale="log", xlabel="depth (layers)", ylabel="test accuracy", title="trainability vs depth")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def batch_size_curves(table: pd.DataFrame, hue: str = "variant", labels: dict | None = None):
    """Left: the learning rate chosen on validation vs batch size (log2 axes; hollow where it sits
    at an end of the grid, so the optimum may lie beyond); right: the test accuracy there, mean ±
    std over seeds."""
    _theme()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    col = _colors(list(dict.fromkeys(table[hue])))
    labels = labels or {}
    for v, g in table.groupby(hue, sort=False):
        g = g.sort_values("batch_size")
        axes[0].plot(g["batch_size"], g["lr"], color=col[v], marker="o", label=labels.get(v, v))
        edge = g[g["lr_at_grid_edge"]]
        axes[0].scatter(edge["batch_size"], edge["lr"], s=110, facecolors="none", edgecolors=col[v])
        axes[1].errorbar(g["batch_size"], g["acc_mean"], yerr=g["acc_std"].fillna(0), color=col[v], marker="o",
                         capsize=3, label=labels.get(v, v))
    axes[0].scatter([], [], s=110, facecolors="none", edgecolors="gray", label="at an end of the grid")
    axes[0].set(xscale="log", yscale="log", xlabel="batch size", ylabel="learning rate chosen on validation",
                title="optimal learning rate")
    axes[0].set_xscale("log", base=2)
    axes[0].set_yscale("log", base=2)
    axes[1].set(xlabel="batch size", ylabel="test accuracy at that rate", title="best accuracy")
    axes[1].set_xscale("log", base=2)
    for ax in axes:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig

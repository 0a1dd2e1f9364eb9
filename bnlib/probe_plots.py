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

__all__ = ["acc_curves_by_lr", "acc_vs_lr_stability", "rel_loss_vs_step", "grad_histograms",
           "channel_moments_vs_depth"]


def _theme():
    sns.set_theme(style="whitegrid", context="notebook")


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

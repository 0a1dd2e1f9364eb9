"""Seaborn figures over the tidy tables of `load_runs` (one run or many).

Every function takes DataFrames as `load_runs` returns them and a `hue` column (the word the
user typed: norm, gamma0, ...), and returns the matplotlib Figure; notebooks only call these.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

__all__ = ["curves", "norm_drift", "norm_final_distribution", "acc_vs_batch", "acc_vs_lr", "arm_bars",
           "channel_distribution", "mark_diverged"]


def _theme():
    sns.set_theme(style="whitegrid", context="notebook")


def curves(epochs: pd.DataFrame, steps: pd.DataFrame | None = None, hue: str = "norm",
           errorbar=("pi", 100)):
    """Loss and accuracy per epoch (train/val/test), plus per-step loss and gradient norm.
    Across seeds the line is the mean and the band the min-max spread."""
    _theme()
    ncols = 4 if steps is not None and len(steps) else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.4))
    long = epochs.melt(id_vars=["epoch", hue, "run_id"] if hue != "run_id" else ["epoch", "run_id"],
                       value_vars=["train_loss", "val_loss", "test_loss"], var_name="split", value_name="loss")
    long["split"] = long["split"].str.replace("_loss", "")
    sns.lineplot(long, x="epoch", y="loss", hue=hue, style="split", errorbar=errorbar, ax=axes[0], marker="o")
    axes[0].set_yscale("log")  # diverging arms would flatten every other curve
    axes[0].set_title("loss per epoch")
    acc = epochs.melt(id_vars=["epoch", hue, "run_id"] if hue != "run_id" else ["epoch", "run_id"],
                      value_vars=["train_acc", "val_acc", "test_acc"], var_name="split", value_name="accuracy")
    acc["split"] = acc["split"].str.replace("_acc", "")
    sns.lineplot(acc, x="epoch", y="accuracy", hue=hue, style="split", errorbar=errorbar, ax=axes[1],
                 marker="o", legend=False)
    axes[1].set_title("accuracy per epoch")
    mark_diverged(axes[1], epochs, "test_acc")
    if ncols == 4:
        sns.lineplot(steps, x="step", y="loss", hue=hue, errorbar=errorbar, ax=axes[2], legend=False)
        axes[2].set_yscale("log")
        axes[2].set_title("train loss per logged step")
        sns.lineplot(steps, x="step", y="grad_norm", hue=hue, errorbar=errorbar, ax=axes[3], legend=False)
        axes[3].set_yscale("log")
        axes[3].set_title("gradient norm")
    fig.tight_layout()
    return fig


def mark_diverged(ax, epochs: pd.DataFrame, y: str, x: str = "epoch") -> None:
    """Mark the last recorded point of every diverged run with a red x (a diverged run is a
    result: it stays in the plot, marked, not dropped)."""
    if "status" not in epochs or not (epochs["status"] == "diverged").any():
        return
    d = epochs[epochs["status"] == "diverged"].sort_values(x).groupby("run_id").tail(1)
    ax.scatter(d[x], d[y], marker="x", color="red", s=40, zorder=5, label="diverged")


def _finished(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of runs that did not diverge: a diverged run's γ/β are not a learned state."""
    return df[df["status"] != "diverged"] if "status" in df else df


def norm_drift(norm_params: pd.DataFrame, hue: str = "norm", stat: str = "mean_abs_delta"):
    """P2's γ/β drift: mean |Δ| from the initial values per layer (x: depth) over epochs
    (colour), one panel per parameter kind (γ, β, α)."""
    _theme()
    norm_params = _finished(norm_params)
    kinds = [k for k in ("gamma", "beta", "alpha") if k in set(norm_params["param"])]
    if not kinds:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.text(0.5, 0.5, "no γ/β/α in this network (e.g. norm=bn_minus or none)", ha="center", va="center")
        ax.axis("off")
        return fig
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        d = norm_params[norm_params["param"] == kind]
        sns.lineplot(d, x="depth", y=stat, hue="epoch", style=hue if d[hue].nunique() > 1 else None,
                     palette="viridis", ax=ax, errorbar=None)
        ax.set_title(f"{kind}: {stat} by layer depth")
    fig.tight_layout()
    return fig


def norm_final_distribution(norm_params: pd.DataFrame, hue: str = "norm"):
    """Per-layer mean γ and β at the last epoch, against their initial values (P1, P2)."""
    _theme()
    norm_params = _finished(norm_params)
    last = norm_params[norm_params["epoch"] == norm_params.groupby("run_id")["epoch"].transform("max")]
    kinds = [k for k in ("gamma", "beta") if k in set(last["param"])]
    if not kinds:
        return norm_drift(norm_params, hue)
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        d = last[last["param"] == kind]
        sns.histplot(d, x="mean", hue=hue, ax=ax, element="step", stat="density", common_norm=False)
        ax.set_title(f"final per-layer mean {kind}")
    fig.tight_layout()
    return fig


def acc_vs_batch(runs: pd.DataFrame, metric: str = "test_acc_at_best_val", hue: str = "norm"):
    """P1's main figure: accuracy vs batch size, one line per variant (mean, band = min-max over
    seeds), one panel per depth."""
    _theme()
    g = sns.relplot(runs, x="batch_size", y=metric, hue=hue, col="arch", kind="line", marker="o",
                    errorbar=("pi", 100), height=3.2, aspect=1.1, facet_kws={"sharey": True})
    for ax in g.axes.flat:
        ax.set_xscale("log", base=2)
    g.set_axis_labels("batch size", metric.replace("_", " "))
    return g.figure


def arm_bars(runs: pd.DataFrame, x: str, metric: str = "test_acc_at_best_val", hue: str | None = None, ax=None):
    """Accuracy per arm: mean with min-max over seeds, every seed as a dot."""
    _theme()
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4, 0.9 * runs[x].nunique() * (runs[hue].nunique() if hue else 1)), 3.4))
    sns.pointplot(runs, x=x, y=metric, hue=hue, errorbar=("pi", 100), dodge=0.3 if hue else False,
                  linestyle="none", ax=ax, capsize=0.1)
    sns.stripplot(runs, x=x, y=metric, hue=hue, dodge=bool(hue), alpha=0.4, ax=ax, legend=False)
    return ax.figure


def acc_vs_lr(runs: pd.DataFrame, metric: str = "best_val_acc", hue: str = "norm", col: str | None = "batch_size",
              selected: pd.DataFrame | None = None):
    """Accuracy vs learning rate per arm (mean, band = min-max over seeds), log x; diverged runs
    as red x at the accuracy they reached; the learning rate chosen on validation for each arm
    (`selected`, from bnlib.stats.select_lr) circled."""
    _theme()
    g = sns.relplot(runs, x="lr", y=metric, hue=hue, col=col if col and runs[col].nunique() > 1 else None,
                    kind="line", marker="o", errorbar=("pi", 100), height=3.2, aspect=1.2)
    for ax in g.axes.flat:
        ax.set_xscale("log")
        d = runs
        if col and runs[col].nunique() > 1:
            v = ax.get_title().split(" = ")[-1]
            d = runs[runs[col].astype(str) == v]
        div = d[d["status"] == "diverged"] if "status" in d else d.iloc[:0]
        ax.scatter(div["lr"], div[metric], marker="x", color="red", s=40, zorder=5)
        if selected is not None:
            s = selected if not (col and runs[col].nunique() > 1) else selected[selected[col].astype(str) == v]
            ax.scatter(s["lr"], s["val_mean"] if metric == "best_val_acc" else s.get(metric, s["val_mean"]),
                       s=160, facecolors="none", edgecolors="black", zorder=6)
    g.set_axis_labels("learning rate", metric.replace("_", " "))
    g.figure.suptitle("accuracy vs learning rate (red x: diverged; circle: chosen on validation)", y=1.04)
    return g.figure


def channel_distribution(channels: pd.DataFrame, hue: str = "norm"):
    """P1's figure: the distribution of the learned per-channel γ and β at the end of training
    (every channel of every norm layer, diverged runs left out), one panel per parameter."""
    _theme()
    channels = _finished(channels)
    kinds = [k for k in ("gamma", "beta") if k in set(channels["param"])]
    if not kinds:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.text(0.5, 0.5, "no per-channel γ/β recorded (norms without γ/β, or no finished runs)",
                ha="center", va="center")
        ax.axis("off")
        return fig
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 3.4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        d = channels[channels["param"] == kind]
        sns.histplot(d, x="value", hue=hue, ax=ax, element="step", stat="density", common_norm=False, bins=60)
        ax.set_title(f"final per-channel {kind} ({d.groupby(hue).size().min()}+ channels per arm)")
    fig.tight_layout()
    return fig

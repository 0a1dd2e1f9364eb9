"""Seaborn figures over the tidy tables of `load_runs` (one run or many).

Every function takes DataFrames as `load_runs` returns them and a `hue` column (the word the
user typed: norm, gamma0, ...), and returns the matplotlib Figure; notebooks only call these.
"""
from __future__ import annotations

import math
import textwrap

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.transforms import blended_transform_factory

__all__ = ["curves", "norm_drift", "norm_final_distribution", "acc_vs_batch", "acc_vs_lr", "arm_bars",
           "channel_distribution", "mark_diverged", "forest", "OUTCOME_COLOURS"]

# the report's index uses the same three colours (bnlib.report.OUTCOME_CSS)
OUTCOME_COLOURS = {"supported": "#1a7f37", "contradicted": "#b42318", "inconclusive": "#9a6700"}


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


def _effect(v) -> tuple[float, float, float, str]:
    """(mean, lo, hi, why no interval) of a verdict's first effect; nan where absent (a verdict
    written before a field existed, or a claim with no estimate)."""
    e = v.effects[0] if getattr(v, "effects", None) else {}

    def num(k):
        x = e.get(k)
        return float(x) if isinstance(x, (int, float)) else math.nan

    return num("mean"), num("lo"), num("hi"), str(e.get("why_no_interval") or "")


def forest(verdicts, width: float = 12.0):
    """The verdicts at a glance: every claim's effect and 95% interval against its threshold
    (a dashed tick on the claim's own row: thresholds differ between claims), coloured by
    outcome, one panel per study, labelled on the left by the claim in a few words
    (Verdict.short) and on the right by the outcome with its cause (Verdict.label). A panel has
    one x scale because a study's effects share it more often than studies do (accuracy
    differences, Spearman ρ, log10 ratios); the numbers are written beside each row. A claim with
    an estimate but no interval is a hollow point marked "no interval"; one with no estimate at
    all says so. Takes bnlib.stats.Verdict objects (or anything with their fields)."""
    verdicts = list(verdicts)
    if not verdicts:
        raise ValueError("verdicts=[]: nothing to plot; pass the list bnlib.stats.read_verdicts(out) returns "
                         "after a study has run")
    _theme()
    studies = list(dict.fromkeys(v.study for v in verdicts))
    groups = [[v for v in verdicts if v.study == s] for s in studies]
    fig, axes = plt.subplots(len(studies), 1, figsize=(width, 0.4 * len(verdicts) + 0.8 * len(studies) + 0.7),
                             gridspec_kw={"height_ratios": [len(g) + 0.6 for g in groups]}, squeeze=False,
                             layout="constrained")
    for ax, study, group in zip(axes[:, 0], studies, groups):
        right = blended_transform_factory(ax.transAxes, ax.transData)
        xs = []
        for i, v in enumerate(group):
            y = -i
            colour = OUTCOME_COLOURS.get(v.outcome, "grey")
            mean, lo, hi, why = _effect(v)
            thr = float(getattr(v, "threshold", 0.0) or 0.0)
            ax.vlines(thr, y - 0.38, y + 0.38, colors="black", linestyles="--", lw=1)
            xs.append(thr)
            if math.isfinite(lo) and math.isfinite(hi):
                ax.hlines(y, lo, hi, colors=colour, lw=2.5)
                ax.plot([mean], [y], "o", color=colour, ms=7)
                xs += [lo, hi, mean]
                nums = f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            elif math.isfinite(mean):
                ax.plot([mean], [y], "o", mfc="white", mec=colour, mew=2, ms=8)
                ax.annotate("no interval", (mean, y), xytext=(-9, 0), textcoords="offset points", va="center",
                            ha="right", fontsize=8, color=colour)
                xs.append(mean)
                nums = f"{mean:+.3f} (no interval{': ' + why if why else ''})"
            else:
                ax.text(0.01, y, "no estimate", transform=right, va="center", fontsize=8, color=colour)
                nums = "no estimate"
            at = getattr(v, "at_budget", "")
            at = f"; {at} at this budget" if at and at != v.outcome else ""
            ax.text(1.01, y, f"{textwrap.shorten(v.label + at, 60, placeholder='…)')}\n{nums}", transform=right,
                    va="center", fontsize=8, color=colour, linespacing=1.1)
        span = (max(xs) - min(xs)) or 1.0
        ax.set_xlim(min(xs) - 0.12 * span, max(xs) + 0.12 * span)
        ax.set_ylim(-len(group) + 0.4, 0.6)
        ax.set_yticks([-i for i in range(len(group))],
                      [v.short or textwrap.shorten(v.claim, 48, placeholder="…") for v in group])
        ax.set_title(study, loc="left", fontweight="bold")
    axes[-1, 0].set_xlabel("effect with its 95% interval (each study's own measure); dashed: the claim's threshold")
    handles = [Line2D([], [], color=c, marker="o", lw=2.5, label=o) for o, c in OUTCOME_COLOURS.items()]
    handles.append(Line2D([], [], color="grey", marker="o", mfc="white", lw=0, label="no interval"))
    fig.legend(handles=handles, loc="outside upper right", ncol=len(handles), fontsize=8, frameon=False)
    return fig

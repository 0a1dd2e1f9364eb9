"""Descriptive numbers the notebooks show, computed from runs (never typed in): per-arm
summaries over seeds and loss-spike counts. Inputs are `load_runs` tables. The statistics
behind verdicts (paired effects, intervals, tests) live in bnlib.stats; each study's verdict
lives with its grid in bnlib/studies/."""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["arm_summary", "loss_spikes", "stability"]


def arm_summary(runs: pd.DataFrame, arms: list[str], metric: str = "test_acc_at_best_val") -> pd.DataFrame:
    """Mean, std, min, max and count of `metric` over seeds for each arm (a combination of the
    `arms` columns). Diverged runs count with the accuracy they reached."""
    g = runs.groupby(arms, dropna=False)[metric]
    return g.agg(["mean", "std", "min", "max", "count"]).reset_index()


def loss_spikes(steps: pd.DataFrame, factor: float = 2.0, window: int = 5) -> pd.DataFrame:
    """Per run: logged losses above `factor` × the median of the previous `window` logged losses
    (a loss spike), and whether the loss went non-finite."""
    rows = []
    for rid, d in steps.sort_values("step").groupby("run_id"):
        loss = d["loss"].to_numpy(dtype=float)
        prev = pd.Series(loss).shift(1).rolling(window, min_periods=window).median().to_numpy()
        rows.append({"run_id": rid, "spikes": int(np.nansum(loss > factor * prev)),
                     "nonfinite": bool((~np.isfinite(loss)).any())})
    return pd.DataFrame(rows, columns=["run_id", "spikes", "nonfinite"])


def stability(runs: pd.DataFrame, steps: pd.DataFrame, arms: list[str]) -> pd.DataFrame:
    """Per arm: runs, diverged runs, total loss spikes."""
    sp = loss_spikes(steps).merge(runs[["run_id", "status", *arms]], on="run_id", how="right")
    sp["diverged"] = sp["status"] == "diverged"
    return sp.groupby(arms, dropna=False).agg(runs=("run_id", "count"), diverged=("diverged", "sum"),
                                              loss_spikes=("spikes", "sum")).reset_index()

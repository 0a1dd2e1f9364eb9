"""Numbers the notebooks state, computed from runs (never typed in): per-arm summaries over
seeds, loss-spike counts, and the P1 verdict. Inputs are `load_runs` tables."""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["arm_summary", "loss_spikes", "stability", "p1_verdict"]


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


def p1_verdict(runs: pd.DataFrame, metric: str = "test_acc_at_best_val") -> tuple[pd.DataFrame, str]:
    """P1 asks how much of BN's benefit comes from its normalization step (bn_minus) and how
    much from its learned shift and scale (affine). Per depth and batch size, with seeds
    matched: gain(arm) = acc(arm) - acc(none); share(arm) = gain(arm) / gain(bn). Returns the
    table and a sentence built from it. Our operationalization, not the paper's (it publishes
    no numbers): 'supported' when bn_minus keeps at least 80% of BN's gain in most cells while
    affine keeps less than half of it — BN's benefit is the normalization at initialization and
    throughout, not the learned γ/β."""
    need = {"bn", "bn_minus", "affine", "none"}
    if not need <= set(runs["norm"]):
        return pd.DataFrame(), f"needs runs of all four norms {sorted(need)}; have {sorted(set(runs['norm']))}"
    piv = runs.pivot_table(index=["arch", "batch_size", "seed"], columns="norm", values=metric)
    piv = piv.dropna(subset=list(need))
    gains = pd.DataFrame({n: piv[n] - piv["none"] for n in ("bn", "bn_minus", "affine")})
    cell = gains.groupby(level=["arch", "batch_size"]).agg(["mean", "std"])
    cell.columns = [f"gain_{a}_{b}" for a, b in cell.columns]
    for n in ("bn_minus", "affine"):
        cell[f"share_{n}"] = cell[f"gain_{n}_mean"] / cell["gain_bn_mean"]
    cell = cell.reset_index()
    pos = cell[cell["gain_bn_mean"] > 0]
    if pos.empty:
        return cell, ("BN did not beat no normalization in any (depth, batch size) cell of these runs, so "
                      "there is no BN benefit to attribute; P1's question cannot be answered from them.")
    keep_norm = float((pos["share_bn_minus"] >= 0.8).mean())
    keep_aff = float((pos["share_affine"] >= 0.5).mean())
    med_n, med_a = float(pos["share_bn_minus"].median()), float(pos["share_affine"].median())
    spread = float(pos["gain_bn_std"].mean())
    supported = keep_norm >= 0.5 and keep_aff < 0.5
    text = (f"Across {len(pos)} (depth, batch size) cells where BN beats no normalization (mean gain "
            f"{pos['gain_bn_mean'].mean():+.3f} accuracy, seed std {spread:.3f}): BatchNorm-minus keeps a median "
            f"{med_n:.0%} of BN's gain (>=80% in {keep_norm:.0%} of cells); AffineLayer keeps a median {med_a:.0%} "
            f"(>=50% in {keep_aff:.0%} of cells). ")
    text += ("These runs SUPPORT P1's reading: the benefit comes from the normalization step (how it scales "
             "activations from initialization on), not from the learned shift and scale."
             if supported else
             "These runs do NOT clearly support P1's reading that the benefit comes from normalization rather "
             "than the learned shift and scale (criterion: bn_minus >=80% of BN's gain in most cells and affine "
             "<50%).")
    return cell, text

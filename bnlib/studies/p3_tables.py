"""P3's tables read off its runs — accuracy, the probe summaries per run, the arm table and the
correlations — which the notebook and the verdicts share (bnlib.studies.p3 holds the grid and
the verdicts, and re-exports every name here). Not a study: it registers nothing."""
from __future__ import annotations

import numpy as np
import pandas as pd

import bnlib.stats as stats
from .p4 import largest_stable_lr  # P4's definition of a stable rate, shared, not restated

METRIC = "test_acc_at_best_val"
CHANCE = 0.1  # Fashion-MNIST and CIFAR-10: 10 classes


def accuracy(runs: pd.DataFrame) -> pd.DataFrame:
    """Finished runs with `acc` = METRIC; a diverged run keeps what it reached before diverging,
    or chance when it never had a finite validation accuracy (diverged runs are results)."""
    fin = runs[runs["status"].isin(["completed", "diverged"])].copy()
    acc = fin[METRIC] if METRIC in fin else pd.Series(np.nan, index=fin.index)
    fin["acc"] = acc.where(acc.notna() | ~fin["status"].eq("diverged"), CHANCE)
    fin["stable"] = fin["status"].eq("completed")
    return fin


def _one_value(v: pd.Series):
    """The value a run's probe times share, or NaN when they differ."""
    return v.iloc[0] if v.nunique() == 1 else np.nan


def counted(probes: pd.DataFrame) -> pd.DataFrame:
    """The probe rows the summaries count: times after initialization, and no ICS time whose
    replayed step was 0. A zero step (probe_ics_lr unset where the schedule's rate is 0, a
    cosine's end) moves nothing, so ICS = 0 exactly: not a measurement (the probe writes only
    step_lr = 0 there; older records' rows at such a time are dropped too). Step 0 is left out
    for every arm and preset: with SkipInit at α₀ = 0 (the quick recipe) every residual branch
    is off at init, so the branch convs the probes measure have zero gradient (no ICS to
    measure) and the net is its stem and classifier alone; the claims are about the training
    trajectory, and one set of times for every arm keeps the summaries comparable."""
    p = probes[probes["step"] > 0]
    st = p[(p["probe"] == "ics") & (p["quantity"] == "step_lr")]
    zero = pd.MultiIndex.from_frame(st.loc[st["value"] <= 0, ["run_id", "step"]])
    at_zero = pd.MultiIndex.from_frame(p[["run_id", "step"]]).isin(zero) & p["probe"].eq("ics").to_numpy()
    return p[~at_zero]


def probe_summary(probes: pd.DataFrame) -> pd.DataFrame:
    """One row per run over the counted probe times (`counted`: after init, no zero step):
    `ics` = mean over probed layers and times of ‖G − G'‖/‖G‖ (layers with a zero gradient left
    out), `ics_cos` = the mean of 1 − cos(G, G'), `ics_l2` = the mean raw ℓ2, `ics_step` = the
    replayed step (NaN when it differs between times, e.g. the scheduled rate), `beta` = median
    over times of log10 of the effective β-smoothness, `grad_pred` = median of grad_diff_max/‖g‖
    (the gradient's change along the step relative to its size: lower = more predictive),
    `loss_range` = median of loss_max − loss_min, `etas` = the landscape's step sizes ("" when
    they differ between times)."""
    cols = ["run_id", "ics", "ics_cos", "ics_l2", "ics_step", "beta", "grad_pred", "loss_range", "etas"]
    if probes is None or probes.empty:
        return pd.DataFrame(columns=cols)
    p = counted(probes)
    out = pd.DataFrame(index=pd.Index(sorted(set(probes["run_id"])), name="run_id"))
    i = p[p["probe"] == "ics"]
    ics = i[i["depth"] >= 0].pivot_table(index=["run_id", "step", "depth"], columns="quantity", values="value")
    if {"l2", "cos", "grad_norm"} <= set(ics.columns):
        ok = ics[ics["grad_norm"] > 0]
        g = ok.assign(rel=ok["l2"] / ok["grad_norm"], one_minus_cos=1 - ok["cos"]).groupby("run_id")
        out = out.join(pd.DataFrame({"ics": g["rel"].mean(), "ics_cos": g["one_minus_cos"].mean(),
                                     "ics_l2": g["l2"].mean()}))
    st = i[i["quantity"] == "step_lr"]
    out["ics_step"] = st.groupby("run_id")["value"].agg(_one_value) if len(st) else np.nan
    land = p[(p["probe"] == "landscape") & p["x"].isna()].pivot_table(
        index=["run_id", "step"], columns="quantity", values="value")
    if {"beta_smoothness", "grad_diff_max", "grad_norm", "loss_max", "loss_min"} <= set(land.columns):
        with np.errstate(divide="ignore", invalid="ignore"):
            land = land.assign(beta=np.log10(land["beta_smoothness"]), grad_pred=land["grad_diff_max"] / land["grad_norm"],
                               loss_range=land["loss_max"] - land["loss_min"])
        out = out.join(land.groupby("run_id")[["beta", "grad_pred", "loss_range"]].median())
    e = p[(p["probe"] == "landscape") & (p["quantity"] == "loss")]
    if len(e):
        key = e.groupby(["run_id", "step"])["x"].agg(lambda x: "/".join(f"{v:.6g}" for v in sorted(x)))
        out["etas"] = key.groupby("run_id").agg(_one_value).fillna("")
    return out.reindex(columns=cols[1:]).reset_index()


def per_run(runs) -> pd.DataFrame:
    """Every finished run with its accuracy, probe summary and its (arm, seed)'s largest stable
    learning rate (`lr_star`, P4's definition over the arm's ladder)."""
    r = runs.runs if hasattr(runs, "runs") else runs
    probes = getattr(runs, "probes", None)
    d = accuracy(r).merge(probe_summary(probes), on="run_id", how="left")
    ls = largest_stable_lr(r)[["norm", "seed", "lr_star", "at_top"]]
    return d.merge(ls, on=["norm", "seed"], how="left")


def selected(runs) -> pd.DataFrame:
    """One row per (arm, seed) at the arm's learning rate chosen on validation (mean over seeds;
    never a rate where it diverged while another trains: bnlib.stats.select_lr)."""
    d = per_run(runs)
    return stats.at_selected_lr(d, ["norm"])


def arm_table(sel: pd.DataFrame) -> pd.DataFrame:
    """Per arm at its chosen rate: accuracy, ICS, smoothness, largest stable rate (means over seeds)."""
    cols = ["lr", "acc", "ics", "ics_cos", "ics_step", "beta", "grad_pred", "lr_star"]
    return sel.groupby("norm")[[c for c in cols if c in sel]].mean().sort_values("acc", ascending=False)


def correlations(sel: pd.DataFrame) -> pd.DataFrame:
    """Spearman ρ of each measure with accuracy across arms (bootstrap over arms and seeds)."""
    rows = []
    for x, expect in (("ics", "−: P3"), ("ics_cos", "−: P3"), ("beta", "−: Santurkar"), ("grad_pred", "−: Santurkar"),
                      ("lr_star", "+: Santurkar / P4")):
        if x in sel and sel[x].notna().any():
            e = stats.rank_correlation(sel, x, "acc", unit="norm", replicate="seed")
            rows.append({"measure": x, "expected sign": expect, "rho": e.mean, "ci_low": e.lo, "ci_high": e.hi,
                         "p": e.p, "arms": e.n})
    return pd.DataFrame(rows)

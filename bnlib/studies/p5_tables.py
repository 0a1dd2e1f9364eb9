"""P5's variants and the tables read off its runs, which the notebook and the verdicts share
(bnlib.studies.p5 holds the grid and the verdicts, and re-exports every name here). The variants
live here because the tables invert them: variant_of, and annotate's sub-experiment by arch.
Not a study: it registers nothing."""
from __future__ import annotations

import math
import re
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd

import bnlib.stats as stats
from ..models import num_blocks

METRIC = "test_acc_at_best_val"
CHANCE = 0.1  # Fashion-MNIST and CIFAR-10: 10 classes
REG_FC_DROPOUT = 0.3  # regularized SkipInit's dropout before the classifier (bnlib's choice; the rate is [U])
DEPTH_K = 1  # the depth study's widen factor: WRN-d-1 (He et al.'s pre-activation CIFAR ResNets)
BATCH_ARCH = "wrn16_4"  # the batch-size study's network (the paper's 16-4 Wide-ResNet)


class Variant(NamedTuple):
    label: str  # legend text
    params: Callable[[str], dict]  # arch -> run parameters (α = 1/√d needs the arch's d)


def _alpha(alpha0: float, learnable: bool = True, **extra) -> Callable[[str], dict]:
    return lambda arch: dict(norm="none", residual_gain=True, alpha0=alpha0, alpha_learnable=learnable, **extra)


# The words a user types (`variant` grid axis) -> run parameters. Every variant is the same
# pre-activation net; only the normalization and the residual gain differ.
VARIANTS = {
    "bn": Variant("BN", lambda arch: dict(norm="bn", residual_gain=False)),
    "skipinit": Variant("SkipInit (α₀ = 0)", _alpha(0.0)),
    "skipinit_inv_sqrt_d": Variant("α₀ = 1/√d", lambda arch: _alpha(1 / math.sqrt(num_blocks(arch)))(arch)),
    "none": Variant("none (α = 1)", lambda arch: dict(norm="none", residual_gain=False)),
    "fixed_inv_sqrt2": Variant("fixed α = 1/√2", _alpha(1 / math.sqrt(2), learnable=False)),
    "skipinit_reg": Variant("regularized SkipInit", _alpha(0.0, conv_bias=True, fc_dropout=REG_FC_DROPOUT)),
}
DEPTH_VARIANTS = ["bn", "skipinit", "skipinit_inv_sqrt_d", "none", "fixed_inv_sqrt2"]


# ----------------------------------------------------------------------------------------------
# tables the notebook and the verdicts share
# ----------------------------------------------------------------------------------------------

def variant_of(row) -> str:
    """The variant name of a run (its config row), the inverse of VARIANTS."""
    if row["norm"] == "bn" and not row.get("residual_gain", False):
        return "bn"
    if row["norm"] != "none":
        return "other"
    if not row.get("residual_gain", False):
        return "none"
    a0, learn = float(row["alpha0"]), bool(row.get("alpha_learnable", True))
    reg = bool(row.get("conv_bias", False)) and float(row.get("fc_dropout", 0.0) or 0.0) > 0
    if learn and a0 == 0:
        return "skipinit_reg" if reg else "skipinit"
    if learn and math.isclose(a0, 1 / math.sqrt(num_blocks(row["arch"]))):
        return "skipinit_inv_sqrt_d"
    if not learn and math.isclose(a0, 1 / math.sqrt(2)):
        return "fixed_inv_sqrt2"
    return "other"


def _wrn(arch: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"wrn(\d+)_(\d+)", str(arch))
    return (int(m.group(1)), int(m.group(2))) if m else None


def annotate(df: pd.DataFrame) -> pd.DataFrame:
    """Runs (or probe rows joined with their runs) with `variant`, `net_depth` (the WRN depth,
    e.g. 1000), `blocks` (d, residual blocks) and `experiment` ('depth' or 'batch')."""
    if df.empty:
        return df.assign(variant=[], net_depth=[], blocks=[], experiment=[])
    cfg = df.drop_duplicates("run_id") if "run_id" in df else df
    v = {r["run_id"] if "run_id" in cfg else i: variant_of(r) for i, r in cfg.iterrows()}
    key = df["run_id"] if "run_id" in df else pd.Series(df.index, index=df.index)
    wrn = df["arch"].map(_wrn)
    return df.assign(variant=key.map(v),
                     net_depth=wrn.map(lambda t: t[0] if t else np.nan),
                     blocks=df["arch"].map(lambda a: num_blocks(a) if _wrn(a) else np.nan),
                     experiment=np.where(df["arch"] == BATCH_ARCH, "batch",
                                         np.where(wrn.map(lambda t: bool(t) and t[1] == DEPTH_K), "depth", "other")))


def accuracy(runs: pd.DataFrame) -> pd.DataFrame:
    """Finished runs with `acc` = METRIC; a diverged run keeps what it reached before diverging,
    or chance when it never had a finite accuracy (a diverged run is a result, not a gap)."""
    fin = annotate(runs[runs["status"].isin(["completed", "diverged"])].copy())
    acc = fin[METRIC] if METRIC in fin else pd.Series(np.nan, index=fin.index)
    fin["acc"] = acc.where(acc.notna() | ~fin["status"].eq("diverged"), CHANCE)
    fin["diverged"] = fin["status"].eq("diverged")
    return fin


def _selected(d: pd.DataFrame, cell: list[str]) -> pd.DataFrame:
    """The runs at each (variant, cell)'s learning rate chosen on validation (bnlib.stats)."""
    if d.empty:
        return d
    return stats.at_selected_lr(d.assign(best_val_acc=d["best_val_acc"].astype(float)), ["variant", *cell])


def trainability(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, depth) of the depth study: the learning rate chosen on validation, the test
    accuracy there over seeds (mean, std, runs), how many of those runs diverged, how many runs
    diverged at any rate, and `trains` (no run at the chosen rate diverged and the accuracy
    beats chance + 0.05, bnlib.stats.beats_chance)."""
    d = accuracy(runs)
    d = d[d["experiment"] == "depth"]
    cols = ["variant", "net_depth", "blocks", "lr", "acc_mean", "acc_std", "runs", "diverged_at_lr",
            "diverged_any", "lr_at_grid_edge", "trains"]
    if d.empty:
        return pd.DataFrame(columns=cols)
    choice = stats.select_lr(d.assign(best_val_acc=d["best_val_acc"].astype(float)), ["variant", "net_depth"])
    rows = []
    for _, c in choice.iterrows():
        g = d[(d["variant"] == c["variant"]) & (d["net_depth"] == c["net_depth"])]
        at = g[g["lr"] == c["lr"]]
        ok, _ = stats.beats_chance(at["acc"], CHANCE)
        rows.append({"variant": c["variant"], "net_depth": int(c["net_depth"]), "blocks": int(g["blocks"].iloc[0]),
                     "lr": c["lr"], "acc_mean": at["acc"].mean(), "acc_std": at["acc"].std(), "runs": len(at),
                     "diverged_at_lr": int(at["diverged"].sum()), "diverged_any": int(g["diverged"].sum()),
                     "lr_at_grid_edge": bool(c["lr_at_grid_edge"]),
                     "trains": bool(ok and not at["diverged"].any())})
    order = {v: i for i, v in enumerate(VARIANTS)}
    return pd.DataFrame(rows, columns=cols).sort_values(["net_depth", "variant"], key=lambda s: s.map(order)
                                                        if s.name == "variant" else s).reset_index(drop=True)


def trainability_grid(table: pd.DataFrame) -> pd.DataFrame:
    """The trainability table as the notebook shows it: variant × depth, each cell the mean test
    accuracy ± std at the chosen rate, or 'diverged' (every run at every rate diverged), with
    the number of diverged runs at the chosen rate where some did."""
    def cell(r):
        if r["diverged_at_lr"] == r["runs"]:
            return "diverged"
        s = f"{r['acc_mean']:.3f}" + (f" ± {r['acc_std']:.3f}" if r["runs"] > 1 else " (1 run)")
        return s + (f" ({r['diverged_at_lr']}/{r['runs']} diverged)" if r["diverged_at_lr"] else "")
    if table.empty:
        return pd.DataFrame()
    t = table.assign(cell=table.apply(cell, axis=1),
                     label=table["variant"].map(lambda v: VARIANTS[v].label if v in VARIANTS else v))
    return t.pivot(index="label", columns="net_depth", values="cell").reindex(
        [VARIANTS[v].label for v in VARIANTS if v in set(t["variant"])]).rename_axis(columns="depth")


def batch_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, batch size) of the batch-size study: the learning rate chosen on validation,
    its validation accuracy, the test accuracy there over seeds, and whether the choice sits at
    an end of the grid (`lr_at_grid_edge`: the optimum may lie beyond)."""
    d = accuracy(runs)
    d = d[d["experiment"] == "batch"]
    cols = ["variant", "batch_size", "lr", "val_mean", "acc_mean", "acc_std", "runs", "diverged_at_lr",
            "lr_at_grid_edge", "lr_grid"]
    if d.empty:
        return pd.DataFrame(columns=cols)
    choice = stats.select_lr(d.assign(best_val_acc=d["best_val_acc"].astype(float)), ["variant", "batch_size"])
    rows = []
    for _, c in choice.iterrows():
        at = d[(d["variant"] == c["variant"]) & (d["batch_size"] == c["batch_size"]) & (d["lr"] == c["lr"])]
        rows.append({"variant": c["variant"], "batch_size": int(c["batch_size"]), "lr": c["lr"],
                     "val_mean": c["val_mean"], "acc_mean": at["acc"].mean(), "acc_std": at["acc"].std(),
                     "runs": len(at), "diverged_at_lr": int(at["diverged"].sum()),
                     "lr_at_grid_edge": bool(c["lr_at_grid_edge"]), "lr_grid": c["lr_grid"]})
    return pd.DataFrame(rows, columns=cols).sort_values(["variant", "batch_size"]).reset_index(drop=True)


def signal(probes: pd.DataFrame, step: int = 0) -> pd.DataFrame:
    """The signal_propagation rows at `step` (0 = init), wide: one row per (variant, net depth,
    block), the median over runs of skip_ms, branch_ms, branch_to_skip and identity_skip."""
    cols = ["variant", "net_depth", "depth", "skip_ms", "branch_ms", "branch_to_skip", "identity_skip"]
    if probes is None or probes.empty:
        return pd.DataFrame(columns=cols)
    p = probes[(probes["probe"] == "signal_propagation") & (probes["step"] == step)]
    if p.empty:
        return pd.DataFrame(columns=cols)
    p = annotate(p)
    w = p.pivot_table(index=["variant", "net_depth", "depth"], columns="quantity", values="value", aggfunc="median")
    return w.reset_index().reindex(columns=cols)


def growth(sig: pd.DataFrame) -> pd.DataFrame:
    """How the skip path's mean square grows along the first stage (identity skips only, no
    projection resetting it), per (variant, net depth): `added_per_block` (least-squares slope of
    skip_ms vs block index; P5: ~1 with BN, the branch's unit mean square added per block),
    `linear_r2` (R² of that line), `log2_per_block` (slope of log2 skip_ms vs block index; P5: ~1
    without normalization, the mean square doubling), `branch_ms_max` (0 for SkipInit at init)."""
    rows = []
    for (v, nd), g in sig.groupby(["variant", "net_depth"]):
        g = g.sort_values("depth")
        first = g[g["identity_skip"] == 1]
        # the first run of consecutive identity skips: the first stage
        first = first[first["depth"] - first["depth"].iloc[0] == np.arange(len(first))] if len(first) else first
        x, y = first["depth"].to_numpy(float), first["skip_ms"].to_numpy(float)
        ok = np.isfinite(y) & (y > 0)
        row = {"variant": v, "net_depth": int(nd), "blocks_fitted": int(ok.sum()), "added_per_block": np.nan,
               "linear_r2": np.nan, "log2_per_block": np.nan, "branch_ms_max": float(g["branch_ms"].max())}
        if ok.sum() >= 3 and np.ptp(y[ok]) > 0:
            a, b = np.polyfit(x[ok], y[ok], 1)
            r2 = 1 - np.sum((y[ok] - (a * x[ok] + b)) ** 2) / np.sum((y[ok] - y[ok].mean()) ** 2)
            row.update(added_per_block=a, linear_r2=r2, log2_per_block=np.polyfit(x[ok], np.log2(y[ok]), 1)[0])
        elif ok.sum() >= 3:
            row.update(added_per_block=0.0, log2_per_block=0.0)
        rows.append(row)
    return pd.DataFrame(rows, columns=["variant", "net_depth", "blocks_fitted", "added_per_block", "linear_r2",
                                       "log2_per_block", "branch_ms_max"])

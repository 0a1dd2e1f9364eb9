"""P2 — Davis & Frank 2022, "Revisiting Batch Norm Initialization" (ECCV; arXiv 2110.13989): the
grid, the tables in the paper's form, the verdicts and the figures, together.

The paper observes that after standard training BN's γ and β stay close to 1 and 0, while the
normalization can produce large values that γ ≈ 1 passes on, and proposes three changes:
initialize every γ to a small γ₀ (0.1 recommended), train γ at the learning rate divided by
c = 100 (no weight decay), and replace input normalization by dataset mean/std with an online
BN layer in front of the network (γ = 0.58·γ₀, β frozen at 0). Its evidence is accuracy over 15
seeds per arm, each arm compared with standard training (γ₀ = 1, c = 1) by a one-sided paired
t-test over matched seeds, significant at p <= 0.05.

The grid: γ₀ ∈ {1, 0.5, 0.25, 0.1, 0.05} × c ∈ {1, 100} with dataset-statistics input
normalization, plus the input BN at γ₀ = 0.1, c = 100: 11 arms, the same ResNet-18 (CIFAR stem)
in each, with matched seeds. c enters as gamma_lr_mult = 1/c.

The recipe of the authors' code (osu-cvl/revisiting-bn), as run parameters: SGD lr 0.1 for every
arm, momentum 0.9, weight decay 1e-4 on conv/linear weights only (γ, β and the classifier bias:
none), every bias zero at init (`zero_bias`), cosine schedule annealing every group from its own
start to the absolute floor 1e-8 (`final_lr`), the last partial batch kept (`drop_last=False`),
horizontal flips only (`crop_pad=0`), stratified 90/10 train/validation split, the test accuracy
of the best-validation epoch, fp32. One learning rate for every arm, as in the paper: γ₀ and c are
the things varied, and the weights' learning rate belongs to the network recipe that all arms
share; choosing a rate per arm would add a second difference between arms.

bnlib's choices: the per-step cosine (the authors step it per epoch); on the quick preset,
Fashion-MNIST, a narrow net, few epochs and BN evaluation statistics recomputed with the final
weights (bn_eval_stats='precise': in a run of a hundred steps the running ones lag).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats as sps

import bnlib.stats as stats
from .base import Preset, Study, register_study

GAMMA0S = [1.0, 0.5, 0.25, 0.1, 0.05]  # P2's sweep of initial scales
CS = [1, 100]  # γ's learning rate is lr / c
# (γ₀, c, input_norm) of every arm: the γ₀ × c sweep with dataset statistics, then the input BN
ARMS = [(g, c, "dataset") for g in GAMMA0S for c in CS] + [(0.1, 100, "bn")]
REFERENCE = (1.0, 1, "dataset")  # standard training: every comparison of the paper's tables is against it
RECIPE = (0.1, 100, "dataset")  # the paper's recommendation, before its input normalization
INPUT_BN = (0.1, 100, "bn")
METRIC = "test_acc_at_best_val"  # the authors keep the best-validation model
CHANCE = 0.1  # Fashion-MNIST and CIFAR-10: 10 classes
PAIR = ["seed"]
PROBED = [(1.0, 1, "dataset"), (0.1, 1, "dataset"), (0.1, 100, "dataset")]  # quick preset: probes only here
PROBES = ["max_normalized"]


def arm_name(gamma0: float, c: float, input_norm: str) -> str:
    """'γ₀=0.1 c=100', or with ' inputBN' for the online input normalization: one label for the
    tables, the plots and the verdicts."""
    return f"γ₀={gamma0:g} c={c:g}" + (" inputBN" if input_norm == "bn" else "")


def _arm_params(point: dict) -> dict:
    """Grid axis `arm` (an index into ARMS) -> the run parameters it stands for."""
    g, c, inorm = ARMS[point.pop("arm")]
    out = {"gamma0": g, "gamma_lr_mult": round(1.0 / c, 12), "input_norm": inorm}
    if "probes" not in point:  # a preset that sets probes itself keeps them (paper: every run)
        out["probes"] = PROBES if (g, c, inorm) in PROBED else []
    return out


# What each preset can and cannot show (printed by the notebook next to the verdicts).
PRESET_NOTES = {
    "quick": "quick preset: Fashion-MNIST (real images), ResNet-18 (CIFAR stem) at width 1/8, a {n_train}-image "
             "training set, {epochs} epochs at batch 128, lr 0.1, {seeds} matched seeds per arm, the four arms its "
             "claims compare (standard; γ₀ = 0.1; γ₀ = 0.1 with lr/100 for γ, the recipe; the recipe with the input "
             "BN): the rest of the γ₀ × c table is the paper preset's. It can show the "
             "γ/β drift, the size of the normalized values and large accuracy effects of γ₀, c and the input BN "
             "after a short training. It cannot show effects of the paper's size (about half a point on CIFAR-10 "
             "after 180 epochs): the smallest effect it resolves is printed below, computed from the seed spread. "
             "Its budget is about a thousandth of the paper's (the verdicts print both), and a small γ₀ also scales "
             "the gradient of every weight feeding a norm layer by γ₀, like a smaller step size until γ grows: the "
             "quick preset measures the recipe after a short training, not the paper's long-run gain. "
             "Run --preset paper (CIFAR-10, 180 epochs, 15 seeds; GPU) for the paper's comparison.",
    "paper": "paper preset: the authors' recipe — CIFAR-10, ResNet-18 (CIFAR stem) at full width, 180 epochs, "
             "batch 128, SGD lr 0.1, momentum 0.9, weight decay 1e-4 on weights only, cosine to 1e-8, flips only, "
             "stratified 90/10 split, best-validation model, fp32, 15 matched seeds per arm.",
}


# ----------------------------------------------------------------------------------------------
# tables the notebook and the verdicts share
# ----------------------------------------------------------------------------------------------

def with_arms(runs: pd.DataFrame) -> pd.DataFrame:
    """Finished runs with `c` (= 1/gamma_lr_mult) and `arm` (arm_name) columns. A diverged run
    keeps the accuracy it reached (a result, not a gap)."""
    fin = runs[runs["status"].isin(["completed", "diverged"])].copy()
    fin["c"] = (1.0 / fin["gamma_lr_mult"]).round(6)
    fin["arm"] = [arm_name(g, c, i) for g, c, i in zip(fin["gamma0"], fin["c"], fin["input_norm"])]
    return fin


def compare(runs: pd.DataFrame, a: tuple, b: tuple, metric: str = METRIC) -> stats.Effect:
    """Arm a − arm b over matched seeds: mean paired difference, 95% t interval, and the
    one-sided paired t-test that a is greater (scipy's ttest_rel(a, b, alternative='greater'),
    the authors' test)."""
    return stats.paired_effect(with_arms(runs) if "arm" not in runs else runs, "arm", arm_name(*a), arm_name(*b),
                               metric, PAIR, alternative="greater")


def table(runs: pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """The paper's table, long form: per arm, accuracy mean ± std over seeds, and its paired
    difference to its reference — standard training (γ₀ = 1, c = 1) for the γ₀ × c arms, the same
    γ₀ and c with dataset statistics for the input BN — with the 95% interval, the one-sided
    p-value and whether it is significantly better at p <= 0.05 (the paper's criterion)."""
    d = with_arms(runs)
    rows = []
    for arm in ARMS:
        acc = d.loc[d["arm"] == arm_name(*arm), metric].dropna()
        if acc.empty:
            continue
        ref = RECIPE if arm == INPUT_BN else REFERENCE
        e = compare(d, arm, ref, metric) if arm != ref else None
        rows.append({"arm": arm_name(*arm), "gamma0": arm[0], "c": arm[1], "input_norm": arm[2], "seeds": len(acc),
                     "mean": acc.mean(), "std": acc.std(ddof=1) if len(acc) > 1 else math.nan,
                     "vs": arm_name(*ref) if e else "", "diff": e.mean if e else math.nan,
                     "ci_low": e.lo if e else math.nan, "ci_high": e.hi if e else math.nan,
                     "p_one_sided": e.p if e else math.nan, "pairs": e.n if e else 0,
                     "significant": bool(e and math.isfinite(e.p) and e.p <= stats.ALPHA)})
    return pd.DataFrame(rows, columns=["arm", "gamma0", "c", "input_norm", "seeds", "mean", "std", "vs", "diff",
                                       "ci_low", "ci_high", "p_one_sided", "pairs", "significant"])


def paper_table(tab: pd.DataFrame) -> pd.DataFrame:
    """The γ₀ × c grid as the paper prints it: 'mean ± std' in percent, '*' where the arm is
    significantly better than γ₀ = 1, c = 1 (one-sided paired t-test, p <= 0.05)."""
    t = tab[tab["input_norm"] == "dataset"].copy()
    t["cell"] = [f"{100 * m:.2f} ± {100 * s:.2f}" + (" *" if sig else "")
                 for m, s, sig in zip(t["mean"], t["std"].fillna(0), t["significant"])]
    out = t.pivot(index="gamma0", columns="c", values="cell").sort_index(ascending=False)
    out.columns = [f"c = {c:g}" for c in out.columns]
    out.index = [f"γ₀ = {g:g}" for g in out.index]
    return out


def detectable_effect(e: stats.Effect, sd: float, power: float = 0.8) -> float:
    """The smallest true mean difference a one-sided paired t-test at ALPHA detects with the
    given power over e.n pairs whose differences spread with standard deviation `sd`:
    (t_{1−α} + t_{power}) · sd / √n, df = n − 1 (the usual normal-approximation form)."""
    if e.n < 2 or not math.isfinite(sd):
        return math.nan
    df = e.n - 1
    return float((sps.t.ppf(1 - stats.ALPHA, df) + sps.t.ppf(power, df)) * sd / math.sqrt(e.n))


def resolution(runs: pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """For each comparison of the verdicts: pairs, the standard deviation of the paired
    differences and the smallest effect the test detects with 80% power (detectable_effect)."""
    d = with_arms(runs)
    rows = []
    for name, (a, b) in COMPARISONS.items():
        piv = d[d["arm"].isin([arm_name(*a), arm_name(*b)])].pivot_table(index=PAIR, columns="arm", values=metric)
        if not {arm_name(*a), arm_name(*b)} <= set(piv.columns):
            continue
        diff = (piv[arm_name(*a)] - piv[arm_name(*b)]).dropna()
        e = compare(d, a, b, metric)
        sd = float(diff.std(ddof=1)) if len(diff) > 1 else math.nan
        rows.append({"comparison": name, "pairs": e.n, "sd_of_differences": sd,
                     "detectable_effect_80pct_power": detectable_effect(e, sd)})
    return pd.DataFrame(rows, columns=["comparison", "pairs", "sd_of_differences", "detectable_effect_80pct_power"])


# ----------------------------------------------------------------------------------------------
# verdicts
# ----------------------------------------------------------------------------------------------

# claim -> (arm a, arm b): a is claimed better than b. Each is one of the paper's comparisons:
# γ₀ alone (c = 1 both: the paper's γ₀ = 0.1 row against the standard baseline), c alone at the
# recommended γ₀ (where the paper proposes lr/c: a small γ moved at the full rate changes by a
# large fraction of itself per step), the whole recipe against standard training (the paper's
# headline row), and the input BN against dataset statistics with everything else the recipe.
SHORT = {  # each claim in a few words (the report's index and forest plot)
    "γ₀ < 1 helps": "γ₀ 0.1 > 1", "lr/c helps": "γ lr/100 > lr", "The recipe helps": "recipe > standard",
    "BN input normalization helps": "input BN > dataset stats"}
COMPARISONS = {
    "γ₀ < 1 helps: γ₀ = 0.1 beats γ₀ = 1 (both with γ at the full learning rate, c = 1)": ((0.1, 1, "dataset"),
                                                                                         REFERENCE),
    "lr/c helps: γ's learning rate lr/100 beats lr (both at γ₀ = 0.1)": (RECIPE, (0.1, 1, "dataset")),
    "The recipe helps: γ₀ = 0.1 with lr/100 beats standard training (γ₀ = 1, c = 1)": (RECIPE, REFERENCE),
    "BN input normalization helps: an online input BN beats dataset mean/std (at γ₀ = 0.1, c = 100)": (INPUT_BN,
                                                                                                     RECIPE),
}


def verdicts(runs) -> list[stats.Verdict]:
    """P2's claims decided from the runs (a bnlib.Runs or its `runs` table), each a one-sided
    paired comparison over matched seeds of the test accuracy at the best-validation epoch (the
    claims are directional: "helps"), against 0. The reference: standard training (γ₀ = 1,
    c = 1) must beat chance, or nothing is attributed. A claim is supported only when the whole
    95% interval lies above 0 (bnlib.stats.decide), which is stricter than the paper's one-sided
    p <= 0.05; where that criterion alone is met the sentence says so. Every claim is about the
    accuracy after the paper's 180 epochs: on runs shorter than a tenth of its PAPER_STEPS it is
    inconclusive (budget), with its statistics at this budget in the sentence. Note that γ₀ = 0.1
    also starts every upstream gradient γ₀ times smaller, which acts like a smaller step until γ
    grows: a short run measures that, not the paper's long-run effect."""
    r = runs.runs if hasattr(runs, "runs") else runs
    if r.empty or "gamma0" not in r:
        return [stats.Verdict("p2", claim, "inconclusive", f"{claim}: INCONCLUSIVE — no finished P2 runs.", [],
                              ["no runs"], short=_short(claim)) for claim in COMPARISONS]
    d = with_arms(r)
    budget = stats.Budget.of_runs(r, PAPER_STEPS)
    ref_ok, ref_why = stats.beats_chance(d.loc[d["arm"] == arm_name(*REFERENCE), METRIC], CHANCE)
    guards = [(ref_ok, f"standard training (γ₀ = 1, c = 1) does not clearly learn ({ref_why})")]
    out = []
    for claim, (a, b) in COMPARISONS.items():
        e = compare(d, a, b)
        b_ok, b_why = stats.beats_chance(d.loc[d["arm"] == arm_name(*b), METRIC], CHANCE)
        g = guards + ([(b_ok, f"the arm compared with ({arm_name(*b)}) does not clearly learn ({b_why})")]
                      if b != REFERENCE else [])
        v = stats.decide("p2", claim, e, guards=g, what="test accuracy difference, one-sided paired t-test",
                         budget=budget, short=_short(claim))
        if (v.at_budget or v.outcome) == "inconclusive" and math.isfinite(e.p) and e.p <= stats.ALPHA \
                and "interval crosses" in v.causes:
            v.sentence = v.sentence[:-1] + f" (the paper's criterion alone, one-sided p <= {stats.ALPHA}, is met)."
        out.append(v)
    return out


def _short(claim: str) -> str:
    return next((v for k, v in SHORT.items() if claim.startswith(k)), claim[:40])


# the paper's run: 180 epochs of 352 batches (45 000 training images at batch 128, the last partial)
PAPER_STEPS = 180 * math.ceil(45000 / 128)


# ----------------------------------------------------------------------------------------------
# figures (the notebook calls these)
# ----------------------------------------------------------------------------------------------

def _plt():
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def plot_drift(norm_params: pd.DataFrame, runs: pd.DataFrame, arms=(REFERENCE, RECIPE)):
    """γ and β per layer over training against their initial values (P2 Sec. 3's observation):
    one column per arm, rows γ and β; x = norm layer in depth order, a line per recorded epoch
    (mean over channels and seeds), the dashed line the initial value."""
    plt = _plt()
    d = with_arms(runs)
    d = d[d["status"] == "completed"]  # a diverged run's parameters are not a learned state
    fig, axes = plt.subplots(2, len(arms), figsize=(5.5 * len(arms), 6.5), squeeze=False)
    for j, arm in enumerate(arms):
        ids = set(d.loc[d["arm"] == arm_name(*arm), "run_id"])
        npar = norm_params[norm_params["run_id"].isin(ids)]
        for i, param in enumerate(("gamma", "beta")):
            ax = axes[i, j]
            p = npar[npar["param"] == param]
            if p.empty:
                ax.set_visible(False)
                continue
            epochs = sorted(p["epoch"].unique())
            cmap = plt.get_cmap("viridis")
            for k, ep in enumerate(epochs):
                m = p[p["epoch"] == ep].groupby("depth")["mean"].mean()
                ax.plot(m.index, m.values, marker=".", color=cmap(k / max(1, len(epochs) - 1)), label=f"epoch {ep}")
            init = p[p["epoch"] == epochs[0]].groupby("depth")["mean"].mean()
            ax.plot(init.index, init.values, "k--", lw=1, label="initial value")
            ax.set_title(f"{param}, {arm_name(*arm)}")
            ax.set_xlabel("norm layer (depth order)")
            ax.set_ylabel(f"mean {param} over channels")
        axes[0, j].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_acc_vs_gamma0(runs: pd.DataFrame, metric: str = METRIC):
    """Test accuracy vs γ₀ (log axis), one line per c: mean over seeds with ±1 std bars, each
    seed a dot; the input-BN arm as a star at its γ₀."""
    plt = _plt()
    d = with_arms(runs)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for k, c in enumerate(CS):
        s = d[(d["c"] == c) & (d["input_norm"] == "dataset")]
        if s.empty:
            continue
        g = s.groupby("gamma0")[metric].agg(["mean", "std"]).sort_index()
        shift = 1.04 if k else 1 / 1.04  # the two lines side by side
        ax.errorbar(g.index * shift, g["mean"], yerr=g["std"], marker="o", capsize=3, label=f"c = {c}")
        ax.scatter(s["gamma0"] * shift, s[metric], s=10, alpha=0.4, color=ax.lines[-1].get_color())
    b = d[d["input_norm"] == "bn"]
    if not b.empty:
        ax.errorbar(b["gamma0"].mean(), b[metric].mean(), yerr=b[metric].std(), marker="*", ms=12, capsize=3,
                    ls="none", color="k", label=f"input BN (c = {b['c'].iloc[0]:g})")
    ax.set_xscale("log")
    ax.set_xlabel("γ₀ (initial γ of every norm layer)")
    ax.set_ylabel("test accuracy at best validation")
    ax.legend()
    return fig


def plot_input_norm(runs: pd.DataFrame, metric: str = METRIC):
    """The input-normalization comparison on matched seeds: one line per seed from dataset
    statistics to the online input BN (γ₀ = 0.1, c = 100 both)."""
    plt = _plt()
    d = with_arms(runs)
    piv = d[d["arm"].isin([arm_name(*RECIPE), arm_name(*INPUT_BN)])].pivot_table(index="seed", columns="arm",
                                                                                   values=metric)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    cols = [c for c in (arm_name(*RECIPE), arm_name(*INPUT_BN)) if c in piv]
    for _, row in piv[cols].iterrows():
        ax.plot(range(len(cols)), row.values, "o-", color="0.5", alpha=0.6)
    if cols:
        ax.plot(range(len(cols)), piv[cols].mean().values, "s-", color="k", lw=2, label="mean")
    ax.set_xticks(range(len(cols)), ["dataset mean/std" if "inputBN" not in c else "online input BN" for c in cols])
    ax.set_xlim(-0.4, len(cols) - 0.6)
    ax.set_ylabel("test accuracy at best validation")
    ax.set_title("input normalization, matched seeds")
    ax.legend()
    return fig


def plot_max_normalized(probes: pd.DataFrame, runs: pd.DataFrame, arms=PROBED):
    """The largest |x̂| and |γ·x̂ + β| per norm layer (probe max_normalized), at initialization
    and at the end of training, one line per arm (median over seeds)."""
    plt = _plt()
    d = with_arms(runs)
    p = probes[probes["probe"] == "max_normalized"].merge(d[["run_id", "arm"]], on="run_id")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=False)
    if p.empty:
        return fig
    last = p.groupby("run_id")["step"].transform("max")
    for ax, q, title in zip(axes, ("xhat_abs_max", "out_abs_max"), ("largest |x̂| (normalized)",
                                                                     "largest |γ·x̂ + β| (layer output)")):
        for k, arm in enumerate(arms):
            s = p[(p["arm"] == arm_name(*arm)) & (p["quantity"] == q)]
            if s.empty:
                continue
            color = f"C{k}"
            for when, ls, mask in (("init", ":", s["step"] == 0), ("end", "-", s["step"] == last[s.index])):
                m = s[mask].groupby("depth")["value"].median()
                ax.plot(m.index, m.values, ls, marker=".", color=color, label=f"{arm_name(*arm)}, {when}")
        ax.set_yscale("log")
        ax.set_xlabel("norm layer (depth order)")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------------------------

# The authors' recipe (their train.py / networks.py defaults), shared by both presets.
RECIPE_PARAMS = dict(arch="resnet18", stem="cifar", conv_init="kaiming_fan_in", fc_init="kaiming_uniform_relu",
                     zero_bias=True, shortcut="B",
                     optimizer="sgd", lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4, gamma_wd=0.0,
                     bias_wd=0.0, bias_lr_mult=1.0, schedule="cosine", final_lr=1e-8, final_lr_frac=0.0,
                     warmup_epochs=0.0, batch_size=128, drop_last=False, crop_pad=0, flip=True, norm="bn",
                     label_smoothing=0.0)

QUICK_SEEDS = list(range(4))
# grid order = run order: the four arms the verdicts compare run first, so a study cut short on a
# busy machine can already decide its claims (the tables and figures use ARMS order)
VERDICT_ARMS_FIRST = sorted(range(len(ARMS)), key=lambda i: ARMS[i] not in (REFERENCE, (0.1, 1, "dataset"), RECIPE,
                                                                              INPUT_BN))
PAPER_SEEDS = list(range(15))  # the paper: 15 seeds
# the quick preset runs the four arms its claims compare (standard, γ₀ = 0.1, the recipe, its input
# BN): its claims are inconclusive (budget) anyway, and the rest of the γ₀ × c table would cost
# make study minutes for figures the paper preset draws
QUICK_ARMS = [ARMS.index(a) for a in (REFERENCE, (0.1, 1, "dataset"), RECIPE, INPUT_BN)]

register_study(Study(
    name="p2",
    title="P2 · revisiting BatchNorm initialization: γ₀, lr/c, input BN (Davis & Frank 2022)",
    notebook="studies/p2_revisiting_bn.ipynb",
    doc="γ₀ ∈ {1, 0.5, 0.25, 0.1, 0.05} × γ learning rate lr/c, c ∈ {1, 100}, plus the online BN input "
        "normalization at γ₀ = 0.1, c = 100, on ResNet-18 (CIFAR stem) with the authors' recipe; each arm "
        "against standard training by one-sided paired t-tests over matched seeds.",
    derive=_arm_params,
    verdicts=verdicts,
    axes_note={"arm": "index into bnlib.studies.p2.ARMS: (γ₀, c, input_norm)"},
    presets={
        # Fashion-MNIST, ResNet-18 at width 1/8 on 4 000 training images (the 2 % validation split
        # is carved from the full pool first), 2 epochs at batch 128 (64 steps with the kept last
        # batch), the 4 compared arms × 4 seeds (16 runs; power at twice the threshold: 71-77%,
        # docs/calibration.md; their time: docs/performance.md). fp32 as the authors; precise BN
        # statistics at evaluation (running ones lag in 64 steps). Flips only, as the authors.
        "quick": Preset(
            base=dict(RECIPE_PARAMS, dataset="fashion_mnist", n_train=4000, val_fraction=0.02, n_test=2000,
                      width=0.125, epochs=2, precision="fp32", bn_eval_stats="precise", precise_batches=8,
                      log_every=5, eval_batch_size=500, probe_batch_size=256),
            grid=dict(arm=QUICK_ARMS, seed=QUICK_SEEDS)),
        "paper": Preset(
            base=dict(RECIPE_PARAMS, dataset="cifar10", n_train=None, n_test=None, val_fraction=0.1, width=1.0,
                      epochs=180, precision="fp32", bn_eval_stats="running", probes=PROBES),
            grid=dict(arm=list(range(len(ARMS))), seed=PAPER_SEEDS)),
    },
))

"""P3 — Awais, Iqbal & Bae 2021, "Revisiting Internal Covariate Shift for Batch Normalization"
(IEEE TNNLS 32(11)): does internal covariate shift (ICS) matter? The grid and the verdicts.

P3 argues that BN's alternative explanations — it allows large learning rates (Bjorck et al.
2018), it smooths the loss landscape (Santurkar et al. 2018) — can be had without an accuracy
gain, while a normalization with every property of BN except the reduction of ICS performs
poorly: ICS reduction matters. It measures ICS as Santurkar et al. do (their Def. 2.1): the
change of layer i's weight gradient when only the layers before i take their update, on the
same batch (ℓ2 distance and cosine). Santurkar et al. read the same measurements the other way:
BN does not reduce that ICS, BN with injected noise ("noisy BN") trains like BN, and what tracks
BN's benefit is a smoother landscape (loss and gradient along the gradient direction).

The grid: the same ResNet (CIFAR stem) with each norm of NORMS_P3 — BN, BatchNorm-minus,
AffineLayer, none, noisy BN, the ICS-free scheme (bnlib.ics_free.IcsFreeBatchNorm2d: BN
normalizing each batch with the statistics BN computes on the same batch with the previous
step's parameters, so it removes every earlier update's shift but not the latest one's, with BN's
gradient; bnlib's choice, P3 publishes none), GroupNorm,
LayerNorm, Batch Renormalization and ghost BN — × each arm's own log ladder of learning rates
(LR_LADDERS: its largest stable rate is read off it, censored at the ladder's ends; each arm is
compared at its own rate chosen on validation) × seeds. Every run records the `ics` probe on a
subset of conv layers and the `landscape` probe (bnlib.probes) at init and every epoch end.

The verdict (P3's claim against Santurkar's, across arms, each at its validated rate): Spearman
rank correlations between the arms' accuracy and their ICS, β-smoothness and largest stable
learning rate, with bootstrap intervals over arms and seeds (bnlib.stats.rank_correlation).

bnlib's choices (the paper publishes no code or recipe): the ICS summary of a run is the mean,
over its probed layers and times, of the relative ℓ2 ICS ‖G − G'‖/‖G‖ (scale-free: arms differ
in gradient scale by orders of magnitude, which the raw ℓ2 would rank instead of ICS); its
smoothness is the median over probe times of the effective β-smoothness; SGD momentum 0.9, weight
decay 5e-4 on conv/linear weights, cosine schedule.
"""
from __future__ import annotations


import numpy as np
import pandas as pd

import bnlib.stats as stats
from .base import Preset, Study, register_study
from .p4 import largest_stable_lr  # P4's definition of a stable rate, shared, not restated

ARMS = ["bn", "bn_minus", "affine", "none", "noisy_bn", "ics_free", "group_norm", "layer_norm", "batch_renorm",
        "ghost_bn"]
PROBES = ["ics", "landscape"]
METRIC = "test_acc_at_best_val"
CHANCE = 0.1  # Fashion-MNIST and CIFAR-10: 10 classes
SIMILAR = 0.02  # "trains nearly like BN" (bnlib's operationalization): within 2 accuracy points
# ResNet-18's 20 convs (bnlib.models.conv_layers): one in each stage (each stage's first block's
# second conv, whose input also depends on its own block's first conv) and the last one
ICS_LAYERS = [2, 6, 11, 16, 19]
QUICK_ICS_LAYERS = [6, 16]  # quick preset: one conv in stage 2 and one in stage 4 (probe cost)
QUICK_LANDSCAPE_STEPS = [0.5, 2.0]  # quick preset: η ∈ {0.5, 2}·lr (probe cost; the default has 4)
# Each arm's learning-rate ladder (the lr itself at the preset's batch size; the grid axis
# `lr_rung` indexes it), as P1 does: one shared sweep put some arm's optimum off its end. How the
# quick ladders were set, with the runs they were read from: docs/presets.md. BN also runs at
# ICS_CHECK_LR, the rate the ICS-free scheme's manipulation check compares them at (verdict 4).
ICS_CHECK_LR = 0.04
_BN_LIKE = (0.32, 1.28)
LR_LADDERS = {
    "quick": {"bn": (ICS_CHECK_LR, *_BN_LIKE), "bn_minus": _BN_LIKE, "noisy_bn": _BN_LIKE,
              "batch_renorm": (0.08, 0.32), "ghost_bn": _BN_LIKE, "group_norm": (0.16, 0.64),
              "layer_norm": (0.16, 0.64), "affine": (0.1, 0.2, 0.4), "none": (0.1, 0.2, 0.4),
              "ics_free": (ICS_CHECK_LR, 0.16)},
    "paper": {**{a: (0.01, 0.03, 0.1, 0.3, 1.0) for a in ARMS},
              "affine": (0.001, 0.003, 0.01, 0.03, 0.1), "none": (0.001, 0.003, 0.01, 0.03, 0.1),
              "ics_free": (0.003, 0.01, 0.03, 0.1, 0.3)},
}
# The quick preset's recipe, the same for every arm (only the norm differs between arms; recorded
# in every run's config): SkipInit (De & Smith 2020, P5's residual_gain: a learnable scalar α,
# starting at 0, at the end of each residual branch) and a linear warm-up over the first half
# epoch. Without it the unnormalized He-init ResNet-18 collapses to a constant output within its
# first steps at every rate tried, so `none` and `affine` stay at chance (the runs:
# docs/presets.md). bnlib's choice: P3's networks have no SkipInit; it changes every arm alike (α
# multiplies each branch after its last norm), but the normalized arms then also start each
# block at the identity.
QUICK_RECIPE = dict(residual_gain=True, alpha0=0.0, warmup_epochs=0.5)
CENSORED_MAX = 0.5  # lr* verdict: inconclusive when more than this share of arms has a censored lr*


# What each preset can and cannot show (printed by the notebook next to the verdicts).
PRESET_NOTES = {
    "quick": "quick preset: Fashion-MNIST (real images), ResNet18 (CIFAR stem) at width 1/8, a 2 048-image training "
             "set, 2 epochs at batch 64 (64 steps), 3 matched seeds; every arm with the same recipe, SkipInit (α = 0 "
             "at the end of each residual branch) and a half-epoch linear warm-up (QUICK_RECIPE: without it none "
             "and affine stay at chance); each arm on its own ladder (LR_LADDERS: for most arms two rungs, its best "
             "rate in an earlier 3-rung run of this recipe and a 4x larger one that diverged there; three for bn, "
             "none and affine; BN also runs at the rate of the ICS-free arm's first rung, where verdict 4 compares "
             "their ICS); ICS on 2 of the 20 convs and the landscape at 2 step sizes, at init and each epoch end "
             "(69 runs; their time: docs/performance.md). It can show whether the arms differ in accuracy, ICS and "
             "smoothness after 64 steps, and the sign of a rank correlation when it is strong. It cannot show "
             "long-run accuracies, CIFAR-10 numbers, ICS late in a long training, or P3's own networks (they have "
             "no SkipInit); the short ladders mostly fix each arm's rate in advance, so 'chosen on validation' "
             "only decides for the 3-rung arms. With 10 arms and 3 seeds a rank correlation's interval is wide: "
             "'inconclusive' is the expected verdict unless the association is strong. Run --preset paper for more.",
    "paper": "paper preset: CIFAR-10, ResNet18 (CIFAR stem) at full width, 60 epochs, 5 learning rates per arm "
             "(LR_LADDERS), 3 seeds, ICS and landscape every 200 steps (bnlib's protocol: the paper publishes none).",
}


def _ladder_derive(ladders: dict):
    def derive(point: dict) -> dict:
        out = {"lr": ladders[point["norm"]][point.pop("lr_rung")]} if "lr_rung" in point else {}
        return {**out, **_derive(point)}
    return derive


def _rung_subgrids(ladders: dict) -> tuple:
    """One sub-grid per ladder length: each arm runs every rung of its own ladder, no more."""
    return tuple({"norm": [a for a in ARMS if len(ladders[a]) == n], "lr_rung": list(range(n))}
                 for n in sorted({len(ladders[a]) for a in ARMS}))


def _derive(point: dict) -> dict:
    # ghost BN: 4 virtual batches per step (Hoffer et al. 2017 split large batches into small ones);
    # the option only exists for its own arm, so the other arms' runs stay what they are
    return {"ghost_batch_size": point["batch_size"] // 4} if point["norm"] == "ghost_bn" else {}


# ----------------------------------------------------------------------------------------------
# tables the notebook and the verdicts share
# ----------------------------------------------------------------------------------------------

def accuracy(runs: pd.DataFrame) -> pd.DataFrame:
    """Finished runs with `acc` = METRIC; a diverged run keeps what it reached before diverging,
    or chance when it never had a finite validation accuracy (diverged runs are results)."""
    fin = runs[runs["status"].isin(["completed", "diverged"])].copy()
    acc = fin[METRIC] if METRIC in fin else pd.Series(np.nan, index=fin.index)
    fin["acc"] = acc.where(acc.notna() | ~fin["status"].eq("diverged"), CHANCE)
    fin["stable"] = fin["status"].eq("completed")
    return fin


def probe_summary(probes: pd.DataFrame) -> pd.DataFrame:
    """One row per run: `ics` = mean over probed layers and times of ‖G − G'‖/‖G‖ (layers with a
    zero gradient left out), `ics_cos` = the mean of 1 − cos(G, G'), `ics_l2` = the mean raw ℓ2,
    `beta` = median over probe times of log10 of the effective β-smoothness, `grad_pred` =
    median of grad_diff_max/‖g‖ (the gradient's change along the step relative to its size:
    lower = more predictive), `loss_range` = median of loss_max − loss_min."""
    cols = ["run_id", "ics", "ics_cos", "ics_l2", "beta", "grad_pred", "loss_range"]
    if probes is None or probes.empty:
        return pd.DataFrame(columns=cols)
    ics = probes[probes["probe"] == "ics"].pivot_table(index=["run_id", "step", "depth"], columns="quantity",
                                                       values="value")
    out = pd.DataFrame(index=pd.Index(sorted(set(probes["run_id"])), name="run_id"))
    if {"l2", "cos", "grad_norm"} <= set(ics.columns):
        ok = ics[ics["grad_norm"] > 0]
        g = ok.assign(rel=ok["l2"] / ok["grad_norm"], one_minus_cos=1 - ok["cos"]).groupby("run_id")
        out = out.join(pd.DataFrame({"ics": g["rel"].mean(), "ics_cos": g["one_minus_cos"].mean(),
                                     "ics_l2": g["l2"].mean()}))
    land = probes[(probes["probe"] == "landscape") & probes["x"].isna()].pivot_table(
        index=["run_id", "step"], columns="quantity", values="value")
    if {"beta_smoothness", "grad_diff_max", "grad_norm", "loss_max", "loss_min"} <= set(land.columns):
        with np.errstate(divide="ignore", invalid="ignore"):
            land = land.assign(beta=np.log10(land["beta_smoothness"]), grad_pred=land["grad_diff_max"] / land["grad_norm"],
                               loss_range=land["loss_max"] - land["loss_min"])
        out = out.join(land.groupby("run_id")[["beta", "grad_pred", "loss_range"]].median())
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
    cols = ["lr", "acc", "ics", "ics_cos", "beta", "grad_pred", "lr_star"]
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


# ----------------------------------------------------------------------------------------------
# verdicts
# ----------------------------------------------------------------------------------------------

MIN_ARMS = 5  # fewer arms cannot rank anything


def verdicts(runs) -> list[stats.Verdict]:
    """P3's claims, and Santurkar et al.'s counter-claims, decided from the runs (a bnlib.Runs
    with its probes table), every arm at its own learning rate chosen on validation:

    0. reference: BN learns (beats chance) and beats no normalization (paired over seeds) — the
       arms differ, so there is something to explain;
    1. P3: across arms, less ICS goes with higher accuracy — Spearman ρ(ICS, accuracy) < 0;
    2. Santurkar: β-smoothness tracks accuracy better than ICS does — −ρ(β, acc) − (−ρ(ICS, acc))
       > 0 (each measure in the direction its side predicts; same bootstrap resamples);
    3. Santurkar / P4: the largest stable learning rate tracks accuracy better than ICS does —
       ρ(lr*, acc) − (−ρ(ICS, acc)) > 0;
    4. P3: the ICS-free scheme, which has more ICS than BN, is less accurate than BN (both parts
       paired over seeds: the manipulation check on ICS, then accuracy);
    5. Santurkar: noisy BN trains nearly like BN (|accuracy difference| < SIMILAR, equivalence).
    The rank correlations' intervals resample arms and seeds (bnlib.stats.rank_correlation).

    Claims 1-3 rank arms that train. When some arm does not beat chance at its chosen rate
    (bnlib.stats.beats_chance: its seeds' accuracies above CHANCE + 0.05, one-sided t-test), they
    say inconclusive and name it: with arms at chance (and others far above it) the ranks of
    accuracy mostly sort "learns" from "does not learn", so ρ would measure whatever separates
    those groups — for an untrained network its ICS and smoothness near init — not whether ICS or
    smoothness tracks accuracy among networks that learn. An arm that diverged in every run
    (every rate of its ladder, every seed) is the exception: that is a result (it cannot be
    trained at any rate tried), not a recipe that has not learnt yet, so it does not block the
    verdict; it is left out of the ranks (of accuracy, ICS, β and lr*, and of the censoring count
    of claim 3) and named in the sentence. Entering it at chance accuracy would rank it last
    whatever its ICS, and its probes were taken on a run heading for divergence (β infinite once
    the loss blows up), so it would bring back the learns-vs-not contrast the guard exists to
    keep out. Its result is read where it belongs: claim 4 for the ICS-free scheme (whose
    guard says a diverging arm's accuracy measures its instability), and the run table.
    """
    r = runs.runs if hasattr(runs, "runs") else runs
    if r.empty or "norm" not in r or not {"bn", "none"} <= set(r["norm"]):
        return [stats.Verdict("p3", "Less ICS goes with higher accuracy across arms", "inconclusive",
                              "Less ICS goes with higher accuracy across arms: INCONCLUSIVE — needs finished runs "
                              "of bn and none.", [], ["no runs of bn and none"])]
    runs_all = per_run(runs)  # every finished run, once: the selection, the all-diverged arms, the ICS check
    sel = stats.at_selected_lr(runs_all, ["norm"])  # as selected(runs)
    have = set(sel["norm"])
    bn_ok, bn_why = stats.beats_chance(sel.loc[sel["norm"] == "bn", "acc"], CHANCE)
    e0 = stats.paired_effect(sel, "norm", "bn", "none", "acc", ["seed"], alternative="greater")
    v0 = stats.decide("p3", "Reference: BN learns and beats no normalization (each at its validated rate)", e0,
                      guards=[(bn_ok, f"the BN arm does not clearly learn ({bn_why})")],
                      what="test accuracy difference")
    out = [v0]
    learn = [(bn_ok, f"the BN arm does not clearly learn ({bn_why})"),
             (v0.outcome == "supported", "BN does not clearly beat no normalization here, so the arms may not differ "
                                         "enough to rank")]
    # the arms the correlations rank: an arm that diverged at every rate of its ladder is left out
    # (named in the verdict; see the docstring); an arm at chance at its chosen rate makes them
    # inconclusive
    all_div = sorted(a for a, g in runs_all.groupby("norm") if not g["stable"].any())
    ranked = sel[~sel["norm"].isin(all_div)]
    at_chance = []
    for arm, g in ranked.groupby("norm"):
        ok, why = stats.beats_chance(g["acc"], CHANCE)
        if not ok:
            at_chance.append(f"{arm} ({why})")
    left_out = (f"; left out: {', '.join(all_div)} (diverged at every rate of its ladder: no trained network "
                f"to rank)" if all_div else "")
    n_arms = ranked.dropna(subset=["ics"]).groupby("norm").size().size if "ics" in ranked else 0
    corr_guards = learn + [(n_arms >= MIN_ARMS, f"only {n_arms} arms have ICS measurements (need >= {MIN_ARMS})"),
                           (not at_chance, f"{len(at_chance)} arm(s) do not beat chance at their chosen rate: "
                                           f"{'; '.join(at_chance)} — a correlation across arms would then rank "
                                           f"learning against not learning, not ICS or smoothness")]
    if "ics" not in sel or sel["ics"].isna().all():
        out.append(stats.Verdict("p3", "P3: across arms, less ICS goes with higher accuracy", "inconclusive",
                                 "P3: across arms, less ICS goes with higher accuracy: INCONCLUSIVE — no ics probe "
                                 "rows in these runs.", [], ["no probe rows"]))
        return out
    e1 = stats.rank_correlation(ranked, "ics", "acc", unit="norm", replicate="seed", alternative="less")
    out.append(stats.decide("p3", "P3: across arms, less ICS goes with higher accuracy", e1, direction="less",
                            guards=corr_guards, min_pairs=MIN_ARMS,
                            what="rank correlation of relative ℓ2 ICS with test accuracy over arms (n = arms"
                                 + left_out + ")"))
    e2 = stats.rank_correlation_difference(ranked, "beta", "ics", "acc", unit="norm", replicate="seed",
                                           sign_a=-1, sign_b=-1)
    out.append(stats.decide("p3", "Santurkar: β-smoothness tracks accuracy better than ICS does", e2,
                            guards=corr_guards, min_pairs=MIN_ARMS,
                            what="difference of rank correlations with accuracy, each signed as its side predicts"
                                 + left_out))
    e3 = stats.rank_correlation_difference(ranked, "lr_star", "ics", "acc", unit="norm", replicate="seed",
                                           sign_a=1, sign_b=-1)
    # lr* is censored for an arm stable at the top of its ladder in some seed (a lower bound) or
    # diverged at its lowest rate (an upper bound, lr* NaN): ranks of censored values are not ranks
    ls = largest_stable_lr(r)
    ls = ls[~ls["norm"].isin(all_div)]
    cens = ls.assign(c=ls["at_top"].fillna(False).astype(bool) | ls["lr_star"].isna()).groupby("norm")["c"].any()
    n_cens, n_ls = int(cens.sum()), int(cens.size)
    v3 = stats.decide("p3", "Santurkar / P4: the largest stable learning rate tracks accuracy better than ICS does",
                      e3, guards=corr_guards + [(n_cens <= CENSORED_MAX * n_ls,
                                                 f"{n_cens} of {n_ls} arms have a censored largest stable rate "
                                                 f"(stable at the top of their ladder, or diverged at its bottom: "
                                                 f"{', '.join(sorted(cens[cens].index))}), so their lr* are bounds, "
                                                 f"not values to rank")],
                      min_pairs=MIN_ARMS,
                      what="difference of rank correlations with accuracy, each signed as its side predicts"
                           + left_out)
    if 0 < n_cens <= CENSORED_MAX * n_ls:
        v3.sentence += (f" Caveat: {n_cens} arm(s) have a censored largest stable rate (a bound, tied at the "
                        f"end of their ladder).")
    out.append(v3)
    if "ics_free" in have:
        fr = sel.loc[sel["norm"] == "ics_free", "stable"]
        trains = (bool(fr.mean() >= 0.5),
                  f"the ICS-free scheme diverged in {int((~fr).sum())} of {len(fr)} seeds at its chosen rate "
                  f"(bnlib.ics_free.IcsFreeBatchNorm2d), so its accuracy measures that instability, not the "
                  f"absence of ICS reduction")
        # The manipulation check compares ICS at one learning rate both arms ran (ICS grows with
        # the step: the update of the earlier layers is lr times their gradient, so at their own
        # chosen rates a BN arm at 0.32 and the ICS-free arm at 0.04 would compare step sizes,
        # not normalizations). The largest shared rate at which neither arm diverged in any seed.
        d = runs_all[runs_all["norm"].isin(["bn", "ics_free"])]
        ok = d.groupby(["lr", "norm"])["stable"].all().unstack("norm")
        shared = sorted(ok.dropna().index[ok.dropna().all(axis=1).to_numpy(bool)], reverse=True) \
            if {"bn", "ics_free"} <= set(ok.columns) else []
        if shared:
            m = stats.paired_effect(d[d["lr"] == shared[0]], "norm", "ics_free", "bn", "ics", ["seed"],
                                    alternative="greater")
            check = stats.decide("p3", f"the ICS-free scheme has more ICS than BN (both at lr {shared[0]:g})", m,
                                 guards=learn[:1], what="relative ℓ2 ICS difference at the same learning rate")
        else:
            check = stats.Verdict("p3", "the ICS-free scheme has more ICS than BN", "inconclusive",
                                  "the ICS-free scheme has more ICS than BN: INCONCLUSIVE — the two arms share no "
                                  "learning rate at which both trained (ICS is only comparable at one rate).", [],
                                  ["no shared learning rate"])
        a = stats.paired_effect(sel, "norm", "bn", "ics_free", "acc", ["seed"], alternative="greater")
        parts = [check,
                 stats.decide("p3", "BN is more accurate than the ICS-free scheme", a, guards=learn[:1] + [trains],
                              what="test accuracy difference, each at its validated rate")]
        out.append(stats.all_of("p3", "P3: the ICS-free scheme (BN without ICS reduction) is less accurate than BN",
                                parts))
    if "noisy_bn" in have:
        e5 = stats.paired_effect(sel, "norm", "noisy_bn", "bn", "acc", ["seed"], alternative="two-sided")
        out.append(stats.decide_margin("p3", f"Santurkar: noisy BN trains nearly like BN (|difference| < {SIMILAR:g})",
                                       e5, SIMILAR, guards=learn[:1], what="test accuracy difference"))
    return out


register_study(Study(
    name="p3",
    title="P3 · does internal covariate shift matter? (Awais et al. 2021)",
    notebook="studies/p3_ics.ipynb",
    doc="bn / bn_minus / affine / none / noisy_bn / ics_free / group_norm / layer_norm / batch_renorm / ghost_bn "
        "on one ResNet, each arm over its own learning-rate ladder, with Santurkar et al.'s ICS and landscape probes; "
        "verdict: across arms, does less ICS go with higher accuracy, or do smoothness and the largest stable "
        "learning rate track it better?",
    derive=_derive,
    verdicts=verdicts,
    presets={
        # Fashion-MNIST, ResNet18 at width 1/8 on 2 048 training images for 2 epochs at batch 64
        # (64 steps), no crop (it slows a 2-epoch run more than it regularizes), SkipInit and a
        # half-epoch warm-up for every arm (QUICK_RECIPE), each arm on its own 2- or 3-rung ladder
        # (69 runs). ICS on 2 of the 20 convs and the landscape at 2 step sizes: about 6 fp32
        # forward-backward passes per probe time (noisy BN: 8), at init and each epoch end.
        "quick": Preset(
            base=dict(dataset="fashion_mnist", n_train=2048, val_fraction=0.02, n_test=1000, arch="resnet18",
                      width=0.125, epochs=2, batch_size=64, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                      crop_pad=0, log_every=4, eval_batch_size=500, bn_eval_stats="precise", precise_batches=4,
                      probes=PROBES, probe_ics_layers=QUICK_ICS_LAYERS, probe_landscape_steps=QUICK_LANDSCAPE_STEPS,
                      **QUICK_RECIPE),
            grid=dict(norm=ARMS, lr_rung=[0, 1, 2], seed=[0, 1, 2]), subgrids=_rung_subgrids(LR_LADDERS["quick"]),
            derive=_ladder_derive(LR_LADDERS["quick"])),
        "paper": Preset(
            base=dict(dataset="cifar10", arch="resnet18", width=1.0, epochs=60, batch_size=128, momentum=0.9,
                      weight_decay=5e-4, schedule="cosine", n_train=None, n_test=None, probes=PROBES,
                      probe_every=200, probe_ics_layers=ICS_LAYERS),
            grid=dict(norm=ARMS, lr_rung=[0, 1, 2, 3, 4], seed=[0, 1, 2]), derive=_ladder_derive(LR_LADDERS["paper"])),
    },
))

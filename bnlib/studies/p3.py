"""P3 — Awais, Iqbal & Bae 2021, "Revisiting Internal Covariate Shift for Batch Normalization"
(IEEE TNNLS 32(11)): does internal covariate shift (ICS) matter? The grid and the verdicts (the
tables the verdicts read are in p3_tables, re-exported here).

P3 argues that BN's alternative explanations — large learning rates (Bjorck et al. 2018), a
smoother landscape (Santurkar et al. 2018) — can be had without an accuracy gain, while a
normalization with every property of BN except the reduction of ICS performs poorly. It measures
ICS as Santurkar et al. do (Def. 2.1: the change of layer i's weight gradient when only the layers
before i take their update, on the same batch). Santurkar et al. read the same measurements the
other way: BN does not reduce that ICS, noisy BN trains like BN, a smoother landscape tracks BN's
benefit.

The grid: one ResNet (CIFAR stem) with each norm of ARMS (the ICS-free scheme is
bnlib.ics_free.IcsFreeBatchNorm2d, bnlib's: P3 publishes none) × each arm's own ladder of
learning rates (LR_LADDERS; its largest stable rate is read off it, censored at the ends) × seeds.
Every run records the `ics` and `landscape` probes at one step size for every arm (PROBE_LR: both
grow with the step, so at each arm's own rate they would rank learning rates). The verdicts:
Spearman rank correlations across arms of accuracy with ICS, β-smoothness and the largest stable
rate (bootstrap over arms and seeds), and two paired tests (ICS-free vs BN, noisy BN vs BN).

bnlib's choices (the paper publishes no code or recipe): a run's ICS is the mean over its probed
layers and times after init of the relative ℓ2 ‖G − G'‖/‖G‖ (arms differ in gradient scale by
orders of magnitude); its smoothness the median over those times of the effective β-smoothness;
SGD momentum 0.9, weight decay 5e-4 on conv/linear weights, cosine schedule.
"""
from __future__ import annotations

import pandas as pd

import bnlib.stats as stats
from ..ladder_file import ladders
from .base import Preset, Study, register_study
from .p4 import largest_stable_lr  # P4's definition of a stable rate, shared, not restated
# re-exported: the notebook and the tests use them as p3.<name>
from .p3_tables import (CHANCE, METRIC, _one_value, accuracy, arm_table, correlations, counted,  # noqa: F401
                        per_run, probe_summary, selected)

ARMS = ["bn", "bn_minus", "affine", "none", "noisy_bn", "ics_free", "group_norm", "layer_norm", "batch_renorm",
        "ghost_bn"]
PROBES = ["ics", "landscape"]
SIMILAR = 0.02  # "trains nearly like BN" (bnlib's operationalization): within 2 accuracy points
# ResNet-18's 20 convs (bnlib.models.conv_layers): one in each stage (each stage's first block's
# second conv, whose input also depends on its own block's first conv) and the last one
ICS_LAYERS = [2, 6, 11, 16, 19]
QUICK_ICS_LAYERS = [6, 16]  # quick preset: one conv in stage 2 and one in stage 4 (probe cost)
# One step size for every arm's probes, both presets: ICS and β-smoothness grow with the step, so
# measured at each arm's own rate (0.04 ... 0.32) the correlations across arms would rank learning
# rates. 0.04: below every rate at which an arm diverged in the runs behind the quick
# ladders (docs/presets.md), inside every paper ladder, and the ICS-free arm's best rate.
PROBE_LR = 0.04
QUICK_LANDSCAPE_ETAS = [0.5 * PROBE_LR, 2 * PROBE_LR]  # Santurkar's η ∈ [0.5, 4]·lr, 2 points (probe cost)
PAPER_LANDSCAPE_ETAS = [k * PROBE_LR for k in (0.5, 1.0, 2.0, 4.0)]
# Each arm's learning-rate ladder (the lr itself at the preset's batch size; the grid axis
# `lr_rung` indexes it), as P1 does: one shared sweep put some arm's optimum off its end. The
# quick ladders (3 rungs, ×4 apart) are centred on each arm's best rate in a validation-only sweep
# with seeds and a data seed of its own (bnlib/studies/ladders/p3.json; `python scripts/ladders.py
# p3` regenerates it); the paper's are a priori grids. lr* (claim 3) is read off these ladders.
LR_LADDERS = {
    "quick": ladders("p3", "quick"),
    "paper": {**{a: (0.01, 0.03, 0.1, 0.3, 1.0) for a in ARMS},
              "affine": (0.001, 0.003, 0.01, 0.03, 0.1), "none": (0.001, 0.003, 0.01, 0.03, 0.1),
              "ics_free": (0.003, 0.01, 0.03, 0.1, 0.3)},
}
# The quick preset's recipe, the same for every arm (recorded in every run's config): SkipInit
# (De & Smith 2020: a learnable α = 0 at the end of each residual branch) and a half-epoch linear
# warm-up. Without it the unnormalized He-init ResNet-18 collapses to a constant output in its
# first steps, so none and affine stay at chance (docs/presets.md). bnlib's choice, not P3's.
QUICK_RECIPE = dict(residual_gain=True, alpha0=0.0, warmup_epochs=0.5)
CENSORED_MAX = 0.5  # lr* verdict: inconclusive when more than this share of arms has a censored lr*


# What each preset can and cannot show (printed by the notebook next to the verdicts).
PRESET_NOTES = {
    "quick": "quick preset: Fashion-MNIST (real images), ResNet18 (CIFAR stem) at width 1/8, a 2 048-image training "
             "set, 2 epochs at batch 64 (64 steps), 3 matched seeds; every arm with the same recipe, SkipInit (α = 0 "
             "at the end of each residual branch) and a half-epoch linear warm-up (QUICK_RECIPE: without it none "
             "and affine stay at chance); each arm on its own 3-rung ladder from a validation sweep on other seeds "
             "(LR_LADDERS; a choice at a ladder's end makes a claim inconclusive); 90 runs; ICS on 2 of the 20 "
             "convs and the landscape at 2 step sizes, every arm at one step (PROBE_LR = 0.04; η = 0.02, 0.08), "
             "on a 128-image probe batch, at init and each epoch end. It can show whether the arms differ in ICS "
             "and smoothness at one step along 64 steps, and BN's ICS against the ICS-free scheme's. Every "
             "claim about accuracy is inconclusive (budget): 64 steps are under a tenth of the paper preset's; its "
             "statistics at this budget are in the sentence. It cannot show CIFAR-10 numbers or P3's own networks "
             "(no SkipInit). With 10 arms and 3 seeds a rank correlation's interval is wide.",
    "paper": "paper preset: CIFAR-10, ResNet18 (CIFAR stem) at full width, 60 epochs (21 060 steps), 5 learning rates "
             "per arm (LR_LADDERS), 5 seeds (3 leave its paired claims below 50% power: docs/calibration.md), "
             "ICS and landscape every 200 steps at one common step for every arm (PROBE_LR; bnlib's protocol: "
             "the paper publishes none).",
}


def _ladder_derive(ladders: dict):
    def derive(point: dict) -> dict:
        out = {"lr": ladders[point["norm"]][point.pop("lr_rung")]} if "lr_rung" in point else {}
        return {**out, **_derive(point)}
    return derive


def _ladder_preset(base: dict, ladders: dict, seeds: list) -> Preset:
    """Every arm × every rung of its own ladder (any length; one sub-grid per ladder length) × seeds."""
    lengths = sorted({len(ladders[a]) for a in ARMS})
    subgrids = tuple({"norm": [a for a in ARMS if len(ladders[a]) == n], "lr_rung": list(range(n))} for n in lengths)
    return Preset(base=base, grid=dict(norm=ARMS, lr_rung=list(range(max(lengths))), seed=list(seeds)),
                  subgrids=subgrids if len(lengths) > 1 else (), derive=_ladder_derive(ladders), ladders=ladders)


def _derive(point: dict) -> dict:
    # ghost BN: 4 virtual batches per step (Hoffer et al. 2017 split large batches into small ones);
    # the option only exists for its own arm, so the other arms' runs stay what they are
    return {"ghost_batch_size": point["batch_size"] // 4} if point["norm"] == "ghost_bn" else {}


# ----------------------------------------------------------------------------------------------
# verdicts
# ----------------------------------------------------------------------------------------------

def _one_step(rows: pd.DataFrame, measure: str, key: str, param: str) -> tuple[bool, str, str]:
    """Guard: every run a claim compares measured `measure` at one step size (column `key`)."""
    v = rows.loc[rows[measure].notna(), key] if {measure, key} <= set(rows) else pd.Series(dtype=object)
    known = v[v.notna() & v.astype(str).ne("")]
    vals = sorted({f"{x:g}" if isinstance(x, float) else str(x) for x in known}) or ["not recorded"]
    vary = "" if len(known) == len(v) else ", or varying over training"
    return (len(v) > 0 and len(known) == len(v) and len(vals) == 1,
            f"{measure} is not measured at one step size for every compared run (steps: {', '.join(vals)}{vary}); "
            f"set {param} to one value for every arm, else this compares learning rates, not norms", "step size")


def verdicts(runs) -> list[stats.Verdict]:
    """P3's claims, and Santurkar et al.'s counter-claims, decided from the runs (a bnlib.Runs
    with its probes table), every arm at its own learning rate chosen on validation, its ICS and
    β-smoothness measured at one step size common to every arm (probe_ics_lr,
    probe_landscape_etas: PROBE_LR) on its own trajectory (the runs at its chosen rate):

    0. reference: BN learns (beats chance) and beats no normalization (paired over seeds) — the
       arms differ, so there is something to explain;
    1. P3: across arms, less ICS goes with higher accuracy — Spearman ρ(ICS, accuracy) < 0;
    2. Santurkar: β-smoothness tracks accuracy better than ICS does — −ρ(β, acc) − (−ρ(ICS, acc))
       > 0 (each measure in the direction its side predicts; same bootstrap resamples);
    3. Santurkar / P4: the largest stable learning rate tracks accuracy better than ICS does —
       ρ(lr*, acc) − (−ρ(ICS, acc)) > 0;
    4. P3: the ICS-free scheme, which has more ICS than BN, is less accurate than BN (both parts
       paired over seeds: the manipulation check on ICS at the common step, then accuracy);
    5. Santurkar: noisy BN trains nearly like BN (|accuracy difference| < SIMILAR, equivalence).
    The rank correlations' intervals resample arms and seeds (bnlib.stats.rank_correlation); a
    correlation needs stats.MIN_RANKED arms. Rules of bnlib.stats: a claim is inconclusive
    (ladder edge) when an arm it compares has its rate at an end of its ladder, and every claim
    about accuracy (0, 1-3, 4's accuracy part, 5) is inconclusive (budget) on runs shorter than
    a tenth of PAPER_STEPS, its statistics at this budget kept in the sentence; the ICS
    manipulation check is about ICS during training, not long-run accuracy, and has no budget.
    A correlation is inconclusive (step size) unless its measures share one step across the runs.

    Claims 1-3 rank arms that train: an arm that does not beat chance at its chosen rate
    (stats.beats_chance: above CHANCE + 0.05, one-sided t-test) makes them inconclusive, named;
    with arms at chance the ranks of accuracy sort learners from non-learners, so ρ would
    measure whatever separates the two groups, not ICS or smoothness. An arm that diverged in
    every run (every rate, every seed) is a result, not a block: it is left out of the ranks (of
    accuracy, ICS, β, lr* and claim 3's censoring count) and named. At chance accuracy it would
    rank last whatever its ICS, and its probes were taken on a run heading for divergence (β
    infinite), bringing back the learns-vs-not contrast; its result is read in claim 4 (the
    ICS-free scheme's own guard) and the run table.
    """
    r = runs.runs if hasattr(runs, "runs") else runs
    if r.empty or "norm" not in r or not {"bn", "none"} <= set(r["norm"]):
        return [stats.Verdict("p3", "Less ICS goes with higher accuracy across arms", "inconclusive",
                              "Less ICS goes with higher accuracy across arms: INCONCLUSIVE — needs finished runs "
                              "of bn and none.", [], ["no runs of bn and none"], ["no runs"], "ρ(ICS, acc) < 0")]
    runs_all = per_run(runs)  # every finished run, once: the selection, the all-diverged arms, the ICS check
    sel = stats.at_selected_lr(runs_all, ["norm"])  # as selected(runs)
    choice = stats.select_lr(runs_all, ["norm"])
    budget = stats.Budget.of_runs(runs_all, PAPER_STEPS)

    def edge(arms):
        return stats.edge_guard(choice, "norm", arms)

    have = set(sel["norm"])
    bn_ok, bn_why = stats.beats_chance(sel.loc[sel["norm"] == "bn", "acc"], CHANCE)
    bn_learns = (bn_ok, f"the BN arm does not clearly learn ({bn_why})")
    e0 = stats.paired_effect(sel, "norm", "bn", "none", "acc", ["seed"], alternative="greater")
    out = [stats.decide("p3", "Reference: BN learns and beats no normalization (each at its validated rate)", e0,
                        guards=[bn_learns, edge(["bn", "none"])], what="test accuracy difference", budget=budget,
                        short="BN > none")]
    # do the arms differ in these runs (the correlations' guard)? The same test at this budget,
    # without the edge guard: each claim applies that to the arms it compares
    differ = stats.decide("p3", "", e0, guards=[bn_learns]).outcome == "supported"
    learn = [bn_learns, (differ, "BN does not clearly beat no normalization here, so the arms may not differ "
                                 "enough to rank", "no BN gain")]
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
    corr_guards = learn + [(not at_chance, f"{len(at_chance)} arm(s) do not beat chance at their chosen rate: "
                                           f"{'; '.join(at_chance)} — a correlation across arms would then rank "
                                           f"learning against not learning, not ICS or smoothness", "arm at chance"),
                           edge(sorted(set(ranked["norm"])))]
    ics_step = _one_step(ranked, "ics", "ics_step", "probe_ics_lr")
    if "ics" not in sel or sel["ics"].isna().all():
        out.append(stats.Verdict("p3", "P3: across arms, less ICS goes with higher accuracy", "inconclusive",
                                 "P3: across arms, less ICS goes with higher accuracy: INCONCLUSIVE — no ics probe "
                                 "rows in these runs.", [], ["no probe rows"], ["no probe rows"], "ρ(ICS, acc) < 0"))
        return out
    signed = "difference of rank correlations with accuracy, each signed as its side predicts" + left_out
    e1 = stats.rank_correlation(ranked, "ics", "acc", unit="norm", replicate="seed", alternative="less")
    out.append(stats.decide("p3", "P3: across arms, less ICS goes with higher accuracy", e1, direction="less",
                            guards=corr_guards + [ics_step], budget=budget, short="ρ(ICS, acc) < 0",
                            what="rank correlation of relative ℓ2 ICS with test accuracy over arms (n = arms"
                                 + left_out + ")"))
    e2 = stats.rank_correlation_difference(ranked, "beta", "ics", "acc", unit="norm", replicate="seed",
                                           sign_a=-1, sign_b=-1)
    out.append(stats.decide("p3", "Santurkar: β-smoothness tracks accuracy better than ICS does", e2,
                            guards=corr_guards + [ics_step, _one_step(ranked, "beta", "etas", "probe_landscape_etas")],
                            budget=budget, short="β tracks acc better than ICS", what=signed))
    e3 = stats.rank_correlation_difference(ranked, "lr_star", "ics", "acc", unit="norm", replicate="seed",
                                           sign_a=1, sign_b=-1)
    # lr* is censored for an arm stable at the top of its ladder in some seed (a lower bound) or
    # diverged at its lowest rate (an upper bound, lr* NaN): ranks of censored values are not ranks
    ls = largest_stable_lr(r)
    ls = ls[~ls["norm"].isin(all_div)]
    cens = ls.assign(c=ls["at_top"].fillna(False).astype(bool) | ls["lr_star"].isna()).groupby("norm")["c"].any()
    n_cens, n_ls = int(cens.sum()), int(cens.size)
    v3 = stats.decide("p3", "Santurkar / P4: the largest stable learning rate tracks accuracy better than ICS does",
                      e3, guards=corr_guards + [ics_step, (n_cens <= CENSORED_MAX * n_ls,
                                                           f"{n_cens} of {n_ls} arms have a censored largest stable "
                                                           f"rate (stable at the top of their ladder, or diverged at "
                                                           f"its bottom: {', '.join(sorted(cens[cens].index))}), so "
                                                           f"their lr* are bounds, not values to rank", "lr* censored")],
                      budget=budget, short="lr* tracks acc better than ICS", what=signed)
    if 0 < n_cens <= CENSORED_MAX * n_ls:
        v3.sentence += (f" Caveat: {n_cens} arm(s) have a censored largest stable rate (a bound, tied at the "
                        f"end of their ladder).")
    out.append(v3)
    if "ics_free" in have:
        fr = sel.loc[sel["norm"] == "ics_free", "stable"]
        trains = (bool(fr.mean() >= 0.5),
                  f"the ICS-free scheme diverged in {int((~fr).sum())} of {len(fr)} seeds at its chosen rate "
                  f"(bnlib.ics_free.IcsFreeBatchNorm2d), so its accuracy measures that instability, not the "
                  f"absence of ICS reduction", "diverged")
        # The manipulation check: each arm on its own trajectory (its chosen rate), its ICS measured
        # at the common step (ICS grows with the step: at their own rates BN at 0.32 and the ICS-free
        # arm at 0.04 would compare step sizes, not normalizations)
        pair = sel[sel["norm"].isin(["bn", "ics_free"])]
        m = stats.paired_effect(pair, "norm", "ics_free", "bn", "ics", ["seed"], alternative="greater")
        step = _one_step(pair, "ics", "ics_step", "probe_ics_lr")
        at = f" (both at step {pair.loc[pair['ics'].notna(), 'ics_step'].iloc[0]:g})" if step[0] else ""
        check = stats.decide("p3", f"the ICS-free scheme has more ICS than BN{at}", m,
                             guards=[bn_learns, step, edge(["bn", "ics_free"])], short="ICS-free has more ICS",
                             what="relative ℓ2 ICS difference at one step size, each on its own trajectory")
        a = stats.paired_effect(sel, "norm", "bn", "ics_free", "acc", ["seed"], alternative="greater")
        parts = [check,
                 stats.decide("p3", "BN is more accurate than the ICS-free scheme", a,
                              guards=[bn_learns, trains, edge(["bn", "ics_free"])], budget=budget,
                              short="BN > ICS-free (acc)", what="test accuracy difference, each at its validated rate")]
        out.append(stats.all_of("p3", "P3: the ICS-free scheme (BN without ICS reduction) is less accurate than BN",
                                parts, short="ICS-free < BN (acc)"))
    if "noisy_bn" in have:
        e5 = stats.paired_effect(sel, "norm", "noisy_bn", "bn", "acc", ["seed"], alternative="two-sided")
        out.append(stats.decide_margin("p3", f"Santurkar: noisy BN trains nearly like BN (|difference| < {SIMILAR:g})",
                                       e5, SIMILAR, guards=[bn_learns, edge(["bn", "noisy_bn"])], budget=budget,
                                       short=f"noisy BN ≈ BN (±{SIMILAR:g})", what="test accuracy difference"))
    return out


STUDY = register_study(Study(
    name="p3",
    title="P3 · does internal covariate shift matter? (Awais et al. 2021)",
    notebook="studies/p3_ics.ipynb",
    doc="bn / bn_minus / affine / none / noisy_bn / ics_free / group_norm / layer_norm / batch_renorm / ghost_bn "
        "on one ResNet, each arm over its own learning-rate ladder, with Santurkar et al.'s ICS and landscape probes "
        "at one step size for every arm; verdict: across arms, does less ICS go with higher accuracy, or do "
        "smoothness and the largest stable learning rate track it better?",
    derive=_derive,
    verdicts=verdicts,
    presets={
        # Fashion-MNIST, ResNet18 at width 1/8 on 2 048 training images for 2 epochs at batch 64
        # (64 steps), no crop (it slows a 2-epoch run more than it regularizes), SkipInit and a
        # half-epoch warm-up for every arm (QUICK_RECIPE), each arm on its own ladder. ICS on 2 of
        # the 20 convs and the landscape at 2 step sizes: about 6 fp32 forward-backward passes per
        # probe time (noisy BN: 8), at init and each epoch end.
        "quick": _ladder_preset(
            dict(dataset="fashion_mnist", n_train=2048, val_fraction=0.02, n_test=1000, arch="resnet18", width=0.125,
                 epochs=2, batch_size=64, momentum=0.9, weight_decay=5e-4, schedule="cosine", crop_pad=0, log_every=4,
                 eval_batch_size=500, bn_eval_stats="precise", precise_batches=4, probes=PROBES, probe_batch_size=128,
                 probe_ics_layers=QUICK_ICS_LAYERS, probe_ics_lr=PROBE_LR, probe_landscape_etas=QUICK_LANDSCAPE_ETAS,
                 **QUICK_RECIPE),
            LR_LADDERS["quick"], seeds=[0, 1, 2]),
        "paper": _ladder_preset(
            dict(dataset="cifar10", arch="resnet18", width=1.0, epochs=60, batch_size=128, momentum=0.9,
                 weight_decay=5e-4, schedule="cosine", n_train=None, n_test=None, probes=PROBES, probe_every=200,
                 probe_ics_layers=ICS_LAYERS, probe_ics_lr=PROBE_LR, probe_landscape_etas=PAPER_LANDSCAPE_ETAS),
            LR_LADDERS["paper"], seeds=[0, 1, 2, 3, 4]),
    },
))

# The paper publishes no protocol (no code or recipe); its stand-in is bnlib's paper preset, 60
# CIFAR-10 epochs at batch 128 (the budget rule's reference for every claim about accuracy).
PAPER_STEPS = stats.run_steps(pd.DataFrame(STUDY.points("paper")))

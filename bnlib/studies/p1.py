"""P1 — Peerthum & Stamp 2023, "An Empirical Analysis of the Shift and Scale Parameters in
BatchNorm": the grid and the verdicts, together.

The paper compares four arms that are the same ResNet except for the norm layer — BatchNorm
(`bn`), BatchNorm-minus (`bn_minus`: normalization, no γ/β), AffineLayer (`affine`: learned
γ/β, no statistics) and no normalization (`none`) — over ResNet18/34/50/101 and several batch
sizes, and concludes that BN's success "may derive primarily from improved weight
initialization". bnlib adds the arm that tests that sentence directly, `affine_bn_init`: an
AffineLayer whose γ, β are set once from one training batch's statistics so that at step 0 the
net computes what BN computes (bnlib.bnstats.init_from_batch), then trained with no statistics.

bnlib's choices (the paper publishes no recipe or numbers): SGD momentum 0.9, weight decay
5e-4 on conv/linear weights only, cosine schedule, lr = base_lr · B/128 with base_lr on a log
ladder per arm (LR_LADDERS), the learning rate of each (arm, depth, batch size) chosen by mean validation
accuracy over seeds (bnlib.stats.select_lr); test accuracy is reported at that choice.

Replication: each (depth, batch size) cell has seeds of its own (the grid axis `replicate`,
turned into the run's seed by bnlib.studies.base.cell_seed), so that the cells are independent
replicates and enter the statistics as strata; within a cell the arms share each seed (paired).
"""
from __future__ import annotations

import math

import pandas as pd

import bnlib.stats as stats
from ..ladder_file import ladders
from .base import Preset, Study, cell_seed, register_study

ARMS = ["bn", "bn_minus", "affine", "affine_bn_init", "none"]
CELL = ["arch", "batch_size"]  # a grid cell; seeds are matched within it
PAIR = [*CELL, "seed"]  # the unit of a paired comparison (a seed belongs to one cell: cell_seed)
METRIC = "test_acc_at_best_val"


# What each preset can and cannot show (printed by the notebook next to the verdicts).
PRESET_NOTES = {
    "quick": "quick preset: Fashion-MNIST (real images), ResNet18 at width 1/8, a 4 000-image training set, "
             "2 epochs (about 190 SGD steps), batch sizes 32 and 64, 3 learning rates per arm, 3 seeds per batch "
             "size (6 independent replicates in 2 cells, arms paired within each). It can show the arms' ranking "
             "and how much of BN's gain each recovers after ~190 steps, with intervals. It cannot decide P1's "
             "claim, which is about the accuracy of fully trained networks: every accuracy verdict is "
             "'inconclusive (budget)' with its statistics at this budget beside it. Nor can it show the depth "
             "trend (one depth) or CIFAR-10 numbers: run --preset paper for those.",
    "paper": "paper preset: CIFAR-10, ResNet18/34/50/101 at full width, batch sizes 16-256, 100 epochs, 4 learning "
             "rates per arm, 3 seeds per (depth, batch size) cell (bnlib's protocol: the paper publishes none).",
}


# Each arm's learning-rate ladder (base_lr at batch 128, ×4 per rung): the grid axis `lr_rung`
# indexes it. Normalized arms train at larger rates than unnormalized ones (P4), so one shared
# grid would put some arm's optimum off its end. The quick ladders are centred on each arm's best
# rate in a validation-only sweep with seeds and a data seed of its own (bnlib/studies/ladders/
# p1.json records it; `python scripts/ladders.py p1` regenerates it); the paper's are a priori
# log grids (no GPU run has chosen them). bnlib's choice, not the paper's.
LR_LADDERS = {
    "quick": ladders("p1", "quick"),
    "paper": {"bn": (0.025, 0.05, 0.1, 0.2), "bn_minus": (0.025, 0.05, 0.1, 0.2),
              "affine_bn_init": (0.0125, 0.025, 0.05, 0.1), "affine": (0.003, 0.01, 0.03, 0.1),
              "none": (0.003, 0.01, 0.03, 0.1)},
}


def _lr_from_ladder(ladders: dict):
    def derive(point: dict) -> dict:
        # linear scaling rule (Goyal et al. 2017): lr = base_lr · B / 128 (bnlib's choice for P1)
        base = ladders.get(point["norm"], ladders["bn"])[point.pop("lr_rung")]
        out = {"lr": round(base * point["batch_size"] / 128, 8)}
        if "replicate" in point:  # each cell its own seeds: cells are independent replicates
            out["seed"] = cell_seed({k: point[k] for k in CELL}, point.pop("replicate"))
        return out
    return derive


def _lr_scaled_with_batch(point: dict) -> dict:
    """lr = base_lr · B/128 for a grid that gives `base_lr` itself (custom P1-style studies)."""
    return {"lr": round(point.pop("base_lr") * point["batch_size"] / 128, 8)}


def selected(runs: pd.DataFrame) -> pd.DataFrame:
    """P1's runs at each (arm, depth, batch size)'s learning rate chosen on validation."""
    fin = runs[runs["status"].isin(["completed", "diverged"])]
    return stats.at_selected_lr(fin, ["norm", *CELL])


def arms_of(runs: pd.DataFrame) -> list[str]:
    """P1's arms, then any arm a user added (bnlib.arms: `--arms +my_norm`), in name order."""
    return [*ARMS, *sorted(set(runs["norm"]) - set(ARMS))] if "norm" in runs else list(ARMS)


def recovered(sel: pd.DataFrame) -> pd.DataFrame:
    """For each arm: the share of BN's gain over `none` it recovers, with a bootstrap interval
    over replicates (stats.ratio_interval), and its mean accuracy at its chosen lr."""
    rows = []
    for arm in arms_of(sel):
        if arm not in set(sel["norm"]):
            continue
        sh = (stats.ratio_interval(sel, "norm", arm, "bn", "none", METRIC, PAIR)
              if {"bn", "none"} <= set(sel["norm"]) else stats.Share(math.nan, math.nan, math.nan, "no bn/none runs"))
        acc = sel.loc[sel["norm"] == arm, METRIC]
        rows.append({"norm": arm, "mean_acc": acc.mean(), "std_acc": acc.std(), "runs": len(acc),
                     "share_of_bn_gain": sh.point, "share_ci_low": sh.lo, "share_ci_high": sh.hi,
                     "share_note": sh.why})
    return pd.DataFrame(rows)


def verdicts(runs) -> list[stats.Verdict]:
    """P1's claims decided from the runs (a bnlib.Runs or its `runs` table):

    0. BN beats no normalization, each at its own validated learning rate (the reference: if it
       fails, nothing below can be attributed);
    1. P1's claim — BN's gain derives primarily from initialization: `affine_bn_init` recovers
       more than half of BN's gain over `none` (contrast affine_bn_init − none − ½(bn − none) > 0);
    2. the normalization step alone (`bn_minus`) keeps more than half of BN's gain;
    3. the learned shift and scale alone (`affine`) keep more than half of BN's gain.
    "More than half" is bnlib's operationalization of "primarily": the paper gives no number.
    Every claim is about the accuracy of trained networks: on runs shorter than a tenth of the
    paper preset's steps it is inconclusive (budget), its statistics at this budget kept. A claim
    is inconclusive too when an arm it compares has its rate at an end of its ladder.
    """
    r = runs.runs if hasattr(runs, "runs") else runs
    if r.empty or "norm" not in r:
        return [stats.Verdict("p1", "BN beats no normalization", "inconclusive", "no finished P1 runs.",
                              reasons=["no runs"], short="BN > none")]
    fin = r[r["status"].isin(["completed", "diverged"])]
    sel = selected(r)
    choice = stats.select_lr(fin, ["norm", *CELL])
    budget = stats.Budget.of_runs(fin, PAPER_STEPS)

    def edge(*arms):
        return stats.edge_guard(choice, "norm", arms, cells=["batch_size"])

    chance = 1.0 / 10
    have = set(sel["norm"])
    bn_ok, bn_why = stats.beats_chance(sel.loc[sel["norm"] == "bn", METRIC], chance)
    out = []
    if not {"bn", "none"} <= have:
        return [stats.Verdict("p1", "BN beats no normalization", "inconclusive",
                              f"needs runs of bn and none; have {sorted(have)}.", reasons=["no bn/none runs"],
                              short="BN > none")]
    e0 = stats.paired_effect(sel, "norm", "bn", "none", METRIC, PAIR, alternative="greater")
    v0 = stats.decide("p1", "BN beats no normalization (each arm at its own validated learning rate)", e0,
                      guards=[(bn_ok, f"the BN arm does not clearly learn ({bn_why})"), edge("bn", "none")],
                      what="test accuracy difference", budget=budget, short="BN > none")
    out.append(v0)
    # a BN gain to attribute: BN > none at this budget without its ladder-edge guard (each share
    # claim applies the edge guard to its own arms; "no BN gain" should mean no gain)
    gain = stats.decide("p1", "", e0, guards=[(bn_ok, bn_why)]).outcome == "supported"
    ref_guards = [(bn_ok, f"the BN arm does not clearly learn ({bn_why})"),
                  (gain, "BN does not beat no normalization significantly here, so there is no BN gain to attribute",
                   "no BN gain")]
    claims = {"affine_bn_init": ("P1's claim: BN's gain derives primarily from initialization (an AffineLayer "
                                 "initialized from batch statistics recovers more than half of it)",
                                 "BN-init affine keeps > ½ BN gain"),
              "bn_minus": ("The normalization step alone (BatchNorm-minus) keeps more than half of BN's gain",
                           "BN-minus keeps > ½ BN gain"),
              "affine": ("The learned shift and scale alone (AffineLayer) keep more than half of BN's gain",
                         "affine keeps > ½ BN gain")}
    for arm in arms_of(sel)[len(ARMS):]:  # an arm a user added: the same question as of P1's own arms
        claims[arm] = (f"{arm} (an added arm) keeps more than half of BN's gain", f"{arm} keeps > ½ BN gain")
    for arm, (claim, short) in claims.items():
        if arm not in have:
            continue
        e = stats.contrast_effect(sel, "norm", {arm: 1.0, "bn": -0.5, "none": -0.5}, METRIC, PAIR,
                                  name=f"{arm} − none − ½(bn − none)")
        sh = stats.ratio_interval(sel, "norm", arm, "bn", "none", METRIC, PAIR)
        v = stats.decide("p1", claim, e, guards=ref_guards + [edge(arm, "bn", "none")],
                         what=f"{sh.text()}; contrast", budget=budget, short=short)
        out.append(v)
    return out


STUDY = register_study(Study(
    name="p1",
    title="P1 · shift and scale parameters of BatchNorm (Peerthum & Stamp 2023)",
    notebook="studies/p1_ablation.ipynb",
    doc="bn / bn_minus / affine / affine_bn_init / none over ResNet depth and batch size, each arm at "
        "its own learning rate chosen on validation (lr = base_lr·B/128, base_lr on a log grid).",
    derive=_lr_scaled_with_batch,
    verdicts=verdicts,
    presets={
        # Fashion-MNIST, ResNet18 at width 1/8 on a 4 000-image training set, flip only (a
        # random crop slows a 2-epoch run down more than it regularizes): big enough that BN
        # learns well past chance in 2 epochs, small enough for the study's share of `make study`
        # (batch 16 doubles the per-step cost; batch 128 leaves BN far lower in 2 epochs). It shows the arms'
        # ranking at two batch sizes with 3 seeds each (a share of BN's gain: 71-74% power, docs/calibration.md);
        # it cannot show the depth trend (one depth) or the paper's long-run accuracies. Precise
        # BN statistics at evaluation: in a run of a few hundred steps the running statistics
        # lag the weights and would under-report every batch-statistics arm.
        "quick": Preset(
            base=dict(dataset="fashion_mnist", n_train=4000, val_fraction=0.02, n_test=1000,
                      width=0.125, arch="resnet18", epochs=2, crop_pad=0, weight_decay=5e-4, schedule="cosine",
                      log_every=5, eval_batch_size=500, bn_eval_stats="precise", precise_batches=8),
            grid=dict(norm=ARMS, batch_size=[32, 64], lr_rung=[0, 1, 2], replicate=[0, 1, 2]),
            derive=_lr_from_ladder(LR_LADDERS["quick"]), ladders=LR_LADDERS["quick"]),
        "paper": Preset(
            base=dict(dataset="cifar10", width=1.0, epochs=100, weight_decay=5e-4,
                      momentum=0.9, schedule="cosine", n_train=None, n_test=None),
            grid=dict(norm=ARMS, arch=["resnet18", "resnet34", "resnet50", "resnet101"],
                      batch_size=[16, 32, 64, 128, 256], lr_rung=[0, 1, 2, 3], replicate=[0, 1, 2]),
            derive=_lr_from_ladder(LR_LADDERS["paper"]), ladders=LR_LADDERS["paper"]),
    },
))

# The paper gives no protocol; its stand-in is bnlib's paper preset (the budget rule's reference).
PAPER_STEPS = stats.run_steps(pd.DataFrame(STUDY.points("paper")))

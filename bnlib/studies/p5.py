"""P5 — De & Smith 2020, "Batch Normalization Biases Residual Blocks Towards the Identity
Function in Deep Networks": the grid and the verdicts, together (the variants and the tables
the verdicts read are in p5_tables, re-exported here).

The paper's argument: in a pre-activation residual net with BN at the start of each residual
branch, the branch's output has unit scale while the skip path accumulates every earlier
block, Var(x_{l+1}) ≈ Var(x_l) + 1, so Var(x_l) grows like l and block l's branch is
down-weighted by ~√l: a deep BN net starts close to a shallow one, its deep blocks close to the
identity. Without normalization (He init) the variance doubles per block instead, 2^l. SkipInit
removes normalization and puts a learnable scalar α, initialized at 0, at the end of every
branch (x_{l+1} = x_l + α·f(x_l)): every block starts as the identity, and the paper reports
that this trains residual nets of 1000 layers without normalization. A second finding: BN's
larger stable learning rates pay off only at large batch sizes; at small batch sizes SkipInit
matches BN.

Three sub-experiments, one grid each (Preset.subgrids), decided from the runs:

1. signal propagation at initialization — the `signal_propagation` probe (bnlib.probes: the
   mean squares of the skip path and of the branch per block, on a fixed batch) at step 0 of
   the trainability runs below, for every variant and depth;
2. trainability vs depth — the variants (VARIANTS) on Wide-ResNets WRN-d-1 at d = 16, 100 and
   1000 (6, 48 and 498 residual blocks), each at its own learning rate chosen on validation;
3. batch size × learning rate — BN vs SkipInit on WRN-16-4 at several batch sizes, a grid of
   powers of 2 of the learning rate at each (lr = base_lr·B/128), a fixed epoch budget: the best
   learning rate and the best accuracy per batch size.

bnlib's choices (the paper publishes no code): SGD momentum 0.9, weight decay 5e-4 on conv and
linear weights only (none on α, β, γ), a cosine schedule; α has its own optimizer group at the
weights' learning rate; "α = 1/√d" uses d = the number of residual blocks of the arch
(bnlib.models.num_blocks), derived here for every grid point; the unnormalized α = 1 arm is the
plain pre-activation net (no α at all); regularized SkipInit adds zero-initialized conv biases
and dropout before the classifier (REG_FC_DROPOUT, the rate is bnlib's choice); a run is
"trainable" when it did not diverge (bnlib.train's rule) and its test accuracy beats chance.
The sub-experiments are told apart by their architecture: the depth study runs k = 1 nets
(DEPTH_K), the batch-size study WRN-16-4 (BATCH_ARCH), as in the paper.
"""
from __future__ import annotations

import pandas as pd

import bnlib.stats as stats
from ..ladder_file import ladders
from .base import Preset, Study, register_study
# re-exported: the notebook, bnlib.ladders, bnlib.calibration and the tests use them as p5.<name>
from .p5_tables import (BATCH_ARCH, CHANCE, DEPTH_K, DEPTH_VARIANTS, METRIC, REG_FC_DROPOUT,  # noqa: F401
                        VARIANTS, Variant, _selected, accuracy, annotate, batch_table, growth, signal,
                        trainability, trainability_grid, variant_of)

SIMILAR = 0.02  # "matches" (bnlib's operationalization, as in P4): |difference| < 2 points
NONINFERIOR = 0.05  # "recovers BN's trainability": SkipInit at most 5 points below BN (bnlib's choice)
MIN_SEEDS = 3  # matched seeds a paired claim needs (stats.decide's min_pairs)


# Each variant's learning rates (the grid axis `lr_rung` indexes them): normalized nets train at
# larger rates than unnormalized ones (P4), so one shared ladder would put some variant's optimum
# off its end. The quick ones come from a validation-only sweep with seeds and a data seed of its
# own (bnlib/studies/ladders/p5.json; `python scripts/ladders.py p5` regenerates it), keyed
# (variant, arch) in the depth study — one rate, the sweep's best, which the study runs without
# choosing, to afford depth 1000 — and (variant, batch size) in the batch-size study: a 3-rung
# base_lr ladder (lr = base_lr·B/128) the study chooses on. The paper's are a priori grids per
# variant. bnlib's choice.
LR_LADDERS = {
    "quick": ladders("p5", "quick"),
    "paper": {"bn": (0.025, 0.05, 0.1, 0.2), "skipinit": (0.0125, 0.025, 0.05, 0.1),
              "skipinit_inv_sqrt_d": (0.0125, 0.025, 0.05, 0.1), "none": (0.003, 0.01, 0.03, 0.1),
              "fixed_inv_sqrt2": (0.003, 0.01, 0.03, 0.1), "skipinit_reg": (0.0125, 0.025, 0.05, 0.1)},
}

# What each preset can and cannot show (the notebook prints it next to the verdicts).
PRESET_NOTES = {
    "quick": "quick preset: Fashion-MNIST (real images), short training on CPU. Depth study: WRN-16-1, -100-1 and "
             "-1000-1 at full width (16-64 channels) with a strided stem (7x7/2 conv and max-pool: the 1000-layer "
             "net's blocks run on 7x7 maps, which is what makes it trainable on 2 cores), 1 epoch of 1 024 images "
             "(16 SGD steps at batch 64), each variant at one rate per depth fixed by a validation sweep on other "
             "seeds (bnlib/studies/ladders/p5.json), 3 seeds. Batch-size study: WRN-16-4 at width 1/4, 2 epochs of "
             "2 048 images, batch sizes 16/64/256, a 3-rung ladder per variant and batch size from the same sweep, "
             "3 seeds. 99 runs. It can show the signal-propagation curves at init, which variants train at which "
             "depth after 16 steps, and the batch-size interaction at this budget, with intervals. It cannot decide "
             "the paper's claims about trained accuracy (16 of the paper preset's ~140 000 steps: every accuracy "
             "verdict is 'inconclusive (budget)' with its statistics at this budget beside it), CIFAR-10 numbers "
             "or the paper's fine learning-rate grid: run --preset paper for those (GPU).",
    "paper": "paper preset: CIFAR-10, WRN-16/100/1000-1 and WRN-16-4 at full width, 200 epochs for depth, 4 "
             "learning rates per variant and 5 seeds for depth (3 leave its paired claims below 50% power: "
             "docs/calibration.md), batch sizes 16-1024 on a grid of powers of 2 of the learning rate with 3 seeds "
             "(bnlib's protocol: the paper publishes no code).",
}


def derive(point: dict) -> dict:
    """A grid point -> run parameters: `variant` -> norm and residual-gain parameters (α0 = 1/√d
    with d = bnlib.models.num_blocks(arch)); `lr_rung` -> a rung of the variant's ladder
    (LR_LADDERS[point's `ladder`], keyed by variant, (variant, arch) or (variant, batch size));
    `base_lr` -> lr = base_lr·B/128 (the batch-size study: the grid slides with B)."""
    variant = point.pop("variant")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}; valid choices: {list(VARIANTS)}")
    out = VARIANTS[variant].params(point["arch"])
    ladder = LR_LADDERS[point.pop("ladder", "quick")]
    if "lr_rung" in point:
        rung = point.pop("lr_rung")
        if (variant, point["batch_size"]) in ladder and point["arch"] == BATCH_ARCH:  # base_lr at batch 128
            point["base_lr"] = ladder[variant, point["batch_size"]][rung]
        else:
            out["lr"] = ladder.get((variant, point["arch"]), ladder.get(variant))[rung]
    if "base_lr" in point:
        out["lr"] = round(point.pop("base_lr") * point["batch_size"] / 128, 10)
    return out


# ----------------------------------------------------------------------------------------------
# verdicts
# ----------------------------------------------------------------------------------------------

def _effect(sel: pd.DataFrame, a: str, b: str, alternative: str = "greater") -> stats.Effect:
    return stats.paired_effect(sel, "variant", a, b, "acc", ["seed"], alternative=alternative)


def verdicts(runs) -> list[stats.Verdict]:
    """P5's claims decided from the runs (a bnlib.Runs or its `runs` table), each variant at
    its own learning rate chosen on validation, paired over seeds:

    0. reference: BN trains the deepest net of the depth study (its accuracy beats chance);
    1. SkipInit recovers BN's trainability at that depth: non-inferiority, SkipInit − BN above
       −NONINFERIOR over its whole 95% interval (contradicted when wholly below);
    2. SkipInit beats the unnormalized α = 1 net and a fixed α = 1/√2 at that depth (paired,
       one-sided); whether those train at all is stated beside it from the trainability test
       (beats chance), not claimed; fixed α = 1/√2 with fewer than MIN_SEEDS seeds at that depth
       is left to the trainability table, and the sentence names it as not tested;
    3. BN's advantage over SkipInit is confined to large batch sizes: (a) at the smallest batch
       size they match (equivalence within ±SIMILAR, both learning), and (b) BN's advantage at
       the largest batch size exceeds its advantage at the smallest (interaction contrast over
       seeds).
    Claims 1-3 are about the accuracy of trained networks: on runs shorter than a tenth of the
    paper preset's steps (per sub-experiment) they are inconclusive (budget), their statistics at
    this budget kept. Where a variant's rate is chosen from a ladder, a choice at its end makes
    the claim inconclusive (ladder edge).
    """
    r = runs.runs if hasattr(runs, "runs") else runs
    if r.empty or "norm" not in r:
        return [stats.Verdict("p5", "SkipInit recovers BN's trainability at depth", "inconclusive",
                              "SkipInit recovers BN's trainability at depth: INCONCLUSIVE — no finished P5 runs.",
                              [], ["no runs"])]
    d = accuracy(r)
    out = []

    # --- trainability at the deepest depth -----------------------------------------------------
    dep = d[d["experiment"] == "depth"]
    if dep.empty or "bn" not in set(dep["variant"]):
        out.append(stats.Verdict("p5", "SkipInit recovers BN's trainability at depth", "inconclusive",
                                 "SkipInit recovers BN's trainability at depth: INCONCLUSIVE — needs depth-study runs "
                                 "of bn and skipinit.", [], ["no depth runs"]))
    else:
        deepest = int(dep["net_depth"].max())
        deep = _selected(dep[dep["net_depth"] == deepest], ["net_depth"])
        budget = stats.Budget.of_runs(dep[dep["net_depth"] == deepest], PAPER_STEPS["depth"])
        choice = stats.select_lr(dep[dep["net_depth"] == deepest].assign(
            best_val_acc=lambda t: t["best_val_acc"].astype(float)), ["variant"])
        bn_ok, bn_why = stats.beats_chance(deep.loc[deep["variant"] == "bn", "acc"], CHANCE)
        ref = [(bn_ok, f"BN does not clearly train the depth-{deepest} net ({bn_why})")]
        out.append(stats.Verdict("p5", f"BN trains the depth-{deepest} net (reference)",
                                 "supported" if bn_ok else "inconclusive",
                                 f"BN trains the depth-{deepest} net (reference): {bn_why}.", [], [] if bn_ok else [bn_why],
                                 short=f"BN learns at depth {deepest} (reference)"))
        e = _effect(deep, "skipinit", "bn", alternative="two-sided")
        out.append(stats.decide_margin(
            "p5", f"SkipInit (α₀ = 0, no normalization) recovers BN's trainability at depth {deepest}", e,
            NONINFERIOR, guards=ref + [stats.edge_guard(choice, "variant", ["skipinit", "bn"])], one_sided=True,
            what=f"test accuracy difference at each variant's validated rate; non-inferiority margin "
                 f"{NONINFERIOR:g}", budget=budget, short=f"SkipInit ≥ BN − {NONINFERIOR:g} at depth {deepest}"))
        parts, tested, table_only, does = [], [], [], []
        for other in ("none", "fixed_inv_sqrt2"):
            if other not in set(deep["variant"]):
                continue
            seeds = deep.loc[deep["variant"] == other, "seed"].nunique()
            if other != "none" and seeds < MIN_SEEDS:
                # an ablation run with fewer seeds than a paired test needs (the quick preset's
                # fixed α = 1/√2 at depth 1000): the trainability table shows it, no claim rests on it
                table_only.append(f"{VARIANTS[other].label} ({seeds} seed{'s' if seeds != 1 else ''})")
                continue
            eo = _effect(deep, "skipinit", other)
            label = VARIANTS[other].label.replace("none (α = 1)", "α = 1")
            tested.append(label)
            trains, why = stats.beats_chance(deep.loc[deep["variant"] == other, "acc"], CHANCE)
            ndiv = int(deep.loc[deep["variant"] == other, "diverged"].sum())
            does.append(f"{label} {'trains' if trains else 'does not train'} ({why}; {ndiv} diverged)")
            parts.append(stats.decide("p5", f"SkipInit beats {VARIANTS[other].label} at depth {deepest}", eo,
                                      guards=ref + [stats.edge_guard(choice, "variant", ["skipinit", other])],
                                      what="test accuracy difference (a diverged run counts as chance)", budget=budget))
        if parts:
            v2 = stats.all_of("p5", f"SkipInit beats {' and '.join(tested)} at depth {deepest}", parts,
                              short=f"SkipInit > {' / '.join(tested)} at depth {deepest}")
            v2.sentence += " Whether they train at all (not claimed): " + "; ".join(does) + "."
            if table_only:
                v2.sentence += (" Not tested (too few seeds to pair; see the trainability table): " +
                                ", ".join(table_only) + ".")
            out.append(v2)

    # --- batch size × learning rate -------------------------------------------------------------
    bat = d[(d["experiment"] == "batch") & d["variant"].isin(["bn", "skipinit"])]
    claim = "BN's advantage over SkipInit is confined to large batch sizes"
    if bat.empty or set(bat["variant"]) != {"bn", "skipinit"} or bat["batch_size"].nunique() < 2:
        out.append(stats.Verdict("p5", claim, "inconclusive", f"{claim}: INCONCLUSIVE — needs batch-size-study runs "
                                 "of bn and skipinit at two or more batch sizes.", [], ["no batch runs"]))
        return out
    sel = _selected(bat, ["batch_size"])
    small, large = int(sel["batch_size"].min()), int(sel["batch_size"].max())
    budget = stats.Budget.of_runs(bat, PAPER_STEPS["batch"])
    bchoice = stats.select_lr(bat[bat["batch_size"].isin([small, large])].assign(
        best_val_acc=lambda t: t["best_val_acc"].astype(float)), ["variant", "batch_size"])
    edge = stats.edge_guard(bchoice, "variant", ["bn", "skipinit"], cells=["batch_size"])
    sel = sel.assign(arm=sel["variant"] + "@" + sel["batch_size"].astype(int).astype(str))
    learn = {}
    for v in ("bn", "skipinit"):
        for b in (small, large):
            learn[v, b] = stats.beats_chance(sel.loc[sel["arm"] == f"{v}@{b}", "acc"], CHANCE)
    ref = [(learn["bn", b][0], f"BN does not clearly learn at batch size {b} ({learn['bn', b][1]})")
           for b in (small, large)]
    e_small = stats.paired_effect(sel, "arm", f"bn@{small}", f"skipinit@{small}", "acc", ["seed"],
                                  alternative="two-sided")
    v_small = stats.decide_margin(
        "p5", f"At batch size {small} SkipInit matches BN (|difference| < {SIMILAR:g})", e_small, SIMILAR,
        guards=ref + [(learn["skipinit", small][0], f"SkipInit does not clearly learn at batch size {small} "
                                                     f"({learn['skipinit', small][1]})"), edge],
        what="test accuracy difference at each arm's validated rate", budget=budget)
    e_int = stats.contrast_effect(sel, "arm", {f"bn@{large}": 1, f"skipinit@{large}": -1, f"bn@{small}": -1,
                                               f"skipinit@{small}": 1}, "acc", ["seed"],
                                  name=f"(bn − skipinit)@{large} − (bn − skipinit)@{small}")
    v_int = stats.decide("p5", f"BN's advantage is larger at batch size {large} than at {small}", e_int,
                         guards=ref + [edge], what="test accuracy interaction", budget=budget)
    out.append(stats.all_of("p5", claim, [v_small, v_int], short="BN's gain only at large batch"))
    return out


# ----------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------

def _depth_archs(depths) -> list[str]:
    return [f"wrn{d}_{DEPTH_K}" for d in depths]


# the quick depth study's sub-grid (without its archs)
# (full width: at width 1/4 the k = 1 nets have 4-16 channels, and SkipInit, which starts as
# stem + classifier on 4 channels, stayed near chance at every rate: 0.10-0.18 in 16 steps)
# one rate per (variant, depth), fixed by the sweep; 3 seeds (its claims are inconclusive (budget) at 16
# steps; the two more seeds it once ran cost make study two minutes)
_QUICK_DEPTH = dict(variant=DEPTH_VARIANTS, lr_rung=[0], seed=[0, 1, 2], stem=["imagenet"], width=[1.0],
                    n_train=[1024], epochs=[1], batch_size=[64], log_every=[4], probes=[["signal_propagation"]])

STUDY = register_study(Study(
    name="p5",
    title="P5 · SkipInit and BN's bias towards the identity (De & Smith 2020)",
    notebook="studies/p5_skipinit.ipynb",
    doc="Signal propagation at init (skip vs branch mean square per block), trainability of BN / SkipInit / "
        "α = 1/√d / α = 1 / fixed α = 1/√2 at depths 16, 100 and 1000, and BN vs SkipInit over batch size × "
        "learning rate, each variant at its own learning rate chosen on validation.",
    derive=derive,
    verdicts=verdicts,
    presets={
        # Depth study: the 1000-layer net is built and trained, not skipped, at full width (at
        # width 1/4, 4-16 channels, SkipInit stayed near chance: 0.18 ± 0.11 at depth 1000). The
        # strided stem brings its blocks to 7x7 maps; 1 epoch of 1 024 images (16 steps) with one
        # intra-op thread per study worker (two threads on busy cores spin). The
        # signal_propagation probe runs in every depth run (at init and at the epoch's end).
        # Batch-size study: 2 epochs of 2 048 images, so batch 256 still takes 16 steps. Precise
        # BN statistics at evaluation (running ones lag in runs this short).
        "quick": Preset(
            base=dict(dataset="fashion_mnist", val_fraction=0.01, n_test=500, width=0.25, crop_pad=0, flip=False,
                      momentum=0.9, weight_decay=5e-4, schedule="cosine", eval_batch_size=500,
                      bn_eval_stats="precise", precise_batches=4, probe_batch_size=64),
            grid=dict(seed=[0, 1, 2]),
            subgrids=(
                # 3 seeds for every variant at every depth, the deepest first (its runs cost most)
                dict(arch=_depth_archs([1000, 100, 16]), **_QUICK_DEPTH),
                # per batch size, each variant's 3-rung base_lr ladder (lr = base_lr·B/128)
                dict(arch=[BATCH_ARCH], variant=["bn", "skipinit"], batch_size=[256, 64, 16], lr_rung=[0, 1, 2],
                     n_train=[2048], epochs=[2], log_every=[4]),
            )),
        "paper": Preset(
            base=dict(dataset="cifar10", width=1.0, momentum=0.9, weight_decay=5e-4, schedule="cosine", n_train=None,
                      n_test=None, probe_batch_size=128, ladder="paper"),
            grid=dict(seed=[0, 1, 2]),
            subgrids=(
                dict(arch=_depth_archs([1000, 100, 16]), variant=DEPTH_VARIANTS + ["skipinit_reg"],
                     lr_rung=[0, 1, 2, 3], epochs=[200], batch_size=[64], checkpoint_blocks=[True],
                     probes=[["signal_propagation"]], seed=[0, 1, 2, 3, 4]),
                dict(arch=[BATCH_ARCH], variant=["bn", "skipinit", "skipinit_reg"],
                     batch_size=[16, 32, 64, 128, 256, 512, 1024], base_lr=[2.0 ** k for k in range(-7, 2)],
                     epochs=[200]),
            )),
    },
))


def _paper_steps() -> dict:
    """The budget rule's reference per sub-experiment: the paper preset's steps (the paper
    publishes no code; its depth study trains 200 epochs)."""
    pts = annotate(pd.DataFrame(STUDY.points("paper")).assign(run_id=lambda t: range(len(t)), status="completed"))
    return {exp: stats.run_steps(g) for exp, g in pts.groupby("experiment")}


PAPER_STEPS = _paper_steps()

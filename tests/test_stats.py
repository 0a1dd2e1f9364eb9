"""bnlib.stats: learning-rate selection on validation, paired effects, and verdicts on
constructed tables whose right answer is known (supported, contradicted, inconclusive)."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from bnlib import stats
from bnlib.studies import p1 as P1


def _runs(acc: dict, seeds=range(5), noise=0.01, cells=((("resnet18", 32)), ("resnet18", 128)), lr=0.1, seed=0,
          status="completed", own_seeds=False, epochs=100):
    """A P1-shaped runs table: acc[norm] = mean test accuracy; val = test (+ small noise). The
    same seeds in every cell (P1's old design), or with own_seeds each cell its own. `epochs` of
    CIFAR-10 at the paper preset's length by default, so the budget rule does not apply."""
    rng = np.random.default_rng(seed)
    rows = []
    for c, (arch, bs) in enumerate(cells):
        for s in seeds:
            s = 1000 * c + s if own_seeds else s
            shared = rng.normal(0, noise)  # a seed effect shared by every arm (what pairing removes)
            for norm, a in acc.items():
                v = a + shared + rng.normal(0, noise / 3)
                rows.append({"norm": norm, "arch": arch, "batch_size": bs, "seed": s, "lr": lr, "status": status,
                             "dataset": "cifar10", "n_train": None, "epochs": epochs,
                             "best_val_acc": v, "test_acc_at_best_val": v, "run_id": f"{norm}-{arch}-{bs}-{s}-{lr}"})
    return pd.DataFrame(rows)


def test_seeds_shared_across_cells_are_one_replicate():
    """A seed in two cells (same initial weights and data order) is one replicate: its paired
    differences are averaged over the cells and the test runs over seeds (ttest_rel on the
    per-seed means), n = 5 seeds, not 10 "pairs"."""
    r = _runs({"bn": 0.85, "none": 0.80})
    e = stats.paired_effect(r, "norm", "bn", "none", "test_acc_at_best_val", P1.PAIR, alternative="greater")
    piv = r.pivot_table(index="seed", columns="norm", values="test_acc_at_best_val")  # mean over cells
    ref = sps.ttest_rel(piv["bn"], piv["none"], alternative="greater")
    assert e.p == pytest.approx(ref.pvalue) and e.n == 5 and e.n_unit.startswith("seeds (each the mean over its 2")
    d = piv["bn"] - piv["none"]
    h = sps.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)
    assert (e.mean, e.lo, e.hi) == pytest.approx((d.mean(), d.mean() - h, d.mean() + h))


def test_independent_seeds_per_cell_are_strata():
    """Each cell with seeds of its own: n = 10 independent seeds, the cells strata: the mean of
    the cell means, the pooled within-cell variance, 10 − 2 degrees of freedom."""
    r = _runs({"bn": 0.85, "none": 0.80}, own_seeds=True, noise=0.02)
    r.loc[r.batch_size == 128, "test_acc_at_best_val"] += np.where(r.loc[r.batch_size == 128, "norm"] == "bn", 0.05, 0)
    e = stats.paired_effect(r, "norm", "bn", "none", "test_acc_at_best_val", P1.PAIR, alternative="greater")
    piv = r.pivot_table(index=["batch_size", "seed"], columns="norm", values="test_acc_at_best_val")
    d = (piv["bn"] - piv["none"]).groupby(level="batch_size")
    means, var = d.mean(), ((d.transform("mean") - (piv["bn"] - piv["none"])) ** 2).sum() / 8
    se = math.sqrt(var * (1 / 5 + 1 / 5)) / 2
    h = sps.t.ppf(0.975, 8) * se
    assert e.n == 10 and e.n_unit == "independent seeds in 2 cells"
    assert (e.mean, e.lo, e.hi) == pytest.approx((means.mean(), means.mean() - h, means.mean() + h))
    assert e.p == pytest.approx(sps.t.sf(means.mean() / se, 8))


def test_identical_differences_have_no_interval_and_decide_nothing():
    r = pd.DataFrame({"arm": ["a"] * 5 + ["b"] * 5, "seed": list(range(5)) * 2, "m": [11] * 5 + [10] * 5})
    e = stats.paired_effect(r, "arm", "a", "b", "m", ["seed"], alternative="greater")
    assert e.mean == 1 and math.isnan(e.lo) and "identical" in e.why_no_interval
    v = stats.decide("t", "a beats b", e)
    assert v.outcome == "inconclusive" and v.causes == ["no interval"] and "identical" in v.sentence


def test_paired_effect_by_hand():
    # differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3), t = 2*sqrt(3) on 2 df
    r = pd.DataFrame({"arm": ["a"] * 3 + ["b"] * 3, "seed": [0, 1, 2] * 2, "m": [11, 12, 13, 10, 10, 10]})
    e = stats.paired_effect(r, "arm", "a", "b", "m", ["seed"], alternative="greater")
    assert e.mean == pytest.approx(2.0)
    h = sps.t.ppf(0.975, 2) / math.sqrt(3)
    assert (e.lo, e.hi) == pytest.approx((2 - h, 2 + h))
    assert e.p == pytest.approx(sps.t.sf(2 * math.sqrt(3), 2))


def test_unmatched_seeds_are_not_paired():
    r = _runs({"bn": 0.85, "none": 0.80})
    e = stats.paired_effect(r[~((r.norm == "none") & (r.seed == 4))], "norm", "bn", "none", "test_acc_at_best_val",
                            P1.PAIR)
    assert e.n == 4
    e = stats.paired_effect(r[~((r.norm == "none") & (r.seed == 4) & (r.batch_size == 32))], "norm", "bn", "none",
                            "test_acc_at_best_val", P1.PAIR)
    assert e.n == 5  # seed 4 keeps its other cell

def test_select_lr_uses_validation_never_test():
    # at lr 0.1 validation is higher, at lr 0.01 test is higher: the choice must be 0.1
    a = _runs({"bn": 0.85}, lr=0.1)
    b = _runs({"bn": 0.80}, lr=0.01)
    b["test_acc_at_best_val"] = 0.99
    sel = stats.select_lr(pd.concat([a, b]), ["norm", "arch", "batch_size"])
    assert set(sel.lr) == {0.1}
    chosen = stats.at_selected_lr(pd.concat([a, b]), ["norm", "arch", "batch_size"])
    assert (chosen.test_acc_at_best_val < 0.9).all()


def test_select_lr_never_picks_a_diverging_rate_when_another_trains():
    ok = _runs({"none": 0.70}, lr=0.01)
    div = _runs({"none": 0.75}, lr=0.1)  # higher mean val, but one seed diverged
    div.loc[div.seed == 0, "status"] = "diverged"
    sel = stats.select_lr(pd.concat([ok, div]), ["norm", "arch", "batch_size"])
    assert set(sel.lr) == {0.01} and not sel.diverged_at_choice.any()
    both = pd.concat([ok.assign(status="diverged"), div])
    assert stats.select_lr(both, ["norm", "arch", "batch_size"]).diverged_at_choice.all()


def _p1(acc, **kw):
    return {v.claim.split(":")[0].split(" (")[0]: v for v in P1.verdicts(_runs(acc, **kw))}


def test_p1_supported():
    vs = P1.verdicts(_runs({"bn": 0.88, "bn_minus": 0.87, "affine": 0.60, "affine_bn_init": 0.86, "none": 0.55}))
    by = {v.claim[:30]: v.outcome for v in vs}
    assert vs[0].outcome == "supported"  # BN beats none
    init = next(v for v in vs if v.claim.startswith("P1's claim"))
    assert init.outcome == "supported" and "SUPPORTED" in init.sentence and "n = 5 seeds" in init.sentence
    assert next(v for v in vs if "AffineLayer) keep" in v.claim).outcome == "contradicted"
    assert list(by.values()).count("supported") == 3


def test_p1_contradicted():
    vs = P1.verdicts(_runs({"bn": 0.88, "bn_minus": 0.87, "affine": 0.56, "affine_bn_init": 0.57, "none": 0.55}))
    init = next(v for v in vs if v.claim.startswith("P1's claim"))
    assert init.outcome == "contradicted" and "CONTRADICTED" in init.sentence


def test_p1_inconclusive_when_the_interval_crosses_the_threshold():
    # affine_bn_init recovers half of BN's gain, with seed noise: the interval straddles "more than half"
    vs = P1.verdicts(_runs({"bn": 0.80, "bn_minus": 0.8, "affine": 0.7, "affine_bn_init": 0.70, "none": 0.60},
                           noise=0.06, seeds=range(3), cells=[("resnet18", 32)]))
    init = next(v for v in vs if v.claim.startswith("P1's claim"))
    assert init.outcome == "inconclusive" and "crosses the threshold" in init.sentence


def test_p1_inconclusive_near_chance():
    # the case the old verdict called "supported": every arm near chance, BN a hair above the others
    vs = P1.verdicts(_runs({"bn": 0.12, "bn_minus": 0.118, "affine": 0.10, "affine_bn_init": 0.10, "none": 0.10},
                           noise=0.003))
    assert all(v.outcome == "inconclusive" for v in vs)
    assert "does not clearly learn" in vs[0].sentence
    assert all("INCONCLUSIVE" in v.sentence for v in vs)


def test_p1_inconclusive_when_bn_does_not_beat_none():
    vs = P1.verdicts(_runs({"bn": 0.85, "bn_minus": 0.85, "affine": 0.85, "affine_bn_init": 0.85, "none": 0.85}))
    assert vs[0].outcome != "supported"
    assert all(v.outcome == "inconclusive" for v in vs[1:])
    assert all("no BN gain to attribute" in v.sentence for v in vs[1:])


def test_ratio_interval_covers_the_true_share():
    r = _runs({"bn": 0.90, "x": 0.75, "none": 0.60}, noise=0.01)
    sh = stats.ratio_interval(r, "norm", "x", "bn", "none", "test_acc_at_best_val", P1.PAIR)
    assert sh.lo < 0.5 < sh.hi and sh.point == pytest.approx(0.5, abs=0.05)


def test_share_is_undefined_when_a_resample_has_no_gain():
    """Dropping resamples whose reference gain is not positive would bias the interval: the
    share is then undefined, and says why."""
    # BN's gain over none per seed: +0.05, +0.04, −0.06 (mean +0.01 > 0, but a resample of the
    # third seed alone has none)
    acc = {"bn": [0.65, 0.64, 0.54], "x": [0.62, 0.62, 0.60], "none": [0.60, 0.60, 0.60]}
    r = pd.DataFrame([{"norm": k, "seed": s, "arch": "resnet18", "batch_size": 32, "test_acc_at_best_val": v[s]}
                      for k, v in acc.items() for s in range(3)])
    sh = stats.ratio_interval(r, "norm", "x", "bn", "none", "test_acc_at_best_val", P1.PAIR)
    assert sh.point == pytest.approx(0.04 / 0.03)  # x's mean gain 0.04/3 over BN's 0.03/3
    assert math.isnan(sh.lo) and math.isnan(sh.hi) and "not positive in" in sh.why and "no interval" in sh.text()


def test_budget_makes_a_long_run_claim_inconclusive_and_keeps_its_statistics():
    r = _runs({"bn": 0.88, "bn_minus": 0.87, "affine": 0.60, "affine_bn_init": 0.86, "none": 0.55}, epochs=2)
    vs = P1.verdicts(r)
    assert all(v.outcome == "inconclusive" and "budget" in v.causes for v in vs)
    init = next(v for v in vs if v.claim.startswith("P1's claim"))
    assert init.at_budget == "supported" and init.label == "inconclusive (budget)"
    assert "(supported at this budget)" in init.sentence and f"of the paper's {P1.PAPER_STEPS:,}".replace(",", " ") \
        in init.sentence


def test_a_rate_at_the_end_of_its_ladder_makes_the_claim_inconclusive():
    acc = {"bn": 0.88, "bn_minus": 0.87, "affine": 0.60, "affine_bn_init": 0.86, "none": 0.55}
    lo, mid, hi = (_runs(acc, lr=lr) for lr in (0.01, 0.1, 1.0))
    lo["best_val_acc"] -= 0.1
    hi["best_val_acc"] -= 0.1
    none_low = lo.norm == "none"
    lo.loc[none_low, "best_val_acc"] += 0.2  # none's best rate is its lowest rung
    vs = P1.verdicts(pd.concat([lo, mid, hi]))
    assert vs[0].outcome == "inconclusive" and vs[0].causes == ["ladder edge"] and "none at lr 0.01" in vs[0].sentence
    bn_minus = next(v for v in vs if v.claim.startswith("The normalization step"))
    assert "ladder edge" in bn_minus.causes


def test_verdicts_round_trip_through_json(tmp_path):
    vs = P1.verdicts(_runs({"bn": 0.88, "bn_minus": 0.87, "affine": 0.60, "affine_bn_init": 0.86, "none": 0.55}))
    stats.write_verdicts(tmp_path, "p1", vs)
    back = stats.read_verdicts(tmp_path)
    assert [v.sentence for v in back] == [v.sentence for v in vs]
    assert list(stats.verdict_table(back).outcome) == [v.outcome for v in vs]


def test_bad_outcome_is_rejected():
    with pytest.raises(ValueError, match="valid choices"):
        stats.Verdict("p1", "x", "probably", "x")


def test_p1_cells_have_seeds_of_their_own_and_arms_share_them_within_a_cell():
    """P1's grid: each (depth, batch size) cell draws its own seeds (bnlib.studies.base.cell_seed)
    so cells are independent replicates; within a cell every arm and rung runs the same seeds."""
    for preset in ("quick", "paper"):
        pts = pd.DataFrame(P1.STUDY.points(preset))
        seeds = pts.groupby(P1.CELL)["seed"].apply(frozenset)
        assert all(a.isdisjoint(b) for i, a in enumerate(seeds) for b in seeds.iloc[i + 1:])
        per_arm = pts.groupby([*P1.CELL, "norm"])["seed"].apply(frozenset).groupby(level=P1.CELL).nunique()
        n_rep = len(P1.STUDY.presets[preset].grid["replicate"])  # 3 in both
        assert (per_arm == 1).all() and (pts.groupby(P1.CELL)["seed"].nunique() == n_rep).all() and n_rep >= 2
    from bnlib.studies.base import cell_seed
    assert cell_seed({"arch": "resnet18", "batch_size": 32}, 1) == cell_seed({"batch_size": 32, "arch": "resnet18"}, 1)
    with pytest.raises(ValueError, match="replicate"):
        cell_seed({"a": 1}, 1000)

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
          status="completed"):
    """A P1-shaped runs table: acc[norm] = mean test accuracy; val = test (+ small noise)."""
    rng = np.random.default_rng(seed)
    rows = []
    for arch, bs in cells:
        for s in seeds:
            shared = rng.normal(0, noise)  # a seed effect shared by every arm (what pairing removes)
            for norm, a in acc.items():
                v = a + shared + rng.normal(0, noise / 3)
                rows.append({"norm": norm, "arch": arch, "batch_size": bs, "seed": s, "lr": lr, "status": status,
                             "best_val_acc": v, "test_acc_at_best_val": v, "run_id": f"{norm}-{arch}-{bs}-{s}-{lr}"})
    return pd.DataFrame(rows)


def test_paired_effect_is_scipy_ttest_rel():
    r = _runs({"bn": 0.85, "none": 0.80})
    e = stats.paired_effect(r, "norm", "bn", "none", "test_acc_at_best_val", P1.PAIR, alternative="greater")
    piv = r.pivot_table(index=P1.PAIR, columns="norm", values="test_acc_at_best_val")
    ref = sps.ttest_rel(piv["bn"], piv["none"], alternative="greater")
    assert e.p == pytest.approx(ref.pvalue) and e.n == 10
    d = piv["bn"] - piv["none"]
    h = sps.t.ppf(0.975, 9) * d.std(ddof=1) / math.sqrt(10)
    assert (e.mean, e.lo, e.hi) == pytest.approx((d.mean(), d.mean() - h, d.mean() + h))


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
    r = r[~((r.norm == "none") & (r.seed == 4))]
    e = stats.paired_effect(r, "norm", "bn", "none", "test_acc_at_best_val", P1.PAIR)
    assert e.n == 8


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
    assert init.outcome == "supported" and "SUPPORTED" in init.sentence and "n=10 matched pairs" in init.sentence
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
    share, lo, hi = stats.ratio_interval(r, "norm", "x", "bn", "none", "test_acc_at_best_val", P1.PAIR)
    assert lo < 0.5 < hi and share == pytest.approx(0.5, abs=0.05)


def test_verdicts_round_trip_through_json(tmp_path):
    vs = P1.verdicts(_runs({"bn": 0.88, "bn_minus": 0.87, "affine": 0.60, "affine_bn_init": 0.86, "none": 0.55}))
    stats.write_verdicts(tmp_path, "p1", vs)
    back = stats.read_verdicts(tmp_path)
    assert [v.sentence for v in back] == [v.sentence for v in vs]
    assert list(stats.verdict_table(back).outcome) == [v.outcome for v in vs]


def test_bad_outcome_is_rejected():
    with pytest.raises(ValueError, match="valid choices"):
        stats.Verdict("p1", "x", "probably", "x")


def test_identical_differences_use_a_sign_test_not_p_zero():
    # every seed's difference is exactly 2 (a discrete grid): 3 agreeing seeds are p = 0.125
    r = pd.DataFrame({"arm": ["a"] * 3 + ["b"] * 3, "seed": [0, 1, 2] * 2, "m": [3, 3, 3, 1, 1, 1]})
    e = stats.paired_effect(r, "arm", "a", "b", "m", ["seed"], alternative="greater")
    assert (e.mean, e.lo, e.hi, e.p) == (2, 2, 2, 0.125)
    v = stats.decide("t", "a beats b", e)
    assert v.outcome == "inconclusive" and "not significant" in v.sentence
    r5 = pd.DataFrame({"arm": ["a"] * 5 + ["b"] * 5, "seed": list(range(5)) * 2, "m": [3] * 5 + [1] * 5})
    assert stats.decide("t", "a beats b", stats.paired_effect(r5, "arm", "a", "b", "m", ["seed"])).outcome == "supported"

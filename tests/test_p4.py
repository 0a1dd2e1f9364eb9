"""The P4 study: its grid, and its verdicts on constructed tables whose answer is known."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import bnlib
from bnlib.studies import get_study, p4

SIZES = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0]


PAPER_LENGTH = dict(dataset="cifar10", n_train=None, epochs=120, batch_size=128)


def _runs(acc, last_stable, seeds=(0, 1, 2), s_div=None, noise=0.004, length=PAPER_LENGTH):
    """A runs table over p4.LR_SWEEP: acc(norm, lr) -> test accuracy; last_stable[norm] = the
    largest stable rate (larger ones diverge, reaching chance); s_div[norm] = the smallest step
    size whose relative loss at init exceeds 10³ (probes table). Runs of the paper preset's
    length unless `length` says otherwise (the budget rule then does not apply)."""
    rng = np.random.default_rng(0)
    rows, probes = [], []
    for norm in ("bn", "none"):
        for lr in p4.LR_SWEEP:
            for seed in seeds:
                rid = f"{norm}-{lr:g}-{seed}"
                stable = lr <= last_stable[norm]
                a = acc(norm, lr) + rng.normal(0, noise) if stable else np.nan
                rows.append({"run_id": rid, "norm": norm, "lr": lr, "seed": seed,
                             "status": "completed" if stable else "diverged", "best_val_acc": a,
                             "test_acc_at_best_val": a, **length})
                if s_div is not None and lr in p4.PAPER_LRS:
                    for s in SIZES:
                        v = 0.99 if s < s_div[norm] else (np.nan if s > 10 * s_div[norm] else 5e3)
                        probes.append({"run_id": rid, "norm": norm, "seed": seed, "lr": lr, "probe": "step_size_loss",
                                       "quantity": "rel_loss", "step": 0, "x": s, "value": v})
    return SimpleNamespace(runs=pd.DataFrame(rows), probes=pd.DataFrame(probes))


def _p4_world(norm, lr):  # the paper's picture: similar at 1e-4, only BN good at large rates
    return 0.85 if lr <= 1e-3 else (0.90 if norm == "bn" else 0.80)


def _outcomes(vs):
    return {v.claim: v.outcome for v in vs}


def test_verdicts_support_p4_when_the_runs_show_it():
    runs = _runs(_p4_world, {"bn": 1.0, "none": 3e-3}, s_div={"bn": 0.1, "none": 1e-4}, seeds=range(5))
    vs = p4.verdicts(runs)
    out = _outcomes(vs)
    assert out["The BN arm learns (reference)"] == "supported"
    assert out["BN's largest stable learning rate exceeds the unnormalized net's"] == "supported"
    assert out["BN's accuracy advantage is confined to large learning rates"] == "supported"
    assert [o for c, o in out.items() if c.startswith("Without BN one SGD step")] == ["supported"]
    factor = next(v for v in vs if "largest stable" in v.claim).sentence
    assert "333× the unnormalized net's" in factor and "lower bound" not in factor  # 1.0 / 3e-3, below the top


def test_stable_lr_lower_bound_is_said_when_bn_is_stable_at_the_top():
    runs = _runs(_p4_world, {"bn": 3.0, "none": 3e-3}, seeds=range(5))
    v = next(v for v in p4.verdicts(runs) if "largest stable" in v.claim)
    assert v.outcome == "supported" and "lower bound: BN was stable at the top of the sweep in 5 seed(s)" in v.sentence
    # three seeds that agree exactly on the sweep: the interval is the grid's resolution (each
    # lr* known to within its half-decade step), not zero width
    three = next(v for v in p4.verdicts(_runs(_p4_world, {"bn": 3.0, "none": 3e-3})) if "largest stable" in v.claim)
    e = three.effects[0]
    assert e["mean"] == pytest.approx(3.0) and e["hi"] - e["lo"] > 0.5 and three.outcome == "supported"


def test_identical_rates_on_a_coarse_grid_decide_nothing_the_grid_cannot_resolve():
    """Both arms stable up to the same rate in every seed: each lr* is known only to within its
    grid step, so the difference may lie on either side of 0: inconclusive, not contradicted."""
    v = next(v for v in p4.verdicts(_runs(_p4_world, {"bn": 3e-3, "none": 3e-3}))
             if "largest stable" in v.claim)
    assert v.outcome == "inconclusive" and v.effects[0]["lo"] < 0 < v.effects[0]["hi"]


def test_accuracy_claims_are_inconclusive_on_a_short_budget():
    quick = get_study("p4").presets["quick"].base
    short = {k: quick[k] for k in ("dataset", "n_train", "epochs", "batch_size", "val_fraction")}
    vs = {v.claim: v for v in p4.verdicts(_runs(_p4_world, {"bn": 1.0, "none": 3e-3}, seeds=range(5),
                                                 s_div={"bn": 0.1, "none": 1e-4}, length=short))}
    conf = vs["BN's accuracy advantage is confined to large learning rates"]
    assert conf.label == "inconclusive (budget)" and conf.at_budget == "supported"
    # the stable rate and the one-step divergence are not claims about long-run accuracy
    assert vs["BN's largest stable learning rate exceeds the unnormalized net's"].outcome == "supported"


def test_verdicts_contradict_when_both_arms_behave_alike():
    same = lambda norm, lr: 0.85 if lr <= 1e-3 else 0.80  # noqa: E731
    vs = _outcomes(p4.verdicts(_runs(same, {"bn": 3e-3, "none": 0.1}, noise=0.002)))
    assert vs["BN's largest stable learning rate exceeds the unnormalized net's"] == "contradicted"


def test_accuracy_gap_at_small_rate_contradicts_confinement():
    gap = lambda norm, lr: (0.90 if norm == "bn" else 0.80) if lr <= 1e-3 else (0.90 if norm == "bn" else 0.80)  # noqa
    vs = _outcomes(p4.verdicts(_runs(gap, {"bn": 1.0, "none": 0.1}, noise=0.002)))
    assert vs["BN's accuracy advantage is confined to large learning rates"] == "contradicted"


def test_inconclusive_when_the_runs_cannot_carry_it():
    # the BN arm never learns: nothing can be attributed
    chance = _runs(lambda norm, lr: 0.1, {"bn": 1.0, "none": 3e-3}, s_div={"bn": 0.1, "none": 1e-4})
    assert {v.outcome for v in p4.verdicts(chance)} == {"inconclusive"}
    # two seeds: too few matched pairs for any paired claim
    two = p4.verdicts(_runs(_p4_world, {"bn": 1.0, "none": 3e-3}, seeds=(0, 1)))
    assert {v.outcome for v in two if "reference" not in v.claim} == {"inconclusive"}
    # no probe rows: the step-size claim says so
    v = p4.verdicts(_runs(_p4_world, {"bn": 1.0, "none": 3e-3}))[-1]
    assert v.outcome == "inconclusive" and "no step_size_loss probe rows" in v.sentence
    # one arm only
    only_bn = _runs(_p4_world, {"bn": 1.0, "none": 3e-3}).runs.query("norm == 'bn'")
    assert [v.outcome for v in p4.verdicts(only_bn)] == ["inconclusive"]


def test_similar_at_small_rate_is_inconclusive_when_neither_arm_learns_there():
    slow = lambda norm, lr: 0.1 if lr <= 1e-3 else (0.90 if norm == "bn" else 0.80)  # noqa: E731
    v = next(v for v in p4.verdicts(_runs(slow, {"bn": 1.0, "none": 3e-3}))
             if v.claim == "BN's accuracy advantage is confined to large learning rates")
    assert v.outcome == "inconclusive" and "does not clearly learn at lr=0.0001" in v.sentence


def test_largest_stable_lr_stops_at_the_first_divergence():
    runs = _runs(_p4_world, {"bn": 1.0, "none": 3e-3}).runs
    runs.loc[(runs.norm == "none") & (runs.lr == 1e-3) & (runs.seed == 0), "status"] = "diverged"
    ls = p4.largest_stable_lr(runs).set_index(["norm", "seed"])
    assert ls.loc[("none", 0), "lr_star"] == 3e-4 and ls.loc[("none", 1), "lr_star"] == 3e-3
    assert ls.loc[("bn", 0), "lr_star"] == 1.0 and not ls.loc[("bn", 0), "at_top"]


def test_p4_grid_contains_the_papers_rates_and_probes_them():
    s = get_study("p4")
    for preset in ("quick", "paper"):
        pts = s.points(preset)
        assert set(p4.PAPER_LRS) <= {p["lr"] for p in pts} and {p["norm"] for p in pts} == {"bn", "none"}
        assert all(("probes" in p) == (preset == "paper" or p["lr"] == p4.PROBE_LR) for p in pts)
        assert all(p["shortcut"] == "A" for p in pts)
        bnlib.validate(pts[0])
    assert {p["arch"] for p in s.points("paper")} == {"resnet110"}
    assert {p["dataset"] for p in s.points("quick")} == {"fashion_mnist"}


@pytest.mark.parametrize("rel, expected", [([0.9, 0.99, 5e3, np.nan], 1e-4), ([0.9] * 4, 1e-3),
                                          ([np.inf] * 4, 1e-6)])
def test_divergence_step_size_reads_the_first_ratio_above_a_thousand(rel, expected):
    p = pd.DataFrame({"run_id": "r", "norm": "bn", "seed": 0, "lr": 0.1, "probe": "step_size_loss",
                      "quantity": "rel_loss", "step": 0, "x": [1e-6, 1e-5, 1e-4, 1e-3], "value": rel})
    assert p4.divergence_step_size(p).s_diverge.iloc[0] == expected


def test_p4_notebook_runs_on_a_tiny_study(tmp_path):
    """The analysis notebook end to end through papermill on a 4-run study (both arms at two of
    the paper's rates, probes at 0.1 as in the quick preset): no cell fails, the figures are
    drawn, the verdicts are written and say inconclusive (one seed cannot carry them)."""
    import json

    from bnlib.grid import run_study
    from bnlib.stats import read_verdicts
    from bnlib.studies import Preset, Study

    tiny = Study(name="p4tiny", title="P4 smoke", notebook="studies/p4_large_lr.ipynb", derive=p4._probes,
                 presets={"smoke": Preset(
                     base=dict(arch="resnet8", width=0.25, synthetic_size=300, val_fraction=0.2, n_test=60,
                               batch_size=32, epochs=2, log_every=2, shortcut="A", probe_batch_size=32),
                     grid=dict(norm=["bn", "none"], lr=[1e-4, 0.1], seed=[0]))})
    counts = run_study(tiny, "smoke", tmp_path, progress=False)
    assert counts["failed"] == 0 and counts["completed"] + counts["diverged"] == 4
    nb = json.loads((tmp_path / "studies" / "p4tiny" / "p4tiny.ipynb").read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 6
    vs = read_verdicts(tmp_path)
    assert vs and {v.outcome for v in vs if "reference" not in v.claim} == {"inconclusive"}

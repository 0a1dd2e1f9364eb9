"""Null calibration and power of every verdict that pairs or correlates runs (issue 21, item 2):
tables drawn on each study's own preset design (bnlib.calibration), every claim's effect exactly
at its threshold (≤ 7% of 1 000 tables decided: a calibrated 95% rule errs in ≤ 5%, plus the
simulation's own noise) and at twice that distance (decided the claimed way in ≥ half of 400).
The tables are decided by calibration.RULES (the verdicts' rules over arrays of tables); a test
below checks them against the studies' own verdict functions, table by table. Derandomized:
every table comes from a fixed seed. A failure here is a verdict rule or a design that decides
the claim by chance: report it, do not loosen the bound."""
import numpy as np
import pandas as pd
import pytest

from bnlib import calibration as C
from bnlib.studies import get_study

MAX_ERROR = 0.07
MIN_POWER = 0.5
# (study, preset, claim) -> why its power at twice the threshold distance is below MIN_POWER by
# design (the test then expects the low figure, and fails as a reminder once power rises)
_MARGIN = ("an absolute margin against the quick presets' spread (SIGMA): decided once runs vary less "
           "(test_margin_claims_are_decided_once_runs_vary_less)")
_SEEDS3 = "3 seeds: a t interval with 2 degrees of freedom spans ±4.3 standard errors"
_RANKS = "10 arms × 3 seeds: the bootstrap interval of a difference of two rank correlations is wide"
LOW_POWER = {
    ("p3", "quick", "beta"): _RANKS, ("p3", "paper", "lr_star"): _RANKS + " (5 seeds: 47%)",
    ("p3", "quick", "ref"): _SEEDS3 + " (paired SD ≈ 0.065)",
    ("p3", "quick", "ics_free"): _SEEDS3 + ", and both parts must hold",
    ("p3", "quick", "noisy"): _MARGIN, ("p3", "paper", "noisy"): _MARGIN,
    ("p4", "quick", "confined"): _MARGIN, ("p4", "paper", "confined"): _MARGIN,
    ("p5", "quick", "batch"): _MARGIN, ("p5", "paper", "batch"): _MARGIN, ("p5", "paper", "noninf"): _MARGIN,
    ("p5", "quick", "noninf"): _SEEDS3 + " at the deepest net, paired SD ≈ 0.1 against a distance of 0.1",
    ("p5", "quick", "beats"): _SEEDS3 + " at the deepest net, and both parts must hold",
}


def _cases():
    for study, claims in C.CLAIMS.items():
        for preset in ("quick", "paper"):
            for key in claims:
                # one worker per study and preset: the claims of one scenario share its tables
                yield pytest.param(study, preset, key, id=f"{study}-{preset}-{key}",
                                   marks=pytest.mark.xdist_group(f"calibration-{study}-{preset}"))


@pytest.mark.parametrize("study,preset", [(s, p) for s in C.CLAIMS for p in ("quick", "paper")])
def test_the_fast_rules_decide_as_the_studys_verdicts(study, preset):
    """calibration.RULES against study.verdicts on one table of every scenario: the first table
    the rules decide (the ones the error rate counts), else the first."""
    for sc in C.SCENARIOS[study]:
        n = C.NULL_TABLES if sc.kind == "null" else C.POWER_TABLES
        fast = C.outcomes(study, preset, sc.name, n)
        decided = np.flatnonzero(fast.isin(["supported", "contradicted"]).any(axis=1).to_numpy())
        t = int(decided[0]) if len(decided) else 0
        exact = C.outcomes(study, preset, sc.name, n, exact=(t,))
        assert exact.loc[t].to_dict() == fast.loc[t].to_dict(), f"{study} {preset} {sc.name!r}, table {t}"


@pytest.mark.parametrize("study,preset,key", list(_cases()))
def test_error_rate_at_the_threshold(study, preset, key):
    r = C.error_rate(study, preset, key, n_tables=C.NULL_TABLES, seed=0)
    assert r.missing == 0, f"{study} returned no verdict matching {C.CLAIMS[study][key]!r} in {r.missing:.0%} of tables"
    assert r.n >= 500
    assert r.decided <= MAX_ERROR, (f"{study} {preset} '{key}' at its threshold (scenario {r.scenario!r}): decided in "
                                    f"{r.decided:.1%} of {r.n} tables ({r.supported:.1%} supported, "
                                    f"{r.contradicted:.1%} contradicted)")


@pytest.mark.parametrize("study,preset,key", list(_cases()))
def test_power_at_twice_the_threshold_distance(study, preset, key):
    r = C.power(study, preset, key, n_tables=C.POWER_TABLES, seed=0)
    assert r.missing == 0, f"{study} returned no verdict matching {C.CLAIMS[study][key]!r} in {r.missing:.0%} of tables"
    why = LOW_POWER.get((study, preset, key))
    msg = (f"{study} {preset} '{key}' at twice the threshold distance (scenario {r.scenario!r}): supported in "
           f"{r.supported:.1%} of {r.n} tables ({r.guarded:.1%} held back by a guard)")
    if why:
        assert r.supported < MIN_POWER, msg + f"; LOW_POWER says it is low ({why}): update it"
    else:
        assert r.supported >= MIN_POWER, msg


@pytest.mark.parametrize("study,key", [(s, k) for s, keys in C.MARGIN_CLAIMS.items() for k in keys])
def test_margin_claims_are_decided_once_runs_vary_less(study, key):
    """A claim with an absolute margin (equivalence within ±0.02, non-inferiority at −0.05) has
    low power at the quick presets' spread; on the paper design it is calibrated at every spread
    and decided (power ≥ 50%) once the spread is small enough: the design can carry it."""
    t = C.margin_table("paper", [study], null_tables=C.NULL_TABLES, power_tables=C.POWER_TABLES)
    t = t[t["claim"] == key].set_index("spread")
    assert (t["error rate"] <= MAX_ERROR).all(), t
    assert t["power"].iloc[-1] >= MIN_POWER, t  # at the smallest spread of C.SPREADS
    assert t["power"].iloc[-1] > t["power"].iloc[0], t


# ----------------------------------------------------------------------------------------------
# the simulator itself (cheap: no verdicts)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("study", list(C.CLAIMS))
def test_a_table_is_the_presets_design_run_for_run(study):
    pts = pd.DataFrame(get_study(study).points("quick"))
    r = C.simulate(study, "quick", C.SCENARIOS[study][0].name, np.random.default_rng(0)).runs
    assert len(r) == len(pts) and r["run_id"].is_unique
    for col in pts.columns:  # every point parameter, as the study gives it
        assert r[col].astype(str).tolist() == pts[col].astype(str).tolist(), col
    assert set(r["status"]) <= {"completed", "diverged"}
    ok = r["status"].eq("completed")
    assert r.loc[ok, ["best_val_acc", "test_acc_at_best_val"]].notna().all().all()


def test_runs_that_share_a_seed_share_its_effects_across_cells():
    """P5's batch study runs the same seeds in every batch-size cell: BN − SkipInit of one seed
    is correlated across cells (the arm×seed effect), as one seed's initial weights are."""
    d = C.design("p5", "quick")
    batch = C.design("p5", "quick").runs["arch"].eq("wrn16_4").to_numpy()
    rng = np.random.default_rng(1)
    first = []
    for _ in range(150):
        r = C.simulate("p5", "quick", "at thresholds", rng).runs[batch].assign(arm=d.arm[batch])
        piv = r.pivot_table(index=["batch_size", "seed"], columns="arm", values="test_acc_at_best_val", aggfunc="max")
        first.append((piv["bn"] - piv["skipinit"]).unstack("batch_size").iloc[0].to_numpy())  # one seed, each cell
    c = np.corrcoef(np.array(first).T)
    assert c[np.triu_indices(len(c), 1)].min() > 0.5


def test_the_middle_rung_is_best_on_validation():
    r = C.simulate("p1", "quick", "half", np.random.default_rng(2)).runs
    d = C.design("p1", "quick")
    assert (d.best == 1).all()  # P1's quick ladders have 3 rungs
    mean = r.assign(rung=d.rung).groupby(["norm", "batch_size", "rung"])["best_val_acc"].mean().unstack("rung")
    assert (mean.idxmax(axis=1) == 1).all()


def test_bad_input_names_the_parameter_and_the_choices():
    with pytest.raises(ValueError, match=r"scenario='nope'.*valid choices"):
        C.simulate("p1", "quick", "nope", np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"claim_key='nope'.*valid choices.*init"):
        C.error_rate("p1", "quick", "nope", n_tables=2)
    with pytest.raises(ValueError, match=r"study='p9'"):
        C.simulate("p9", "quick", "half", np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"preset='huge'"):
        C.simulate("p1", "huge", "half", np.random.default_rng(0))


def test_the_readme_calibration_table_is_computed_and_rewrites_only_its_block(tmp_path, monkeypatch, capsys):
    """make readme's second half (scripts/readme_calibration.py), on few tables: one row per
    study, a figure per claim and preset, every byte outside the block kept."""
    import re
    import runpy
    import sys
    from pathlib import Path

    script = str(Path(__file__).resolve().parents[1] / "scripts" / "readme_calibration.py")
    readme = tmp_path / "README.md"
    text = "before\n<!-- calibration: from make readme -->\nold\n<!-- /calibration -->\nafter 5.0%\n"
    readme.write_text(text)
    monkeypatch.setattr(sys, "argv", [script, "--readme", str(readme), "--tables", "5"])
    runpy.run_path(script, run_name="__main__")
    assert "(5 studies, 5 null tables each)" in capsys.readouterr().out
    new = readme.read_text()
    assert new.startswith("before\n<!-- calibration: from make readme -->\n| study | quick preset")
    assert new.endswith("<!-- /calibration -->\nafter 5.0%\n") and "old" not in new
    rows = new.split("|---|---|---|\n")[1].split("\n<!--")[0].splitlines()
    assert [r.split("|")[1].strip() for r in rows] == ["P1", "P2", "P3", "P4", "P5"]
    for row, study in zip(rows, C.CLAIMS):
        for cell in row.strip("|").split("|")[1:]:  # quick, paper: a figure pair per claim
            assert len(re.findall(r"\d+\.\d% · \d+%", cell)) == len(C.CLAIMS[study])
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="readme_calibration: readme=.*needs exactly one"):
        runpy.run_path(script, run_name="__main__")
    assert readme.read_text() == "no markers\n"

"""The quick ladders are made from validation-only sweeps with seeds disjoint from the studies'
(issue 21, item 4): the picking rule on constructed sweep tables, every ladder file against the
study it is for, and a tiny real sweep end to end through bnlib.grid."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import bnlib.ladder_file as ladder_file
import bnlib.stats as stats
from bnlib.config import RunConfig
from bnlib.ladder_file import ladder_record, ladder_studies, ladders
from bnlib.ladders import (SPECS, Group, _cells, make_ladders, pick, rate_at, rungs_of, sweep,
                           sweep_table, write_ladders)
from bnlib.records import load_runs
from bnlib.studies import Preset, Study, get_study

ROOT = Path(__file__).resolve().parents[1]


def table(rows):
    """[(rate, val_acc_mean, diverged seeds)] -> a sweep table."""
    return pd.DataFrame([{"rate": r, "lr": r, "val_acc": [v], "val_acc_mean": v, "diverged": d, "runs": 1}
                         for r, v, d in rows])


# ----------------------------------------------------------------------------------------------
# the picking rule
# ----------------------------------------------------------------------------------------------

def test_a_diverged_rate_is_never_chosen_while_another_trains():
    t = table([(0.01, 0.40, 0), (0.02, 0.55, 0), (0.04, 0.90, 1), (0.08, 0.10, 2)])
    assert pick(t) == {"best": 0.02, "trained": True, "extend": 0}


def test_the_best_validation_rate_is_the_centre_of_the_ladder():
    t = table([(0.01, 0.40, 0), (0.02, 0.50, 0), (0.04, 0.70, 0), (0.08, 0.60, 0), (0.16, 0.30, 1)])
    p = pick(t)
    assert p == {"best": 0.04, "trained": True, "extend": 0}
    g3 = Group("g", select=lambda q: True, arm=lambda q: q["norm"], spans={}, anchor=0.01)
    assert rungs_of(p["best"], g3) == [0.01, 0.04, 0.16]  # best/4, best, best·4
    assert rungs_of(p["best"], Group("g", select=g3.select, arm=g3.arm, spans={}, rungs=1)) == [0.04]
    # another grid anchor: base_lr on powers of 2
    assert rungs_of(0.5, Group("g", select=g3.select, arm=g3.arm, spans={}, anchor=1.0)) == [0.125, 0.5, 2.0]


def test_ties_go_to_the_lower_rate_and_rows_may_come_in_any_order():
    t = table([(0.08, 0.60, 0), (0.02, 0.60, 0), (0.04, 0.50, 0), (0.16, 0.1, 1)])
    assert pick(t)["best"] == 0.02


@pytest.mark.parametrize("rows, best, extend", [
    ([(0.01, 0.3, 0), (0.02, 0.5, 0), (0.04, 0.6, 0)], 0.04, 1),  # best at the top: go higher
    ([(0.01, 0.7, 0), (0.02, 0.5, 0), (0.04, 0.1, 2)], 0.01, -1),  # best at the bottom: go lower
    ([(0.01, 0.3, 0), (0.02, 0.5, 0), (0.04, 0.9, 1)], 0.02, 0),  # top diverged: the best is interior
])
def test_a_best_at_an_end_of_the_sweep_asks_for_one_more_step(rows, best, extend):
    assert pick(table(rows)) == {"best": best, "trained": True, "extend": extend}


def test_a_sweep_where_every_rate_diverged_goes_lower():
    p = pick(table([(0.01, 0.3, 1), (0.02, 0.5, 2), (0.04, None, 2)]))
    assert p == {"best": 0.01, "trained": False, "extend": -1}


def test_an_empty_table_is_an_error():
    with pytest.raises(ValueError, match="empty sweep table"):
        pick(table([]))


def test_the_rule_is_the_one_the_studies_choose_by():
    """pick() on a sweep table chooses what bnlib.stats.select_lr chooses on the same runs."""
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(200):
        rates = [rate_at(0.01, k) for k in range(rng.integers(2, 7))]
        runs = pd.DataFrame([{"rate": r, "lr": r, "seed": s, "best_val_acc": round(float(rng.choice([0.3, 0.5, 0.7])), 2),
                              "status": "diverged" if rng.random() < 0.3 else "completed"}
                             for r in rates for s in (0, 1)])
        if runs.groupby("rate")["status"].apply(lambda s: s.eq("diverged").any()).all():
            continue  # every rate diverged: the sweep goes lower instead of choosing (tested above)
        want = stats.select_lr(runs.assign(arm="a"), ["arm"])["lr"].iloc[0]
        assert pick(sweep_table(runs))["best"] == want
        checked += 1
    assert checked > 50


# ----------------------------------------------------------------------------------------------
# the ladder files
# ----------------------------------------------------------------------------------------------

def _json(obj):
    return json.loads(json.dumps(obj))


def test_every_swept_study_has_its_ladder_file():
    assert {s for s, _ in SPECS} <= set(ladder_studies()), "run `make ladders` to write them"


@pytest.mark.parametrize("study", ladder_studies())
def test_a_ladder_file_names_its_script_and_its_seeds_are_disjoint_from_the_study(study):
    doc = json.loads((ladder_file.LADDER_DIR / f"{study}.json").read_text())
    assert doc["study"] == study and (ROOT / doc["script"]).is_file()
    for preset, rec in doc["presets"].items():
        assert rec["command"] == f"python {doc['script']} {study}"
        points = get_study(study).points(preset)
        assert not set(rec["seeds"]) & {p["seed"] for p in points}
        assert rec["data_seed"] not in {p.get("data_seed", RunConfig().data_seed) for p in points}
        assert ladders(study, preset)  # the loader reads it


@pytest.mark.parametrize("study", ladder_studies())
def test_a_ladder_is_what_the_rule_gives_on_its_own_sweep_for_the_preset_the_study_runs(study):
    """Each entry's rungs follow from its recorded sweep table, and its point is the one the
    study's preset has now (a preset changed since the sweep needs `python scripts/ladders.py`)."""
    for preset, rec in json.loads((ladder_file.LADDER_DIR / f"{study}.json").read_text())["presets"].items():
        groups = {g.name: g for g in SPECS[study, preset].groups}
        for g in rec["groups"]:
            spec = groups[g["name"]]
            cells = _cells(get_study(study), preset, spec, None)
            assert {(e["arm"], e["cell"]) for e in g["entries"]} == set(cells)
            for e in g["entries"]:
                t = pd.DataFrame(e["sweep"])
                assert t["runs"].eq(len(rec["seeds"])).all()
                p = pick(t)
                assert e["best"] == p["best"] and e["rungs"] == rungs_of(p["best"], spec)
                assert len(e["rungs"]) == (3 if spec.rungs == 3 else 1)
                assert e["point"] == _json(cells[e["arm"], e["cell"]]), \
                    f"{study} {e['arm']} {e['cell']}: the preset changed since the sweep; run {rec['command']}"


def test_the_loader_keys_by_arm_or_by_arm_and_cell(tmp_path, monkeypatch):
    monkeypatch.setattr(ladder_file, "LADDER_DIR", tmp_path)
    entry = {"rungs": [0.01, 0.04, 0.16], "best": 0.04, "trained": True, "best_at_end": False, "point": {},
             "sweep": []}
    rec = {"command": "python scripts/ladders.py x", "seeds": [5], "data_seed": 1, "groups": [
        {"name": "a", "unit": "lr", "cell": None, "rungs": 3, "note": "", "entries": [{**entry, "arm": "bn", "cell": None}]},
        {"name": "b", "unit": "lr", "cell": "arch", "rungs": 1, "note": "",
         "entries": [{**entry, "arm": "bn", "cell": "wrn16_1", "rungs": [0.04]}]}]}
    write_ladders("x", "quick", rec, tmp_path / "x.json")
    assert ladders("x") == {"bn": (0.01, 0.04, 0.16), ("bn", "wrn16_1"): (0.04,)}
    with pytest.raises(ValueError, match=r"preset='paper'.*valid choices: \['quick'\]"):
        ladders("x", "paper")
    with pytest.raises(ValueError, match=r"study='nope'.*valid choices: \['x'\]"):
        ladders("nope")


def test_a_study_without_a_sweep_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"study='p2'.*valid choices"):
        make_ladders("p2")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "ladders.py"), "p9"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'p9'" in r.stderr


# ----------------------------------------------------------------------------------------------
# a tiny real sweep, end to end
# ----------------------------------------------------------------------------------------------

TINY = dict(dataset="synthetic", arch="resnet8", width=0.25, synthetic_size=400, val_fraction=0.2, n_test=80,
            batch_size=32, epochs=1, log_every=2, probes=["ics"], precision="fp32")


def test_a_tiny_sweep_runs_through_the_grid_and_is_reused(tmp_path, monkeypatch, capsys):
    """2 rates, resnet8, 1 epoch on the synthetic set: the study's point at the sweep's seeds and
    data seed, one extension step where the best sits at an end, ladder from the rule, rerun free."""
    study = Study("tiny", "tiny", None, {"quick": Preset(base=TINY, grid={"norm": ["bn"], "lr": [0.1, 0.3],
                                                                         "seed": [0, 1]})})
    group = Group("arms", select=lambda p: True, arm=lambda p: p["norm"], spans={"bn": (0.05, 0.1)}, anchor=0.05)
    out = tmp_path / "out"
    rec = sweep(study, "quick", (group,), out=out, workers=1, seeds=(7,), data_seed=3, max_extend=1, progress=False)
    (e,) = rec["groups"][0]["entries"]
    t = pd.DataFrame(e["sweep"])
    assert set(t["rate"]) >= {0.05, 0.1} and len(t) == 3  # the best of 2 rates is an end: one step more
    assert e["rungs"] == rungs_of(pick(t)["best"], group) and e["point"] == {k: v for k, v in TINY.items()
                                                                                 if k != "probes"} | {"norm": "bn"}
    runs = load_runs(out / "runs").runs
    assert len(runs) == 3 and set(runs["seed"]) == {7} and set(runs["data_seed"]) == {3}
    assert sorted(runs["lr"]) == sorted(t["lr"]) and (runs["probes"].map(len) == 0).all()
    assert sorted(np.round(runs["best_val_acc"], 6)) == sorted(x for v in t["val_acc"] for x in v)
    capsys.readouterr()
    again = sweep(study, "quick", (group,), out=out, workers=1, seeds=(7,), data_seed=3, max_extend=1,
                  progress=False)
    assert again == rec and "(0 to run, 3 already done)" in capsys.readouterr().out
    monkeypatch.setattr(ladder_file, "LADDER_DIR", tmp_path)
    write_ladders("tiny", "quick", rec, tmp_path / "tiny.json")
    assert ladders("tiny") == {"bn": tuple(e["rungs"])} and ladder_record("tiny")["seeds"] == [7]

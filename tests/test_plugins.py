"""Plugins: norms, probes and studies of your own, loaded in every entry point, with identity that
follows their code; arms added to a paper's study; a plugin's own study with the generic notebook.
Tiny real runs (synthetic data, ResNet-8 at width 1/4, a few hundred images)."""
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import bnlib
from bnlib.arms import with_arms
from bnlib.errors import ConfigError
from bnlib.grid import run_study
from bnlib.models import build_model
from bnlib.studies import get_study, p1, p4

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ws_gn.py"
TINY = dict(dataset="synthetic", synthetic_size=300, n_test=100, val_fraction=0.2, arch="resnet8", width=0.25,
            epochs=1, batch_size=16, log_every=2, eval_batch_size=100, progress=False)

# bnlib's own entries keep their run ids (computed with the code before plugins existed);
# ics_free's computation changed (the reference-pass scheme): version 2, a new id, on purpose
BUILTIN_IDS = [
    (dict(norm="bn"), "bn-resnet18-bs128-lr0.1-s0-3d6a249983"),
    (dict(norm="group_norm", norm_groups=4), "group_norm-resnet18-bs128-lr0.1-s0-cc8c77d860"),
    (dict(norm="affine", probes=["ics"], lr=0.3), "affine-resnet18-bs128-lr0.3-s0-c505509bc1"),
    (dict(norm="ics_free_stale"), "ics_free_stale-resnet18-bs128-lr0.1-s0-d856a8b4f5"),
    (dict(norm="noisy_bn", probes=["landscape@5"]), "noisy_bn-resnet18-bs128-lr0.1-s0-017bb7a48c"),
]
ICS_FREE_V1 = "ics_free-resnet18-bs128-lr0.1-s0-76d02c9745"


@pytest.fixture
def plugin(tmp_path):
    """A copy of the example plugin that a test may edit; its entries are forgotten afterwards (a
    second file registering the same names in one process is an error, rightly)."""
    p = tmp_path / "my_plugin.py"
    shutil.copy(EXAMPLE, p)
    _forget(EXAMPLE)  # the same names from the example itself, if another test loaded it here
    yield p
    _forget(p)
    _forget(EXAMPLE)  # imported afresh when next named


def _forget(path: Path) -> None:
    """This process forgets a plugin: its registry entries, and that it imported it."""
    from bnlib import config, plugins
    from bnlib.probes import PROBES
    from bnlib.studies import STUDIES

    for reg in (bnlib.NORMS, PROBES, STUDIES):
        for name in [n for n, e in reg.items() if (e.source or {}).get("path") == str(path)]:
            del reg[name]
    plugins._LOADED.pop(str(path), None)
    config.refresh_run_config()


def test_builtin_run_ids_are_unchanged_with_and_without_plugins():
    for kw, rid in BUILTIN_IDS:
        assert bnlib.run_id(bnlib.validate(kw, epochs=1)) == rid
        # loading a plugin (its norm, probe and their parameters) changes no built-in run's id
        assert bnlib.run_id(bnlib.validate(kw, epochs=1, plugins=[str(EXAMPLE)])) == rid
    assert bnlib.NORMS["ics_free"].version == 2
    assert bnlib.run_id(bnlib.validate(norm="ics_free", epochs=1)) != ICS_FREE_V1


def test_plugin_run_in_process_records_its_source_and_editing_it_gives_a_new_run(plugin, tmp_path):
    res = bnlib.run(plugins=[str(plugin)], norm="ws_gn", ws_gn_groups=2, probes=["weight_spread"],
                    out_dir=str(tmp_path / "runs"), **TINY)
    assert res["status"] == "completed"
    conf = json.loads((Path(res["run_dir"]) / "config.json").read_text())
    code = conf["provenance"]["code"]
    import hashlib

    sha = hashlib.sha256(plugin.read_bytes()).hexdigest()
    assert code["norm:ws_gn"]["path"] == str(plugin) and code["norm:ws_gn"]["sha256"] == sha
    assert code["probe:weight_spread"]["sha256"] == sha
    assert conf["params"]["plugins"] == [str(plugin)]
    probes = bnlib.load_runs(res["run_dir"]).probes
    assert set(probes["quantity"]) == {"mean", "std"}
    # the conv half of WS + GN is in the net: every conv standardizes its weights
    model = build_model(bnlib.validate(norm="ws_gn", ws_gn_groups=2, plugins=[str(plugin)], **TINY))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(type(m).__name__ == "WSConv2d" for m in convs)
    # an edit of the plugin is a new run; the same content is the same run
    before = bnlib.run_id(bnlib.validate(plugins=[str(plugin)], norm="ws_gn", ws_gn_groups=2,
                                         probes=["weight_spread"], **TINY))
    assert before == Path(res["run_dir"]).name
    plugin.write_text(plugin.read_text() + "\n# an edit\n")
    after = bnlib.run_id(bnlib.validate(plugins=[str(plugin)], norm="ws_gn", ws_gn_groups=2,
                                        probes=["weight_spread"], **TINY))
    assert after != before


@pytest.mark.parametrize("value, why", [
    ("does/not/exist.py", "no such file"),
    ("no_such_module_xyz", "no module of that name"),
    ("SYNTAX", "SyntaxError"),
    ("RAISES", "RuntimeError: boom"),
    ("TWICE", "registered twice"),
])
def test_a_plugin_that_cannot_be_imported_is_named_before_any_training(value, why, tmp_path):
    bodies = {"SYNTAX": "def broken(:\n", "RAISES": "raise RuntimeError('boom')\n",
              "TWICE": "from bnlib import register_norm\n@register_norm('bn', has_gamma=True, has_beta=True, "
                       "batch_stats=True, doc='x')\ndef f(n, **kw):\n    pass\n"}
    if value in bodies:
        p = tmp_path / f"bad_{value.lower()}.py"
        p.write_text(bodies[value])
        value = str(p)
    with pytest.raises(ConfigError) as e:
        bnlib.run(plugins=[value], out_dir=str(tmp_path / "runs"), **TINY)
    assert "plugins=" in str(e.value) and value in str(e.value) and why in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_cli_names_a_bad_plugin_and_plans_a_plugin_study(tmp_path):
    py = [sys.executable, "-m", "bnlib"]
    bad = subprocess.run([*py, "run", "--plugins", str(tmp_path / "missing.py"), "--out_dir", str(tmp_path / "r")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "plugins=" in bad.stderr and "missing.py" in bad.stderr
    plan = subprocess.run([*py, "study", "wsgn", "--preset", "tiny", "--plugins", str(EXAMPLE), "--arms",
                           "+layer_norm@group_norm", "--plan", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT)
    assert plan.returncode == 0, plan.stderr
    assert "6 runs" in plan.stdout or " 6 " in plan.stdout
    arm = subprocess.run([*py, "study", "p1", "--arms", "+no_such_norm", "--plan"], capture_output=True, text=True,
                         cwd=ROOT)
    assert arm.returncode == 2 and "no_such_norm" in arm.stderr and "valid choices" in arm.stderr


def test_an_added_arm_joins_p1_p3_p4_with_its_ladder():
    bnlib.load_plugins([str(EXAMPLE)])
    s = get_study("p1")
    base = s.points("quick")
    ext = with_arms(s, ["+ws_gn"]).points("quick")
    bn = [p for p in base if p["norm"] == "bn"]
    mine = [p for p in ext if p["norm"] == "ws_gn"]
    assert ext[:len(base)] == base and len(mine) == len(bn)
    # on BN's ladder, in BN's cells and seeds (paired with every arm)
    assert sorted((p["batch_size"], p["seed"], p["lr"]) for p in mine) == \
        sorted((p["batch_size"], p["seed"], p["lr"]) for p in bn)
    own = with_arms(s, ["+ws_gn:0.01,0.02"]).points("quick")
    assert sorted({(p["batch_size"], p["lr"]) for p in own if p["norm"] == "ws_gn"}) == \
        [(32, 0.0025), (32, 0.005), (64, 0.005), (64, 0.01)]  # its ladder, ×B/128 as P1's own
    p3 = with_arms(get_study("p3"), ["+ws_gn@group_norm"]).points("quick")
    gn = sorted((p["lr"], p["seed"]) for p in p3 if p["norm"] == "group_norm")
    assert sorted((p["lr"], p["seed"]) for p in p3 if p["norm"] == "ws_gn") == gn
    p4s = with_arms(get_study("p4"), ["+ws_gn"]).points("quick")
    assert {p["lr"] for p in p4s if p["norm"] == "ws_gn"} == set(p4.QUICK_LRS)
    with pytest.raises(ConfigError, match="no norm axis"):
        with_arms(get_study("p5"), ["+ws_gn"])
    with pytest.raises(ConfigError, match="valid forms"):
        with_arms(s, ["ws_gn"])


def _p4_runs(stable_top, seeds=range(5)):
    rows = []
    for norm, top in stable_top.items():
        for lr in p4.LR_SWEEP:
            for seed in seeds:
                ok = lr <= top
                a = 0.85 if ok else np.nan
                rows.append({"run_id": f"{norm}-{lr:g}-{seed}", "norm": norm, "lr": lr, "seed": seed,
                             "status": "completed" if ok else "diverged", "best_val_acc": a,
                             "test_acc_at_best_val": a, "dataset": "cifar10", "n_train": None, "epochs": 120,
                             "batch_size": 128})
    return SimpleNamespace(runs=pd.DataFrame(rows), probes=pd.DataFrame())


def test_verdicts_include_an_added_arm():
    vs = p4.verdicts(_p4_runs({"bn": 1.0, "none": 3e-3, "my_norm": 0.3}))
    mine = [v for v in vs if v.claim.startswith("my_norm")]
    assert len(mine) == 1 and mine[0].outcome == "supported" and "100×" in mine[0].sentence
    rows, rng = [], np.random.default_rng(0)
    for norm, acc in {"bn": 0.9, "none": 0.5, "bn_minus": 0.8, "affine": 0.6, "affine_bn_init": 0.7,
                      "my_norm": 0.85}.items():
        for rung, lr in enumerate((0.01, 0.1, 1.0)):
            for seed in range(6):
                a = acc - 0.05 * abs(rung - 1) + rng.normal(0, 0.005)
                rows.append({"run_id": f"{norm}-{lr}-{seed}", "norm": norm, "arch": "resnet18", "batch_size": 128,
                             "lr": lr, "seed": seed, "status": "completed", "best_val_acc": a,
                             "test_acc_at_best_val": a, "dataset": "cifar10", "n_train": None, "epochs": 100})
    runs = pd.DataFrame(rows)
    rec = p1.recovered(p1.selected(runs)).set_index("norm")
    assert rec.loc["my_norm", "share_of_bn_gain"] == pytest.approx(0.875, abs=0.01)
    assert np.isfinite(rec.loc["my_norm", "share_ci_low"])
    v = next(v for v in p1.verdicts(runs) if v.claim.startswith("my_norm"))
    assert "keeps more than half of BN's gain" in v.claim and v.outcome == "supported"


@pytest.fixture(scope="module")
def study_out(tmp_path_factory):
    """The example plugin's own study at its tiny preset, with an added arm, through the study
    runner's reused papermill kernel (no Dask)."""
    out = tmp_path_factory.mktemp("plugin_study")
    counts = run_study("wsgn", "tiny", out=out, plugins=[str(EXAMPLE)], arms=["+layer_norm@group_norm"],
                       progress=False)
    return out, counts


def test_plugin_study_runs_in_kernels_with_its_generic_notebook_and_verdicts(study_out):
    out, counts = study_out
    assert counts["completed"] == 6 and not counts["failed"] and not counts.get("analysis_failed")
    man = json.loads((out / "studies" / "wsgn" / "manifest.json").read_text())
    assert man["arms"] == ["+layer_norm@group_norm"] and man["study_source"]["path"] == str(EXAMPLE)
    assert all(p["plugins"] == [str(EXAMPLE)] for p in man["points"])
    claims = [v["claim"] for v in json.loads((out / "studies" / "wsgn" / "verdicts.json").read_text())]
    assert "WS + GN beats GroupNorm alone (each at its validated rate)" in claims
    assert "WS + GN is at least as accurate as layer_norm" in claims  # the added arm, compared
    runs = bnlib.load_runs(out / "runs")
    ws = runs.runs[runs.runs["norm"] == "ws_gn"].iloc[0]
    conf = json.loads((out / "runs" / ws["run_id"] / "config.json").read_text())
    assert conf["provenance"]["code"]["norm:ws_gn"]["path"] == str(EXAMPLE)
    nb = (out / "studies" / "wsgn" / "wsgn.ipynb").read_text()
    assert "Accuracy per arm" in nb and '"ename"' not in nb
    from bnlib.report import build_report

    index = build_report(out).read_text()
    assert "WS + GN beats GroupNorm alone" in index


def test_example_notebook_adds_an_arm_and_reads_its_verdict(study_out, tmp_path):
    """examples/my_variant.ipynb's code path, on the tiny study (its runs already done)."""
    from bnlib.kernels import execute_notebook

    out, _ = study_out
    dst = tmp_path / "my_variant.ipynb"
    execute_notebook(ROOT / "examples" / "my_variant.ipynb", dst,
                     {"study": "wsgn", "preset": "tiny", "arms": ["+layer_norm@group_norm"], "out": str(out),
                      "plugin": str(tmp_path / "my_norm.py")})
    text = dst.read_text()
    assert "at least as accurate as layer_norm" in text and "<- your arm" in text
    assert (tmp_path / "my_norm.py").read_text() == EXAMPLE.read_text()


def test_plugins_reach_dask_workers_and_a_worker_that_cannot_import_one_is_named(tmp_path, monkeypatch):
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster:
        counts = run_study("wsgn", "tiny", out=tmp_path / "o", scheduler=cluster.scheduler_address,
                           plugins=[str(EXAMPLE)], analyze=False, progress=False)
        assert counts["completed"] == 4 and not counts["failed"]
        ids = json.loads((tmp_path / "o" / "studies" / "wsgn" / "manifest.json").read_text())["run_ids"]
        assert all(json.loads((tmp_path / "o" / "runs" / r / "config.json").read_text())["params"]["plugins"]
                   == [str(EXAMPLE)] for r in ids)
        # a module this process imports but the worker cannot (it is only on this process's path)
        (tmp_path / "mods").mkdir()
        (tmp_path / "mods" / "only_here_plugin.py").write_text("X = 1\n")
        monkeypatch.syspath_prepend(str(tmp_path / "mods"))
        with pytest.raises(ConfigError, match="only_here_plugin") as e:
            run_study("wsgn", "tiny", out=tmp_path / "o2", scheduler=cluster.scheduler_address,
                      plugins=[str(EXAMPLE), "only_here_plugin"], analyze=False, progress=False)
        assert "cannot import the study's plugins" in str(e.value) and "tcp://127.0.0.1" in str(e.value)


def test_the_readmes_plugin_snippet_runs_as_written(tmp_path):
    """README's "Extending bnlib": its plugin file, as printed there, and its first command (the
    CLI, with the plugin's own option and probe; tiny data in place of the default's)."""
    text = (ROOT / "README.md").read_text()
    code = text.split("```python\n# my_plugin.py\n", 1)[1].split("```", 1)[0]
    study = text.split("```python\n# my_plugin.py, continued\n", 1)[1].split("```", 1)[0]
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(code + "\n\n" + study)
    cmd = "python -m bnlib run --plugins my_plugin.py --norm my_norm --my_groups 2 --probes '[weight_norm]'"
    assert cmd in text
    tiny = [a for k, v in TINY.items() for a in (f"--{k}", str(v))]
    try:
        proc = subprocess.run([sys.executable, *shlex.split(cmd)[1:], *tiny, "--out_dir", str(tmp_path / "runs")],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        run = bnlib.load_runs(tmp_path / "runs")
        assert run.runs["norm"].tolist() == ["my_norm"] and run.runs["my_groups"].tolist() == [2]
        assert (run.probes["probe"] == "weight_norm").any() and (run.probes["value"] > 0).all()
        # the study: its grid checked and planned (--plan trains nothing), as printed
        assert "python -m bnlib study mine --plugins my_plugin.py" in text
        plan = subprocess.run([sys.executable, "-m", "bnlib", "study", "mine", "--plugins", "my_plugin.py", "--plan",
                               "--out", str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert plan.returncode == 0 and "18 runs" in plan.stdout, plan.stdout[-2000:] + plan.stderr[-2000:]
    finally:
        _forget(plugin)


def test_an_arm_with_a_ladder_of_its_own_stays_one_arm():
    """'+my_norm:0.01,0.04,0.16' (README, --arms) is one arm: a string splits only before a '+'."""
    from bnlib.arms import parse_arms

    assert parse_arms("+my_norm:0.01,0.04,0.16") == ["+my_norm:0.01,0.04,0.16"]
    assert parse_arms("+a:0.01,0.1, +b@bn") == ["+a:0.01,0.1", "+b@bn"]
    assert parse_arms(["+a", "+b"]) == ["+a", "+b"] and parse_arms(None) == []

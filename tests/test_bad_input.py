"""Bad input, round two (issue 15): every entry point driven with generated bad input.

Each case asserts what a hostile but realistic user should get: a clear message that names
the parameter or the file, the documented exit code (CLI: 2 bad input, 1 a failed run or one
that could not be done, 0 otherwise), no traceback text, and nothing new on disk (the outputs
folder, the current folder and a fake HOME, where `~/data` would appear, are snapshotted
before and after). Bad values are generated from the RunConfig table itself (each field's
type, choices, range and path flag), so parameters added later are covered without an edit.

Categories (README, "Bad input"): bad parameter values through bnlib.run, the CLI `run`, a
study grid (run_study) and papermill; CLI flags and arguments (`run`, `study`, `report`);
numbers and paths in every accepted spelling (scientific notation, NumPy scalars, Path);
randomly damaged run folders read by load_runs, bnlib.run, the study planner and the report;
damaged checkpoints.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import bnlib
from bnlib import cli
from bnlib.config import FP32_MAX, ConfigError, RunConfig, validate
from bnlib.records import RunDir, load_runs

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(arch="resnet8", width=0.1, synthetic_size=60, val_fraction=0.2, n_test=20, batch_size=16, epochs=1,
            progress=False, log_every=2, precision="fp32")
# derandomized: the same cases on every run of the suite (BNLIB_HYPOTHESIS_RANDOM=1 explores)
SETTINGS = dict(deadline=None, database=None, derandomize=os.environ.get("BNLIB_HYPOTHESIS_RANDOM") is None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# ----------------------------------------------------------------------------------------------
# sandbox: a tmp folder that is the current folder, holds the outputs, and is HOME
# ----------------------------------------------------------------------------------------------

def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@contextlib.contextmanager
def sandbox():
    """A fresh folder made the current folder and HOME (so `~/data` and the default
    `outputs/runs` land inside it). Yields (root, check) where check() asserts nothing new
    appeared under it since the start (or since the last check)."""
    root = Path(tempfile.mkdtemp(prefix="bnlib-bad-"))
    (root / "home").mkdir()
    old_cwd, old_home = os.getcwd(), os.environ.get("HOME")
    os.chdir(root)
    os.environ["HOME"] = str(root / "home")
    before = _tree(root)

    def check(what=""):
        new = _tree(root) - before
        assert not new, f"left behind by a rejected {what}: {sorted(new)[:10]}"

    try:
        yield root, check
    finally:
        os.chdir(old_cwd)
        if old_home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = old_home
        shutil.rmtree(root, ignore_errors=True)


def _main(argv) -> tuple[int, str]:
    """bnlib's CLI in this process: (exit code, stdout + stderr)."""
    out = io.StringIO()
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue()


def _no_traceback(text: str) -> None:
    assert "Traceback (most recent call last)" not in text and 'File "' not in text, text[-2000:]


# ----------------------------------------------------------------------------------------------
# bad values, generated from the RunConfig table
# ----------------------------------------------------------------------------------------------

FIELDS = {f.name: f for f in fields(RunConfig)}


def _bad_values(f) -> list[tuple[str, object]]:
    """(category, value) pairs that validate() must refuse for field f, from its metadata."""
    md, t = f.metadata, f.type
    out = []
    wrong_type = {"str": [3, 1.5, ["x"], True], "bool": ["yes", "false", 1, 0.0], "int": ["3", 2.5, True, [1]],
                  "float": ["0.1", True, [0.1], {"a": 1}], "list": [{"a": 1}, 3, "[0.3, 0.6]"]}[t]
    out += [("wrong type", v) for v in wrong_type]
    if not md["nullable"]:
        out.append(("None where a value is needed", None))
    choices = md["choices"]() if callable(md["choices"]) else md["choices"]
    if choices is not None and t == "str":
        out += [("not a choice", v) for v in ("", "nonexistent-choice", str(choices[0]).upper() + "_X")]
    if t in ("int", "float"):
        lo, hi = md["lo"], md["hi"]
        if lo is not None:
            out.append(("below range", lo if md["lo_open"] else lo - (1 if t == "int" else 1e-3)))
            out.append(("below range", lo - 10 ** 6))
        if hi is not None:
            out.append(("above range", hi if md["hi_open"] else hi + (1 if t == "int" else 1e-3)))
            out.append(("above range", hi + 2 ** 70 if t == "int" else hi * 10 + 1e6))
    if t == "float":
        out += [("not finite", math.nan), ("not finite", math.inf), ("not finite", -math.inf),
                ("beyond float32", 1e300), ("beyond float32", -FP32_MAX * 2), ("huge int", 10 ** 400)]
    if t == "list" and md["items"] != "str":
        out += [("not finite item", [math.nan]), ("beyond float32 item", [1e300]), ("string item", ["a"])]
    if t == "list" and md["items"] == "str":
        out += [("non-string item", [1])]
    if md.get("path"):
        out += [("empty path", ""), ("blank path", "   "), ("NUL in path", "a\0b")]
    return out


BAD = [(name, cat, v) for name, f in FIELDS.items() for cat, v in _bad_values(f)]
# values that pass each field's own check but that the code cannot take (issue 15, point 1)
CROSS = [("seed", "numpy's seed range", 2 ** 32), ("data_seed", "seed range", 2 ** 64),
         ("lr", "lr x multiplier beyond float32", (1e30, {"gamma_lr_mult": 1e10})),
         ("lr", "step schedule beyond float32", (1e10, {"schedule": "step", "step_gamma": 1e30})),
         ("synthetic_size", "data cannot fit in memory", 10 ** 10),
         ("width", "model cannot fit in memory", 5000.0),
         ("batch_size", "activations cannot fit in memory", (10 ** 7, {"synthetic_size": 2 * 10 ** 7}))]


def _params(name, value) -> dict:
    if isinstance(value, tuple):
        value, extra = value
        return {**extra, name: value}
    return {name: value}


bad_case = st.sampled_from(BAD + CROSS)


def _check_config_message(msg: str, name: str) -> None:
    assert f"{name}=" in msg or f"--{name}" in msg, (name, msg)
    _no_traceback(msg)


def test_the_generated_pools_cover_every_field():
    """Every RunConfig field has bad values (a new parameter is covered without an edit)."""
    assert {n for n, _, _ in BAD} == set(FIELDS)
    assert len(BAD) >= 4 * len(FIELDS)


@settings(max_examples=300, **SETTINGS)
@given(bad_case)
def test_bad_values_through_validate_run_and_the_study_runner(case):
    """bnlib.run and run_study: a ConfigError naming the parameter, before anything is written."""
    name, cat, value = case
    params = {**TINY, **_params(name, value)}
    with sandbox() as (root, check):
        with pytest.raises(ConfigError) as e:
            bnlib.run(params)
        _check_config_message(str(e.value), name)
        check(f"bnlib.run ({name}: {cat})")
        from bnlib.grid import run_study
        from bnlib.studies import Preset, Study

        grid_base = {k: v for k, v in params.items() if k != "seed"}
        s = Study("badinput", "bad input", None, {"t": Preset(base=grid_base, grid={"seed": [0, 1]})})
        if name == "seed":
            s = Study("badinput", "bad input", None, {"t": Preset(base=grid_base, grid={"seed": [0, value]})})
        if name != "out_dir":  # a study sets out_dir itself (from --out)
            with pytest.raises(ConfigError) as e:
                run_study(s, "t", root / "outputs", progress=False, analyze=False)
            _check_config_message(str(e.value), name)
            check(f"study ({name}: {cat})")  # no manifest, no runs/ folder


def _cli_text(v) -> str:
    if isinstance(v, str):
        return v
    try:
        return json.dumps(v, allow_nan=True)
    except (TypeError, ValueError):
        return str(v)


@settings(max_examples=200, **SETTINGS)
@given(bad_case)
def test_bad_values_through_the_cli_run_command(case):
    """`python -m bnlib run --name value`: exit 2, one message naming the parameter, no traceback,
    nothing written (the default outputs folder is the sandbox's)."""
    name, cat, value = case
    params = {**TINY, **_params(name, value)}
    if "\0" in _cli_text(params[name]):
        assume(False)  # a NUL cannot be in a command-line argument at all
    # the command line has no types: skip a spelling that reads as a valid value (YAML's "yes" is
    # true, "0.1" a number; any text is a valid path)
    typed = {k: (_cli_text(v) if FIELDS[k].metadata.get("path") else cli._yaml_value(_cli_text(v)))
             for k, v in params.items()}
    try:
        validate(typed)
        assume(False)
    except ConfigError:
        pass
    argv = ["run"] + [x for k, v in params.items() for x in (f"--{k}", _cli_text(v))]
    with sandbox() as (root, check):
        rc, text = _main(argv)
        assert rc == 2, (rc, text)
        assert "error: " in text, text
        _no_traceback(text)
        # the parameter is named (a value argparse/YAML turned into another type is still named)
        assert name in text, (name, text)
        check(f"CLI run ({name}: {cat})")


# ----------------------------------------------------------------------------------------------
# CLI flags and arguments, every command
# ----------------------------------------------------------------------------------------------

def _cli_cases(root: Path) -> list[tuple[list, int, str]]:
    """(argv, exit code, text the message must contain)."""
    afile = root / "afile"
    afile.write_text("x")
    return [
        (["run", "positional"], 2, "'positional'"),
        (["run", "-lr", "0.1"], 2, "--lr"),
        (["run", "-e", "1"], 2, "--name value"),
        (["run", "--learning_rate", "0.1"], 2, "learning_rate"),
        (["run", "--out_dir", str(afile / "runs")], 2, "out_dir="),
        (["run", "--out_dir", ""], 2, "out_dir="),
        (["run", "--data_dir", ""], 2, "data_dir="),
        (["run", "--lr"], 2, "--lr"),
        (["run", "--step_milestones", "[0.3,"], 2, "step_milestones"),
        (["run", "--dataset", "cifar10", "--download", "false", "--data_dir", "~/nodata"], 2, "dataset='cifar10'"),
        (["study"], 2, "name"),
        (["study", "nonexistent"], 2, "nonexistent"),
        (["study", "p1", "extra"], 2, "extra"),
        (["study", "p1", "-w", "2"], 2, "-w"),
        (["study", "p1", "--workers", "0"], 2, "--workers"),
        (["study", "p1", "--workers", "two"], 2, "--workers"),
        (["study", "p1", "--preset", "nonexistent"], 2, "preset="),
        (["study", "p1", "--dataset", "mnist"], 2, "dataset='mnist'"),
        (["study", "p1", "--out", str(afile)], 2, str(afile)),
        # an unreachable scheduler: refused within cluster.SCHEDULER_TIMEOUT_S, before the manifest
        (["study", "p1", "--dataset", "synthetic", "--scheduler", "tcp://127.0.0.1:9", "--out", "o"], 2, "--scheduler"),
        (["report", "--out", str(root / "nonexistent")], 2, "does not exist"),
        (["report", "--out", str(afile)], 2, "not a folder"),
        (["report", "--out", str(root / "home")], 2, "nothing to report"),
        (["report", "positional"], 2, "positional"),
        (["nonexistent-command"], 2, "nonexistent-command"),
        ([], 2, "cmd"),
    ]


def test_bad_cli_flags_and_arguments_every_command():
    with sandbox() as (root, check):
        cases = _cli_cases(root)
        check_after = _tree(root)
        for argv, code, needle in cases:
            rc, text = _main(argv)
            assert rc == code, (argv, rc, text)
            assert needle in text, (argv, needle, text)
            _no_traceback(text)
            new = _tree(root) - check_after
            assert not new, (argv, sorted(new))


def test_a_run_held_by_another_process_is_one_line_exit_1():
    """Two terminals on one run: the second says so in one line (exit 1: the run could not be
    done now; nothing is wrong with the input)."""
    from filelock import FileLock

    with sandbox() as (root, _):
        out = root / "runs"
        cfg = validate({**TINY, "out_dir": str(out)})
        d = out / bnlib.run_id(cfg)
        d.mkdir(parents=True)
        with FileLock(str(d / ".lock")):
            rc, text = _main(["run"] + [x for k, v in {**TINY, "out_dir": str(out)}.items()
                                        for x in (f"--{k}", _cli_text(v))])
        assert rc == 1 and "another process" in text and text.count("\n") == 1, text
        _no_traceback(text)


# ----------------------------------------------------------------------------------------------
# numbers and paths in every accepted spelling
# ----------------------------------------------------------------------------------------------

@settings(max_examples=60, **SETTINGS)
@given(st.floats(1e-8, 1e3), st.sampled_from(["lr", "weight_decay", "gamma_lr_mult", "warmup_epochs"]),
       st.sampled_from(["sci", "numpy64", "numpy32", "cli"]))
def test_scientific_notation_numpy_scalars_and_paths_are_accepted(x, name, spelling):
    if name not in FIELDS:
        assume(False)
    x = float(np.float32(x))  # exactly representable in every spelling below
    plain = validate({**TINY, name: x})
    value = {"sci": float(f"{x:e}"), "numpy64": np.float64(x), "numpy32": np.float32(x), "cli": None}[spelling]
    if spelling == "cli":
        ns, extra = cli.build_parser().parse_known_args(["run", f"--{name}", f"{x:e}"])
        value = vars(ns)[name]
        assert value == float(f"{x:e}"), (name, value)
    cfg = validate({**TINY, name: value, "out_dir": Path("some") / "runs", "epochs": np.int64(1),
                    "step_milestones": np.array([0.25, 0.5]), "flip": np.bool_(True)})
    assert cfg[name] == float(value) and type(cfg[name]) is float
    assert cfg["out_dir"] == os.path.join("some", "runs") and cfg["epochs"] == 1 and type(cfg["epochs"]) is int
    assert cfg["step_milestones"] == [0.25, 0.5] and cfg["flip"] is True
    # the same run as the plain spelling: same id
    assert bnlib.run_id(cfg) == bnlib.run_id(validate({**TINY, name: float(value), "step_milestones": [0.25, 0.5]}))
    assert plain[name] == x


def test_cli_reads_scientific_notation_in_flags_and_lists():
    ns, extra = cli.build_parser().parse_known_args(["run", "--lr", "1e-3", "--step_milestones", "[5e-1, 0.75]",
                                                     "--out_dir", "2026", "--weight_decay", "5E-4"])
    args = vars(ns)
    assert args["lr"] == 1e-3 and args["step_milestones"] == [0.5, 0.75] and args["weight_decay"] == 5e-4
    assert args["out_dir"] == "2026"  # a path is taken as typed
    assert cli._unknown_flags(["--bogus", "1e3"]) == {"bogus": 1000.0}


def test_run_with_an_empty_out_dir_is_an_error_not_the_current_folder():
    with sandbox() as (_, check):
        with pytest.raises(ConfigError, match="out_dir=''"):
            bnlib.run({**TINY, "out_dir": ""})
        check("run(out_dir='')")


# ----------------------------------------------------------------------------------------------
# damaged run folders: load_runs, bnlib.run, the study planner, the report
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One real finished tiny run (and its config), copied and damaged by the tests below."""
    out = tmp_path_factory.mktemp("good") / "runs"
    res = bnlib.run({**TINY, "out_dir": str(out)})
    assert res["status"] == "completed"
    return res.run_dir


WRONG_SHAPES = [[], [1, 2], "a string", None, 3, {}, {"status": "completed", "metrics": "high"},
                {"status": "completed", "metrics": [1]}, {"status": "completed", "data_sizes": "big"},
                {"status": 7}, {"status": "finished"}, {"params": None}, {"params": []}, {"params": "lr=0.1"}]
FILES = ["config.json", "status.json", "epochs.parquet", "steps.parquet", "norm_params.parquet", "channels.parquet"]


@st.composite
def damages(draw):
    """1-3 damages: (file, kind, argument)."""
    n = draw(st.integers(1, 3))
    out = []
    for _ in range(n):
        f = draw(st.sampled_from(FILES))
        kind = draw(st.sampled_from(["truncate", "garbage", "delete", "empty"] +
                                    (["json shape", "json field"] if f.endswith(".json") else [])))
        arg = draw(st.sampled_from(WRONG_SHAPES)) if kind.startswith("json") else draw(st.floats(0, 0.95))
        out.append((f, kind, arg))
    return out


def _damage(d: Path, f: str, kind: str, arg) -> None:
    p = d / f
    if kind == "delete":
        p.unlink(missing_ok=True)
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "truncate" and p.exists():
        b = p.read_bytes()
        p.write_bytes(b[: int(len(b) * arg)])
    elif kind == "garbage":
        p.write_bytes(bytes(np.random.default_rng(int(arg * 1e6)).integers(0, 256, 64, dtype=np.uint8)))
    elif kind == "json shape":
        p.write_text(json.dumps(arg))
    elif kind == "json field" and p.exists():
        try:
            obj = json.loads(p.read_text())
        except ValueError:
            return
        if isinstance(obj, dict) and isinstance(arg, dict):
            obj.update(arg)
        elif isinstance(obj, dict):
            obj["status" if f == "status.json" else "params"] = arg
        p.write_text(json.dumps(obj))


def _loadable(d: Path) -> bool:
    """What a whole run folder means: readable records of the shape bnlib writes."""
    return RunDir(d).verify() is None and (RunDir(d).status() or {}).get("status") in ("completed", "diverged")


@settings(max_examples=60, **SETTINGS)
@given(damages())
def test_load_runs_survives_any_damaged_run_folder(finished_run, damage):
    """A randomly damaged run beside an intact one: load_runs never raises, loads the intact one,
    and either loads the damaged one (the damage was harmless: an optional table removed) or
    skips it with a reason that names the damaged file; the report lists it without crashing
    only where it has a notebook (below)."""
    with sandbox() as (root, _):
        runs = root / "runs"
        good, bad = runs / "good", runs / "bad"
        shutil.copytree(finished_run, good)
        shutil.copytree(finished_run, bad)
        for f, kind, arg in damage:
            _damage(bad, f, kind, arg)
        out = io.StringIO()
        with contextlib.redirect_stderr(out):
            r = load_runs(runs)
        assert "good" in set(r.runs.run_id), r.skipped
        skipped = dict(r.skipped)
        if str(bad) in skipped:  # skipped, and the reason names the damaged file
            reason = skipped[str(bad)]
            named = {f for f, _, _ in damage} | {f.split(".")[0] for f, _, _ in damage}
            assert any(n in reason for n in named) or "config/status" in reason or "status " in reason, \
                (damage, reason)
            assert not _loadable(bad) or "channels" in reason, (damage, reason)
        elif "bad" in set(r.runs.run_id):  # loaded: the damage left whole records
            assert _loadable(bad), (damage, r.skipped)
        else:  # no config.json left: not a run folder any more
            assert not (bad / "config.json").exists(), (damage, r.skipped)
        # whole-id filters: a prefix of an id matches nothing; the id itself matches exactly one
        assert load_runs(runs, run_ids="goo").runs.empty
        assert list(load_runs(runs, run_ids="good").runs.run_id) == ["good"]


def test_load_runs_on_a_missing_path_or_a_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_runs(tmp_path / "nonexistent")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        load_runs(tmp_path / "f")
    assert load_runs(tmp_path).runs.empty  # an empty folder is an empty table
    with pytest.raises(FileNotFoundError, match="empty path"):
        load_runs("")


@pytest.mark.parametrize("params", [["lr", 0.1], "lr=0.1", 3])
def test_run_params_that_are_not_a_dict_are_a_config_error(params):
    with sandbox() as (_, check):
        with pytest.raises(ConfigError, match="params=.*must be a dict"):
            bnlib.run(params)
        check(f"bnlib.run({params!r})")


@pytest.mark.parametrize("f,kind,arg", [("status.json", "json shape", ["completed"]),
                                        ("status.json", "json field", {"status": "completed", "metrics": "high"}),
                                        ("config.json", "json shape", None),
                                        ("config.json", "json field", {"params": []}),
                                        ("epochs.parquet", "truncate", 0.5)])
def test_a_damaged_finished_run_is_planned_again_and_rerun(finished_run, f, kind, arg, tmp_path):
    """bnlib.run and the study planner treat a wrongly shaped record as damaged: the planner
    names it, bnlib.run says so and runs it again."""
    from bnlib.grid import plan
    from bnlib.studies import Preset, Study

    out = tmp_path / "runs"
    shutil.copytree(finished_run, out / finished_run.name)
    d = out / finished_run.name
    _damage(d, f, kind, arg)
    params = {k: v for k, v in TINY.items()}
    s = Study("dmg", "damage", None, {"t": Preset(base=params, grid={"seed": [0]})})
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        items = plan(s, "t", tmp_path)
    assert items[0]["status"] not in ("completed", "diverged"), items[0]["status"]
    with contextlib.redirect_stderr(err):
        res = bnlib.run({**TINY, "out_dir": str(out)})
    assert "damaged" in err.getvalue() and f.split(".")[0] in err.getvalue(), err.getvalue()
    assert res["status"] == "completed" and RunDir(d).verify() is None
    assert list(load_runs(out).runs.run_id) == [finished_run.name]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not a checkpoint", "empty"])
def test_a_damaged_checkpoint_restarts_the_run_from_scratch(finished_run, tmp_path, damage):
    """An interrupted run whose checkpoint is damaged: said so, started again from scratch,
    completed, instead of failing on every rerun until the user guesses --rerun."""
    out = tmp_path / "runs"
    params = {**TINY, "epochs": 2, "out_dir": str(out)}
    cfg = validate(params)
    d = out / bnlib.run_id(cfg)
    d.mkdir(parents=True)
    (d / "status.json").write_text(json.dumps({"status": "interrupted"}))
    ck = d / "checkpoint.pt"
    if damage == "truncated":
        torch.save({"epoch": 1, "model": {"w": torch.zeros(1000)}}, ck)
        ck.write_bytes(ck.read_bytes()[:300])
    elif damage == "garbage":
        ck.write_bytes(os.urandom(512))
    elif damage == "not a checkpoint":
        torch.save([1, 2, 3], ck)
    else:
        ck.write_bytes(b"")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        res = bnlib.run(params)
    assert "checkpoint damaged" in err.getvalue() and "from scratch" in err.getvalue(), err.getvalue()
    assert res["status"] == "completed" and "resumed_from_epoch" not in res
    assert not ck.exists()


@settings(max_examples=8, **SETTINGS)
@given(damages(), st.sampled_from([None, [], "x", {"title": 3}, [{"outcome": 1}]]))
def test_report_survives_damaged_runs_manifests_and_verdicts(finished_run, damage, junk):
    """The report over a damaged run (with a notebook) and a damaged manifest/verdicts: builds,
    lists the run (as damaged where its status cannot be read, with why)."""
    import nbformat
    from bnlib.report import build_report

    with sandbox() as (root, _):
        out = root / "outputs"
        d = out / "runs" / "bad"
        shutil.copytree(finished_run, d)
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("run")]), str(d / "run.ipynb"))
        for f, kind, arg in damage:
            _damage(d, f, kind, arg)
        sd = out / "studies" / "s"
        sd.mkdir(parents=True)
        nbformat.write(nbformat.v4.new_notebook(), str(sd / "s.ipynb"))
        (sd / "manifest.json").write_text(json.dumps(junk))
        (sd / "verdicts.json").write_text(json.dumps(junk))
        index = build_report(out).read_text()
        assert "bad</a>" in index
        if RunDir(d).status() is None:
            assert "damaged" in index


def test_report_and_load_study_on_damaged_manifest_name_the_file(tmp_path):
    from bnlib.records import load_study

    (tmp_path / "studies" / "p1").mkdir(parents=True)
    (tmp_path / "studies" / "p1" / "manifest.json").write_text(json.dumps(["not", "a", "manifest"]))
    with pytest.raises(ConfigError, match="manifest.json"):
        load_study(tmp_path, "p1")


# ----------------------------------------------------------------------------------------------
# data folders are not created by a check
# ----------------------------------------------------------------------------------------------

def test_a_failed_data_check_leaves_no_data_folder():
    with sandbox() as (root, check):
        for ds in ("cifar10", "cifar100"):
            with pytest.raises(ConfigError, match=f"dataset='{ds}'"):
                bnlib.run({**TINY, "dataset": ds, "download": False, "out_dir": str(root / "o")})
        assert not (root / "home" / "data").exists()
        check("data check")


# ----------------------------------------------------------------------------------------------
# papermill: a handful of real cases in one reused kernel
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kernel():
    from bnlib.kernels import _point_kernel, shutdown_point_kernel

    km = _point_kernel()
    yield km
    shutdown_point_kernel()


PM_CASES = [
    ({"lr": "1e-3x"}, "lr="),
    ({"step_milestones": "[0.3, 0.6]", "schedule": "step"}, "-y"),
    ({"seed": 2 ** 32}, "seed="),
    ({"out_dir": ""}, "out_dir="),
]


@pytest.mark.parametrize("params,needle", PM_CASES)
def test_papermill_bad_parameters_fail_in_the_check_cell_naming_them(kernel, tmp_path, params, needle):
    import papermill as pm

    from bnlib.kernels import NOTEBOOKS, execute_notebook

    with sandbox() as (root, check):
        dst = tmp_path / "bad.ipynb"  # outside the sandbox: the executed notebook is papermill's own output
        with pytest.raises(pm.PapermillExecutionError) as e:
            execute_notebook(NOTEBOOKS / "run.ipynb", dst, {**TINY, "out_dir": str(root / "runs"), **params},
                             cwd=root, km=kernel)
        assert e.value.ename == "ConfigError" and needle in e.value.evalue, (e.value.ename, e.value.evalue)
        assert "bnlib.validate(params)" in e.value.source  # the check cell, before training
        check(f"papermill {params}")


def test_papermill_inject_paths_and_scientific_numbers_work(kernel, tmp_path):
    """papermill's standard options: --inject-paths adds PAPERMILL_INPUT_PATH/OUTPUT_PATH, which
    are not run parameters; -p lr 1e-3 is a float."""
    from bnlib.kernels import NOTEBOOKS, execute_notebook

    out = tmp_path / "runs"
    execute_notebook(NOTEBOOKS / "run.ipynb", tmp_path / "ok.ipynb",
                     {**TINY, "lr": 1e-3, "out_dir": str(out), "PAPERMILL_INPUT_PATH": str(NOTEBOOKS / "run.ipynb"),
                      "PAPERMILL_OUTPUT_PATH": str(tmp_path / "ok.ipynb")}, km=kernel)
    r = load_runs(out)
    assert list(r.runs.status) == ["completed"] and r.runs.lr[0] == 1e-3


# ----------------------------------------------------------------------------------------------
# a few through real processes: exit codes as a shell sees them
# ----------------------------------------------------------------------------------------------

def test_cli_subprocess_exit_codes_and_no_traceback(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    cases = [(["run", "--lr", "1e-3", "--seed", str(2 ** 40)], 2, "seed="),
             (["study", "p1", "--out", "/dev/null"], 2, "/dev/null")]
    for argv, code, needle in cases:
        p = subprocess.run([sys.executable, "-m", "bnlib", *argv], capture_output=True, text=True, cwd=tmp_path,
                           env=env, timeout=120)
        assert p.returncode == code and needle in p.stderr, (argv, p.returncode, p.stderr[-2000:])
        _no_traceback(p.stderr)
    assert _tree(tmp_path) == {"home"}

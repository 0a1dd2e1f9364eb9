"""A tiny study end to end through papermill: grid, resume, a failing run, the analysis and
summary notebooks, and the HTML report opened in a real headless browser."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bnlib
from bnlib.grid import run_study, plan
from bnlib.kernels import execute_notebook, NOTEBOOKS
from bnlib.records import load_study
from bnlib.report import build_report
from bnlib.studies import Preset, Study

# one xdist process for the module: its module-scoped fixture is expensive (make test: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("study")

SMOKE = dict(arch="resnet8", width=0.25, synthetic_size=300, val_fraction=0.2, n_test=60, batch_size=32,
             epochs=2, log_every=2)


def smoke_study(name="tiny", **grid):
    return Study(name=name, title=f"smoke study {name}", notebook="studies/p1_ablation.ipynb",
                 presets={"smoke": Preset(base=SMOKE, grid=grid or {"norm": ["bn", "none"], "seed": [0, 1]})})


# A real out-of-memory failure: the study runs in a child process under an address-space limit
# (ulimit -v) that its kernels inherit. The big point (2500 images x 64 channels x 32 x 32 fp32 =
# 0.66 GB per activation, ~10 GB kept for the backward pass) does not fit under the limit, but it
# fits this machine's RAM, so bnlib's memory estimate (config.estimate_memory) lets it start;
# the small point fits.
OOM_SCRIPT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, resource.RLIM_INFINITY))
from bnlib.grid import run_study
from bnlib.studies import Preset, Study
big = dict(width=4.0, synthetic_size=5000, batch_size=2500, eval_batch_size=2500)
s = Study("oom", "one run runs out of memory", None,
          {{"smoke": Preset(base={base!r}, grid={{"width": [4.0, 0.25]}})}},
          derive=lambda p: big if p["width"] == 4.0 else {{}})
run_study(s, "smoke", sys.argv[1], progress=False)
"""


def run_oom_study(out: Path) -> subprocess.CompletedProcess:
    import psutil

    # headroom over a process with torch, bnlib and jupyter loaded (this one): the small run fits
    limit = max(psutil.Process().memory_info().vms, 5 * 2**30) + 3 * 2**30
    script = OOM_SCRIPT.format(limit=limit, base={**SMOKE, "epochs": 1, "precision": "fp32", "norm": "bn"})
    return subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """One tiny study run once for the module: 2 norms × 2 seeds, then a 2-point study in a
    memory-limited process whose first point runs out of memory, then the summary and report."""
    out = tmp_path_factory.mktemp("outputs")
    first = run_study(smoke_study(), "smoke", out, progress=False)
    oom = run_oom_study(out)
    execute_notebook(NOTEBOOKS / "summary.ipynb", out / "summary.ipynb", {"out": str(out)})
    index = build_report(out)
    return {"out": out, "first": first, "oom": oom, "index": index, "tiny": smoke_study()}


def test_grid_runs_every_point_through_papermill(outputs):
    out = outputs["out"]
    assert outputs["first"]["completed"] == 4 and outputs["first"]["failed"] == 0
    runs, manifest = load_study(out, "tiny")
    assert len(runs.runs) == 4 and set(runs.runs.norm) == {"bn", "none"} and set(runs.runs.seed) == {0, 1}
    for rid in manifest["run_ids"]:
        assert (out / "runs" / rid / "run.ipynb").exists()  # executed notebook kept beside its records
        assert (out / "runs" / rid / "epochs.parquet").exists()
    analysis = out / "studies" / "tiny" / "tiny.ipynb"
    nb = json.loads(analysis.read_text())
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


def test_rerun_skips_everything(outputs):
    counts = run_study(outputs["tiny"], "smoke", outputs["out"], progress=False, analyze=False)
    assert counts["skipped"] == 4 and counts["completed"] == counts["failed"] == 0
    assert all(it["status"] == "completed" for it in plan(outputs["tiny"], "smoke", outputs["out"]))


def test_out_of_memory_run_is_failed_with_its_reason_and_the_grid_goes_on(outputs):
    oom = outputs["oom"]
    assert oom.returncode == 0, oom.stderr[-3000:]
    assert "study oom: completed 1 / diverged 0 / failed 1 / skipped 0" in oom.stdout, (oom.stdout, oom.stderr[-3000:])
    statuses = {json.loads(p.read_text())["status"]: json.loads(p.read_text())
                for p in (outputs["out"] / "runs").glob("*/status.json")}
    failed = statuses["failed"]
    assert failed["error"].startswith("out of memory: RuntimeError") and "can't allocate memory" in failed["error"]
    # the runner said so, and load_runs leaves the run out and says why
    assert "failed:" in oom.stderr and "out of memory" in oom.stderr
    runs = bnlib.load_runs(outputs["out"] / "runs")
    assert any(why == "status 'failed'" for _, why in runs.skipped)
    # the grid went on: the second point completed in the same memory-limited process
    assert ((runs.runs.width == 0.25) & (runs.runs.epochs == 1)).sum() == 1


def test_missing_dataset_rejects_the_study_before_any_run(tmp_path):
    empty = tmp_path / "no_cifar"
    empty.mkdir()
    study = Study(name="nodata", title="CIFAR absent", notebook=None, presets={"smoke": Preset(
        base={**SMOKE, "data_dir": str(empty), "download": False}, grid={"dataset": ["synthetic", "cifar10"]})})
    with pytest.raises(bnlib.ConfigError) as e:
        run_study(study, "smoke", tmp_path / "out", progress=False)
    assert "dataset='cifar10'" in str(e.value) and str(empty) in str(e.value)
    assert not (tmp_path / "out" / "runs").exists()  # not even the synthetic point ran


def test_invalid_grid_point_rejected_before_any_run(tmp_path):
    bad = smoke_study(norm=["bn", "batchnorm"])
    with pytest.raises(bnlib.ConfigError, match="batchnorm"):
        run_study(bad, "smoke", tmp_path, progress=False)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_summary_executes_and_names_missing_studies(outputs):
    nb = json.loads((outputs["out"] / "summary.ipynb").read_text())
    outs = [o for c in nb["cells"] for o in c.get("outputs", [])]
    assert not [o for o in outs if o.get("output_type") == "error"]
    text = "".join("".join(o.get("text", "")) for o in outs)
    assert "p1: MISSING" in text  # the registered P1 study was not run here
    assert sum("image/png" in o.get("data", {}) for o in outs) >= 3


def test_verdicts_are_on_the_index_and_open_the_summary(outputs):
    """The study notebook writes its verdicts; the index lists them, one row per claim with its
    outcome and cause, next to the study's link; the summary opens with the forest plot, then the
    compact table and every sentence (folded)."""
    import html

    from bnlib import stats

    vs = stats.read_verdicts(outputs["out"])
    assert vs and {v.study for v in vs} == {"tiny"} and all(v.outcome in stats.OUTCOMES for v in vs)
    text = outputs["index"].read_text()
    assert 'class="verdicts"' in text and vs[0].label in text
    nb = json.loads((outputs["out"] / "summary.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and c.get("outputs")]
    assert "image/png" in code[0]["outputs"][0]["data"]  # the summary opens with the forest plot
    h = "".join("".join(o.get("data", {}).get("text/html", "")) for o in code[1]["outputs"])
    assert "<details>" in h and html.escape(vs[0].sentence) in h and vs[0].label in h


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_report_renders_in_a_real_browser(outputs):
    index = outputs["index"]
    pages = sorted(index.parent.rglob("*.html"))
    assert (index.parent / "summary.html").exists() and (index.parent / "studies" / "tiny.html").exists()
    assert len(list((index.parent / "runs").glob("*.html"))) == 6
    if _chromium() is None or shutil.which("chromedriver") is None:
        pytest.skip("no chromium/chromedriver found: the browser check needs Debian's chromium and "
                    "chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = _chromium()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--no-first-run", "--disable-quic"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        for page in pages:
            driver.get(page.resolve().as_uri())
            imgs = driver.execute_script(
                "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
            assert all(c and w > 0 and h > 0 for c, w, h in imgs), (page, imgs)
            body = driver.find_element("tag name", "body").text
            status = outputs["out"] / "runs" / page.stem / "status.json"
            if status.exists() and json.loads(status.read_text())["status"] == "failed":
                assert "can't allocate memory" in body  # a failed run's page shows why it failed
                continue
            assert "Traceback" not in body, page
            if page != index:
                if page.parent.name == "runs":  # a study's point draws no figures of its own (BNLIB_RUN_FIGURES)
                    assert "figures not drawn here (BNLIB_RUN_FIGURES=0)" in body and "val_acc" in body, page
                else:
                    assert imgs, f"{page.name} shows no figure"
                # code hidden by default, one click shows it
                hidden = driver.execute_script("return document.body.classList.contains('bnlib-hide-code')")
                driver.find_element("id", "bnlib-toggle-code").click()
                shown = not driver.execute_script("return document.body.classList.contains('bnlib-hide-code')")
                assert hidden and shown
        driver.get(index.resolve().as_uri())
        assert "failed: out of memory: RuntimeError" in driver.find_element("tag name", "body").text
        links = driver.execute_script("return Array.from(document.links).map(a => a.href)")
        assert len(links) == len(pages) - 1
        assert all(Path(l.replace("file://", "")).exists() for l in links)
    finally:
        driver.quit()


def test_report_lists_an_unreadable_notebook_instead_of_failing(outputs, tmp_path):
    """A run notebook cut short (full disk, a killed writer) is named on the index; the rest renders."""
    src = next(p.parent for p in (outputs["out"] / "runs").glob("*/run.ipynb"))
    for name in ("good", "cut"):
        shutil.copytree(src, tmp_path / "runs" / name)
    nb = tmp_path / "runs" / "cut" / "run.ipynb"
    nb.write_bytes(nb.read_bytes()[:5000])
    index = build_report(tmp_path)
    text = index.read_text()
    assert "could not be rendered" in text and str(nb) in text
    assert (tmp_path / "report" / "runs" / "good.html").exists() and "runs/good.html" in text


# ----------------------------------------------------------------------------------------------
# the real studies' presets: data set override, and a missing data set stops everything early
# ----------------------------------------------------------------------------------------------

def test_dataset_override_replaces_the_preset_data_set_only():
    from bnlib.studies import get_study

    p1 = get_study("p1")
    quick, synth = p1.points("quick"), p1.points("quick", dataset="synthetic")
    assert {p["dataset"] for p in quick} == {"fashion_mnist"} and {p["dataset"] for p in synth} == {"synthetic"}
    assert [{k: v for k, v in a.items() if k != "dataset"} for a in quick] == \
        [{k: v for k, v in b.items() if k != "dataset"} for b in synth]
    # every arm has its own learning-rate ladder of at least 3 values, scaled with the batch size
    for norm in {p["norm"] for p in quick}:
        for bs in {p["batch_size"] for p in quick}:
            lrs = sorted({p["lr"] for p in quick if p["norm"] == norm and p["batch_size"] == bs})
            assert len(lrs) >= 3 and all(b / a == pytest.approx(4) for a, b in zip(lrs, lrs[1:]))


def test_missing_fashion_mnist_stops_make_study_before_any_run(tmp_path, monkeypatch, capsys):
    from bnlib import cli, data

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # data_dir '~/data' is empty here
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", str(tmp_path / "no-package"))
    data._fashion_arrays.cache_clear()
    out = tmp_path / "outputs"
    assert cli.main(["study", "all", "--out", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "dataset='fashion_mnist'" in err and "make study DATASET=synthetic" in err
    assert "apt-get install dataset-fashion-mnist" in err
    assert not out.exists() and not (tmp_path / "home" / "data").exists()  # nothing written
    data._fashion_arrays.cache_clear()

"""notebooks/run.ipynb executed for real through papermill, with tiny parameters."""
import json
from dataclasses import fields
from pathlib import Path

import papermill as pm
import pytest

import bnlib

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks" / "run.ipynb"
TINY = dict(arch="resnet8", width=0.25, synthetic_size=300, val_fraction=0.2, n_test=60, batch_size=32,
            epochs=2, log_every=2)


def test_parameters_cell_is_the_run_config():
    """The notebook's parameters cell and bnlib.RunConfig carry the same names and defaults."""
    nb_params = pm.inspect_notebook(str(NB))
    defaults = bnlib.RunConfig()
    assert list(nb_params) == [f.name for f in fields(bnlib.RunConfig)]
    for name, p in nb_params.items():
        assert eval(p["default"]) == getattr(defaults, name), name


def test_parameters_cell_is_the_generators_output():
    """run.ipynb's parameters cell is exactly what `make params` writes (help texts intact)."""
    import nbformat

    from bnlib.config import parameters_cell

    cell = next(c for c in nbformat.read(NB, 4).cells if "parameters" in c.metadata.get("tags", []))
    assert cell.source == parameters_cell(), "run `make params` to regenerate run.ipynb's parameters cell"
    assert "# channel width multiplier (1.0 = the paper's widths)" in cell.source


def test_run_notebook_writes_a_complete_run(tmp_path):
    out = tmp_path / "run.ipynb"
    pm.execute_notebook(str(NB), str(out), parameters={**TINY, "norm": "bn_minus", "out_dir": str(tmp_path / "runs")},
                        cwd=str(ROOT), progress_bar=False, kernel_name="python3")
    runs = bnlib.load_runs(tmp_path / "runs")
    assert len(runs.runs) == 1 and runs.runs.status[0] == "completed" and runs.runs.norm[0] == "bn_minus"
    run_dir = Path(tmp_path / "runs" / runs.runs.run_id[0])
    assert {"config.json", "status.json", "epochs.parquet", "steps.parquet", "norm_params.parquet"} <= \
        {p.name for p in run_dir.iterdir()}
    nb = json.loads(out.read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # curves + γ/β drift
    # one progress bar for the run, not a line per step
    stderr = "".join("".join(o["text"]) for o in outputs if o.get("name") == "stderr")
    assert stderr.count("\n") <= 3


def test_run_notebook_rejects_bad_parameters_before_training(tmp_path):
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(NB), str(tmp_path / "bad.ipynb"),
                            parameters={**TINY, "norm": "batchnorm", "lr": -0.1, "epochs": "3", "learning_rate": 0.1,
                                        "out_dir": str(tmp_path / "runs")},
                            cwd=str(ROOT), progress_bar=False, kernel_name="python3")
    msg = str(e.value)
    assert "norm='batchnorm'" in msg and "valid choices" in msg and "lr=-0.1" in msg
    assert "epochs='3' (str): must be an integer" in msg and "unknown parameter 'learning_rate'" in msg
    assert not (tmp_path / "runs").exists()


def test_run_notebook_missing_dataset_fails_in_the_check_cell(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(NB), str(tmp_path / "bad.ipynb"),
                            parameters={**TINY, "dataset": "cifar10", "data_dir": str(empty), "download": False,
                                        "out_dir": str(tmp_path / "runs")},
                            cwd=str(ROOT), progress_bar=False, kernel_name="python3")
    assert e.value.ename == "ConfigError" and "dataset='cifar10'" in str(e.value)
    assert "bnlib.check_data(cfg)" in e.value.source  # the check cell, before the training cell
    assert not (tmp_path / "runs").exists()

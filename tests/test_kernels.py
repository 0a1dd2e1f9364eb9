"""bnlib.kernels: the notebook is written once per code cell as it starts (watchable while it
runs), as it stands when the kernel dies, and a run through run.ipynb in the study runner's
reused kernel computes exactly what bnlib.run computes in this process."""
import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest

import bnlib
import bnlib.data
from bnlib.kernels import NOTEBOOKS, execute_notebook

TINY = dict(arch="resnet8", width=0.25, synthetic_size=300, val_fraction=0.2, n_test=60, batch_size=32,
            epochs=2, log_every=2, dataset="synthetic", progress=False)


def small_notebook(path: Path, cells: list[str]) -> Path:
    """A notebook of `cells` (code; '# md ' ones markdown), with a parameters cell first."""
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3"},
                                            "language_info": {"name": "python"}})
    nb.cells.append(nbformat.v4.new_code_cell("partial = ''", metadata={"tags": ["parameters"]}))
    for src in cells:
        nb.cells.append(nbformat.v4.new_markdown_cell(src[5:]) if src.startswith("# md ")
                        else nbformat.v4.new_code_cell(src))
    nbformat.write(nb, path)
    return path


def test_the_notebook_is_written_as_each_code_cell_starts(tmp_path, monkeypatch):
    import papermill.engines

    writes = []
    real = papermill.engines.write_ipynb
    monkeypatch.setattr(papermill.engines, "write_ipynb", lambda nb, path: (writes.append(path), real(nb, path)))
    # the third code cell reads the partial notebook on disk while it runs: it holds the earlier
    # cells' outputs and marks this cell as running
    src = small_notebook(tmp_path / "nb.ipynb", [
        "# md a heading", "print('first output')", "# md more words",
        "import json\nnb = json.load(open(partial))\n"
        "print([o.get('text') for c in nb['cells'] for o in c.get('outputs', [])])\n"
        "print([c['metadata']['papermill']['status'] for c in nb['cells']])"])
    dst = tmp_path / "out.ipynb"
    execute_notebook(src, dst, {"partial": str(tmp_path / ".out.partial.ipynb")}, cwd=tmp_path)
    code_cells = 4  # parameters, injected parameters, and the two above
    assert len(writes) == code_cells  # not 2 per cell, markdown included, + 2 (papermill's engine)
    out = nbformat.read(dst, as_version=4)
    seen = out.cells[-1].outputs[0]["text"].splitlines()
    assert seen[0] == "[['first output\\n']]"
    assert eval(seen[1])[-1] == "running" and eval(seen[1])[2] == "completed"
    assert not (tmp_path / ".out.partial.ipynb").exists()  # moved onto dst


def test_a_dead_kernel_leaves_the_notebook_as_it_stood(tmp_path):
    src = small_notebook(tmp_path / "nb.ipynb", ["print('before the crash')", "import os\nos._exit(1)",
                                                 "print('never')"])
    dst = tmp_path / "out.ipynb"
    with pytest.raises(Exception) as e:
        execute_notebook(src, dst, {}, cwd=tmp_path)
    assert "DeadKernel" in type(e.value).__name__ or "died" in str(e.value).lower(), repr(e.value)
    out = {c.source: c for c in nbformat.read(dst, as_version=4).cells}
    assert out["print('before the crash')"].outputs[0]["text"] == "before the crash\n"
    assert out["print('never')"].outputs == []


@pytest.fixture
def kernel(monkeypatch):
    """The study runner's kernel, on one thread like this process (conftest): the same
    reduction order, so the same bits."""
    from bnlib.kernels import _point_kernel, shutdown_point_kernel

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    km = _point_kernel()
    yield km
    shutdown_point_kernel()


def test_reused_kernel_runs_compute_what_bnlib_run_computes(kernel, tmp_path):
    """Two runs in one reused kernel (the second with the first's cached data set and split,
    after gc.freeze and %reset -f) against the same runs in this process with nothing cached:
    same run ids, metrics and tables."""
    points = [{**TINY, "seed": 3}, {**TINY, "seed": 4, "norm": "none", "lr": 0.05}]
    for i, p in enumerate(points):
        execute_notebook(NOTEBOOKS / "run.ipynb", tmp_path / f"nb{i}.ipynb", {**p, "out_dir": str(tmp_path / "k")},
                         km=kernel)
        bnlib.data._SPLITS.clear()
        bnlib.data._synthetic_arrays.cache_clear()
        bnlib.run({**p, "out_dir": str(tmp_path / "here")})
    k, here = (sorted((tmp_path / d).iterdir()) for d in ("k", "here"))
    assert [p.name for p in k] == [p.name for p in here] and len(k) == 2
    for a, b in zip(k, here):
        sa, sb = (json.loads((d / "status.json").read_text()) for d in (a, b))
        assert sa["metrics"] == sb["metrics"] and sa["status"] == sb["status"] == "completed"
        for t in ("epochs", "steps", "norm_params", "channels"):
            ta, tb = (pd.read_parquet(d / f"{t}.parquet").drop(columns=["seconds", "img_per_s"], errors="ignore")
                      for d in (a, b))
            pd.testing.assert_frame_equal(ta, tb, check_exact=True)

"""Where a study run's wall time goes besides training, and what bnlib's overhead cuts save.

Every timed round runs one point of P1's quick preset in each arm, in one process, the arms in
a rotating order (so drifting machine load hits them alike), each arm into its own outputs folder:

- `fresh`:  a fresh kernel per run (the study runner before kernels were reused);
- `before`: one reused kernel with the overhead cuts undone: papermill's default engine (it
            writes the notebook at the start and the end of every cell), run.ipynb without its
            gc.freeze() and with the inline backend's tight crop of each figure, and
            load_data's split cache and the synthetic set's cache emptied before each run;
- `after`:  one reused kernel, as the study runner uses it (bnlib.kernels.execute_notebook).

The reused kernels are started and warmed (one untimed run) before timing; every kernel gets
the thread count a study worker's kernel gets (the cores / --workers). Overhead = the
notebook's wall time - the training time the run records (status.json total_seconds, from its
first step to its last record). The script checks that every arm gives each point the same run
id, metrics and epochs table (every value but the timings): the cuts change no result.

    .venv/bin/python scripts/kernel_overhead.py [--runs 4] [--no-fresh] [--dataset synthetic] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nbformat  # noqa: E402
import pandas as pd  # noqa: E402
from jupyter_core.utils import run_sync  # noqa: E402

from bnlib.data import FASHION_SYSTEM_DIR  # noqa: E402
from bnlib.kernels import NOTEBOOKS, _kernel_manager_class, execute_notebook  # noqa: E402
from bnlib.studies import STUDIES, get_study  # noqa: E402

TIMING = ["seconds", "img_per_s"]  # the epochs table's columns that measure time, not the run
CUTS = ("gc.freeze()", '%config InlineBackend.print_figure_kwargs = {"bbox_inches": None}')  # run.ipynb's


def before_notebook(dst: Path) -> Path:
    """run.ipynb with the kernel-side cuts undone (module docstring: the `before` arm)."""
    nb = nbformat.read(NOTEBOOKS / "run.ipynb", as_version=4)
    cell = nb.cells[1]
    assert cell.source.endswith("_before_parameters = set(globals())") and all(c in cell.source for c in CUTS), \
        "run.ipynb's first cell changed: update before_notebook"
    lines = [ln for ln in cell.source.splitlines() if ln.strip() not in CUTS]
    cell.source = "\n".join(lines[:-1] + ["bnlib.data._SPLITS.clear()", "bnlib.data._synthetic_arrays.cache_clear()",
                                          lines[-1]])
    nbformat.write(nb, dst)
    return dst


def execute_before(src: Path, dst: Path, params: dict, km) -> None:
    """bnlib.kernels.execute_notebook as it was: papermill's own engine."""
    import papermill as pm

    pm.execute_notebook(str(src), str(dst), parameters=params, cwd=str(ROOT), kernel_name="python3",
                        progress_bar=False, log_output=False, request_save_on_cell_execute=True, km=km)


def parts(nb_path: Path, wall: float, train: float) -> dict:
    """The notebook's wall time by part, from papermill's per-cell durations."""
    nb = json.loads(nb_path.read_text())
    out = {"wall": wall, "train": train, "overhead": wall - train, "papermill": wall, "setup cell": 0.0,
           "check cell": 0.0, "run cell - train": 0.0, "tables & figures": 0.0}
    after_run = False
    for c in nb["cells"]:
        d = (c.get("metadata", {}).get("papermill") or {}).get("duration") or 0.0
        out["papermill"] -= d
        src = "".join(c["source"])
        if c["cell_type"] != "code":
            continue
        if "%reset -f" in src:
            out["setup cell"] += d
        elif "bnlib.validate(params)" in src:
            out["check cell"] += d
        elif "bnlib.run(cfg)" in src:
            out["run cell - train"] += d - train
            after_run = True
        elif after_run:
            out["tables & figures"] += d
    return out


def run_one(arm: str, params: dict, out: Path, km, src: Path) -> tuple[dict, Path]:
    runs = out / arm / "runs"
    dst = out / arm / f"nb-{params['seed']}-{params['lr']}.ipynb"
    dst.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if arm == "before":
        execute_before(src, dst, {**params, "out_dir": str(runs)}, km)
    else:
        execute_notebook(NOTEBOOKS / "run.ipynb", dst, {**params, "out_dir": str(runs)}, km=km)
    wall = time.perf_counter() - t0
    rid = next(ln.split()[-1] for c in json.loads(dst.read_text())["cells"] if c["cell_type"] == "code"
               for o in c.get("outputs", []) for ln in "".join(o.get("text", "")).splitlines()
               if ln.startswith("run id:"))
    st = json.loads((runs / rid / "status.json").read_text())
    return parts(dst, wall, st["total_seconds"]), runs / rid


def same_result(a: Path, b: Path) -> None:
    """The two run folders hold the same run: id, metrics, epochs table (timings aside)."""
    assert a.name == b.name, (a.name, b.name)
    ma, mb = (json.loads((p / "status.json").read_text())["metrics"] for p in (a, b))
    assert ma == mb, (ma, mb)
    ea, eb = (pd.read_parquet(p / "epochs.parquet").drop(columns=TIMING) for p in (a, b))
    pd.testing.assert_frame_equal(ea, eb, check_exact=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=4, help="timed runs per arm")
    ap.add_argument("--no-fresh", action="store_true", help="leave out the fresh-kernel arm")
    ap.add_argument("--dataset", default=None, help="override the points' data set (e.g. synthetic)")
    ap.add_argument("--workers", type=int, default=2,
                    help="the study's workers: each kernel gets this machine's cores / workers threads, as there")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.workers))  # the kernels inherit it
    if args.dataset is None and not Path(FASHION_SYSTEM_DIR, "train-images-idx3-ubyte.gz").exists():
        args.dataset = "synthetic"
    points = get_study("p1").points("quick", args.dataset)
    arms = ["before", "after"] + ([] if args.no_fresh else ["fresh"])
    rows = {a: [] for a in arms}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        src = before_notebook(out / "run-before.ipynb")
        kms = {}
        try:
            for a in ("before", "after"):
                kms[a] = _kernel_manager_class()(kernel_name="python3")
                run_sync(kms[a].start_kernel)(cwd=str(ROOT))
                run_one(a, {**points[-1], "progress": False}, out, kms[a], src)  # warm: imports, data set; untimed
            for i in range(args.runs):
                params = {**points[i % len(points)], "progress": False}
                order = arms[i % len(arms):] + arms[:i % len(arms)]
                done = {}
                for a in order:
                    res, done[a] = run_one(a, params, out, kms.get(a), src)
                    rows[a].append(res)
                for a in order[1:]:
                    same_result(done[order[0]], done[a])
                print(f"round {i + 1}: " + ", ".join(f"{a} overhead {rows[a][-1]['overhead']:.2f} s" for a in arms),
                      flush=True)
        finally:
            for km in kms.values():
                run_sync(km.shutdown_kernel)()
    med = {a: {k: statistics.median(r[k] for r in rows[a]) for k in rows[a][0]} for a in arms}
    print(f"\nmedian seconds per run over {args.runs} rounds (P1 quick points, {points[0]['dataset']}); "
          f"every arm gave each point the same run id, metrics and epochs table")
    print(f"{'':18s}" + "".join(f"{a:>10s}" for a in arms))
    for k in med[arms[0]]:
        print(f"{k:18s}" + "".join(f"{med[a][k]:10.2f}" for a in arms))
    ratio = med["before"]["overhead"] / med["after"]["overhead"]
    n = sum(len(get_study(s).points("quick")) for s in STUDIES)
    saved = (med["before"]["overhead"] - med["after"]["overhead"]) * n / args.workers
    print(f"\noverhead per run in a reused kernel, before/after: {ratio:.2f}x "
          f"({med['before']['overhead']:.2f} s -> {med['after']['overhead']:.2f} s)")
    print(f"make study: {n} quick-preset runs on {args.workers} workers -> about {saved / 60:.1f} min less wall time "
          f"(at this machine's speed now; P1's notebooks stand for every study's)")
    if "fresh" in med:
        print(f"a kernel's start (fresh - reused overhead): {med['fresh']['overhead'] - med['after']['overhead']:.2f} s")


if __name__ == "__main__":
    main()

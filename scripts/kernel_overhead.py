"""How much of a study run is papermill's kernel overhead, with a fresh kernel per run (how the
study runner worked before) and with one reused kernel (bnlib.kernels now)?

Both arms execute the same tiny quick-preset-like runs (Fashion-MNIST if present, else the
synthetic set) through notebooks/run.ipynb, interleaved, in one process; overhead = wall time
of the notebook − the training time the run records itself. The reused kernel is started and
warmed (one untimed run) before timing, so its start-up is not in the timed part.

    .venv/bin/python scripts/kernel_overhead.py [--runs 4]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jupyter_core.utils import run_sync  # noqa: E402

from bnlib.data import FASHION_SYSTEM_DIR  # noqa: E402
from bnlib.kernels import NOTEBOOKS, _kernel_manager_class, execute_notebook  # noqa: E402


def one(params: dict, out: Path, km=None) -> tuple[float, float]:
    t0 = time.perf_counter()
    execute_notebook(NOTEBOOKS / "run.ipynb", out / f"nb-{params['seed']}.ipynb", params, km=km)
    wall = time.perf_counter() - t0
    st = json.loads(next(out.glob(f"runs/*-s{params['seed']}-*/status.json")).read_text())
    return wall, st["total_seconds"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=4, help="timed runs per arm")
    args = ap.parse_args()
    fashion = Path(FASHION_SYSTEM_DIR, "train-images-idx3-ubyte.gz").exists()
    base = dict(dataset="fashion_mnist" if fashion else "synthetic", n_train=2000, n_test=500, val_fraction=0.02,
                width=0.125, arch="resnet18", epochs=1, crop_pad=0, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        base["out_dir"] = str(out / "runs")
        km = _kernel_manager_class()(kernel_name="python3")
        run_sync(km.start_kernel)(cwd=str(ROOT))
        try:
            one({**base, "seed": 10_000}, out, km)  # warm: imports and data cache, untimed
            fresh, reused = [], []
            for i in range(args.runs):  # interleaved, so drifting machine load hits both arms alike
                fresh.append(one({**base, "seed": 2 * i}, out))
                reused.append(one({**base, "seed": 2 * i + 1}, out, km))
        finally:
            run_sync(km.shutdown_kernel)()
    for name, rows in (("fresh kernel per run", fresh), ("one reused kernel", reused)):
        over = [w - t for w, t in rows]
        share = [o / w for o, (w, _) in zip(over, rows)]
        print(f"{name:22s} overhead/run median {statistics.median(over):5.2f} s (min {min(over):.2f}, "
              f"max {max(over):.2f}); share of the run's wall time {statistics.median(share):.0%}")
    print(f"overhead ratio fresh/reused: "
          f"{statistics.median([w - t for w, t in fresh]) / statistics.median([w - t for w, t in reused]):.1f}x "
          f"({base['dataset']}, {args.runs} runs per arm)")


if __name__ == "__main__":
    main()

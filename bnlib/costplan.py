"""What a study will cost before it starts (`python -m bnlib study NAME --plan`): its runs,
epochs and training images, how many are already done, and an estimated duration from the
training throughput `make bench` measured on this machine (outputs/bench/throughput.json).

Images are counted from the parameters alone (bnlib.data.split_sizes), so a plan
needs no data files: per epoch, the training pool less the validation split, capped by
`n_train`, in whole batches when `drop_last`. An estimate is training time only (images /
img/s of the grid's arch and width on that device), for one worker; evaluation, kernel start-up
and records add to it, and parallel workers divide it. The throughput table holds one entry per
(host, device, arch, width); a model bench has not measured here is said to be so, never guessed.
"""
from __future__ import annotations

import json
import socket
from collections import Counter
from pathlib import Path

from .cluster import resolve_runs_per_gpu, slurm_cluster
from .data import split_sizes
from .grid import plan
from .records import FINISHED
from .studies import STUDIES, get_study

__all__ = ["train_images", "grid_cost", "load_throughput", "estimate", "format_plan", "THROUGHPUT"]

THROUGHPUT = Path("bench") / "throughput.json"  # under the outputs folder; written by scripts/bench.py


def train_images(cfg: dict) -> int:
    """Training images one epoch of this (validated) run sees, as data.py splits them."""
    n = split_sizes(cfg)[2]
    return n // cfg["batch_size"] * cfg["batch_size"] if cfg.get("drop_last", True) else n


def grid_cost(items: list[dict]) -> dict:
    """Runs, epochs and training images of a plan (bnlib.grid.plan's items), in total and per
    (arch, width), and how many runs are done already (by the ids this machine resolves)."""
    by_model, todo_by_model = Counter(), Counter()
    runs = epochs = images = done = 0
    for it in items:
        cfg = it["cfg"]
        n = train_images(cfg) * cfg["epochs"]
        key = (cfg["arch"], cfg["width"])
        by_model[key] += n
        runs, epochs, images = runs + 1, epochs + cfg["epochs"], images + n
        if it["status"] in FINISHED:
            done += 1
        else:
            todo_by_model[key] += n
    return {"runs": runs, "epochs": epochs, "images": images, "done": done, "by_model": dict(by_model),
            "todo_by_model": dict(todo_by_model)}


def load_throughput(out) -> list[dict]:
    """This machine's entries of <out>/bench/throughput.json ([] when there is none)."""
    path = Path(out) / THROUGHPUT
    try:
        entries = json.loads(path.read_text()).get("entries", [])
    except (OSError, ValueError, AttributeError):
        return []
    host = socket.gethostname()
    return [e for e in entries if isinstance(e, dict) and e.get("hostname") == host]


def estimate(cost: dict, entries: list[dict], device: str) -> dict:
    """Training seconds of the runs still to do on `device` ('cpu' or 'cuda'), from the entries
    measured there; `missing` lists the (arch, width) with no measurement (seconds is then a
    lower bound over the measured ones, or None when nothing is measured)."""
    rate = {}
    for e in entries:  # later entries win: the newest measurement
        if e.get("device") == device and e.get("img_per_s"):
            rate[(e["arch"], float(e["width"]))] = float(e["img_per_s"])
    seconds, missing = 0.0, []
    for (arch, width), n in sorted(cost["todo_by_model"].items()):
        if (arch, float(width)) in rate:
            seconds += n / rate[(arch, float(width))]
        else:
            missing.append((arch, width))
    measured = len(missing) < len(cost["todo_by_model"]) or not cost["todo_by_model"]
    return {"seconds": seconds if measured else None, "missing": missing}


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def format_plan(name: str, preset: str, items: list[dict], out, devices: list[str], runs_per_gpu: int = 1) -> str:
    """The text `study NAME --plan` prints for one study; with K = runs_per_gpu > 1, what K runs
    sharing a GPU can at best make of the GPU estimate (sharing itself is not benched)."""
    cost = grid_cost(items)
    entries = load_throughput(out)
    lines = [f"study {name} [{preset}]: {cost['runs']} runs, {cost['epochs']} epochs, "
             f"{cost['images']:,} training images ({cost['images']:.2g}); {cost['done']} already done, "
             f"{cost['runs'] - cost['done']} to run"]
    for (arch, width), n in sorted(cost["by_model"].items()):
        lines.append(f"  {arch} width {width:g}: {n:,} training images")
    for dev in devices:
        est = estimate(cost, entries, dev)
        miss = ", ".join(f"{a} width {w:g}" for a, w in est["missing"])
        if est["seconds"] is None:
            lines.append(f"  estimated on {dev}: not measured here: run make bench (`.venv/bin/python "
                         f"scripts/bench.py --study {name}:{preset}` measures {miss})")
            continue
        line = f"  estimated on {dev}: {_duration(est['seconds'])} of training for one worker"
        if dev == "cuda" and runs_per_gpu > 1:
            line += (f"; {runs_per_gpu} runs per GPU: between {_duration(est['seconds'] / runs_per_gpu)} and that "
                     f"per GPU (the gain of sharing is not benched: make gpu-check measures one grid)")
        if miss:
            line += f" + the runs of {miss}: not measured here: run make bench"
        lines.append(line)
    return "\n".join(lines)


def print_plan(name: str, preset: str = "quick", out="outputs", dataset: str | None = None,
               cluster: dict | None = None, runs_per_gpu: int | None = None) -> None:
    """`study NAME --plan`: format_plan for the study (every registered study for 'all'), on
    the CPU and, where one is present, on the GPU; with cluster {"kind": "slurm", ...} also the
    job script dask-jobqueue would submit. `runs_per_gpu`: K runs per GPU (None: the study's
    own choice, cluster.resolve_runs_per_gpu). Trains nothing, writes nothing, needs no data files."""
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    names = list(STUDIES) if name == "all" else [name]
    out = Path(out).resolve()
    local = (cluster or {}).get("kind", "local") == "local"
    ks = []
    for n in names:
        items = plan(get_study(n), preset, out, dataset, check=False)
        ks.append(resolve_runs_per_gpu(runs_per_gpu, preset, [it["cfg"] for it in items], local))
        print(format_plan(n, preset, items, out, devices, ks[-1]))
        print(f"  runs per GPU: {ks[-1]}" + ("" if runs_per_gpu is not None else " (--runs-per-gpu: 1 for the paper "
              "preset and on a cluster, else as many as the memory estimate fits on this machine's GPU)"))
    print(f"(estimates: training time at the img/s that make bench measured on {socket.gethostname()}, "
          f"from {out / THROUGHPUT}; one worker: divide by the workers that run in parallel)")
    if (cluster or {}).get("kind") == "slurm":
        opts = {k: v for k, v in cluster.items() if k != "kind"}
        with slurm_cluster(**opts, runs_per_gpu=min(ks)) as c:
            print("\nSLURM job script of each worker (dask-jobqueue):\n" + c.job_script())

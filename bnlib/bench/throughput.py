"""Training throughput of bnlib's own loop: one fresh 2-epoch run measured by bnlib's epoch timer
(records written, or kept in memory for the lean variant), its ceiling (the model step alone on
ready-made device tensors), and the machine-tagged table of img/s per model that
`python -m bnlib study NAME --plan` reads (bnlib.costplan.THROUGHPUT under the outputs folder)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from ..data import to_input
from ..device import configure_backends
from ..records import RunDir
from ..train import build_model, make_optimizer, param_groups
from ..train import run as bnlib_run
from ..train import train as bnlib_train
from .meters import sync
from .workload import BATCH

__all__ = ["CeilingLoop", "MemoryRecords", "bnlib_epoch", "throughput_entry", "write_throughput"]


class CeilingLoop:
    """Forward, loss, backward, optimizer step on ready-made device tensors (float in [0, 1],
    channels_last as bnlib's), bnlib's model and optimizer, bnlib's precision. Nothing else."""

    def __init__(self, data, cfg: dict, device: torch.device):
        self.device = device
        torch.manual_seed(cfg["seed"])
        model = build_model(cfg, data.mean, data.std, data.num_classes).to(device)
        if cfg["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.opt = make_optimizer(param_groups(model, cfg), cfg)
        steps = len(data.y_train) // BATCH
        self.batches = [(to_input(data.x_train[i * BATCH:(i + 1) * BATCH], cfg["channels_last"]),
                         data.y_train[i * BATCH:(i + 1) * BATCH]) for i in range(steps)]
        self.bf16 = cfg["precision"] == "bf16"
        self.cfg = cfg

    def step(self, x, y):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(x)
        loss = F.cross_entropy(out.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

    def warmup(self, steps: int):
        configure_backends(self.cfg)  # bnlib's flags (process-wide; the last run may have set others)
        self.model.train()
        for _ in range(steps):
            self.step(*self.batches[0])
        sync(self.device)

    def epoch(self) -> dict:
        self.model.train()
        sync(self.device)
        t0 = time.perf_counter()
        for x, y in self.batches:
            loss = self.step(x, y)
        sync(self.device)
        sec = time.perf_counter() - t0
        n = len(self.batches) * BATCH
        return {"img_per_s": n / sec, "seconds": sec, "images": n, "train_loss_last": loss.item()}


class MemoryRecords(RunDir):
    """bnlib's RunDir with the tables kept in memory instead of written as parquet files (any
    other file bnlib's loop writes still goes to `path`, a scratch folder)."""

    def __init__(self, path):
        super().__init__(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.tables = {}

    def write_table(self, name, rows):
        self.tables[name] = list(rows)


def bnlib_epoch(cfg: dict, lean: bool, root: Path, tag: str) -> dict:
    """One fresh 2-epoch bnlib run; the second epoch's numbers (bnlib's own timer, training
    only: evaluation, norm snapshots and records writing come after the timer stops)."""
    t0 = time.perf_counter()
    if lean:
        mem = MemoryRecords(root / tag)
        status = bnlib_train(cfg, mem)
        epochs = mem.tables["epochs"]
        where = "in memory"
    else:
        res = bnlib_run({**cfg, "out_dir": str(root / tag)}, rerun=True)
        status = res
        epochs = pd.read_parquet(res.run_dir / "epochs.parquet").to_dict("records")
        where = str(res.run_dir / "epochs.parquet")
    wall = time.perf_counter() - t0
    if status.get("status") != "completed" or len(epochs) < 2:
        raise RuntimeError(f"bnlib run {tag} did not complete 2 epochs: {status.get('status')} ({where})")
    e = epochs[1]
    return {"img_per_s": float(e["img_per_s"]), "seconds": float(e["seconds"]),
            "images": int(round(e["img_per_s"] * e["seconds"])),
            "warmup_epoch_img_per_s": float(epochs[0]["img_per_s"]), "run_wall_s": wall,
            "train_loss": float(e["train_loss"])}


def throughput_entry(machine: dict, arch: str, width: float, precision: str, img_per_s: float,
                     rounds: int) -> dict:
    """One row of the throughput table, tagged with the machine (bnlib.device.machine) it ran on."""
    return {"hostname": machine["hostname"], "device": machine["device_type"], "device_name": machine["device_name"],
            "arch": arch, "width": float(width), "precision": precision, "batch_size": BATCH, "image": "32x32x3",
            "img_per_s": img_per_s, "rounds": rounds, "threads": machine["threads"],
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_throughput(path: Path, new: list[dict]) -> None:
    """Merge `new` into the machine-tagged table at `path`: one entry per (hostname, device,
    arch, width), the newest measurement kept; other machines' entries stay."""
    try:
        entries = json.loads(path.read_text()).get("entries", [])
    except (OSError, ValueError, AttributeError):
        entries = []
    key = lambda e: (e.get("hostname"), e.get("device"), e.get("arch"), e.get("width"))  # noqa: E731
    fresh = {key(e) for e in new}
    entries = [e for e in entries if key(e) not in fresh] + new
    path.write_text(json.dumps({"note": "training img/s of bnlib's loop (bnlib.run defaults, batch 128, 32x32 RGB "
                                        "synthetic images, epoch 2 of a fresh run) per machine and model; read "
                                        "by `python -m bnlib study NAME --plan`", "entries": entries}, indent=1))


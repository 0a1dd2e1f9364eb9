"""Training throughput of bnlib's loop against the popular CIFAR loop and the bare model step.

    .venv/bin/python scripts/bench.py [--quick] [--repeats N] [--out outputs/bench]
        [--n-train N] [--threads N] [--budget-s S] [--max-foreign F] [--wait-idle S] [--loops a,b]
        [--device D] [--probe-calls N] [--archs ARCH:WIDTH,...] [--study NAME[:PRESET]]

One process, one model (resnet18, BN, CIFAR stem; width 0.25 on CPU, 1.0 on CUDA), one data
set (bnlib's synthetic images, the same training images for every loop), batch size 128.
Loops, run interleaved (reference, reference_warm, bnlib, bnlib_fp32, ceiling, bnlib_lean, reference, ...):

  reference   the popular CIFAR loop: Dataset of PIL images + torchvision transforms
              (RandomCrop(32, 4), RandomHorizontalFlip, ToTensor, Normalize), DataLoader with
              num_workers=2, shuffle, drop_last; fp32, NCHW, SGD(momentum 0.9), loss.item()
              per step as in the PyTorch tutorial. Cold: the workers start inside each timed
              epoch (the default persistent_workers=False), on the same short epoch as bnlib's.
  reference_warm  the same loop warm: persistent workers started before timing, on its own
              epoch of >= 8000 images. Both are reported: on short epochs the cold figure
              counts the workers' start-up and flatters bnlib/reference.
  bnlib       bnlib.run with its defaults (precision auto, channels_last, records written to a
              temporary run directory, log_every 10); one fresh 2-epoch run per round, the
              first epoch is warm-up, the second epoch's `img_per_s` (training only, bnlib's
              own timer) is the measurement.
  bnlib_fp32  the same with precision='fp32'.
  ceiling     the model step alone (forward, loss, backward, optimizer step) on ready-made
              device tensors (float, channels_last), the precision of `bnlib`, bnlib's model
              and optimizer (param groups), no augmentation, no records, no logging.
  bnlib_lean  bnlib's loop with diagnostics minimized (log_every=1e9: the grad norm and the
              host read happen once per epoch, at its last step) and records kept in memory,
              not written: `diagnostics_overhead` = img/s(bnlib_lean) / img/s(bnlib).

Medians and min-max over the rounds; ratios of medians, and per-round ratios. The machine may
be shared: the share of the CPUs other processes used is measured during every measurement, and
rounds above --max-foreign are left out of the summary when at least 2 clean rounds remain (all
values stay in the JSON); --wait-idle S makes each round wait up to S seconds for an idle
machine first. --budget-s bounds the run: no new round starts that would end past it.
Writes <out>/bench.json (machine, results, ratios, diagnostics_overhead) and prints a table,
and merges this machine's bnlib img/s per model (resnet18 at the bench width, plus --archs
arch:width,...) into <out>/throughput.json, which `python -m bnlib study NAME --plan` reads.
Then the cost of every registered probe (bnlib.probes), in ms per call on the bench model with
a training batch of 128 (--probe-calls timed calls each after one untimed; 0 skips), so users
can choose a probe cadence: a probe every k steps adds about ms_per_call / k to each step.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

import bnlib
from bnlib.data import load_data, to_input
from bnlib.device import configure_backends
from bnlib.models import create_model
from bnlib.records import RunDir, git_commit
from bnlib.train import build_model, make_optimizer, param_groups
from bnlib.train import train as bnlib_train

BATCH = 128
LOOPS = ("reference", "reference_warm", "bnlib", "bnlib_fp32", "ceiling", "bnlib_lean")
WARM_IMAGES = 8000  # reference_warm's epoch: long enough that nothing but steady state shows


# ----------------------------------------------------------------------------------------------
# machine, timers, memory
# ----------------------------------------------------------------------------------------------

def machine_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "torch_num_threads": torch.get_num_threads(), "os_cpu_count": os.cpu_count(),
            "platform": platform.platform()}
    try:
        import torchvision
        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    name, flags = platform.processor() or "unknown", ""
    try:
        with open("/proc/cpuinfo") as fh:
            text = fh.read()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        name = m.group(1).strip() if m else name
        m = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = m.group(1) if m else ""
    except OSError:
        pass
    fl = set(flags.split())
    info["cpu"] = {"model_name": name, "avx512_bf16": "avx512_bf16" in fl, "amx_bf16": "amx_bf16" in fl,
                   "amx_tile": "amx_tile" in fl, "avx512f": "avx512f" in fl}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": torch.cuda.get_device_name(device), "total_memory_mb": p.total_memory / 2**20,
                       "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda,
                       "cudnn": torch.backends.cudnn.version(), "bf16_supported": torch.cuda.is_bf16_supported()}
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = os.getloadavg()
    info["bnlib"] = {"version": bnlib.__version__, "git_commit": git_commit()}
    return info


def _cpu_busy_jiffies() -> tuple[float, float] | None:
    """(busy, total) CPU time of the whole machine from /proc/stat, in seconds."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    total = sum(v[:8])  # guest time is already counted in user
    return (total - idle) / hz, total / hz


def _live_children_cpu() -> dict[int, float]:
    """{pid: user + system CPU seconds} of this process's live child processes (psutil)."""
    try:
        import psutil
    except ImportError:
        return {}
    out = {}
    for c in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            t = c.cpu_times()
            out[c.pid] = t.user + t.system
    return out


class ForeignLoad:
    """How much of the machine other processes used while a config ran: (machine busy CPU time
    - this process's and its reaped children's CPU time) / (wall time x CPUs). On a shared
    machine this is what makes a measurement unreliable; it is recorded next to each one."""

    def __enter__(self):
        self.m0, self.t0, self.w0 = _cpu_busy_jiffies(), os.times(), time.perf_counter()
        self.k0 = _live_children_cpu()
        return self

    def __exit__(self, *exc):
        m1, t1, wall = _cpu_busy_jiffies(), os.times(), time.perf_counter() - self.w0
        k1 = _live_children_cpu()
        self.frac = None
        if self.m0 and m1 and wall > 0:
            own = sum(b - a for a, b in zip(self.t0[:4], t1[:4]))  # user, sys, children user/sys
            # children still alive (persistent DataLoader workers) are not in os.times: add theirs
            own += sum(v - self.k0.get(pid, 0.0) for pid, v in k1.items())
            busy = m1[0] - self.m0[0]
            self.frac = max(0.0, (busy - own) / (wall * (os.cpu_count() or 1)))
        return False


def wait_idle(limit_s: float, max_foreign: float, probe_s: float = 2.0) -> float:
    """Wait (at most limit_s) until other processes use at most max_foreign of the CPUs over
    a probe_s window; returns the seconds spent."""
    t0, said = time.perf_counter(), False
    while True:
        with ForeignLoad() as fl:
            time.sleep(probe_s)
        spent = time.perf_counter() - t0
        if fl.frac is None or fl.frac <= max_foreign or spent >= limit_s:
            if said:
                print(f"  ... waited {spent:.0f} s (other processes now at {100 * (fl.frac or 0):.0f}%)", flush=True)
            return spent
        if not said:
            print(f"  other processes use {100 * fl.frac:.0f}% of the CPUs; waiting up to {limit_s:.0f} s "
                  f"for them to finish", flush=True)
            said = True
        time.sleep(3.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_reader():
    """A function read(children) returning (this process's RSS, summed RSS of its child
    processes, or 0 when not asked) in bytes."""
    try:
        import psutil

        me = psutil.Process()

        def read(children=False):
            kids = 0
            for c in (me.children(recursive=True) if children else ()):
                with contextlib.suppress(psutil.Error):
                    kids += c.memory_info().rss
            return me.memory_info().rss, kids
        return read, "psutil"
    except ImportError:  # Linux fallback: /proc/self/statm (children not counted)
        page = os.sysconf("SC_PAGE_SIZE")

        def read(children=False):
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * page, 0
        return read, "/proc/self/statm"


class MemoryMeter:
    """Peak memory of one config. CPU: RSS sampled every `interval` s by a background thread
    while the config runs (ru_maxrss is a process-lifetime peak, useless per config); the
    RSS at the start is kept too, so the delta is available. CUDA: max_memory_allocated after
    reset_peak_memory_stats."""

    _reader, source = None, None

    def __init__(self, device: torch.device, children: bool = False, interval: float = 0.02):
        self.device, self.interval, self.children = device, interval, children
        if MemoryMeter._reader is None:
            MemoryMeter._reader, MemoryMeter.source = _rss_reader()
        self.read = MemoryMeter._reader

    def __enter__(self):
        self.rss0, _ = self.read()
        self.peak, self.peak_kids = self.rss0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda0 = torch.cuda.memory_allocated(self.device)
        return self

    def _sample(self):
        while not self._stop.is_set():
            rss, kids = self.read(self.children)
            self.peak, self.peak_kids = max(self.peak, rss), max(self.peak_kids, kids)
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        rss, kids = self.read(self.children)
        self.peak, self.peak_kids = max(self.peak, rss), max(self.peak_kids, kids)
        self.cuda_peak = None
        if self.device.type == "cuda":
            sync(self.device)
            self.cuda_peak = torch.cuda.max_memory_allocated(self.device)
        return False

    def record(self) -> dict:
        mb = 2 ** 20
        out = {"peak_rss_mb": self.peak / mb, "rss_at_start_mb": self.rss0 / mb,
               "peak_rss_delta_mb": (self.peak - self.rss0) / mb}
        if self.peak_kids:
            out["peak_rss_children_mb"] = self.peak_kids / mb
        if self.cuda_peak is not None:
            out["cuda_max_memory_allocated_mb"] = self.cuda_peak / mb
            out["cuda_allocated_at_start_mb"] = self.cuda0 / mb
            out["cuda_peak_delta_mb"] = (self.cuda_peak - self.cuda0) / mb
        return out


# ----------------------------------------------------------------------------------------------
# the loops
# ----------------------------------------------------------------------------------------------

class PILImages(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10-style: HWC uint8 array in memory, a PIL image made per item,
    the transform applied to it; returns (tensor, label)."""

    def __init__(self, x_nchw_u8: np.ndarray, labels: np.ndarray, transform):
        self.data = np.ascontiguousarray(x_nchw_u8.transpose(0, 2, 3, 1))  # (N, H, W, C)
        self.targets = [int(t) for t in labels]
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.fromarray(self.data[i])
        return self.transform(img), self.targets[i]


class ReferenceLoop:
    """The popular CIFAR loop. The model, optimizer and DataLoader live across rounds (a long
    run). Cold (`reference`): each timed epoch starts the DataLoader's workers afresh, as the
    default (persistent_workers=False) loop does every epoch; on a short epoch that start-up is
    a large share of the time. Warm (`reference_warm`): persistent workers, started before the
    first timed epoch, on an epoch of >= WARM_IMAGES images: the loop's steady state."""

    def __init__(self, data, width: float, device: torch.device, seed: int = 0, persistent: bool = False):
        import torchvision.transforms as T

        self.device, self.persistent = device, persistent
        tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(data.mean, data.std)])
        ds = PILImages(data.x_train.cpu().numpy(), data.y_train.cpu().numpy(), tf)
        g = torch.Generator().manual_seed(seed)
        self.loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, drop_last=True,
                                                  num_workers=2, generator=g, persistent_workers=persistent)
        torch.manual_seed(seed)
        # the transform normalizes, so the model takes its input as it is (input_norm='raw')
        self.model = create_model("resnet18", norm="bn", stem="cifar", width=width, input_norm="raw",
                                  num_classes=data.num_classes).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        self.crit = torch.nn.CrossEntropyLoss()
        # fixed batch for untimed warm-up steps (kernel caches), the same step as the loop's
        x0, y0 = next(iter(torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=0)))
        self.warm = (x0.to(device), y0.to(device))

    def step(self, x, y) -> float:
        out = self.model(x)
        loss = self.crit(out, y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()

    def warmup(self, steps: int):
        # the backend flags are process-wide and every bnlib run sets them: fix them here too, so
        # each round's reference runs the same arithmetic (IEEE fp32; cuDNN autotuning on CUDA)
        configure_backends({"device": str(self.device), "precision": "fp32"})
        self.model.train()
        for _ in range(steps):
            self.step(*self.warm)
        if self.persistent:  # start the workers now, untimed: they live on into every timed epoch
            for k, _ in enumerate(self.loader):
                if k >= 1:
                    break
        sync(self.device)

    def epoch(self) -> dict:
        self.model.train()
        running, n = 0.0, 0
        sync(self.device)
        t0 = time.perf_counter()
        for x, y in self.loader:
            x, y = x.to(self.device), y.to(self.device)
            running += self.step(x, y)
            n += len(y)
        sync(self.device)
        sec = time.perf_counter() - t0
        return {"img_per_s": n / sec, "seconds": sec, "images": n, "train_loss": running / max(1, n // BATCH)}


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
        res = bnlib.run({**cfg, "out_dir": str(root / tag)}, rerun=True)
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


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def probe_costs(params: dict, data, device: torch.device, calls: int) -> dict:
    """ms per call of every registered probe on the bench model, through the loop's hook
    (ProbeRunner.at: model copy, RNG save/restore, fp32), after one untimed call each."""
    import copy

    from bnlib.probes import PROBES, ProbeRunner, probe_names

    cfg = bnlib.validate(params, probes=probe_names())
    torch.manual_seed(0)
    model = build_model(cfg, data.mean, data.std, data.num_classes).to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(param_groups(model, cfg), cfg)
    x, y = to_input(data.x_train[:BATCH], cfg["channels_last"]), data.y_train[:BATCH]
    k = min(cfg["probe_batch_size"], len(data.y_train))
    pb = (to_input(data.x_train[:k], cfg["channels_last"]), data.y_train[:k])
    runner = ProbeRunner(cfg, model, opt, lambda o, t: F.cross_entropy(o.float(), t), pb, len(data.y_train) // BATCH)
    out, step = {}, 0
    for name in probe_names():
        runner.every = {name: None}
        ms = []
        for c in range(calls + 1):
            sync(device)
            t0 = time.perf_counter()
            runner.at(step, x, y, epoch_end=True)
            sync(device)
            if c > 0:
                ms.append(1000 * (time.perf_counter() - t0))
            step += 1
        out[name] = {**summarize(ms), "default_every": PROBES[name].default_every}
    copies = []
    for _ in range(max(3, calls)):
        t0 = time.perf_counter()
        copy.deepcopy(model)
        sync(device)
        copies.append(1000 * (time.perf_counter() - t0))
    return {"ms_per_call": out, "model_copy_ms": summarize(copies), "calls": calls,
            "probe_batch_size": k, "train_batch_size": BATCH,
            "note": ("wall ms per call of ProbeRunner.at with one probe due (model deep copy, RNG save/restore, "
                     "the probe in fp32), median/min/max over the timed calls; model_copy_ms: the deep copy "
                     "alone. A probe every k steps costs about ms_per_call / k per step.")}


def summarize(vals: list[float]) -> dict:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def throughput_entry(machine: dict, device: torch.device, arch: str, width: float, precision: str,
                     img_per_s: float, rounds: int) -> dict:
    import socket

    name = machine["gpu"]["name"] if "gpu" in machine else machine["cpu"]["model_name"]
    return {"hostname": socket.gethostname(), "device": device.type, "device_name": name, "arch": arch,
            "width": float(width), "precision": precision, "batch_size": BATCH, "image": "32x32x3",
            "img_per_s": img_per_s, "rounds": rounds, "threads": torch.get_num_threads(),
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer images, 2 rounds (~1 min on CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 10, --quick 2)")
    ap.add_argument("--n-train", type=int, default=None,
                    help="training images per epoch (default CPU 2048 / CUDA 16384; --quick CPU 1024 / CUDA 4096)")
    ap.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu) or a torch device")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new rounds when the next one would end past this many seconds "
                         "(default 330, --quick 75; at least one round always runs)")
    ap.add_argument("--max-foreign", type=float, default=0.10,
                    help="a round in which other processes used more than this share of the CPUs is left "
                         "out of the summary (when at least 2 clean rounds remain)")
    ap.add_argument("--wait-idle", type=float, default=0.0,
                    help="before each round wait up to this many seconds for other processes to drop to "
                         "--max-foreign (the wait does not count in --budget-s); default 0: no waiting")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--out", default="outputs/bench", help="folder for bench.json")
    ap.add_argument("--loops", default=",".join(LOOPS), help=f"comma-separated subset of {','.join(LOOPS)}")
    ap.add_argument("--probe-calls", type=int, default=3,
                    help="timed calls per registered probe after the loops (0: do not time probes)")
    ap.add_argument("--archs", default="",
                    help="also measure bnlib's loop on these models, comma-separated arch:width (e.g. "
                         "resnet20:0.5,resnet50:1), --repeats fresh runs each (at most 3), for `study --plan`")
    ap.add_argument("--study", default=None, metavar="NAME[:PRESET]",
                    help="also measure every arch:width of this study's grid (preset default 'paper'), as --archs")
    a = ap.parse_args(argv)
    try:
        extra_models = [(m.split(":")[0].strip(), float(m.split(":")[1])) for m in a.archs.split(",") if m.strip()]
    except (IndexError, ValueError):
        ap.error(f"--archs {a.archs!r}: give comma-separated arch:width pairs, e.g. resnet20:0.5,resnet50:1")
    if a.study:
        from bnlib.config import RunConfig
        from bnlib.studies import get_study

        name, _, preset = a.study.partition(":")
        try:
            pts = get_study(name).points(preset or "paper")
        except ValueError as e:
            ap.error(f"--study {a.study!r}: {e}")
        d = RunConfig()
        for pt in pts:
            m = (pt.get("arch", d.arch), float(pt.get("width", d.width)))
            if m not in extra_models:
                extra_models.append(m)

    t_all = time.perf_counter()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else torch.device(a.device)
    gpu = device.type == "cuda"
    width = 1.0 if gpu else 0.25
    n_train = a.n_train or ({True: 4096, False: 1024} if a.quick else {True: 16384, False: 2048})[gpu]
    n_train = max(BATCH, n_train // BATCH * BATCH)
    repeats = a.repeats or (2 if a.quick else 10)
    loops = [s.strip() for s in a.loops.split(",") if s.strip()]
    unknown = set(loops) - set(LOOPS)
    if not loops:
        ap.error(f"--loops: name at least one of {list(LOOPS)}")
    if unknown:
        ap.error(f"unknown loops {sorted(unknown)}; valid: {list(LOOPS)}")
    warm_steps = 2  # untimed steps before each timed reference/ceiling epoch

    # The synthetic pool has balanced classes and the caps are stratified per class, so ask for
    # a multiple of 10 training images: every loop runs n_train // 128 full batches per epoch.
    val_fraction, n_cap = 0.1, math.ceil(n_train / 10) * 10
    params = dict(arch="resnet18", norm="bn", stem="cifar", width=width, dataset="synthetic",
                  synthetic_size=math.ceil(n_cap / (1 - val_fraction) / 10) * 10 + 10,
                  val_fraction=val_fraction, n_train=n_cap, n_test=min(1000, max(250, n_train // 8)),
                  batch_size=BATCH, epochs=2, device=str(device), progress=False)
    cfg = bnlib.validate(params)                               # precision auto, channels_last on
    cfg32 = bnlib.validate(params, precision="fp32")
    cfg_lean = bnlib.validate(params, log_every=10 ** 9)
    data = load_data(cfg, device)
    assert len(data.y_train) // BATCH == n_train // BATCH, (len(data.y_train), n_train)

    machine = machine_info(device)
    print(f"device {device} ({machine.get('gpu', machine['cpu'])['name' if gpu else 'model_name']}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}; resnet18 width {width}, "
          f"{n_train} train images, batch {BATCH}, bnlib precision {cfg['precision']}, "
          f"up to {repeats} interleaved round(s) of {loops}", flush=True)

    ref = ReferenceLoop(data, width, device) if "reference" in loops else None
    ref_warm, warm_images = None, None
    if "reference_warm" in loops:
        # its own, longer epoch (>= WARM_IMAGES images) over the same kind of synthetic images
        warm_cap = math.ceil(max(n_train, math.ceil(WARM_IMAGES / BATCH) * BATCH) / 10) * 10
        cfg_w = bnlib.validate(params, n_train=warm_cap,
                               synthetic_size=math.ceil(warm_cap / (1 - val_fraction) / 10) * 10 + 10)
        data_w = data if warm_cap <= n_cap else load_data(cfg_w, device)
        ref_warm = ReferenceLoop(data_w, width, device, persistent=True)
        warm_images = len(data_w.y_train) // BATCH * BATCH
    ceil_ = CeilingLoop(data, cfg, device) if "ceiling" in loops else None
    # process-level warm-up (oneDNN/cuDNN kernel selection), untimed
    for lp in (ref, ref_warm, ceil_):
        if lp is not None:
            lp.warmup(warm_steps)

    precision = {"reference": "fp32", "reference_warm": "fp32", "bnlib": cfg["precision"], "bnlib_fp32": "fp32",
                 "ceiling": cfg["precision"], "bnlib_lean": cfg["precision"]}
    budget = a.budget_s if a.budget_s is not None else (75.0 if a.quick else 330.0)
    per = {k: [] for k in loops}
    stopped_early, partial = None, None
    last_s = {}  # each config's duration in the previous round: predicts the next one

    def measuring() -> float:  # seconds since start, less the waits for an idle machine
        return time.perf_counter() - t_all - waited

    with tempfile.TemporaryDirectory(prefix="bnlib-bench-") as tmp:
        root = Path(tmp)
        waited = 0.0
        for r in range(repeats):
            if r > 0 and measuring() + sum(last_s.values()) > budget:
                stopped_early = (f"stopped after {r} of {repeats} rounds: the next would end past "
                                 f"--budget-s {budget:.0f} s")
                break
            if a.wait_idle > 0:
                waited += wait_idle(a.wait_idle, a.max_foreign)
            row = {}
            for name in loops:
                # a busy machine can make a round far longer than the last: give up on a round
                # (it is left out) rather than run past the budget by more than one config
                if r > 0 and measuring() + last_s[name] > budget:
                    stopped_early = (f"stopped in round {r + 1} of {repeats} before {name}: it would end past "
                                     f"--budget-s {budget:.0f} s (the unfinished round is left out)")
                    break
                if gpu:
                    torch.cuda.empty_cache()
                t_cfg = time.perf_counter()
                with MemoryMeter(device, children=name.startswith("reference")) as mm, ForeignLoad() as fl:
                    if name.startswith("reference"):
                        lp = ref if name == "reference" else ref_warm
                        lp.warmup(warm_steps)
                        res = lp.epoch()
                    elif name == "ceiling":
                        ceil_.warmup(warm_steps)
                        res = ceil_.epoch()
                    else:
                        c = {"bnlib": cfg, "bnlib_fp32": cfg32, "bnlib_lean": cfg_lean}[name]
                        res = bnlib_epoch(c, name == "bnlib_lean", root, f"r{r}-{name}")
                last_s[name] = time.perf_counter() - t_cfg
                res.update(mm.record())
                res["foreign_cpu_frac"] = fl.frac
                row[name] = res
                busy = "" if fl.frac is None else f", other processes used {100 * fl.frac:.0f}% of the CPUs"
                print(f"  round {r + 1}/{repeats}  {name:<14} {res['img_per_s']:8.1f} img/s  "
                      f"({res['seconds']:.2f} s{busy})", flush=True)
            if len(row) < len(loops):
                partial = row
                break
            for name in loops:
                per[name].append(row[name])
    if stopped_early:
        print(f"  {stopped_early}", flush=True)

    # --- summary: over the rounds no other process disturbed, when there are enough of them ----
    n_rounds = len(per[loops[0]])
    round_foreign = [max((per[k][r].get("foreign_cpu_frac") or 0.0) for k in loops) for r in range(n_rounds)]
    clean = [r for r in range(n_rounds) if round_foreign[r] <= a.max_foreign]
    used = clean if len(clean) >= min(2, n_rounds) else list(range(n_rounds))
    excluded = [r for r in range(n_rounds) if r not in used]
    summary_over = ("all rounds" if not excluded else
                    f"{len(used)} of {n_rounds} rounds: rounds {[r + 1 for r in excluded]} excluded because "
                    f"other processes used more than {100 * a.max_foreign:.0f}% of the CPUs during them")
    if len(clean) < min(2, n_rounds):
        summary_over = (f"all rounds, although only {len(clean)} had other processes below "
                        f"{100 * a.max_foreign:.0f}% of the CPUs: these numbers are disturbed")

    mem_key = "cuda_max_memory_allocated_mb" if gpu else "peak_rss_mb"
    delta_key = "cuda_peak_delta_mb" if gpu else "peak_rss_delta_mb"
    results = []
    for name in loops:
        rs = per[name]
        use = [rs[r] for r in used]
        entry = {"name": name, "img_per_s": summarize([x["img_per_s"] for x in use]),
                 "img_per_s_all_rounds": summarize([x["img_per_s"] for x in rs]),
                 "precision": precision[name], "channels_last": not name.startswith("reference") and cfg["channels_last"],
                 "peak_memory_mb": max(x[mem_key] for x in rs),
                 "peak_memory_delta_mb": max(x[delta_key] for x in rs)}
        if any("peak_rss_children_mb" in x for x in rs):
            entry["peak_rss_children_mb"] = max(x.get("peak_rss_children_mb", 0.0) for x in rs)
        entry["repeats"] = rs
        results.append(entry)
    med = {e["name"]: e["img_per_s"]["median"] for e in results}

    pairs = [("bnlib", "reference"), ("bnlib", "reference_warm"), ("reference_warm", "reference"),
             ("bnlib", "ceiling"), ("bnlib_fp32", "reference"), ("bnlib_fp32", "reference_warm"),
             ("bnlib", "bnlib_fp32"), ("ceiling", "reference"), ("bnlib_lean", "bnlib"),
             ("bnlib_lean", "ceiling")]
    pairs = [(x, y) for x, y in pairs if x in med and y in med]
    ratios = {f"{x}/{y}": med[x] / med[y] for x, y in pairs}
    # per-round ratios: neighbours in one round share the machine's state
    ratios_paired = {f"{x}/{y}": summarize([per[x][r]["img_per_s"] / per[y][r]["img_per_s"] for r in used])
                     for x, y in pairs}
    diag = ratios.get("bnlib_lean/bnlib")
    with contextlib.suppress(OSError):
        machine["loadavg_at_end"] = os.getloadavg()

    out = {
        "machine": machine,
        "setup": {"model": f"resnet18 norm=bn stem=cifar width={width}", "n_train": n_train, "batch_size": BATCH,
                  "steps_per_epoch": n_train // BATCH, "rounds": n_rounds, "rounds_asked": repeats,
                  "stopped_early": stopped_early, "unfinished_round": partial, "budget_s": budget,
                  "waited_for_idle_s": waited,
                  "threads": torch.get_num_threads(), "order": loops, "quick": a.quick,
                  "bnlib_params": {k: cfg[k] for k in ("precision", "channels_last", "log_every", "compile",
                                                       "crop_pad", "flip", "optimizer", "lr", "momentum",
                                                       "weight_decay", "schedule")},
                  "warmup": ("bnlib loops: each round is a fresh 2-epoch bnlib run; epoch 1 is warm-up and "
                             "epoch 2 is measured with bnlib's own per-epoch timer (training only; eval, norm "
                             "snapshots and records come after the timer stops). reference/ceiling: model, "
                             f"optimizer and loader live across rounds; {warm_steps} untimed steps at start and "
                             "before each timed epoch."),
                  "reference_loop": ("Dataset of PIL images (made per item from uint8 HWC, as torchvision's "
                                     "CIFAR10), RandomCrop(32,4)+RandomHorizontalFlip+ToTensor+Normalize, "
                                     "DataLoader(num_workers=2, shuffle, drop_last, persistent_workers=False), "
                                     "fp32 NCHW, SGD(lr 0.1, momentum 0.9, wd 5e-4), loss.item() per step; "
                                     "the epoch timer includes the workers' start-up (cold: flatters bnlib's "
                                     "ratio on short epochs)."),
                  "reference_warm_loop": (f"the same loop with persistent_workers=True, the workers started "
                                          f"before timing, on an epoch of {warm_images} images (>= {WARM_IMAGES}): "
                                          "the popular loop in steady state" if warm_images else None),
                  "progress_bar": "off in every bnlib run (progress=False)",
                  "cudnn_benchmark": torch.backends.cudnn.benchmark,
                  "timers": ("reference/ceiling: perf_counter around the epoch, torch.cuda.synchronize before "
                             "both reads on CUDA; bnlib: its own epoch timer, read after the epoch's last step "
                             "has copied its logged values to the host (a synchronization on CUDA)")},
        "summary_over": summary_over,
        "round_foreign_cpu_frac": round_foreign,
        "foreign_cpu_note": ("foreign_cpu_frac: share of all CPUs used by other processes (and hypervisor steal) "
                             "while a measurement ran: /proc/stat busy time minus this process's and its reaped "
                             "children's CPU time, over wall time x CPUs. A round counts as clean when every "
                             f"loop in it stayed at or below --max-foreign ({a.max_foreign}); img_per_s and "
                             "ratios summarize the clean rounds when there are at least 2, img_per_s_all_rounds "
                             "every round."),
        "memory_note": ("peak_memory_mb: on CUDA torch.cuda.max_memory_allocated after reset_peak_memory_stats "
                        "at the start of each config (it includes tensors other loops keep alive, e.g. the "
                        "ceiling's ready-made batches; peak_memory_delta_mb subtracts memory_allocated at the "
                        "config's start); on CPU the peak RSS of this process, sampled every 20 ms "
                        f"({MemoryMeter.source}) by a background thread while that config ran, max over rounds "
                        "(ru_maxrss would be the whole process's lifetime peak). RSS keeps memory retained from "
                        "earlier configs (the allocator holds on to freed pages), so peak_memory_delta_mb (peak "
                        "minus RSS at the config's start) is given too. peak_rss_children_mb: summed RSS of the "
                        "DataLoader workers (copy-on-write pages shared with this process counted in each)."),
        "results": results,
        "ratios": ratios,
        "ratios_note": "ratios of median img/s; ratios_paired: median/min/max of the per-round ratios",
        "ratios_paired": ratios_paired,
        "diagnostics_overhead": diag,
        "diagnostics_overhead_note": ("img/s of bnlib_lean (log_every=1e9: grad norm and host read once per epoch, "
                                      "at its last step; records kept in memory) over img/s of bnlib (defaults: "
                                      "log_every=10, records written): 1.0 = diagnostics are free, 1.05 = they "
                                      "cost 5%. Records are written after the epoch timer stops, so their cost "
                                      "shows in run_wall_s, not in img/s."),
    }
    if a.probe_calls > 0:
        print("timing probes ...", flush=True)
        out["probes"] = probe_costs(params, data, device, a.probe_calls)
    # the throughput table `study --plan` reads: bnlib's loop (its defaults, as a study runs)
    # per model measured on this machine and device
    through = []
    if "bnlib" in med:
        through.append(throughput_entry(machine, device, "resnet18", width, cfg["precision"], med["bnlib"],
                                        n_rounds))
    with tempfile.TemporaryDirectory(prefix="bnlib-bench-") as tmp:
        for arch, w in extra_models:
            c = bnlib.validate(params, arch=arch, width=w)
            vals = [bnlib_epoch(c, False, Path(tmp), f"{arch}-{w}-{r}")["img_per_s"] for r in range(min(3, repeats))]
            print(f"  {arch} width {w:g}: {statistics.median(vals):.1f} img/s (bnlib, {c['precision']})", flush=True)
            through.append(throughput_entry(machine, device, arch, w, c["precision"], statistics.median(vals),
                                            len(vals)))
    out["throughput"] = through
    out["total_wall_s"] = time.perf_counter() - t_all
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "bench.json").write_text(json.dumps(out, indent=1))
    write_throughput(outdir / "throughput.json", through)

    print(f"\nsummary over {summary_over}")
    print(f"{'loop':<14} {'precision':<9} {'median img/s':>12} {'min':>8} {'max':>8} {'peak MB':>8} {'Δ MB':>6}"
          f"  every round")
    for e in results:
        s_ = e["img_per_s"]
        reps = " ".join(f"{x['img_per_s']:.0f}" for x in e["repeats"])
        print(f"{e['name']:<14} {e['precision']:<9} {s_['median']:12.1f} {s_['min']:8.1f} {s_['max']:8.1f} "
              f"{e['peak_memory_mb']:8.0f} {e['peak_memory_delta_mb']:6.0f}  {reps}")
    print()
    for k, v in ratios.items():
        p_ = ratios_paired[k]
        print(f"{k:<22} {v:6.3f}   (per round: median {p_['median']:.3f}, {p_['min']:.3f}-{p_['max']:.3f})")
    if diag is not None:
        print(f"{'diagnostics_overhead':<22} {diag:6.3f}   (img/s bnlib_lean / bnlib; 1.0 = free)")
    if "probes" in out:
        pc = out["probes"]
        print(f"\nprobe cost on this model (batch {BATCH}, probe batch {pc['probe_batch_size']}; model copy "
              f"{pc['model_copy_ms']['median']:.1f} ms):")
        for name, v in pc["ms_per_call"].items():
            print(f"  {name:<18} {v['median']:9.1f} ms/call  (min {v['min']:.1f}, max {v['max']:.1f})")
    if max(round_foreign, default=0.0) > a.max_foreign:
        print(f"\nWARNING: other processes used up to {100 * max(round_foreign):.0f}% of the CPUs during some "
              f"rounds (per round: {', '.join(f'{100 * f:.0f}%' for f in round_foreign)}). With 2 intra-op "
              "threads on a busy 2-core machine a step can be many times slower; rerun when it is idle.")
    print(f"\nwrote {outdir / 'bench.json'} in {out['total_wall_s']:.0f} s", flush=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())

"""Training throughput of bnlib's loop against the popular CIFAR loop and the bare model step.

    .venv/bin/python scripts/bench.py [--quick] [--repeats N] [--out outputs/bench]

One process, one model (resnet18, BN, CIFAR stem; width 0.25 on CPU, 1.0 on CUDA), one data
set (bnlib's synthetic images, the same training images for every loop), batch size 128.
Loops, run interleaved (reference, bnlib, bnlib_fp32, ceiling, bnlib_lean, reference, ...):

  reference   the popular CIFAR loop: Dataset of PIL images + torchvision transforms
              (RandomCrop(32, 4), RandomHorizontalFlip, ToTensor, Normalize), DataLoader with
              num_workers=2, shuffle, drop_last; fp32, NCHW, SGD(momentum 0.9), loss.item()
              per step as in the PyTorch tutorial.
  bnlib       bnlib.run with its defaults (precision auto, channels_last, records written to a
              temporary run directory, log_every 10); one fresh 2-epoch run per repeat, the
              first epoch is warm-up, the second epoch's `img_per_s` (training only, bnlib's
              own timer) is the measurement.
  bnlib_fp32  the same with precision='fp32'.
  ceiling     the model step alone (forward, loss, backward, optimizer step) on ready-made
              device tensors (float, channels_last), the precision of `bnlib`, bnlib's model
              and optimizer (param groups), no augmentation, no records, no logging.
  bnlib_lean  bnlib's loop with diagnostics minimized (log_every=1e9: the grad norm and the
              host read happen once per epoch, at its last step) and records kept in memory,
              not written: `diagnostics_overhead` = img/s(bnlib_lean) / img/s(bnlib).

Writes <out>/bench.json (machine, results, ratios) and prints a table.
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
import torch
import torch.nn.functional as F

import bnlib
from bnlib.data import load_data, to_input
from bnlib.models import create_model
from bnlib.train import build_model, make_optimizer, param_groups
from bnlib.train import train as bnlib_train

BATCH = 128
LOOPS = ("reference", "bnlib", "bnlib_fp32", "ceiling", "bnlib_lean")


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
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_reader():
    """A function returning (this process's RSS, summed RSS of its child processes) in bytes."""
    try:
        import psutil

        me = psutil.Process()

        def read():
            kids = 0
            for c in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    kids += c.memory_info().rss
            return me.memory_info().rss, kids
        return read, "psutil"
    except ImportError:  # Linux fallback: /proc/self/statm (children not counted)
        page = os.sysconf("SC_PAGE_SIZE")

        def read():
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * page, 0
        return read, "/proc/self/statm"


class MemoryMeter:
    """Peak memory of one config. CPU: RSS sampled every `interval` s by a background thread
    while the config runs (ru_maxrss is a process-lifetime peak, useless per config); the
    RSS at the start is kept too, so the delta is available. CUDA: max_memory_allocated after
    reset_peak_memory_stats."""

    _reader, source = None, None

    def __init__(self, device: torch.device, interval: float = 0.02):
        self.device, self.interval = device, interval
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
        return self

    def _sample(self):
        while not self._stop.is_set():
            rss, kids = self.read()
            self.peak, self.peak_kids = max(self.peak, rss), max(self.peak_kids, kids)
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        rss, kids = self.read()
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
        from PIL import Image

        img = Image.fromarray(self.data[i])
        return self.transform(img), self.targets[i]


class ReferenceLoop:
    """The popular CIFAR loop. The model, optimizer and DataLoader live across repeats (a long
    run); each timed epoch starts the DataLoader's workers afresh, as the default
    (persistent_workers=False) loop does every epoch."""

    def __init__(self, data, width: float, device: torch.device, seed: int = 0):
        import torchvision.transforms as T

        self.device = device
        tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(data.mean, data.std)])
        ds = PILImages(data.x_train.cpu().numpy(), data.y_train.cpu().numpy(), tf)
        g = torch.Generator().manual_seed(seed)
        self.loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, drop_last=True,
                                                  num_workers=2, generator=g)
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
        self.model.train()
        for _ in range(steps):
            self.step(*self.warm)
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

    def step(self, x, y):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(x)
        loss = F.cross_entropy(out.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

    def warmup(self, steps: int):
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


class MemoryRecords:
    """Stands in for bnlib.records.RunDir: keeps the tables in memory, writes nothing."""

    def __init__(self):
        self.tables = {}

    def write_table(self, name, rows):
        self.tables[name] = list(rows)


def bnlib_epoch(cfg: dict, lean: bool, root: Path, tag: str) -> dict:
    """One fresh 2-epoch bnlib run; the second epoch's numbers (bnlib's own timer, training
    only: evaluation, norm snapshots and records writing come after the timer stops)."""
    t0 = time.perf_counter()
    if lean:
        mem = MemoryRecords()
        status = bnlib_train(cfg, mem)
        epochs = mem.tables["epochs"]
        where = "in memory"
    else:
        res = bnlib.run({**cfg, "out_dir": str(root / tag)}, rerun=True)
        status = res
        import pandas as pd
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

def summarize(vals: list[float]) -> dict:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer images, 1 repeat (~1 min on CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3, --quick 1)")
    ap.add_argument("--n-train", type=int, default=None,
                    help="training images per epoch (default CPU 1536 / CUDA 16384; --quick CPU 512 / CUDA 4096)")
    ap.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu) or a torch device")
    ap.add_argument("--out", default="outputs/bench", help="folder for bench.json")
    ap.add_argument("--loops", default=",".join(LOOPS), help=f"comma-separated subset of {','.join(LOOPS)}")
    a = ap.parse_args(argv)

    t_all = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else torch.device(a.device)
    gpu = device.type == "cuda"
    width = 1.0 if gpu else 0.25
    n_train = a.n_train or ({True: 4096, False: 512} if a.quick else {True: 16384, False: 1536})[gpu]
    n_train = max(BATCH, n_train // BATCH * BATCH)
    repeats = a.repeats or (1 if a.quick else 3)
    loops = [s.strip() for s in a.loops.split(",") if s.strip()]
    unknown = set(loops) - set(LOOPS)
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
          f"{repeats} repeat(s) of {loops}", flush=True)

    ref = ReferenceLoop(data, width, device) if "reference" in loops else None
    ceil_ = CeilingLoop(data, cfg, device) if "ceiling" in loops else None
    # process-level warm-up (oneDNN/cuDNN kernel selection), untimed
    for lp in (ref, ceil_):
        if lp is not None:
            lp.warmup(warm_steps)

    precision = {"reference": "fp32", "bnlib": cfg["precision"], "bnlib_fp32": "fp32",
                 "ceiling": cfg["precision"], "bnlib_lean": cfg["precision"]}
    per = {k: [] for k in loops}
    with tempfile.TemporaryDirectory(prefix="bnlib-bench-") as tmp:
        root = Path(tmp)
        for r in range(repeats):
            for name in loops:
                if gpu:
                    torch.cuda.empty_cache()
                with MemoryMeter(device) as mm:
                    if name == "reference":
                        ref.warmup(warm_steps)
                        res = ref.epoch()
                    elif name == "ceiling":
                        ceil_.warmup(warm_steps)
                        res = ceil_.epoch()
                    else:
                        c = {"bnlib": cfg, "bnlib_fp32": cfg32, "bnlib_lean": cfg_lean}[name]
                        res = bnlib_epoch(c, name == "bnlib_lean", root, f"r{r}-{name}")
                res.update(mm.record())
                with contextlib.suppress(OSError):
                    res["loadavg_1min_after"] = os.getloadavg()[0]
                per[name].append(res)
                print(f"  repeat {r + 1}/{repeats}  {name:<11} {res['img_per_s']:8.1f} img/s  "
                      f"({res['seconds']:.2f} s)", flush=True)

    mem_key = "cuda_max_memory_allocated_mb" if gpu else "peak_rss_mb"
    results = []
    for name in loops:
        rs = per[name]
        entry = {"name": name, "img_per_s": summarize([x["img_per_s"] for x in rs]), "precision": precision[name],
                 "channels_last": name != "reference" and cfg["channels_last"],
                 "peak_memory_mb": max(x[mem_key] for x in rs),
                 "peak_rss_delta_mb": max(x["peak_rss_delta_mb"] for x in rs), "repeats": rs}
        if any("peak_rss_children_mb" in x for x in rs):
            entry["peak_rss_children_mb"] = max(x.get("peak_rss_children_mb", 0.0) for x in rs)
        results.append(entry)
    med = {e["name"]: e["img_per_s"]["median"] for e in results}

    def ratio(a_, b_):
        return med[a_] / med[b_] if a_ in med and b_ in med else None

    def paired(a_, b_):  # per-repeat ratios (interleaved neighbours share the machine's state)
        if a_ not in per or b_ not in per:
            return None
        return summarize([x["img_per_s"] / y["img_per_s"] for x, y in zip(per[a_], per[b_])])

    pairs = [("bnlib", "reference"), ("bnlib", "ceiling"), ("bnlib_fp32", "reference"),
             ("bnlib", "bnlib_fp32"), ("ceiling", "reference"), ("bnlib_lean", "ceiling")]
    ratios = {f"{x}/{y}": ratio(x, y) for x, y in pairs if ratio(x, y) is not None}
    ratios_paired = {f"{x}/{y}": paired(x, y) for x, y in pairs if paired(x, y) is not None}
    diag = ratio("bnlib_lean", "bnlib")
    with contextlib.suppress(OSError):
        machine["loadavg_at_end"] = os.getloadavg()

    out = {
        "machine": machine,
        "setup": {"model": f"resnet18 norm=bn stem=cifar width={width}", "n_train": n_train, "batch_size": BATCH,
                  "steps_per_epoch": n_train // BATCH, "repeats": repeats, "order": loops, "quick": a.quick,
                  "bnlib_params": {k: cfg[k] for k in ("precision", "channels_last", "log_every", "compile",
                                                       "crop_pad", "flip", "optimizer", "lr", "momentum",
                                                       "weight_decay", "schedule")},
                  "warmup": ("bnlib loops: each repeat is a fresh 2-epoch bnlib run, epoch 1 is warm-up and "
                             "epoch 2 is measured with bnlib's own per-epoch timer (training only; eval and "
                             "records come after the timer). reference/ceiling: live across repeats, "
                             f"{warm_steps} untimed steps at start and before each timed epoch."),
                  "reference_loop": ("Dataset of PIL images (made per item from uint8 HWC, as torchvision "
                                     "CIFAR10), RandomCrop(32,4)+RandomHorizontalFlip+ToTensor+Normalize, "
                                     "DataLoader(num_workers=2, shuffle, drop_last, persistent_workers=False), "
                                     "fp32 NCHW, SGD(lr 0.1, momentum 0.9, wd 5e-4), loss.item() per step; "
                                     "the epoch timer includes worker start-up."),
                  "progress_bar": "off in every bnlib run (progress=False)"},
        "memory_note": ("peak_memory_mb: on CUDA torch.cuda.max_memory_allocated after reset_peak_memory_stats "
                        "at the start of each config; on CPU the peak RSS of this process sampled every 20 ms "
                        f"({MemoryMeter.source}) by a background thread while that config ran (max over repeats). "
                        "RSS includes memory retained from earlier configs (the allocator keeps freed pages), so "
                        "peak_rss_delta_mb (peak minus RSS at the config's start) is given as well; "
                        "peak_rss_children_mb is the summed RSS of DataLoader workers (shared copy-on-write "
                        "pages counted in each)."),
        "results": results,
        "ratios": ratios,
        "ratios_note": "ratios of median img/s; ratios_paired: summary of the per-repeat ratios",
        "ratios_paired": ratios_paired,
        "diagnostics_overhead": diag,
        "diagnostics_overhead_note": ("img/s of bnlib_lean (log_every=1e9: grad norm + host read once per epoch; "
                                      "records kept in memory) over img/s of bnlib (defaults: log_every=10, "
                                      "records written): 1.0 = free, 1.05 = diagnostics cost 5%. Records are "
                                      "written after the epoch timer stops, so their cost shows in run_wall_s, "
                                      "not in img/s."),
        "total_wall_s": time.perf_counter() - t_all,
    }
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "bench.json").write_text(json.dumps(out, indent=1, default=float))

    # table
    print()
    print(f"{'loop':<11} {'precision':<9} {'median img/s':>12} {'min':>8} {'max':>8} {'peak MB':>9}  per repeat")
    for e in results:
        s = e["img_per_s"]
        reps = " ".join(f"{x['img_per_s']:.0f}" for x in e["repeats"])
        print(f"{e['name']:<11} {e['precision']:<9} {s['median']:12.1f} {s['min']:8.1f} {s['max']:8.1f} "
              f"{e['peak_memory_mb']:9.0f}  {reps}")
    print()
    for k, v in ratios.items():
        p = ratios_paired.get(k)
        extra = f"   (paired per repeat: {p['median']:.3f}, {p['min']:.3f}-{p['max']:.3f})" if p else ""
        print(f"{k:<22} {v:6.3f}{extra}")
    if diag is not None:
        print(f"{'diagnostics_overhead':<22} {diag:6.3f}   (img/s bnlib_lean / bnlib)")
    print(f"\nwrote {outdir / 'bench.json'} in {out['total_wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a measurement costs besides its result: the share of the CPUs other processes used while
it ran (a shared machine makes a measurement unreliable), the peak memory, a device sync for
honest timers, and the median/min/max summary every table of the bench uses."""
from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time

import torch

__all__ = ["ForeignLoad", "wait_idle", "sync", "MemoryMeter", "summarize"]


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



def summarize(vals: list[float]) -> dict:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}

"""bnlib's loop against the torchvision reference loop and the bare model step: the loops run in
interleaved rounds (neighbours in one round share the machine's state), each measurement with
its memory peak and the share of the CPUs other processes used; the summary keeps the rounds no
other process disturbed, when enough remain, and gives medians, min-max and ratios."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from .meters import ForeignLoad, MemoryMeter, summarize, wait_idle
from .reference import WARM_IMAGES

__all__ = ["LOOPS", "PAIRS", "run_rounds", "summarize_rounds", "setup_notes", "result_notes", "print_comparison"]

LOOPS = ("reference", "reference_warm", "bnlib", "bnlib_fp32", "ceiling", "bnlib_lean")
PAIRS = [("bnlib", "reference"), ("bnlib", "reference_warm"), ("reference_warm", "reference"),
         ("bnlib", "ceiling"), ("bnlib_fp32", "reference"), ("bnlib_fp32", "reference_warm"),
         ("bnlib", "bnlib_fp32"), ("ceiling", "reference"), ("bnlib_lean", "bnlib"),
         ("bnlib_lean", "ceiling")]


def run_rounds(loops: list[str], measure: dict[str, Callable[[Path, str], dict]], repeats: int, budget: float,
               t_start: float, device: torch.device, wait_idle_s: float, max_foreign: float) -> dict:
    """Up to `repeats` rounds of every loop in order; measure[name](scratch_dir, tag) times one
    epoch. No round starts, and no loop within one, that would end past `budget` seconds since
    t_start (waits for an idle machine not counted); the first round always runs in full.
    Returns per (name: the finished rounds' results), stopped_early, partial (the unfinished
    round) and waited (seconds)."""
    per = {k: [] for k in loops}
    stopped_early, partial = None, None
    last_s = {}  # each config's duration in the previous round: predicts the next one

    def measuring() -> float:  # seconds since start, less the waits for an idle machine
        return time.perf_counter() - t_start - waited

    with tempfile.TemporaryDirectory(prefix="bnlib-bench-") as tmp:
        root = Path(tmp)
        waited = 0.0
        for r in range(repeats):
            if r > 0 and measuring() + sum(last_s.values()) > budget:
                stopped_early = (f"stopped after {r} of {repeats} rounds: the next would end past "
                                 f"--budget-s {budget:.0f} s")
                break
            if wait_idle_s > 0:
                waited += wait_idle(wait_idle_s, max_foreign)
            row = {}
            for name in loops:
                # a busy machine can make a round far longer than the last: give up on a round
                # (it is left out) rather than run past the budget by more than one config
                if r > 0 and measuring() + last_s[name] > budget:
                    stopped_early = (f"stopped in round {r + 1} of {repeats} before {name}: it would end past "
                                     f"--budget-s {budget:.0f} s (the unfinished round is left out)")
                    break
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                t_cfg = time.perf_counter()
                with MemoryMeter(device, children=name.startswith("reference")) as mm, ForeignLoad() as fl:
                    res = measure[name](root, f"r{r}-{name}")
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
    return {"per": per, "stopped_early": stopped_early, "partial": partial, "waited": waited}


def summarize_rounds(per: dict[str, list[dict]], loops: list[str], max_foreign: float, gpu: bool,
                     precision: dict[str, str], channels_last: bool) -> dict:
    """Per loop: img/s over the clean rounds (other processes at or below max_foreign; all
    rounds when fewer than 2 are clean) and over every round, peak memory; ratios of medians
    and per-round ratios of the PAIRS measured."""
    n_rounds = len(per[loops[0]])
    round_foreign = [max((per[k][r].get("foreign_cpu_frac") or 0.0) for k in loops) for r in range(n_rounds)]
    clean = [r for r in range(n_rounds) if round_foreign[r] <= max_foreign]
    used = clean if len(clean) >= min(2, n_rounds) else list(range(n_rounds))
    excluded = [r for r in range(n_rounds) if r not in used]
    summary_over = ("all rounds" if not excluded else
                    f"{len(used)} of {n_rounds} rounds: rounds {[r + 1 for r in excluded]} excluded because "
                    f"other processes used more than {100 * max_foreign:.0f}% of the CPUs during them")
    if len(clean) < min(2, n_rounds):
        summary_over = (f"all rounds, although only {len(clean)} had other processes below "
                        f"{100 * max_foreign:.0f}% of the CPUs: these numbers are disturbed")

    mem_key = "cuda_max_memory_allocated_mb" if gpu else "peak_rss_mb"
    delta_key = "cuda_peak_delta_mb" if gpu else "peak_rss_delta_mb"
    results = []
    for name in loops:
        rs = per[name]
        use = [rs[r] for r in used]
        entry = {"name": name, "img_per_s": summarize([x["img_per_s"] for x in use]),
                 "img_per_s_all_rounds": summarize([x["img_per_s"] for x in rs]),
                 "precision": precision[name], "channels_last": not name.startswith("reference") and channels_last,
                 "peak_memory_mb": max(x[mem_key] for x in rs),
                 "peak_memory_delta_mb": max(x[delta_key] for x in rs)}
        if any("peak_rss_children_mb" in x for x in rs):
            entry["peak_rss_children_mb"] = max(x.get("peak_rss_children_mb", 0.0) for x in rs)
        entry["repeats"] = rs
        results.append(entry)
    med = {e["name"]: e["img_per_s"]["median"] for e in results}

    pairs = [(x, y) for x, y in PAIRS if x in med and y in med]
    ratios = {f"{x}/{y}": med[x] / med[y] for x, y in pairs}
    # per-round ratios: neighbours in one round share the machine's state
    ratios_paired = {f"{x}/{y}": summarize([per[x][r]["img_per_s"] / per[y][r]["img_per_s"] for r in used])
                     for x, y in pairs}
    return {"n_rounds": n_rounds, "round_foreign": round_foreign, "summary_over": summary_over,
            "results": results, "median": med, "ratios": ratios, "ratios_paired": ratios_paired,
            "diagnostics_overhead": ratios.get("bnlib_lean/bnlib")}


def setup_notes(warm_steps: int, warm_images: int | None) -> dict:
    """How each loop is warmed up, built and timed: the setup record's descriptions."""
    return {
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
                   "has copied its logged values to the host (a synchronization on CUDA)")}


def result_notes(summary: dict, max_foreign: float) -> dict:
    """The summary with what its numbers mean, in the order bench.json records them."""
    return {
        "summary_over": summary["summary_over"],
        "round_foreign_cpu_frac": summary["round_foreign"],
        "foreign_cpu_note": ("foreign_cpu_frac: share of all CPUs used by other processes (and hypervisor steal) "
                             "while a measurement ran: /proc/stat busy time minus this process's and its reaped "
                             "children's CPU time, over wall time x CPUs. A round counts as clean when every "
                             f"loop in it stayed at or below --max-foreign ({max_foreign}); img_per_s and "
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
        "results": summary["results"],
        "ratios": summary["ratios"],
        "ratios_note": "ratios of median img/s; ratios_paired: median/min/max of the per-round ratios",
        "ratios_paired": summary["ratios_paired"],
        "diagnostics_overhead": summary["diagnostics_overhead"],
        "diagnostics_overhead_note": ("img/s of bnlib_lean (log_every=1e9: grad norm and host read once per epoch, "
                                      "at its last step; records kept in memory) over img/s of bnlib (defaults: "
                                      "log_every=10, records written): 1.0 = diagnostics are free, 1.05 = they "
                                      "cost 5%. Records are written after the epoch timer stops, so their cost "
                                      "shows in run_wall_s, not in img/s."),
    }


def print_comparison(summary: dict) -> None:
    """The table of loops (median, min, max img/s, memory, every round) and the ratios."""
    print(f"\nsummary over {summary['summary_over']}")
    print(f"{'loop':<14} {'precision':<9} {'median img/s':>12} {'min':>8} {'max':>8} {'peak MB':>8} {'Δ MB':>6}"
          f"  every round")
    for e in summary["results"]:
        s_ = e["img_per_s"]
        reps = " ".join(f"{x['img_per_s']:.0f}" for x in e["repeats"])
        print(f"{e['name']:<14} {e['precision']:<9} {s_['median']:12.1f} {s_['min']:8.1f} {s_['max']:8.1f} "
              f"{e['peak_memory_mb']:8.0f} {e['peak_memory_delta_mb']:6.0f}  {reps}")
    print()
    for k, v in summary["ratios"].items():
        p_ = summary["ratios_paired"][k]
        print(f"{k:<22} {v:6.3f}   (per round: median {p_['median']:.3f}, {p_['min']:.3f}-{p_['max']:.3f})")
    diag = summary["diagnostics_overhead"]
    if diag is not None:
        print(f"{'diagnostics_overhead':<22} {diag:6.3f}   (img/s bnlib_lean / bnlib; 1.0 = free)")

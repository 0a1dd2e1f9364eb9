"""Training throughput of bnlib's loop against the popular CIFAR loop and the bare model step.

    .venv/bin/python scripts/bench.py [--quick] [--repeats N] [--out outputs/bench]
        [--n-train N] [--threads N] [--budget-s S] [--max-foreign F] [--wait-idle S] [--loops a,b]
        [--device D] [--probe-calls N] [--archs ARCH:WIDTH,...] [--study NAME[:PRESET]]
    (or: .venv/bin/python -m bnlib.bench ...)

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
import functools
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..config import RunConfig, validate
from ..costplan import THROUGHPUT
from ..data import load_data
from ..device import machine as describe_machine
from ..records import git_commit
from ..studies import get_study
from ..version import __version__
from .compare import LOOPS, print_comparison, result_notes, run_rounds, setup_notes, summarize_rounds
from .probe_cost import probe_costs
from .reference import WARM_IMAGES, ReferenceLoop
from .throughput import CeilingLoop, bnlib_epoch, throughput_entry, write_throughput
from .workload import BATCH, bench_params, bench_width, default_n_train, synthetic_size

__all__ = ["main", "parser", "bench_machine"]

WARM_STEPS = 2  # untimed steps before each timed reference/ceiling epoch


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
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
    return ap


def bench_machine(device: torch.device) -> dict:
    """bnlib.device.machine with the load average at the start and bnlib's version and commit."""
    info = describe_machine(device)
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = os.getloadavg()
    info["bnlib"] = {"version": __version__, "git_commit": git_commit()}
    return info


def _models(ap: argparse.ArgumentParser, a: argparse.Namespace) -> list[tuple[str, float]]:
    """The (arch, width) of --archs and of --study's grid, in order, each once."""
    try:
        extra_models = [(m.split(":")[0].strip(), float(m.split(":")[1])) for m in a.archs.split(",") if m.strip()]
    except (IndexError, ValueError):
        ap.error(f"--archs {a.archs!r}: give comma-separated arch:width pairs, e.g. resnet20:0.5,resnet50:1")
    if a.study:
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
    return extra_models


def _epoch_after_warmup(loop, steps: int):
    """measure(scratch_dir, tag) of a reference or ceiling loop: untimed steps, then one timed epoch."""
    def measure(root: Path, tag: str) -> dict:
        loop.warmup(steps)
        return loop.epoch()
    return measure


def main(argv=None, prog: str | None = None) -> int:
    ap = parser(prog)
    a = ap.parse_args(argv)
    extra_models = _models(ap, a)

    t_all = time.perf_counter()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else torch.device(a.device)
    gpu = device.type == "cuda"
    width = bench_width(device)
    n_train = default_n_train(device, a.quick, a.n_train)
    repeats = a.repeats or (2 if a.quick else 10)
    loops = [s.strip() for s in a.loops.split(",") if s.strip()]
    unknown = set(loops) - set(LOOPS)
    if not loops:
        ap.error(f"--loops: name at least one of {list(LOOPS)}")
    if unknown:
        ap.error(f"unknown loops {sorted(unknown)}; valid: {list(LOOPS)}")

    params = bench_params(width, n_train, device)
    n_cap = params["n_train"]
    cfg = validate(params)                               # precision auto, channels_last on
    cfg32 = validate(params, precision="fp32")
    cfg_lean = validate(params, log_every=10 ** 9)
    data = load_data(cfg, device)
    assert len(data.y_train) // BATCH == n_train // BATCH, (len(data.y_train), n_train)

    machine = bench_machine(device)
    print(f"device {device} ({machine['device_name']}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}; resnet18 width {width}, "
          f"{n_train} train images, batch {BATCH}, bnlib precision {cfg['precision']}, "
          f"up to {repeats} interleaved round(s) of {loops}", flush=True)

    timed = {}  # the loops that live across rounds: reference, reference_warm, ceiling
    warm_images = None
    if "reference" in loops:
        timed["reference"] = ReferenceLoop(data, width, device)
    if "reference_warm" in loops:
        # its own, longer epoch (>= WARM_IMAGES images) over the same kind of synthetic images
        warm_cap = math.ceil(max(n_train, math.ceil(WARM_IMAGES / BATCH) * BATCH) / 10) * 10
        cfg_w = validate(params, n_train=warm_cap, synthetic_size=synthetic_size(warm_cap))
        data_w = data if warm_cap <= n_cap else load_data(cfg_w, device)
        timed["reference_warm"] = ReferenceLoop(data_w, width, device, persistent=True)
        warm_images = len(data_w.y_train) // BATCH * BATCH
    if "ceiling" in loops:
        timed["ceiling"] = CeilingLoop(data, cfg, device)
    # process-level warm-up (oneDNN/cuDNN kernel selection), untimed
    for lp in timed.values():
        lp.warmup(WARM_STEPS)
    measure = {name: _epoch_after_warmup(lp, WARM_STEPS) for name, lp in timed.items()}
    for name, c in (("bnlib", cfg), ("bnlib_fp32", cfg32), ("bnlib_lean", cfg_lean)):
        measure[name] = functools.partial(bnlib_epoch, c, name == "bnlib_lean")

    precision = {"reference": "fp32", "reference_warm": "fp32", "bnlib": cfg["precision"], "bnlib_fp32": "fp32",
                 "ceiling": cfg["precision"], "bnlib_lean": cfg["precision"]}
    budget = a.budget_s if a.budget_s is not None else (75.0 if a.quick else 330.0)
    rounds = run_rounds(loops, measure, repeats, budget, t_all, device, a.wait_idle, a.max_foreign)
    summary = summarize_rounds(rounds["per"], loops, a.max_foreign, gpu, precision, cfg["channels_last"])
    with contextlib.suppress(OSError):
        machine["loadavg_at_end"] = os.getloadavg()

    out = {
        "machine": machine,
        "setup": {"model": f"resnet18 norm=bn stem=cifar width={width}", "n_train": n_train, "batch_size": BATCH,
                  "steps_per_epoch": n_train // BATCH, "rounds": summary["n_rounds"], "rounds_asked": repeats,
                  "stopped_early": rounds["stopped_early"], "unfinished_round": rounds["partial"],
                  "budget_s": budget, "waited_for_idle_s": rounds["waited"],
                  "threads": torch.get_num_threads(), "order": loops, "quick": a.quick,
                  "bnlib_params": {k: cfg[k] for k in ("precision", "channels_last", "log_every", "compile",
                                                       "crop_pad", "flip", "optimizer", "lr", "momentum",
                                                       "weight_decay", "schedule")},
                  **setup_notes(WARM_STEPS, warm_images)},
        **result_notes(summary, a.max_foreign),
    }
    if a.probe_calls > 0:
        print("timing probes ...", flush=True)
        out["probes"] = probe_costs(params, data, device, a.probe_calls)
    # the throughput table `study --plan` reads: bnlib's loop (its defaults, as a study runs)
    # per model measured on this machine and device
    med = summary["median"]
    through = []
    if "bnlib" in med:
        through.append(throughput_entry(machine, "resnet18", width, cfg["precision"], med["bnlib"],
                                        summary["n_rounds"]))
    with tempfile.TemporaryDirectory(prefix="bnlib-bench-") as tmp:
        for arch, w in extra_models:
            c = validate(params, arch=arch, width=w)
            vals = [bnlib_epoch(c, False, Path(tmp), f"{arch}-{w}-{r}")["img_per_s"] for r in range(min(3, repeats))]
            print(f"  {arch} width {w:g}: {statistics.median(vals):.1f} img/s (bnlib, {c['precision']})", flush=True)
            through.append(throughput_entry(machine, arch, w, c["precision"], statistics.median(vals), len(vals)))
    out["throughput"] = through
    out["total_wall_s"] = time.perf_counter() - t_all
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "bench.json").write_text(json.dumps(out, indent=1))
    write_throughput(outdir / THROUGHPUT.name, through)

    print_comparison(summary)
    if "probes" in out:
        pc = out["probes"]
        print(f"\nprobe cost on this model (batch {BATCH}, probe batch {pc['probe_batch_size']}; model copy "
              f"{pc['model_copy_ms']['median']:.1f} ms):")
        for name, v in pc["ms_per_call"].items():
            print(f"  {name:<18} {v['median']:9.1f} ms/call  (min {v['min']:.1f}, max {v['max']:.1f})")
    round_foreign = summary["round_foreign"]
    if max(round_foreign, default=0.0) > a.max_foreign:
        print(f"\nWARNING: other processes used up to {100 * max(round_foreign):.0f}% of the CPUs during some "
              f"rounds (per round: {', '.join(f'{100 * f:.0f}%' for f in round_foreign)}). With 2 intra-op "
              "threads on a busy 2-core machine a step can be many times slower; rerun when it is idle.")
    print(f"\nwrote {outdir / 'bench.json'} in {out['total_wall_s']:.0f} s", flush=True)
    return 0

"""Command line: `python -m bnlib run --norm affine --epochs 1 ...` (flags are the notebook's
parameter names; values are parsed as YAML scalars, as papermill's -y would, so `--n_train
null`, `--step_milestones [0.3,0.6]` and `--flip false` work)."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import fields

import yaml

import bnlib.config as _config  # the module: RunConfig is rebuilt when plugins add parameters
from .arms import parse_arms, use_arms
from .costplan import print_plan
from .errors import ConfigError, RunLocked
from .grid import run_all, run_study
from .plugins import parse as parse_plugins
from .records import FINISHED
from .report import build_report
from .studies import study_names
from .train import run


# YAML 1.1 (PyYAML) reads `1e-3` as a string (its floats need a dot: `1.0e-3`); papermill's -p
# and Python read it as a number, so the CLI does too.
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _numbers(v):
    """Strings in scientific notation (YAML left them strings) as floats, in lists too."""
    if isinstance(v, str) and _SCIENTIFIC.fullmatch(v.strip()):
        return float(v)
    if isinstance(v, list):
        return [_numbers(x) for x in v]
    return v


_NEGATIVE = re.compile(r"-(\d|\.\d|\.?inf|infinity|nan)", re.IGNORECASE)


def _glue_negative_values(argv: list[str]) -> list[str]:
    """`--gamma0 -1e-3` as `--gamma0=-1e-3`: argparse takes a value that starts with '-' for a
    flag unless it looks like a plain negative number (its test misses -1e-3, -.inf, -Infinity)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "=" not in a and i + 1 < len(argv) and _NEGATIVE.match(argv[i + 1]):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def _yaml_value(s: str):
    try:
        return _numbers(yaml.safe_load(s))
    except yaml.YAMLError:
        return s


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: `--warmup 2` must not silently mean --warmup_epochs
    p = argparse.ArgumentParser(prog="python -m bnlib", description="bnlib: why BatchNorm works, reproduced",
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one training run (same parameters as notebooks/run.ipynb)", allow_abbrev=False)
    defaults = _config.RunConfig()  # the current one: with the parameters of the plugins loaded (_preload_plugins)
    for f in fields(_config.RunConfig):
        # a path is taken as typed: `--out_dir 2026` is the folder "2026", not a number
        r.add_argument(f"--{f.name}", type=str if f.metadata.get("path") else _yaml_value, default=argparse.SUPPRESS,
                       help=f"{f.metadata['help']} (default: {getattr(defaults, f.name)!r})")
    r.add_argument("--rerun", action="store_true", help="train again even if the run exists")
    s = sub.add_parser("study", help="run (or resume) a study grid through papermill, then its analysis",
                       allow_abbrev=False)
    s.add_argument("name", help=f"one of {study_names()} or 'all' (every study, the summary and the report)")
    s.add_argument("--preset", default="quick", help="quick (CPU, Fashion-MNIST) or paper (GPU, CIFAR-10)")
    s.add_argument("--dataset", default=None,
                   help="run every point on this data set instead of the preset's (e.g. synthetic, which needs "
                        "no files)")
    s.add_argument("--workers", type=int, default=1, help="parallel runs (Dask local cluster when > 1)")
    s.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler (a cluster)")
    s.add_argument("--runs-per-gpu", dest="runs_per_gpu", type=int, default=None, metavar="K",
                   help="K runs share one GPU (K workers per GPU; SLURM: K workers per job); default 1 for the "
                        "paper preset, else on a GPU machine as many as the memory estimate fits (at most 8)")
    s.add_argument("--plan", action="store_true",
                   help="print the grid's runs, epochs, training images, how many are done and an estimated "
                        "duration from this machine's `make bench`; train nothing (with --cluster slurm: also the "
                        "job script)")
    s.add_argument("--cluster", default="local", choices=("local", "slurm"),
                   help="local: --workers processes here; slurm: --workers SLURM jobs of one GPU each "
                        "(dask-jobqueue; repository and --out on a shared file system)")
    s.add_argument("--retries", type=int, default=None,
                   help="times a run whose worker died is started again from its checkpoint before it counts "
                        "as failed (default 2; a run that fails by itself is not retried)")
    for flag, what in (("partition", "SLURM partition (queue)"), ("walltime", "SLURM time limit per job, e.g. 04:00:00"),
                       ("memory", "memory per SLURM job, e.g. 32GB"), ("account", "SLURM account to charge"),
                       ("cores", "CPU cores per SLURM job")):
        s.add_argument(f"--{flag}", default=None, type=int if flag == "cores" else str,
                       help=f"--cluster slurm: {what} (default: your dask-jobqueue config, jobqueue.slurm)")
    s.add_argument("--out", default="outputs", help="outputs folder (runs/, studies/, report/)")
    s.add_argument("--plugins", default=None, type=_yaml_value,
                   help="your own norms/probes/studies: module names or .py paths, comma-separated or a YAML list "
                        "(default: BNLIB_PLUGINS); every run of the study imports them")
    s.add_argument("--arms", default=None, type=_yaml_value,
                   help="arms added to the study's own: '+NAME' (BN's ladder), '+NAME@ARM' (ARM's ladder) or "
                        "'+NAME:LR1,LR2,LR3' (its own ladder); several comma-free entries as a YAML list")
    rp = sub.add_parser("report", help="render the HTML report of an outputs folder")
    rp.add_argument("--out", default="outputs")
    return p


def _unknown_flags(extra: list[str]) -> dict:
    """`--name value` pairs argparse did not know, as parameters, so that validate() names them
    with the list of valid parameters (argparse's own message lists none)."""
    out, i = {}, 0
    while i < len(extra):
        if not extra[i].startswith("--"):  # bad input (exit 2), named with the form that works
            hint = f" (--{extra[i].lstrip('-')})" if extra[i].startswith("-") and len(extra[i]) > 1 else ""
            raise ConfigError(f"unexpected argument {extra[i]!r}: parameters are given as --name value{hint}; "
                              f"see python -m bnlib run --help")
        name, _, value = extra[i][2:].partition("=")
        if not value and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            value, i = extra[i + 1], i + 1
        out[name] = _yaml_value(value)
        i += 1
    return out


SLURM_FLAGS = ("partition", "walltime", "memory", "account", "cores")


def _cluster_flags_error(args: dict) -> str | None:
    """A bad combination of the cluster flags, named with what is accepted; None when fine."""
    if args["retries"] is not None and args["retries"] < 0:
        return f"--retries={args['retries']}: must be >= 0"
    if args["cores"] is not None and args["cores"] < 1:
        return f"--cores={args['cores']}: must be >= 1"
    if args.get("runs_per_gpu") is not None and args["runs_per_gpu"] < 1:
        return (f"--runs-per-gpu={args['runs_per_gpu']}: the number of runs that share one GPU; valid choices: a "
                f"whole number >= 1")
    if args["scheduler"] is not None and args["cluster"] != "local":
        return (f"--scheduler {args['scheduler']!r} with --cluster {args['cluster']}: give one of them (--scheduler "
                f"joins a running Dask cluster, --cluster slurm starts one)")
    given = [f"--{k}" for k in SLURM_FLAGS if args[k] is not None]
    if given and args["cluster"] != "slurm":
        return f"{', '.join(given)}: SLURM options; valid only with --cluster slurm"
    return None


def main(argv=None) -> int:
    """Every command, with bnlib's own errors and the foreseeable ones printed as one line that
    names the parameter or path and what to do, never a raw traceback. Exit codes: 2 bad input
    (a bad parameter, flag, path or study name, an unreachable scheduler), 1 a run or study that
    failed or could not be done (RunLocked: another process runs it; an unexpected error), 130
    interrupted, 0 otherwise. BNLIB_TRACEBACK=1 re-raises an unexpected error with its traceback."""
    argv = _glue_negative_values(sys.argv[1:] if argv is None else [os.fspath(a) for a in argv])
    try:
        return _main(argv)
    except SystemExit as e:  # argparse printed its usage line and message (or --help: 0)
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 — the catch-all: one line, never a traceback
        if os.environ.get("BNLIB_TRACEBACK"):
            raise
        msg = " ".join(str(e).split())[:400]
        if isinstance(e, RunLocked):
            print(f"error: {msg}; wait for that process to finish (or stop it), or pass another --out_dir",
                  file=sys.stderr)
            return 1
        if isinstance(e, OSError) and e.filename:  # a path the command could not use
            print(f"error: {e.filename}: {e.strerror or msg}; check the path (--out, --out_dir, --data_dir)",
                  file=sys.stderr)
            return 2
        sched = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--scheduler"), None)
        if sched and isinstance(e, (OSError, TimeoutError)):
            print(f"error: --scheduler {sched!r}: could not reach the Dask scheduler ({type(e).__name__}: {msg}); "
                  f"start it or check the address", file=sys.stderr)
            return 2
        print(f"error: {type(e).__name__}: {msg} (BNLIB_TRACEBACK=1 shows where)", file=sys.stderr)
        return 1


def _preload_plugins(argv: list[str]) -> None:
    """Import the plugins a command names (--plugins, else BNLIB_PLUGINS) before its parser is
    built: their norms, probes, studies and parameters are then flags and names like bnlib's."""
    vals = [a.split("=", 1)[1] for a in argv if a.startswith("--plugins=")]
    vals += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--plugins"]
    _config.load_plugins([p for v in vals for p in parse_plugins(_yaml_value(v))] if vals else None)


def _main(argv) -> int:
    _preload_plugins(argv)
    ns, extra = build_parser().parse_known_args(argv)
    args = vars(ns)
    cmd = args.pop("cmd")
    if extra and cmd != "run":
        print(f"error: unrecognized arguments: {' '.join(extra)}; see python -m bnlib {cmd} --help", file=sys.stderr)
        return 2
    if cmd == "run":
        rerun = args.pop("rerun")
        args.update(_unknown_flags(extra))
        try:
            res = run(args, rerun=rerun)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted: the run is kept up to its last epoch; run the same command to resume it",
                  file=sys.stderr)
            return 130
        print(json.dumps({k: res.get(k) for k in ("status", "diverged_step", "metrics", "run_dir")}, indent=1))
        return 0 if res["status"] in FINISHED else 1
    if cmd == "study":
        if args["workers"] < 1:
            print(f"error: --workers={args['workers']}: must be >= 1", file=sys.stderr)
            return 2
        if (bad := _cluster_flags_error(args)) is not None:
            print(f"error: {bad}", file=sys.stderr)
            return 2
        cluster = {"kind": args["cluster"], **{k: args[k] for k in SLURM_FLAGS if args[k] is not None}}
        plugins = None if args["plugins"] is None else parse_plugins(args["plugins"])
        arms = None if args["arms"] is None else parse_arms(args["arms"])
        if arms and args["name"] == "all":
            print(f"error: --arms {args['arms']!r}: adds arms to one study; name it (e.g. study p1 --arms ...)",
                  file=sys.stderr)
            return 2
        retries = {} if args["retries"] is None else {"retries": args["retries"]}
        try:
            if arms:  # this process's registry: --plan and the runner see the study with its arms
                use_arms(args["name"], arms)
            if args["plan"]:
                print_plan(args["name"], args["preset"], args["out"], args["dataset"], cluster,
                           runs_per_gpu=args["runs_per_gpu"])
                return 0
            if args["name"] == "all":
                res = run_all(args["preset"], args["out"], args["workers"], args["scheduler"], dataset=args["dataset"],
                              cluster=cluster, runs_per_gpu=args["runs_per_gpu"], plugins=plugins, **retries)
                failed = sum(c["failed"] for c in res.values())
            else:
                failed = run_study(args["name"], args["preset"], args["out"], args["workers"], args["scheduler"],
                                   dataset=args["dataset"], cluster=cluster, runs_per_gpu=args["runs_per_gpu"],
                                   plugins=plugins, **retries)["failed"]
        except ValueError as e:  # ConfigError included: bad study, preset or grid point
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted: finished runs are kept and the interrupted one has its last epoch; run the same "
                  "command to resume", file=sys.stderr)
            return 130
        return 1 if failed else 0
    if cmd == "report":
        print(build_report(args["out"]))
        return 0
    return 2

"""Command line: `python -m bnlib run --norm affine --epochs 1 ...` (flags are the notebook's
parameter names; values are parsed as YAML scalars, as papermill's -y would, so `--n_train
null`, `--step_milestones [0.3,0.6]` and `--flip false` work)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

import yaml

from .config import ConfigError, RunConfig


def _yaml_value(s: str):
    try:
        return yaml.safe_load(s)
    except yaml.YAMLError:
        return s


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: `--warmup 2` must not silently mean --warmup_epochs
    p = argparse.ArgumentParser(prog="python -m bnlib", description="bnlib: why BatchNorm works, reproduced",
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one training run (same parameters as notebooks/run.ipynb)", allow_abbrev=False)
    defaults = RunConfig()
    for f in fields(RunConfig):
        r.add_argument(f"--{f.name}", type=_yaml_value, default=argparse.SUPPRESS,
                       help=f"{f.metadata['help']} (default: {getattr(defaults, f.name)!r})")
    r.add_argument("--rerun", action="store_true", help="train again even if the run exists")
    from .studies import study_names

    s = sub.add_parser("study", help="run (or resume) a study grid through papermill, then its analysis",
                       allow_abbrev=False)
    s.add_argument("name", help=f"one of {study_names()} or 'all' (every study, the summary and the report)")
    s.add_argument("--preset", default="quick", help="quick (CPU, Fashion-MNIST) or paper (GPU, CIFAR-10)")
    s.add_argument("--dataset", default=None,
                   help="run every point on this data set instead of the preset's (e.g. synthetic, which needs "
                        "no files)")
    s.add_argument("--workers", type=int, default=1, help="parallel runs (Dask local cluster when > 1)")
    s.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler (a cluster)")
    s.add_argument("--out", default="outputs", help="outputs folder (runs/, studies/, report/)")
    rp = sub.add_parser("report", help="render the HTML report of an outputs folder")
    rp.add_argument("--out", default="outputs")
    return p


def _unknown_flags(extra: list[str]) -> dict:
    """`--name value` pairs argparse did not know, as parameters, so that validate() names them
    with the list of valid parameters (argparse's own message lists none)."""
    out, i = {}, 0
    while i < len(extra):
        if not extra[i].startswith("--"):
            raise SystemExit(f"error: unexpected argument {extra[i]!r}; parameters are given as --name value")
        name, _, value = extra[i][2:].partition("=")
        if not value and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            value, i = extra[i + 1], i + 1
        out[name] = _yaml_value(value)
        i += 1
    return out


def main(argv=None) -> int:
    ns, extra = build_parser().parse_known_args(argv)
    args = vars(ns)
    cmd = args.pop("cmd")
    if extra and cmd != "run":
        print(f"error: unrecognized arguments: {' '.join(extra)}; see python -m bnlib {cmd} --help", file=sys.stderr)
        return 2
    if cmd == "run":
        from .train import run

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
        from .records import FINISHED

        return 0 if res["status"] in FINISHED else 1
    if cmd == "study":
        from .grid import run_all, run_study

        if args["workers"] < 1:
            print(f"error: --workers={args['workers']}: must be >= 1", file=sys.stderr)
            return 2
        try:
            if args["name"] == "all":
                res = run_all(args["preset"], args["out"], args["workers"], args["scheduler"], dataset=args["dataset"])
                failed = sum(c["failed"] for c in res.values())
            else:
                failed = run_study(args["name"], args["preset"], args["out"], args["workers"], args["scheduler"],
                                   dataset=args["dataset"])["failed"]
        except ValueError as e:  # ConfigError included: bad study, preset or grid point
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted: finished runs are kept and the interrupted one has its last epoch; run the same "
                  "command to resume", file=sys.stderr)
            return 130
        return 1 if failed else 0
    if cmd == "report":
        from .report import build_report

        print(build_report(args["out"]))
        return 0
    return 2

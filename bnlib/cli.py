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
    p = argparse.ArgumentParser(prog="python -m bnlib", description="bnlib: why BatchNorm works, reproduced")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one training run (same parameters as notebooks/run.ipynb)")
    defaults = RunConfig()
    for f in fields(RunConfig):
        r.add_argument(f"--{f.name}", type=_yaml_value, default=argparse.SUPPRESS,
                       help=f"{f.metadata['help']} (default: {getattr(defaults, f.name)!r})")
    r.add_argument("--rerun", action="store_true", help="train again even if the run exists")
    return p


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    cmd = args.pop("cmd")
    if cmd == "run":
        from .train import run

        rerun = args.pop("rerun")
        try:
            res = run(args, rerun=rerun)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps({k: res.get(k) for k in ("status", "diverged_step", "metrics", "run_dir")}, indent=1))
        return 0 if res["status"] in ("completed", "diverged") else 1
    return 2

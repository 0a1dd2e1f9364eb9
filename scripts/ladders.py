"""Regenerate the studies' quick learning-rate ladders (bnlib/studies/ladders/<study>.json) from
validation-only sweeps with seeds disjoint from the studies' (bnlib.ladders; docs/presets.md).

    .venv/bin/python scripts/ladders.py p1 [p3 p5 ...] [--workers 2] [--out outputs/ladders]

Finished sweep runs under --out are reused, so an interrupted sweep resumes where it stopped.
"""
import argparse
import sys

from bnlib.ladders import OUT, SPECS, make_ladders


def main(argv=None) -> int:
    names = sorted({s for s, _ in SPECS})
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("studies", nargs="+", choices=names, help="the studies whose ladders to regenerate")
    ap.add_argument("--preset", default="quick", choices=sorted({p for _, p in SPECS}))
    ap.add_argument("--workers", type=int, default=2, help="study workers (bnlib.grid), default 2")
    ap.add_argument("--out", default=OUT, help=f"where the sweep's runs go (default {OUT})")
    a = ap.parse_args(argv)
    if a.workers < 1:
        ap.error(f"--workers {a.workers}: must be >= 1")
    for s in a.studies:
        make_ladders(s, a.preset, a.out, a.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())

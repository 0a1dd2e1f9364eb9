"""Rewrite README.md's calibration table (between `<!-- calibration: from make readme -->` and
`<!-- /calibration -->`) from a fresh run of bnlib.calibration (about a minute):

    make readme

Per study and preset, each claim's error rate with its effect exactly at the threshold (1 000
tables) and its power at twice that distance (400 tables): bnlib.calibration.summary_markdown.
docs/calibration.md has the full table (python -m bnlib.calibration --markdown).
"""
import argparse
import sys

from bnlib.calibration import NULL_TABLES, calibration_table, power_tables, summary_markdown
from bnlib.errors import ConfigError
from bnlib.report import rewrite_block

BEGIN, END = "<!-- calibration: from make readme -->", "<!-- /calibration -->"

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--readme", default="README.md", help="the README to update (default: README.md)")
ap.add_argument("--tables", type=int, default=NULL_TABLES, help=f"null tables per scenario (power: 2/5 of it; "
                                                                 f"default {NULL_TABLES})")
args = ap.parse_args()
if args.tables < 1:
    ap.error(f"--tables={args.tables}: must be >= 1")
try:
    table = rewrite_block(args.readme, BEGIN, END, lambda _old: summary_markdown(
        calibration_table(null_tables=args.tables, power_tables=power_tables(args.tables))))
except ConfigError as e:
    sys.exit(f"readme_calibration: {e}")
print(f"{args.readme}: calibration table rewritten ({table.count(chr(10)) - 1} studies, {args.tables} null tables each)")

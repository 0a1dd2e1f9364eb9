"""Rewrite README.md's verdict table (between `<!-- verdicts: from make study -->` and
`<!-- /verdicts -->`) from outputs/studies/*/verdicts.json, after `make study`:

    make readme

Every number in the table comes from the verdicts the studies wrote (bnlib.report.readme_verdicts).
"""
import argparse
import sys

from bnlib.errors import ConfigError
from bnlib.report import readme_verdicts

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--out", default="outputs", help="outputs folder the studies wrote (default: outputs)")
ap.add_argument("--readme", default="README.md", help="the README to update (default: README.md)")
args = ap.parse_args()
try:
    table = readme_verdicts(args.out, args.readme)
except ConfigError as e:
    sys.exit(f"readme_verdicts: {e}")
print(f"{args.readme}: verdict table rewritten from {args.out}/studies ({table.count(chr(10)) - 1} studies)")

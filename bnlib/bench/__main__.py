"""python -m bnlib.bench: the same command line as scripts/bench.py (`make bench`)."""
import sys

from .command import main

sys.exit(main(prog="python -m bnlib.bench"))

"""`make bench`: training throughput of bnlib's loop against the popular CIFAR loop and the bare
model step, and the throughput table `study --plan` reads. The code is bnlib.bench (its command
line: bnlib/bench/command.py); `.venv/bin/python scripts/bench.py --help` for the flags."""
import sys

from bnlib.bench import main

if __name__ == "__main__":
    sys.exit(main())

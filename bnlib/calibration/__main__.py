"""python -m bnlib.calibration: the calibration table (bnlib.calibration.main)."""
import sys

from . import main

sys.exit(main())

"""bnlib's version: a leaf, read by the package, the run records and the build backend."""
__version__ = "0.1.0"

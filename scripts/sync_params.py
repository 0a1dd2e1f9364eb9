"""Rebuild notebooks/run.ipynb's parameters cell from bnlib.RunConfig (sections from config.py's
`# --- section ---` comments). Run after adding or changing a RunConfig field:

    .venv/bin/python scripts/sync_params.py

tests/test_notebook_run.py checks that the cell and RunConfig agree.
"""
import re, nbformat
from dataclasses import fields, MISSING
import bnlib
from bnlib.config import RunConfig
src = open("bnlib/config.py").read()
body = src[src.index("class RunConfig"):]
section_of, cur = {}, None
for line in body.splitlines():
    m = re.match(r"\s+# --- (\w[\w ]*?) -+", line)
    if m:
        cur = m.group(1)
    m = re.match(r"\s+(\w+): \w+ = _p\(", line)
    if m:
        section_of[m.group(1)] = cur
d = RunConfig()
lines = ["# Parameters: the names of bnlib.RunConfig (python -m bnlib run --help lists the same)."]
last = None
for f in fields(RunConfig):
    sec = section_of.get(f.name)
    if sec != last:
        lines += ["", f"# --- {sec} ---"]
        last = sec
    v = getattr(d, f.name)
    help = f.metadata["help"].replace("=", ":").replace("'", "")
    if f.metadata["nullable"] or v is None:
        lines.append(f"{f.name} = {v!r}  # ({f.type} or None) {help}")
    else:
        lines.append(f"{f.name}: {f.type} = {v!r}  # {help}")
nb = nbformat.read("notebooks/run.ipynb", 4)
cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
cell.source = "\n".join(lines)
nbformat.write(nb, "notebooks/run.ipynb")
print(f"run.ipynb parameters cell: {len(fields(RunConfig))} parameters")

"""Write notebooks/run.ipynb's parameters cell from bnlib.RunConfig (bnlib.config.parameters_cell).
Run after adding or changing a parameter (a RunConfig field, a norm's option, a probe's parameter):

    make params

tests/test_notebook_run.py checks that the cell equals the generator's output.
"""
import nbformat

from bnlib.config import RunConfig, parameters_cell

NB = "notebooks/run.ipynb"
nb = nbformat.read(NB, 4)
cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
cell.source = parameters_cell()
nbformat.write(nb, NB)
print(f"{NB} parameters cell: {len(RunConfig.__dataclass_fields__)} parameters")

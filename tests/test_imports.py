"""The package's imports form a tree: read from the code itself (ast), function-level imports
included, every bnlib-internal import must go down the declared layer order, and no module may
import itself back through others. A new module must be given a layer here."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "bnlib"

# Low to high: a module may import modules of lower layers only. Inside a wildcard layer (the
# modules of one package, e.g. bench.*) they may import each other; the cycle test still holds.
LAYERS = [
    ["bnlib.version", "bnlib.errors", "bnlib.params", "bnlib.rng", "bnlib.ladder_file"],
    ["bnlib.plugins"],  # the registries record where an entry comes from
    ["bnlib.device", "bnlib.bn_variants", "bnlib.bnstats", "bnlib.blocks"],
    ["bnlib.ics_free"],
    ["bnlib.norms"],
    ["bnlib.models"],
    ["bnlib.optim"],
    ["bnlib.data"],
    ["bnlib.probes.registry"],
    ["bnlib.probes.*"],  # each paper's probes
    ["bnlib.probes"],
    ["bnlib.memory"],
    ["bnlib.config"],
    ["bnlib.records"],
    ["bnlib.checkpoint"],
    ["bnlib.train"],
    ["bnlib.effects"],
    ["bnlib.stats", "bnlib.analysis", "bnlib.plots"],
    ["bnlib.probe_plots"],
    ["bnlib.studies.base"],
    ["bnlib.studies.p4"],
    ["bnlib.studies.p3_tables", "bnlib.studies.p5_tables"],  # below their studies: no study imports back
    ["bnlib.studies.*"],
    ["bnlib.studies"],
    ["bnlib.calibration.worlds"],
    ["bnlib.calibration.rules"],
    ["bnlib.calibration"],
    ["bnlib.calibration.__main__"],
    ["bnlib.arms"],  # a user's arm added to a study
    ["bnlib.kernels", "bnlib.report"],
    ["bnlib.cluster"],
    ["bnlib.grid"],
    ["bnlib.ladders"],
    ["bnlib.costplan"],
    ["bnlib.bench.*"],
    ["bnlib.bench"],
    ["bnlib.cli"],
    ["bnlib"],
    ["bnlib.__main__"],
]


def _modules(pkg: Path = PKG) -> dict[str, Path]:
    out = {}
    for f in pkg.rglob("*.py"):
        parts = list(f.relative_to(pkg.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def layer_of(mod: str) -> int:
    for i, names in enumerate(LAYERS):
        if mod in names:
            return i
    for i, names in enumerate(LAYERS):  # wildcards after exact names
        if any(n.endswith(".*") and mod.startswith(n[:-1]) and mod.count(".") == n.count(".") for n in names):
            return i
    raise KeyError(mod)


def imports_of(mod: str, modules: dict[str, Path] = MODULES) -> set[str]:
    """bnlib modules that `mod` imports anywhere in its code (top level or in a function). An
    import of a package's name counts as importing the package (its __init__)."""
    f = modules[mod]
    is_pkg = f.name == "__init__.py"
    here = mod.split(".") if is_pkg else mod.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - (node.level - 1)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            if target in modules:
                out.add(target)
            for a in node.names:
                if f"{target}.{a.name}" in modules:
                    out.add(f"{target}.{a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules:
                    out.add(a.name)
    out.discard(mod)
    return out


def test_every_module_has_a_layer():
    missing = []
    for m in MODULES:
        try:
            layer_of(m)
        except KeyError:
            missing.append(m)
    assert not missing, f"modules without a layer in tests/test_imports.py LAYERS: {missing}"


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_imports_point_down(mod):
    here = layer_of(mod)
    wild = any(n.endswith(".*") for n in LAYERS[here])
    up = sorted(t for t in imports_of(mod) if layer_of(t) > here or (layer_of(t) == here and not wild))
    assert not up, f"{mod} (layer {layer_of(mod)}) imports {[(t, layer_of(t)) for t in up]}: not below it"


def test_no_import_cycle():
    graph = {m: imports_of(m) for m in MODULES}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_function_level_relative_and_package_imports(tmp_path):
    """The reader above is what keeps the tree a tree: it must see an import inside a function,
    a relative `from . import x` (which imports the package's __init__ too) and `import a.b`."""
    pkg = tmp_path / "bnlib"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "x.py").write_text("")
    (pkg / "b.py").write_text("")
    (pkg / "c.py").write_text("import bnlib.sub.x as x\n")
    (pkg / "a.py").write_text("def f():\n    from .b import thing\n    from . import c\n")
    mods = _modules(pkg)
    assert imports_of("bnlib.a", mods) == {"bnlib.b", "bnlib", "bnlib.c"}
    assert imports_of("bnlib.c", mods) == {"bnlib.sub.x"}

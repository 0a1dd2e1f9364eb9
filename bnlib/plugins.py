"""Plugins: your own norms, probes and studies in a file of your own, without editing bnlib.

A plugin is an importable module name (`my_pkg.my_norm`) or a path to a `.py` file whose import
registers entries with bnlib's own `register_norm`, `register_probe` and `register_study`. The
run parameter `plugins` (or the environment variable BNLIB_PLUGINS, paths separated by
os.pathsep or commas) names them; bnlib.config.validate imports them before it checks anything,
so every entry point that validates (bnlib.run, the CLI, run.ipynb, the study runner's kernels
and Dask workers) loads them first.

Identity follows the code: a registry entry remembers where it was defined (`entry_source`:
the file's path and the sha256 of its content; None for bnlib's own), and a run that uses a
plugin's entry hashes that sha256 into its id (bnlib.records.run_id), so editing the plugin
gives new runs. A leaf of the package: the registries call in, it imports none of them.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path

from .errors import ConfigError

__all__ = ["ENV", "load", "parse", "check_unique", "entry_source", "loaded", "check_importable"]

ENV = "BNLIB_PLUGINS"
PKG = Path(__file__).resolve().parent
_LOADING: list[dict] = []  # the plugin being imported (its source), innermost last
_LOADED: dict[str, dict] = {}  # spec as given, resolved -> {"module", "path", "sha256"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parse(value) -> list[str]:
    """`plugins` as a list of strings: a list's items as strings (a YAML flag value may hold a
    path object or a number); a string split on commas and os.pathsep (the environment
    variable's and the CLI's form); None or '' -> []."""
    if value is None:
        return []
    if isinstance(value, str):
        return [s.strip() for part in value.split(os.pathsep) for s in part.split(",") if s.strip()]
    return [str(x) for x in value]


def from_env() -> list[str]:
    return parse(os.environ.get(ENV, ""))


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or "/" in spec


def resolve(spec: str) -> str:
    """A file plugin by its absolute path (a run records it, and a worker with another working
    directory finds it); a module name as given."""
    return str(Path(spec).expanduser().resolve()) if _is_path(spec) else spec


def entry_source(fn) -> dict | None:
    """Where a registry entry was defined: None for bnlib's own; else {module, path, sha256} of
    the file that defines `fn` (a function or class), or of the plugin being imported when that
    file cannot be read (an entry defined in a notebook cell: then the sha256 of its source)."""
    code = getattr(fn, "__code__", None)
    file = code.co_filename if code is not None else getattr(sys.modules.get(getattr(fn, "__module__", "")),
                                                              "__file__", None)
    if file:
        p = Path(file).resolve()
        if p.is_relative_to(PKG):
            return None
        if _LOADING and _LOADING[-1].get("path") == str(p):  # the plugin being imported: hashed already
            return dict(_LOADING[-1])
        if p.is_file():
            return {"module": getattr(fn, "__module__", ""), "path": str(p), "sha256": _sha256(p)}
    if _LOADING:
        return dict(_LOADING[-1])
    try:  # defined interactively (a notebook cell): its own source text is its identity
        import inspect

        text = inspect.getsource(fn)
    except (OSError, TypeError):
        text = repr(fn)
    return {"module": getattr(fn, "__module__", ""), "path": "<interactive>",
            "sha256": hashlib.sha256(text.encode()).hexdigest()}


def same_definition(old: dict | None, new: dict | None) -> bool:
    """Two registrations of one name from one file: the file imported again (edited, or under
    another module name): the newer one replaces the older."""
    return bool(old and new and old.get("path") == new.get("path") and old["path"] != "<interactive>")


def check_unique(kind: str, registry: dict, name: str, source: dict | None) -> None:
    """A name registered twice is an error, naming the first definition, unless the same file
    registers it again (same_definition): one rule for norms, probes and studies."""
    if name in registry and not same_definition(registry[name].source, source):
        where = (registry[name].source or {}).get("path", "bnlib")
        raise ValueError(f"{kind} {name!r} is registered twice (first in {where}); choose another name")


def _why(e: BaseException) -> str:
    if isinstance(e, SyntaxError):
        return f"SyntaxError: {e.msg} (line {e.lineno})"
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {e}{where}"


def _import_file(path: Path) -> None:
    # a module name of its own per file (its stem plus a hash of its path): two plugins named
    # alike in two folders do not replace each other in sys.modules
    name = f"bnlib_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise


def _load_one(spec: str) -> dict:
    key = resolve(spec)
    if _is_path(spec):
        path = Path(key)
        if not path.is_file():
            raise ConfigError(f"plugins={spec!r}: no such file ({key}); valid: a path to a .py file or an "
                              f"importable module name")
        sha = _sha256(path)
        if (old := _LOADED.get(key)) and old["sha256"] == sha:
            return old
        src = {"module": path.stem, "path": key, "sha256": sha}
        _LOADING.append(src)
        try:
            _import_file(path)  # again when the file changed: its entries are replaced (same_definition)
        except ConfigError:
            raise
        except BaseException as e:  # noqa: BLE001 — anything the plugin's import raises
            raise ConfigError(f"plugins={spec!r}: cannot be imported: {_why(e)}") from None
        finally:
            _LOADING.pop()
    else:
        try:
            found = importlib.util.find_spec(spec)
        except (ImportError, ValueError) as e:
            found, err = None, e
        else:
            err = None
        if found is None:
            raise ConfigError(f"plugins={spec!r}: no module of that name can be imported ({err or 'not found'}); "
                              f"valid: an importable module name or a path to a .py file") from None
        origin = Path(found.origin) if found.origin and found.origin not in ("built-in", "frozen") else None
        sha = _sha256(origin) if origin and origin.is_file() else ""
        if (old := _LOADED.get(key)) and old["sha256"] == sha:
            return old
        src = {"module": spec, "path": str(origin) if origin else spec, "sha256": sha}
        _LOADING.append(src)
        try:
            if spec in sys.modules and key in _LOADED:  # edited since: import it again
                importlib.reload(sys.modules[spec])
            else:
                importlib.import_module(spec)
        except BaseException as e:  # noqa: BLE001
            raise ConfigError(f"plugins={spec!r}: cannot be imported: {_why(e)}") from None
        finally:
            _LOADING.pop()
    _LOADED[key] = src
    return src


def load(value) -> list[dict]:
    """Import every plugin of `value` (a list, or a string as `parse` reads it) once per content:
    a file that changed since it was imported is imported again. Returns their sources. Raises
    ConfigError naming `plugins`, the value and why it cannot be imported."""
    return [_load_one(s) for s in parse(value)]


def loaded() -> list[dict]:
    """The sources of every plugin this process imported."""
    return list(_LOADED.values())


def check_importable(value) -> str | None:
    """On a worker: None when every plugin imports here, else why not (the study's pre-flight
    check names the worker)."""
    try:
        load(value)
    except ConfigError as e:
        return str(e)
    return None

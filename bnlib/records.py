"""Run records: one directory per run, named by a deterministic id of its resolved parameters.

    outputs/runs/<run_id>/
      config.json         every resolved parameter + provenance
      status.json         running | completed | diverged | failed, timings, headline metrics
      epochs.parquet      per epoch: lr_now, train/val/test loss and accuracy, seconds
      steps.parquet       every `log_every` steps: loss, lr_now, gradient norm
      norm_params.parquet per epoch (0 = init) per norm layer / residual gain: γ, β, α stats
      channels.parquet    at the end: γ and β of every channel of every norm layer, and their init
      probes.parquet      runs with `probes`: step, probe, layer, depth, quantity, x, value (bnlib.probes)

Every file is written atomically (temp file in the same folder, then os.replace), so a reader
never sees half a file. `load_runs(path)` gathers all runs under a path into tidy DataFrames.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from .config import IDENTITY_EXCLUDED
from .errors import ConfigError, RecordError
from .version import __version__
from .norms import NORMS
from .probes import PROBES, parse_probes
from .device import machine

__all__ = ["run_id", "code_identity", "provenance", "config_record", "RunDir", "Runs", "load_runs", "atomic_write", "atomic_path",
           "check_writable", "STATUSES", "FINISHED", "RecordError", "record_problem"]

STATUSES = ("running", "completed", "diverged", "failed", "interrupted")
FINISHED = ("completed", "diverged")  # results: skipped on rerun, loaded by load_runs
TABLES = ("epochs", "steps", "norm_params")  # every run has these
# Tables a run has only when it records them (older runs, or a feature turned off): loaded when
# present, an empty frame otherwise. channels: the final γ/β of every channel of every norm layer.
OPTIONAL_TABLES = ("channels", "probes")  # probes: measurements inside training (bnlib.probes)


def record_problem(name: str, obj) -> str | None:
    """None when `obj` (the parsed `name`.json) has the shape bnlib writes, else what is wrong.
    Readers check this before they index into a record, so a hand-edited or foreign file makes
    them skip the run with a reason instead of crashing on the whole folder."""
    if not isinstance(obj, dict):
        return f"{name}.json holds {type(obj).__name__}, not an object"
    if name == "config":
        if not isinstance(obj.get("params"), dict):
            return f"config.json: 'params' is {type(obj.get('params')).__name__}, not an object"
    elif name == "status":
        if obj.get("status") not in STATUSES:
            return f"status.json: status {obj.get('status')!r} is not one of {list(STATUSES)}"
        for sub in ("metrics", "data_sizes"):
            if obj.get(sub) is not None and not isinstance(obj[sub], dict):
                return f"status.json: {sub!r} is {type(obj[sub]).__name__}, not an object"
    elif name == "manifest":
        if not isinstance(obj.get("run_ids"), list) or not all(isinstance(r, str) for r in obj["run_ids"]):
            return "manifest.json: 'run_ids' is not a list of run ids"
    return None


def run_id(cfg: dict) -> str:
    """Readable prefix + hash of every parameter that changes what the run computes (device
    by type only: cuda:0 and cuda:1 compute the same run; the options of norms other than the
    run's, e.g. norm_groups of a BN run, change nothing: left out, so a grid that varies them
    for one norm does not rerun the others)."""
    own = set(NORMS[cfg["norm"]].options) if cfg.get("norm") in NORMS else set()
    other_norms = {k for spec in NORMS.values() for k in spec.options} - own
    # a plugin probe's parameters are in every config once it is loaded: hashed only for a run
    # that requests it (bnlib's own probes' are hashed always, as before: their ids stay)
    asked = {n for n, _ in parse_probes(cfg.get("probes", []))[0]}
    plugin_probes = {k for spec in PROBES.values() if spec.source and spec.name not in asked for k in spec.params}
    plugin_probes -= {k for spec in PROBES.values() if not spec.source or spec.name in asked for k in spec.params}
    ident = {k: v for k, v in cfg.items() if k not in IDENTITY_EXCLUDED and k not in other_norms | plugin_probes}
    ident["device"] = torch.device(cfg["device"]).type
    if code := code_identity(cfg):  # absent for bnlib's own entries at version 1: their ids are unchanged
        ident["code"] = {k: {kk: v[kk] for kk in ("version", "sha256") if kk in v} for k, v in code.items()}
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg['norm']}-{cfg['arch']}-bs{cfg['batch_size']}-lr{cfg['lr']:g}-s{cfg['seed']}-{digest}"


def code_identity(cfg: dict) -> dict:
    """The code behind a run beyond bnlib's own version-1 entries: for its norm and each probe it
    requests, {"norm:NAME" / "probe:NAME": {version (when not 1), sha256, path, module (a
    plugin's)}}. run_id hashes versions and content hashes; config.json records it all."""
    out = {}
    entries = [("norm", NORMS.get(cfg.get("norm")))]
    entries += [("probe", PROBES.get(n)) for n, _ in parse_probes(cfg.get("probes", []))[0]]
    for kind, spec in entries:
        if spec is None:
            continue
        rec = {**({"version": spec.version} if spec.version != 1 else {}), **(spec.source or {})}
        if rec:
            out[f"{kind}:{spec.name}"] = rec
    return out


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; when the block ends without error, the file
    written there is flushed to disk and renamed onto `path` (else removed). A kill at any
    moment leaves either the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def check_writable(out_dir: Path, min_free_mb: float = 50.0) -> None:
    """Fail before training when the outputs folder cannot take a run's records."""
    out_dir = Path(out_dir).expanduser()
    # Checked on the nearest folder that exists, creating nothing: a command rejected here (or
    # later, before its first run) leaves no empty outputs folder behind (issue 15).
    here = out_dir
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        raise ConfigError(f"out_dir={str(out_dir)!r}: {str(here)!r} is a file, not a folder; choose another "
                          f"outputs folder") from None
    try:
        with tempfile.NamedTemporaryFile(dir=here, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"out_dir={str(out_dir)!r}: not writable ({e.strerror or e}); choose a folder you can "
                          f"write to") from None
    free = shutil.disk_usage(here).free / 2**20
    if free < min_free_mb:
        raise ConfigError(f"out_dir={str(out_dir)!r}: only {free:.0f} MB free; a run needs at least "
                          f"{min_free_mb:.0f} MB for its records and checkpoint") from None


def git_commit() -> str | None:
    """HEAD of the checkout bnlib is imported from, '+dirty' when tracked files differ."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) if sha else None


def provenance(cfg: dict) -> dict:
    """bnlib's version and commit, the machine (bnlib.device.machine: host, device, library
    versions, CUDA/cuDNN/driver, GPU and capability, TF32/cuDNN flags in force), the precision
    and whether the run asked for deterministic kernels."""
    return {"bnlib_version": __version__, "git_commit": git_commit(), "pandas": pd.__version__,
            **machine(cfg["device"]), "precision": cfg["precision"],
            "deterministic": bool(cfg.get("deterministic", False)),  # the run's request; the flags it set are beside it
            "code": code_identity(cfg),  # a plugin's norm/probe: its file and sha256; a version other than 1
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def config_record(rd: "RunDir", rid: str, cfg: dict, resuming: bool) -> dict:
    """config.json: the run's parameters and its provenance. `provenance` is this start or
    resume (readers that want one entry read it); `provenance_history` has one entry per start
    or resume of the records in the directory, oldest first, so a run started on one machine
    and resumed on another shows both. A fresh start (no checkpoint) begins the history anew:
    the records of an earlier attempt are gone with it."""
    entry = {**provenance(cfg), "event": "resume" if resuming else "start"}
    history = []
    if resuming:
        try:
            old = rd.read_json("config")
        except (OSError, ValueError):  # unreadable: the entries before it are lost, not this one
            old = {}
        history = old.get("provenance_history") or ([old["provenance"]] if old.get("provenance") else [])
    return {"run_id": rid, "params": cfg, "provenance": entry, "provenance_history": [*history, entry]}


class RunDir:
    """The folder of one run; every write is atomic."""

    def __init__(self, path):
        self.path = Path(path)

    @property
    def id(self) -> str:
        return self.path.name

    def write_json(self, name: str, obj: dict) -> None:
        atomic_write(self.path / f"{name}.json", json.dumps(obj, indent=1, default=str).encode())

    def read_json(self, name: str) -> dict:
        """The parsed record, its shape checked (record_problem): RecordError (a ValueError)
        when it parses but is not what bnlib writes; OSError / ValueError when unreadable."""
        obj = json.loads((self.path / f"{name}.json").read_text())
        if (problem := record_problem(name, obj)) is not None:
            raise RecordError(f"{self.path / f'{name}.json'}: {problem.split(': ', 1)[-1]}")
        return obj

    def write_table(self, name: str, rows: list[dict] | pd.DataFrame) -> None:
        df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
        with atomic_path(self.path / f"{name}.parquet") as tmp:
            df.to_parquet(tmp, index=False)

    LOCKS = {"run": ".lock", "notebook": ".notebook.lock"}

    def lock(self, which: str = "run"):
        """A lock on the run directory. "run": held by the process that trains and records the
        run (bnlib.run). "notebook": held by the study runner that executes run.ipynb into the
        directory, so two study processes never write the same executed notebook. Both are
        flock locks, released by the OS when their holder dies, so a killed process never
        blocks the rerun that resumes its work."""
        from filelock import FileLock

        return FileLock(str(self.path / self.LOCKS[which]))

    def locked(self, which: str = "run") -> bool:
        """True when another live process holds the lock."""
        from filelock import Timeout

        lock = self.lock(which)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return True
        lock.release()
        return False

    def verify(self) -> str | None:
        """None when the run's records are whole; else what is wrong (a truncated or unreadable
        file). Checked before a finished run is trusted, skipped or loaded."""
        import pyarrow.parquet as pq

        for name in ("config", "status"):
            try:
                self.read_json(name)
            except RecordError as e:
                return f"{name}.json has the wrong shape: {e}"
            except (OSError, ValueError) as e:
                return f"{name}.json unreadable: {type(e).__name__}: {e}"
        for t in (*TABLES, *(t for t in OPTIONAL_TABLES if (self.path / f"{t}.parquet").exists())):
            try:
                pq.read_metadata(self.path / f"{t}.parquet")
            except Exception as e:  # noqa: BLE001 — pyarrow raises several kinds
                return f"{t}.parquet unreadable: {type(e).__name__}: {e}"
        return None

    def status(self) -> dict | None:
        """status.json, or None when it is missing, unreadable or of the wrong shape (the run
        is then treated as not finished: run again)."""
        try:
            return self.read_json("status")
        except (OSError, ValueError):
            return None


def _interrupted(rd: RunDir, st: dict) -> bool:
    """A `running` status that no live process stands behind. The run's lock says so for any
    host sharing the folder (and is not fooled by a reused pid); where the lock cannot be taken
    (a read-only copy of the outputs), a pid written on this host that no longer exists."""
    import socket

    try:
        return not rd.locked("run")
    except OSError:
        pass
    if st.get("hostname") != socket.gethostname() or not st.get("pid"):
        return False
    try:
        os.kill(int(st["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class Runs:
    """All runs under a path. `runs`: one row per run (config + status + headline metrics);
    `epochs`, `steps`, `norm_params`: tidy tables, each row carrying its run's config columns.
    `skipped`: (run directory, reason) for every folder that could not be read. `channels`:
    per-channel final γ/β (runs that recorded them). `probes`: the rows of bnlib.probes (runs
    that requested probes), long format."""

    runs: pd.DataFrame
    epochs: pd.DataFrame
    steps: pd.DataFrame
    norm_params: pd.DataFrame
    skipped: list = field(default_factory=list)
    channels: pd.DataFrame = field(default_factory=pd.DataFrame)
    probes: pd.DataFrame = field(default_factory=pd.DataFrame)


def _flat_status(st: dict) -> dict:
    out = {k: v for k, v in st.items() if not isinstance(v, dict)}
    for sub in ("metrics", "data_sizes"):
        out.update(st.get(sub) or {})
    return out


def load_runs(path="outputs/runs", statuses=FINISHED, run_ids=None) -> Runs:
    """Read every run directory under `path` (searched recursively for config.json; only those
    named in `run_ids` if given). Runs whose status is not in `statuses` (e.g. still running, or
    failed) or whose files cannot be read are left out and listed in `.skipped` with the reason."""
    if not str(os.fspath(path)).strip():
        raise FileNotFoundError("load_runs: an empty path; pass the runs folder (e.g. 'outputs/runs')")
    root = Path(os.fspath(path)).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"load_runs: {str(root)!r} does not exist; pass the runs folder (e.g. "
                                f"'outputs/runs') or one run's folder")
    if not root.is_dir():
        raise NotADirectoryError(f"load_runs: {str(root)!r} is a file, not a folder; pass the runs folder (e.g. "
                                 f"'outputs/runs') or one run's folder")
    if run_ids is not None:  # whole ids: a single id given as a string is not a set of its substrings
        run_ids = {run_ids} if isinstance(run_ids, str) else {os.fspath(r) for r in run_ids}
    rows, tables, skipped = [], {t: [] for t in (*TABLES, *OPTIONAL_TABLES)}, []
    for cfg_path in sorted(root.rglob("config.json")):
        rd = RunDir(cfg_path.parent)
        if run_ids is not None and rd.id not in run_ids:
            continue
        try:
            conf = rd.read_json("config")
            st = rd.read_json("status")
        except RecordError as e:
            skipped.append((str(rd.path), f"wrong shape: {e}"))
            continue
        except (OSError, ValueError) as e:
            skipped.append((str(rd.path), f"unreadable config/status: {type(e).__name__}: {e}"))
            continue
        if st.get("status") not in statuses:
            why = f"status {st.get('status')!r}"
            if st.get("status") == "running" and _interrupted(rd, st):
                pid = f" (pid {st['pid']} on {st.get('hostname')})" if st.get("pid") else ""
                why += f" but no live process holds it{pid}: interrupted; rerun to resume"
            skipped.append((str(rd.path), why))
            continue
        params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in conf.get("params", {}).items()}
        try:
            frames = {t: pd.read_parquet(rd.path / f"{t}.parquet") for t in TABLES}
            frames |= {t: pd.read_parquet(rd.path / f"{t}.parquet") for t in OPTIONAL_TABLES
                       if (rd.path / f"{t}.parquet").exists()}
        except Exception as e:  # noqa: BLE001 — any unreadable table excludes the run
            skipped.append((str(rd.path), f"unreadable table: {type(e).__name__}: {e}"))
            continue
        rows.append({"run_id": rd.id, **params, **_flat_status(st)})
        for t, df in frames.items():
            tables[t].append(df.assign(run_id=rd.id))
    runs = pd.DataFrame(rows)

    def join(t):
        if not tables[t]:
            return pd.DataFrame()
        df = pd.concat(tables[t], ignore_index=True)
        # a table's own column wins over a run-level one of the same name (none by design)
        return df.merge(runs.drop(columns=[c for c in runs if c in df and c != "run_id"]), on="run_id", how="left")

    return Runs(runs, join("epochs"), join("steps"), join("norm_params"), skipped, channels=join("channels"),
                probes=join("probes"))


def load_study(out="outputs", study: str = "p1"):
    """The runs of one study (from its manifest) as bnlib.Runs, plus the manifest."""
    out = Path(out)
    path = out / "studies" / study / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"study={study!r}: its manifest {str(path)!r} cannot be read ({type(e).__name__}: {e}); "
                          f"run the study (python -m bnlib study {study}) to write it") from None
    if (problem := record_problem("manifest", manifest)) is not None:
        raise ConfigError(f"study={study!r}: {str(path)!r} has the wrong shape ({problem}); run the study again "
                          f"to rewrite it") from None
    runs = load_runs(out / "runs", run_ids=set(manifest["run_ids"]))
    return runs, manifest

"""Run a study: every grid point through papermill (notebooks/run.ipynb) into its own run
directory, then the study's analysis notebook; `study all` adds the summary and the report.

Resume follows from run identity: a point whose run directory says `completed` or `diverged`
is skipped; an interrupted or failed one resumes from its last checkpoint. A point whose
notebook fails (an error, running out of memory, a killed kernel) is recorded `failed` with its
reason and the grid goes on. Two study processes on one outputs folder share the work: a point
held by the other is left to it, and waited for at the end. With `workers > 1` (or a
`scheduler`, or `cluster`) the points run on Dask (bnlib.cluster), one papermill kernel per task
(bnlib.kernels); this module plans the grid, executes one point (_execute_point, on the worker)
and writes the study's manifest.

Run identity: a run's id hashes its resolved device type and precision (device/precision
'auto' become e.g. cuda/bf16 or cpu/fp32), because a bf16 GPU run and an fp32 CPU run compute
different things and must not share a folder. They are resolved where the run executes: the
worker validates the point and computes the id, the result carries it, and the manifest is
rewritten from the results. The study process's own resolution (a CPU login node in front of
GPU workers) only decides what it may skip: a point with 'auto' is sent to the cluster, whose
worker answers "skipped" for a finished run without starting a kernel. (Hashing the requested
'auto' instead would merge bf16 and fp32 runs into one id.)
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from .config import load_plugins, validate
from .data import check_data
from .errors import ConfigError
from .records import FINISHED, RunDir, atomic_write, check_writable, load_study, run_id
from .studies import STUDIES, Study, get_study
from .kernels import (NOTEBOOKS, ROOT, _point_kernel, execute_notebook, execute_shared_notebook,
                      shutdown_point_kernel)
from .cluster import (RETRIES, _assign_gpu, _connect, _disconnect, _map, _not_shared, _run_threads,
                      resolve_runs_per_gpu, slurm_cluster)
from .memory import RUNS_PER_GPU_ENV
from .arms import prepare
from .plugins import check_importable, loaded as loaded_plugins
from .report import build_report

# re-exported, importable from here as before: load_study (bnlib.records), execute_notebook,
# execute_shared_notebook, ROOT, NOTEBOOKS (bnlib.kernels), slurm_cluster, RETRIES (bnlib.cluster)
__all__ = ["run_study", "run_all", "plan", "load_study", "execute_notebook", "execute_shared_notebook", "ROOT",
           "NOTEBOOKS", "slurm_cluster", "RETRIES"]


def plan(study: Study, preset: str, out: Path, dataset: str | None = None, check: bool = True,
         plugins: list[str] | None = None) -> list[dict]:
    """Check every point before anything runs (parameters, data sets, the outputs folder);
    return [{params, run_id, status, epochs, auto, cfg}]. `dataset` overrides the preset's
    data set. Raises ConfigError listing every problem. `check=False` checks the parameters
    only, not the data sets or the outputs folder (`study --plan` on a machine without the data).
    `plugins`: every point carries them (bnlib.arms.prepare), so its kernel or worker imports them."""
    runs_dir = Path(out) / "runs"
    items, errors, data_specs = [], [], {}
    for i, point in enumerate(study.points(preset, dataset)):
        if plugins and "plugins" not in point:
            point = {**point, "plugins": list(plugins)}
        try:
            cfg = validate({**point, "out_dir": str(runs_dir)})
        except ConfigError as e:
            errors.append(f"point {i} {point}: {e}")
            continue
        data_specs.setdefault((cfg["dataset"], cfg["data_dir"], cfg["download"]), cfg)
        rid = run_id(cfg)
        rd = RunDir(runs_dir / rid)
        status = (rd.status() or {}).get("status")
        if status in FINISHED and (problem := rd.verify()):
            print(f"  {rid}: {status} but damaged ({problem}): will run again", file=sys.stderr)
            status = "damaged"
        # device or precision 'auto': resolved where the run executes, so its id is known there
        auto = "auto" in (point.get("device", "auto"), point.get("precision", "auto"))
        items.append({"params": {**point, "out_dir": str(runs_dir)}, "run_id": rid, "status": status,
                      "epochs": cfg["epochs"], "auto": auto, "cfg": cfg})
    if check and not errors:  # the outputs folder first (creates nothing), then the data sets
        check_writable(runs_dir)
    # once per data set, not once per point; not at all for a rejected grid (a check may stage
    # files into data_dir: a rejected command leaves nothing behind)
    for cfg in data_specs.values() if check and not errors else ():
        try:
            check_data(cfg)
        except ConfigError as e:
            errors.append(str(e))
    if errors:
        raise ConfigError(f"study {study.name!r} preset {preset!r} has invalid points:\n" + "\n".join(errors))
    return items


def _failure_reason(e: Exception, before: dict | None, after: dict | None) -> str:
    """Why a point's notebook failed: the run's own recorded error when it wrote one (e.g.
    "out of memory: ..."), else what the notebook or the kernel reported."""
    if after and after != before and after.get("status") == "failed" and after.get("error"):
        return after["error"]
    if type(e).__name__ == "DeadKernelError":
        return ("kernel died: the run's process was killed (by the OS out-of-memory killer, a scheduler or "
                "a signal) or crashed; run the study again to resume it from its last checkpoint")
    return f"{getattr(e, 'ename', type(e).__name__)}: {getattr(e, 'evalue', str(e))}"


RUN_LOCK_GRACE_S = 20.0  # _execute_point: how long a waiting study gives a held run lock to be freed


def _execute_point(item: dict, threads=None, wait: bool = False, gpus: list[str] | None = None,
                   shared: str | None = None, runs_per_gpu: int | None = None) -> dict:
    """Run one grid point through run.ipynb; never raises (a failure is a recorded result, so
    Dask's retries, meant for a worker that died, never re-run a deterministic failure).

    The point's device and precision are resolved here, where it runs, and its run id computed
    from them (module docstring: run identity); the result carries that id. The study runner
    holds the run directory's "notebook" lock while papermill writes the executed notebook
    there; the kernel's bnlib.run holds the "run" lock while it trains. A point held by another
    live process is "locked" (with `wait`, block until it is free). `threads`: cluster._run_threads.
    `gpus`: on a LocalCluster worker, one GPU per worker (cluster._gpu_slots). `shared`: a file the
    study process wrote into the outputs folder, which this worker must see (a shared file
    system). `runs_per_gpu`: how many runs share this worker's GPU, for the run's memory check
    (RUNS_PER_GPU_ENV; with `gpus`, _assign_gpu counts them; None: the environment as it is)."""
    from filelock import Timeout

    if (n := _run_threads(threads)) is not None:  # the kernel inherits this environment
        os.environ["OMP_NUM_THREADS"] = str(n)
    # Dask's nanny gives its workers MALLOC_TRIM_THRESHOLD_=65536 (distributed.yaml,
    # pre-spawn-environ). A kernel that inherits it has glibc's dynamic mmap threshold off, so
    # every large tensor is mmapped and page-faulted afresh: training measured 2.7x slower.
    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    if runs_per_gpu is not None:
        os.environ[RUNS_PER_GPU_ENV] = str(runs_per_gpu)
    if gpus:
        _assign_gpu(gpus)  # before the device is resolved: the run sees only its own GPU
    res = {"run_id": item["run_id"], "planned_id": item["run_id"], "seconds": 0.0}
    if shared and not Path(shared).exists():
        return {**res, "status": "failed", "error": _not_shared(socket.gethostname(), shared)}
    try:
        rid = run_id(validate(item["params"]))
    except ConfigError as e:  # e.g. a point asking for cuda on a worker without one
        return {**res, "status": "failed", "error": f"on {socket.gethostname()}: {e}"[:2000]}
    res["run_id"] = rid
    rd = RunDir(Path(item["params"]["out_dir"]) / rid)
    t0 = time.perf_counter()
    try:
        rd.path.mkdir(parents=True, exist_ok=True)
        nb_lock = rd.lock("notebook")
        nb_lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        return {**res, "status": "locked"}
    except OSError as e:
        return {**res, "status": "failed", "error": f"cannot write {rd.path}: {e}"}
    try:
        before = rd.status()
        if (before or {}).get("status") in FINISHED and not rd.verify():  # finished elsewhere meanwhile
            return {**res, "status": "skipped"}
        # a live `bnlib run` of the same parameters outside this study. With `wait`, give it
        # RUN_LOCK_GRACE_S to let go (the kernel of a worker that was just killed, whose lock the
        # OS frees a moment later), but no longer: a run held by a live process outside any
        # study is skipped, not waited for (it may be this very process's own).
        grace = time.monotonic() + (RUN_LOCK_GRACE_S if wait else 0.0)
        while rd.locked("run"):
            if time.monotonic() >= grace:
                return {**res, "status": "locked"}
            time.sleep(1.0)
        try:
            execute_notebook(NOTEBOOKS / "run.ipynb", rd.path / "run.ipynb", item["params"], km=_point_kernel())
        except Exception as e:  # noqa: BLE001 — papermill errors, a dead kernel, ...
            shutdown_point_kernel()  # the next point gets a fresh kernel
            if getattr(e, "ename", None) == "RunLocked":  # another live process runs it: not ours to mark
                return {**res, "status": "locked", "seconds": time.perf_counter() - t0}
            st = rd.status()
            reason = _failure_reason(e, before, st)
            st = st or {}
            try:
                rd.write_json("status", {**st, "status": "failed", "training_status": st.get("status"),
                                         "error": reason[:2000], "notebook": str(rd.path / "run.ipynb")})
            except OSError as w:
                reason += f" (and its status could not be written: {w})"
            return {**res, "status": "failed", "error": reason[:300], "seconds": time.perf_counter() - t0}
        st = rd.status() or {}
        return {**res, "status": st.get("status", "failed"), "seconds": time.perf_counter() - t0}
    finally:
        nb_lock.release()


def run_study(study: Study | str, preset: str = "quick", out="outputs", workers: int = 1,
              scheduler: str | None = None, analyze: bool = True, progress: bool = True,
              dataset: str | None = None, cluster: dict | None = None, retries: int = RETRIES,
              session: dict | None = None, runs_per_gpu: int | None = None, plugins=None, arms=None) -> Counter:
    """Run (or resume) every point of `study` at `preset` (on `dataset` instead of the preset's
    when given), then its analysis notebook. Returns the counts of completed / diverged /
    failed / skipped runs. `scheduler`: a running Dask scheduler's address; `cluster`:
    {"kind": "slurm", ...slurm_cluster options} to start `workers` SLURM jobs; else `workers`
    local processes (1: in this process). `retries`: how often a point whose worker died is
    started again (from its checkpoint) before it counts as failed. `session`: a dict that
    holds the Dask connection across studies (run_all's: one cluster, whose workers keep their
    kernels, for every study; the caller disconnects it); None: connected for this study alone.
    `runs_per_gpu`: K runs share one GPU (None: cluster.resolve_runs_per_gpu's choice)."""
    # `plugins`: imported here and by every point's kernel or worker (None: BNLIB_PLUGINS); `arms`:
    # arms added to the study's own, e.g. ["+my_norm", "+other@bn", "+third:0.01,0.1"] (bnlib.arms)
    study, plugin_list = prepare(study, plugins, arms)
    out = Path(out).resolve()
    items = plan(study, preset, out, dataset, plugins=plugin_list)
    remote = scheduler is not None or (cluster or {}).get("kind", "local") != "local"
    k = resolve_runs_per_gpu(runs_per_gpu, preset, [it["cfg"] for it in items], local=not remote)
    # Where the study process cannot know a run's id (device or precision 'auto', resolved by
    # the worker), only the worker can say whether it is done: such points go to the cluster,
    # which answers "skipped" for a finished one without starting a kernel.
    todo = [it for it in items if it["status"] not in FINISHED or (remote and it["auto"])]
    counts = Counter(skipped=len(items) - len(todo))
    conn = (session or {}).get("conn")
    if conn is None and todo:
        conn = _connect(workers, scheduler, cluster, retries, out, k)  # fails before the manifest
        _check_plugins(conn, plugin_list)
        if session is not None:
            session["conn"] = conn
    try:
        print(f"study {study.name} [{preset}]: {len(items)} runs, {sum(i['epochs'] for i in items)} epochs "
              f"({len(todo)} to run, {counts['skipped']} already done) -> {out / 'runs'}"
              + (f" on {conn['where']}" if conn and todo else ""), flush=True)
        _write_manifest(study, preset, out, items, dataset)
        bar = tqdm(total=len(todo), desc=f"study {study.name}", unit="run", disable=not progress or not todo,
                   file=sys.stderr)
        held = []
        try:
            for it, res in _map(todo, conn, _execute_point):
                it["run_id"] = res["run_id"]  # the id the worker resolved (module docstring)
                if res["status"] == "locked":  # another live process runs it now
                    held.append(it)
                else:
                    counts[res["status"]] += 1
                if res["status"] == "failed":
                    tqdm.write(f"  failed: {res['run_id']}: {res.get('error', '')}", file=sys.stderr)
                bar.set_postfix({k: counts[k] for k in ("completed", "diverged", "failed")}
                                | ({"held_elsewhere": len(held)} if held else {}), refresh=False)
                bar.update(1)
            bar.close()
            if held:  # another live process had them: wait for it, then take over what it left undone
                print(f"study {study.name}: waiting for {len(held)} run(s) held by another process", flush=True)
                for it, res in _map(held, conn, _execute_point, wait=True):
                    it["run_id"] = res["run_id"]
                    counts[res["status"]] += 1
                    if res["status"] == "failed":
                        print(f"  failed: {res['run_id']}: {res.get('error', '')}", file=sys.stderr)
        finally:
            bar.close()
            _write_manifest(study, preset, out, items, dataset)  # the ids the runs really have
    finally:
        if session is None:
            _disconnect(conn)
    counts["skipped"] += counts.pop("locked", 0)  # still held by a live process outside any study
    print(f"study {study.name}: " + " / ".join(f"{k} {counts[k]}" for k in ("completed", "diverged", "failed",
                                                                           "skipped")), flush=True)
    # a study of yours without a notebook (a verdict function, or registered by a plugin) gets the
    # generic one; an unregistered grid with neither (a test's, a bench's) stays without analysis
    if analyze and (study.notebook or study.verdicts is not None or study.source is not None):
        dst = out / "studies" / study.name / f"{study.name}.ipynb"
        src, extra = ((NOTEBOOKS / study.notebook, {}) if study.notebook else
                      (NOTEBOOKS / GENERIC_NOTEBOOK, {"plugins": plugin_list, "preset": preset}))
        try:
            execute_shared_notebook(src, dst, {"out": str(out), "study": study.name, **extra})
        except Exception as e:  # noqa: BLE001 — the runs are kept; the analysis can be rerun
            print(f"study {study.name}: analysis notebook failed ({type(e).__name__}); see {dst}", file=sys.stderr)
            counts["analysis_failed"] += 1
    return counts


def _check_plugins(conn: dict | None, plugin_list: list[str]) -> None:
    """Every worker must import the study's plugins: a worker that cannot is named, before any
    point runs (the points' own validation would fail each of them one by one)."""
    if not conn or not plugin_list or conn.get("client") is None:
        return
    try:
        problems = {w: p for w, p in conn["client"].run(check_importable, plugin_list).items() if p}
    except Exception:
        _disconnect(conn)
        raise
    if problems:
        _disconnect(conn)
        raise ConfigError("the Dask workers cannot import the study's plugins:\n  - " + "\n  - ".join(
            f"{w}: {p}" for w, p in problems.items()))


GENERIC_NOTEBOOK = "studies/generic_study.ipynb"  # a study that names no notebook of its own


def _write_manifest(study: Study, preset: str, out: Path, items: list[dict], dataset: str | None = None) -> None:
    d = out / "studies" / study.name
    d.mkdir(parents=True, exist_ok=True)
    manifest = {"study": study.name, "title": study.title, "preset": preset, "axes": study.axes(preset),
                "dataset_override": dataset,
                # arms a user added, and where the study's code came from (None: bnlib's own)
                "arms": list(study.extra_arms), "study_source": study.source, "study_version": study.version,
                "plugins": loaded_plugins(),
                "run_ids": [it["run_id"] for it in items],
                "points": [{k: v for k, v in it["params"].items() if k != "out_dir"} for it in items]}
    atomic_write(d / "manifest.json", json.dumps(manifest, indent=1).encode())


def run_all(preset: str = "quick", out="outputs", workers: int = 1, scheduler: str | None = None,
            studies: list[str] | None = None, dataset: str | None = None, cluster: dict | None = None,
            retries: int = RETRIES, runs_per_gpu: int | None = None, plugins=None) -> dict:
    """Every study, then the summary notebook and the HTML report (the main job, `make study`).
    Every study's points are checked (parameters, data sets) before the first one runs.
    `scheduler`, `cluster`, `retries`, `runs_per_gpu`: as run_study (one K for the shared cluster:
    the smallest any study chooses)."""
    out = Path(out).resolve()
    load_plugins(plugins)  # a plugin's own study is then one of STUDIES
    names = studies or list(STUDIES)
    plans = {}
    for name in names:  # a missing data set or a bad point stops here, before any run
        plans[name] = plan(get_study(name), preset, out, dataset)
    remote = scheduler is not None or (cluster or {}).get("kind", "local") != "local"
    runs_per_gpu = min(resolve_runs_per_gpu(runs_per_gpu, preset, [it["cfg"] for it in p], local=not remote)
                       for p in plans.values()) if plans else 1
    results = {}
    # one Dask cluster for every study: starting workers, their kernels and each kernel's first
    # run (imports, the data set's decoding) once, not once per study
    session: dict = {}
    try:
        for name in names:
            results[name] = run_study(name, preset, out, workers, scheduler, dataset=dataset, cluster=cluster,
                                      retries=retries, session=session, runs_per_gpu=runs_per_gpu, plugins=plugins)
    finally:
        _disconnect(session.get("conn"))
    execute_shared_notebook(NOTEBOOKS / "summary.ipynb", out / "summary.ipynb", {"out": str(out)})
    index = build_report(out)
    print(f"report: {index}")
    return results

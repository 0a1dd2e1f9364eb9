"""Notebook execution for the study runner: papermill with the settings every bnlib notebook
uses, and the Jupyter kernel each study process (or Dask worker) reuses for its grid points.

An executed notebook is written beside its destination and moved onto it when execution ends, so
a reader never sees a half-written one; notebooks two study processes may both produce (a study's
analysis, the summary) are executed one at a time (execute_shared_notebook).
"""
from __future__ import annotations

import atexit
import functools
import os
from pathlib import Path

from .device import CUBLAS_WORKSPACE_CONFIG

__all__ = ["ROOT", "NOTEBOOKS", "RUN_FIGURES_ENV", "run_figures", "KERNEL_REUSE", "ENGINE", "execute_notebook",
           "execute_shared_notebook", "shutdown_point_kernel"]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
RUN_FIGURES_ENV = "BNLIB_RUN_FIGURES"


def run_figures() -> bool:
    """Whether run.ipynb draws its run's own two figures: yes, unless RUN_FIGURES_ENV is "0",
    which the study runner's point kernels default to (_point_kernel): a study's notebook and the
    summary draw every run's curves, and the two figures were most of a study run's notebook
    overhead (docs/performance.md). `BNLIB_RUN_FIGURES=1 python -m bnlib study ...` draws them."""
    return os.environ.get(RUN_FIGURES_ENV, "1") != "0"


@functools.lru_cache(maxsize=None)
def _kernel_manager_class():
    """nbclient's kernel manager, asked to give each kernel CurveZMQ keys (jupyter_client >= 8.10,
    pyzmq with libsodium): the kernel's TCP sockets are then encrypted, on a shared machine too,
    and it does not print its plain-TCP warning into every study runner's output. The async
    manager, also for the reused kernel this process starts itself (_point_kernel): with a
    blocking manager nbclient never notices that its kernel died (measured: it hangs)."""
    import zmq
    from jupyter_client.manager import AsyncKernelManager

    if "transport_encryption" not in AsyncKernelManager.class_trait_names() or not zmq.has("curve"):
        return AsyncKernelManager

    class CurveKernelManager(AsyncKernelManager):
        def __init__(self, **kw):
            super().__init__(**{"transport_encryption": "auto", **kw})

    return CurveKernelManager


ENGINE = "bnlib"  # the papermill engine execute_notebook registers and uses (_engine)


@functools.lru_cache(maxsize=None)
def _engine() -> str:
    """papermill's nbclient engine, writing the notebook as each code cell starts (the outputs so
    far and which cell runs) rather than at the start and the end of every cell, markdown
    included, and before and after the notebook: each write serializes and validates the whole
    notebook. papermill's 30-s autosave still writes a long cell's output. After an engine error
    (a dead kernel) the notebook is written as it stands, since papermill then writes nothing;
    otherwise papermill writes the finished notebook itself."""
    from papermill.engines import NBClientEngine, NotebookExecutionManager, papermill_engines

    class Manager(NotebookExecutionManager):
        writes = False  # save() writes only while this is set

        def save(self, **kw):
            if self.writes:
                super().save(**kw)

        def _writing(self, method, *args, **kw):
            self.writes = True
            try:
                return method(*args, **kw)
            finally:
                self.writes = False

        def cell_start(self, cell, cell_index=None, **kw):
            if cell.get("cell_type") != "code":
                return super().cell_start(cell, cell_index, **kw)
            return self._writing(super().cell_start, cell, cell_index, **kw)

        def autosave_cell(self):
            return self._writing(super().autosave_cell)

    class Engine(NBClientEngine):
        @classmethod
        def execute_notebook(cls, nb, kernel_name, output_path=None, progress_bar=True, log_output=False,
                             autosave_cell_every=30, **kw):
            # papermill's Engine.execute_notebook, with the Manager above
            nb_man = Manager(nb, output_path=output_path, progress_bar=progress_bar, log_output=log_output,
                             autosave_cell_every=autosave_cell_every)
            nb_man.notebook_start()
            try:
                cls.execute_managed_notebook(nb_man, kernel_name, log_output=log_output, **kw)
            except BaseException:
                nb_man.writes = True
                raise
            finally:
                nb_man.cleanup_pbar()
                nb_man.notebook_complete()
            return nb_man.nb

    papermill_engines.register(ENGINE, Engine)
    return ENGINE


def execute_notebook(src: Path, dst: Path, parameters: dict, cwd: Path = ROOT, km=None) -> None:
    """papermill with the settings every bnlib notebook uses (the kernel is this Python's).

    The executed notebook is saved as each code cell starts (_engine) to `.NAME.partial.ipynb`
    beside `dst` (watch it there) and moved onto `dst` when execution ends, failed or not: a
    reader (the report, a second study process) never sees a half-written `dst`. `km`: an
    already started kernel to run in (papermill passes it to nbclient, which then neither starts
    nor stops a kernel); None starts a fresh kernel for this notebook alone."""
    import papermill as pm

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.parent / f".{dst.stem}.partial{dst.suffix}"
    kernel = {"km": km} if km is not None else {"kernel_manager_class": _kernel_manager_class()}
    try:
        pm.execute_notebook(str(src), str(partial), parameters=parameters, cwd=str(cwd), kernel_name="python3",
                            engine_name=_engine(), progress_bar=False, log_output=False,
                            request_save_on_cell_execute=True, **kernel)
    finally:
        if partial.exists():
            os.replace(partial, dst)


# One kernel per study process (or Dask worker), reused by its grid points: starting a kernel
# and importing torch and bnlib costs seconds, as much as training a quick-preset run
# (scripts/kernel_overhead.py measures it: docs/performance.md). run.ipynb's first cell clears the namespace (%reset -f), so each run starts from
# clean globals; the kernel is replaced after any point that did not finish (a failed run may
# hold memory through its traceback, a killed kernel is gone) and every KERNEL_REUSE points.
KERNEL_REUSE = 40
_KERNEL: dict = {}  # {"km": KernelManager, "uses": int, "env": the values of KERNEL_ENV it started with}
# what a point's kernel must inherit from its worker: threads, its GPU, how many runs share that
# GPU (the memory check's share) and the test suite's pin of device 'auto'
KERNEL_ENV = ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "BNLIB_RUNS_PER_GPU", "BNLIB_AUTO_DEVICE", RUN_FIGURES_ENV)


def _point_kernel():
    """This process's kernel for grid points, started on first use and restarted when it died,
    was used KERNEL_REUSE times, or the environment it must inherit (KERNEL_ENV) changed."""
    from jupyter_core.utils import run_sync

    env = tuple(os.environ.get(v) for v in KERNEL_ENV)
    k = _KERNEL
    if k and (k["uses"] >= KERNEL_REUSE or k["env"] != env or not run_sync(k["km"].is_alive)()):
        shutdown_point_kernel()
    if not k:
        km = _kernel_manager_class()(kernel_name="python3")
        # cuBLAS reads its workspace setting once, at the kernel's first CUDA use: set it at the start
        # and a grid point's notebook draws no figures of its own unless asked (run_figures)
        run_sync(km.start_kernel)(cwd=str(ROOT), env={"CUBLAS_WORKSPACE_CONFIG": CUBLAS_WORKSPACE_CONFIG,
                                                      RUN_FIGURES_ENV: "0", **os.environ})
        k.update(km=km, uses=0, env=env)
    k["uses"] += 1
    return k["km"]


def shutdown_point_kernel() -> None:
    """Stop this process's reused kernel, if any (at the end of a study, and at exit)."""
    from jupyter_core.utils import run_sync

    km = _KERNEL.pop("km", None)
    _KERNEL.clear()
    if km is not None:
        try:
            run_sync(km.shutdown_kernel)()  # a polite shutdown request first (now=True interrupts, which the kernel logs)
        except Exception:  # noqa: BLE001 — already dead: nothing to stop
            pass


atexit.register(shutdown_point_kernel)  # a no-op when this process started no kernel


def execute_shared_notebook(src: Path, dst: Path, parameters: dict) -> None:
    """execute_notebook for outputs two study processes may both produce (a study's analysis,
    the summary): one at a time, the later one redoing it with every run present."""
    from filelock import FileLock

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dst.parent / f".{dst.stem}.lock")):
        execute_notebook(src, dst, parameters)


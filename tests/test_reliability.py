"""Reliability, exercised for real: SIGKILLed runs and studies resume, damaged records are
detected and rerun, a run directory is held by one live process at a time, an unwritable
outputs folder fails before training."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from filelock import FileLock

import bnlib
from bnlib.config import ConfigError
from bnlib.grid import run_study
from bnlib.train import RunLocked

TINY = dict(arch="resnet8", width=0.25, synthetic_size=400, val_fraction=0.2, n_test=60, batch_size=16,
            epochs=4, progress=False, log_every=3, precision="fp32")
COLS = ["epoch", "step", "lr_now", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"]


def _cli(out, **kw):
    args = [sys.executable, "-m", "bnlib", "run", "--out_dir", str(out)]
    for k, v in {**TINY, **kw}.items():
        args += [f"--{k}", json.dumps(v)]
    return args


def _wait_for(pred, proc, timeout=120):
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, "the process ended before it could be killed"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.02)


def test_sigkilled_run_resumes_to_the_same_metrics(tmp_path):
    ref = bnlib.run({**TINY, "out_dir": str(tmp_path / "ref")})
    # same thread count as this process (conftest: 1), so float reductions run in the same order
    proc = subprocess.Popen(_cli(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    run_dir = tmp_path / "killed" / ref.run_dir.name
    _wait_for(lambda: (run_dir / "checkpoint.pt").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "running"
    skipped = bnlib.load_runs(tmp_path / "killed").skipped
    assert len(skipped) == 1 and "no live process holds it (pid" in skipped[0][1]  # detected, reported, not loaded

    res = bnlib.run({**TINY, "out_dir": str(tmp_path / "killed")})
    assert res["status"] == "completed" and res["resumed_from_epoch"] >= 1
    a = pd.read_parquet(ref.run_dir / "epochs.parquet")[COLS]
    b = pd.read_parquet(run_dir / "epochs.parquet")[COLS]
    pd.testing.assert_frame_equal(a, b)  # same metrics as the uninterrupted run, no duplicate rows
    sa, sb = (pd.read_parquet(d / "steps.parquet") for d in (ref.run_dir, run_dir))
    assert sb.step.is_unique and len(sa) == len(sb)
    pd.testing.assert_frame_equal(sa[["step", "loss"]], sb[["step", "loss"]])
    assert not (run_dir / "checkpoint.pt").exists()


def _ctrl_c_deliverable():
    """In the child, before exec: SIGINT at its default disposition and not blocked, whatever the
    test process had (in the full suite the CLI child once ran to the end ignoring SIGINT; a
    disposition or mask inherited from the test process is the only way it can)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_marks_the_run_interrupted_and_the_same_command_resumes_it(tmp_path):
    # 8 epochs: the first checkpoint (epoch 1) leaves 7 epochs in which the interrupt lands, even
    # on an idle machine where a tiny epoch takes a few hundred ms
    cmd = _cli(tmp_path, epochs=8)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=_ctrl_c_deliverable)
    _wait_for(lambda: any(tmp_path.glob("*/checkpoint.pt")), proc)
    proc.send_signal(signal.SIGINT)
    out, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "run the same command to resume" in stderr and "Traceback" not in stderr, \
        (proc.returncode, out[-1000:], stderr[-2000:])
    run_dir = next(tmp_path.glob("*/checkpoint.pt")).parent
    st = json.loads((run_dir / "status.json").read_text())
    assert st["status"] == "interrupted" and st["error"].startswith("KeyboardInterrupt")
    assert "status 'interrupted'" in dict(bnlib.load_runs(tmp_path).skipped)[str(run_dir)]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    st = json.loads((run_dir / "status.json").read_text())
    assert st["status"] == "completed" and st["resumed_from_epoch"] >= 1
    assert pd.read_parquet(run_dir / "epochs.parquet").epoch.tolist() == list(range(1, 9))


def test_sigkilled_study_completes_on_rerun(tmp_path):
    proc = _study_proc(tmp_path / "out", "kill", [0, 1, 2], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = tmp_path / "out" / "runs"

    def one_done_one_started():
        sts = [json.loads(p.read_text())["status"] for p in runs.glob("*/status.json")] if runs.exists() else []
        return sts.count("completed") >= 1 and any(runs.glob("*/checkpoint.pt"))

    _wait_for(one_done_one_started, proc, timeout=240)
    # SIGKILL the whole tree: the runner and its kernel (which jupyter starts in a session of its own)
    import psutil
    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in tree:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs([psutil.Process(p) for p in tree[1:] if psutil.pid_exists(p)], timeout=10)
    from bnlib.studies import Study, Preset
    s = Study("kill", "kill test", None, {"t": Preset(base=TINY, grid={"seed": [0, 1, 2]})})
    counts = run_study(s, "t", tmp_path / "out", progress=False)
    assert counts["skipped"] >= 1 and counts["completed"] + counts["skipped"] == 3 and counts["failed"] == 0
    statuses = [json.loads(p.read_text()) for p in runs.glob("*/status.json")]
    assert [st["status"] for st in statuses] == ["completed"] * 3
    assert any(st.get("resumed_from_epoch") for st in statuses)  # the interrupted run resumed


def test_damaged_records_are_detected_reported_and_rerun(tmp_path):
    res = bnlib.run({**TINY, "epochs": 1, "out_dir": str(tmp_path)})
    table = res.run_dir / "epochs.parquet"
    table.write_bytes(table.read_bytes()[: len(table.read_bytes()) // 2])  # truncated
    runs = bnlib.load_runs(tmp_path)
    assert runs.runs.empty and "unreadable table" in runs.skipped[0][1]
    again = bnlib.run({**TINY, "epochs": 1, "out_dir": str(tmp_path)})
    assert again["status"] == "completed"
    assert len(bnlib.load_runs(tmp_path).runs) == 1


def test_a_run_is_held_by_one_process_at_a_time(tmp_path):
    cfg = bnlib.validate({**TINY, "epochs": 1, "out_dir": str(tmp_path)})
    run_dir = tmp_path / bnlib.run_id(cfg)
    run_dir.mkdir(parents=True)
    with FileLock(str(run_dir / ".lock")):  # as another live process would hold it
        with pytest.raises(RunLocked):
            bnlib.run(cfg)
    # once released (or its holder dies), the run proceeds
    assert bnlib.run(cfg)["status"] == "completed"


def test_locked_point_in_a_study_is_skipped_not_failed(tmp_path):
    from bnlib.studies import Study, Preset
    s = Study("lock", "lock test", None, {"t": Preset(base={**TINY, "epochs": 1}, grid={"seed": [0]})})
    cfg = bnlib.validate({**TINY, "epochs": 1, "seed": 0, "out_dir": str(tmp_path / "runs")})
    run_dir = tmp_path / "runs" / bnlib.run_id(cfg)
    run_dir.mkdir(parents=True)
    with FileLock(str(run_dir / ".lock")):
        counts = run_study(s, "t", tmp_path, progress=False, analyze=False)
    assert counts["failed"] == 0 and counts["skipped"] == 1
    assert not (run_dir / "status.json").exists()  # nothing written over the other process's run


def test_unwritable_outputs_fail_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="out_dir=.*is a file, not a folder"):
        bnlib.run({**TINY, "out_dir": str(blocker / "runs")})


def _mount_tmpfs(path: Path, opts: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("opts,match", [("ro,size=4m", "not writable"), ("size=1m", "MB free")])
def test_readonly_or_full_filesystem_fails_before_training(tmp_path, opts, match):
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, opts):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        with pytest.raises(ConfigError, match=match):
            bnlib.run({**TINY, "out_dir": str(mnt / "runs")})
        assert not any(mnt.rglob("config.json"))
    finally:
        subprocess.run(["umount", str(mnt)])


STUDY_SCRIPT = """
import sys
from bnlib.grid import run_study
from bnlib.studies import Preset, Study
s = Study(sys.argv[2], "reliability test", None, {{"t": Preset(base={base!r}, grid={{"seed": {seeds!r}}})}})
run_study(s, "t", sys.argv[1], progress=False)
"""


def _study_proc(out, name, seeds, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **base):
    """`run_study` of TINY × seeds in a child process (a study runner of its own)."""
    script = STUDY_SCRIPT.format(base={**TINY, **base}, seeds=seeds)
    return subprocess.Popen([sys.executable, "-c", script, str(out), name], stdout=stdout, stderr=stderr,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _final_counts(stdout: str, name: str) -> dict:
    """The runner's last line: 'study NAME: completed a / diverged b / failed c / skipped d'."""
    line = [ln for ln in stdout.splitlines() if ln.startswith(f"study {name}: completed")][-1]
    return {k: int(v) for v, k in (part.split()[::-1] for part in line.split(": ", 1)[1].split(" / "))}


def test_killed_kernel_is_recorded_failed_the_grid_goes_on_and_a_rerun_resumes_it(tmp_path):
    """The OS out-of-memory killer (or a scheduler) SIGKILLs one run's kernel: that run is
    `failed` with the reason, the next point still runs, and running the study again resumes
    the killed run from its last checkpoint."""
    out = tmp_path / "out"
    proc = _study_proc(out, "dead", [0, 1])
    runs = out / "runs"

    def running_with_checkpoint():
        for st in runs.glob("*/status.json") if runs.exists() else []:
            s = json.loads(st.read_text())
            if s["status"] == "running" and (st.parent / "checkpoint.pt").exists():
                return s["pid"], st.parent
        return None

    _wait_for(running_with_checkpoint, proc, timeout=240)
    pid, victim = running_with_checkpoint()
    assert pid != proc.pid  # the kernel, not the study runner
    os.kill(pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert _final_counts(stdout, "dead") == {"completed": 1, "diverged": 0, "failed": 1, "skipped": 0}, stdout
    st = json.loads((victim / "status.json").read_text())
    assert st["status"] == "failed" and st["error"].startswith("kernel died") and "resume" in st["error"]
    assert "kernel died" in stderr

    again = _study_proc(out, "dead", [0, 1])
    stdout, stderr = again.communicate(timeout=300)
    assert _final_counts(stdout, "dead") == {"completed": 1, "diverged": 0, "failed": 0, "skipped": 1}, stdout
    st = json.loads((victim / "status.json").read_text())
    assert st["status"] == "completed" and st["resumed_from_epoch"] >= 1
    assert pd.read_parquet(victim / "epochs.parquet").epoch.tolist() == [1, 2, 3, 4]


def test_two_study_processes_on_one_folder_run_each_point_once(tmp_path):
    """Two runners started together on the same outputs folder split the points between them:
    every run is trained by exactly one process, each runner ends with the whole study done,
    and no run's records or executed notebook are written by both."""
    out = tmp_path / "out"
    seeds = [0, 1, 2, 3]
    procs = [_study_proc(out, "share", seeds, epochs=2) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-2000:]
    counts = [_final_counts(stdout, "share") for stdout, _ in results]
    assert sum(c["completed"] for c in counts) == len(seeds), counts  # each point trained once
    for c in counts:  # and each runner saw the whole study finished
        assert c["failed"] == 0 and c["completed"] + c["skipped"] == len(seeds), counts
    for d in (out / "runs").iterdir():
        st = json.loads((d / "status.json").read_text())
        assert st["status"] == "completed" and not st.get("resumed_from_epoch"), st
        steps = pd.read_parquet(d / "steps.parquet")
        assert steps.step.is_unique
        assert pd.read_parquet(d / "epochs.parquet").epoch.tolist() == [1, 2]
        nb = json.loads((d / "run.ipynb").read_text())  # one whole notebook, by one writer
        assert not [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]

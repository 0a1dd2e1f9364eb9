"""The training loop and its records, on tiny real runs (seconds each on a 2-core CPU)."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

import bnlib
from bnlib.config import ConfigError
from bnlib.train import lr_at, param_groups, build_model

TINY = dict(arch="resnet8", width=0.25, synthetic_size=300, val_fraction=0.2, n_test=60, batch_size=32,
            epochs=2, progress=False, log_every=2)


def tiny(tmp_path, **kw):
    return {**TINY, "out_dir": str(tmp_path), **kw}


def test_run_writes_complete_records(tmp_path):
    res = bnlib.run(tiny(tmp_path, norm="affine"))
    d = res.run_dir
    assert res["status"] == "completed"
    assert {p.name for p in d.iterdir()} >= {"config.json", "status.json", "epochs.parquet", "steps.parquet",
                                            "norm_params.parquet"}
    conf = json.loads((d / "config.json").read_text())
    assert conf["run_id"] == d.name == bnlib.run_id(conf["params"])
    assert conf["params"]["norm"] == "affine" and conf["params"]["epochs"] == 2
    for k in ("bnlib_version", "git_commit", "torch", "torchvision", "device", "precision"):
        assert k in conf["provenance"]
    st = json.loads((d / "status.json").read_text())
    assert st["status"] == "completed" and 0 <= st["metrics"]["best_val_acc"] <= 1
    ep = pd.read_parquet(d / "epochs.parquet")
    assert list(ep.epoch) == [1, 2]
    assert {"lr_now", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "seconds"} <= set(ep)
    steps = pd.read_parquet(d / "steps.parquet")
    assert steps.step.is_monotonic_increasing and steps.grad_norm.gt(0).all()
    npar = pd.read_parquet(d / "norm_params.parquet")
    assert sorted(npar.epoch.unique()) == [0, 1, 2]
    init = npar[npar.epoch == 0]
    assert (init[init.param == "gamma"]["mean"] == 1.0).all() and (init.mean_abs_delta == 0).all()
    assert (npar[npar.epoch == 2].mean_abs_delta > 0).any()  # γ/β moved during training
    # headline metric: test accuracy at the best *validation* epoch
    best = ep.loc[ep.val_acc.idxmax()]
    assert st["metrics"]["test_acc_at_best_val"] == pytest.approx(best.test_acc)


def test_same_seed_same_metrics_and_different_seed_differs(tmp_path):
    cols = ["train_loss", "val_loss", "val_acc", "test_loss", "test_acc"]
    a = bnlib.run(tiny(tmp_path / "a", precision="fp32"))
    b = bnlib.run(tiny(tmp_path / "b", precision="fp32"))
    c = bnlib.run(tiny(tmp_path / "c", precision="fp32", seed=1))
    ea, eb, ec = (pd.read_parquet(r.run_dir / "epochs.parquet")[cols] for r in (a, b, c))
    pd.testing.assert_frame_equal(ea, eb)
    assert not ea.equals(ec)


def test_divergence_is_a_result_not_an_error(tmp_path):
    res = bnlib.run(tiny(tmp_path, norm="none", lr=50.0, epochs=3, schedule="constant"))
    assert res["status"] == "diverged"
    assert isinstance(res["diverged_step"], int) and res["diverged_step"] >= 0
    st = json.loads((res.run_dir / "status.json").read_text())
    assert st["status"] == "diverged" and st["diverged_step"] == res["diverged_step"]
    ep = pd.read_parquet(res.run_dir / "epochs.parquet")
    assert len(ep) >= 1  # the records up to the divergence are kept


def test_existing_run_is_loaded_not_retrained(tmp_path):
    a = bnlib.run(tiny(tmp_path))
    mtime = (a.run_dir / "status.json").stat().st_mtime_ns
    b = bnlib.run(tiny(tmp_path))
    assert b.run_dir == a.run_dir and (a.run_dir / "status.json").stat().st_mtime_ns == mtime


def test_cli_and_python_give_identical_records(tmp_path):
    args = [sys.executable, "-m", "bnlib", "run", "--out_dir", str(tmp_path / "cli"), "--precision", "fp32"]
    for k, v in TINY.items():
        args += [f"--{k}", json.dumps(v)]
    # same thread count as this process (conftest: 1), so float reductions run in the same order
    out = subprocess.run(args, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert out.returncode == 0, out.stderr
    py = bnlib.run(tiny(tmp_path / "py", precision="fp32"))
    cli_dir = tmp_path / "cli" / py.run_dir.name
    assert cli_dir.is_dir()  # same resolved parameters -> same run id
    cols = ["epoch", "train_loss", "val_acc", "test_acc"]
    pd.testing.assert_frame_equal(pd.read_parquet(cli_dir / "epochs.parquet")[cols],
                                  pd.read_parquet(py.run_dir / "epochs.parquet")[cols])


def test_cli_bad_parameter_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bnlib", "run", "--norm", "batchnorm", "--out_dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "norm='batchnorm'" in out.stderr and "bn_minus" in out.stderr and "Traceback" not in out.stderr
    assert not any(tmp_path.iterdir())


def test_cli_unknown_or_abbreviated_flag_is_named_with_the_valid_ones(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bnlib", "run", "--learning_rate", "0.1", "--warmup", "2",
                          "--out_dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    # no prefix matching: --warmup is not taken for --warmup_epochs
    assert "unknown parameter 'learning_rate'" in out.stderr and "unknown parameter 'warmup'" in out.stderr
    assert "warmup_epochs" in out.stderr and "lr" in out.stderr  # the valid names are listed
    assert not any(tmp_path.iterdir())


def test_bad_parameters_fail_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="lr=-1"):
        bnlib.run(tiny(tmp_path / "x", lr=-1))
    assert not (tmp_path / "x").exists()


def test_missing_dataset_offline_fails_before_anything_is_written(tmp_path):
    """No CIFAR files and no download: a ConfigError naming the data set, the folder and what to
    do, raised before the run directory exists (from Python and from the CLI)."""
    empty = tmp_path / "data"
    empty.mkdir()
    params = tiny(tmp_path / "runs", dataset="cifar10", data_dir=str(empty), download=False)
    with pytest.raises(ConfigError) as e:
        bnlib.run(params)
    msg = str(e.value)
    assert "dataset='cifar10'" in msg and str(empty) in msg and "cifar-10-batches-py" in msg and "synthetic" in msg
    assert not (tmp_path / "runs").exists()
    out = subprocess.run([sys.executable, "-m", "bnlib", "run", "--out_dir", str(tmp_path / "runs"), "--dataset",
                          "cifar10", "--data_dir", str(empty), "--download", "false", "--progress", "false"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "dataset='cifar10'" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()


def test_load_runs_joins_config_and_skips_unfinished(tmp_path):
    bnlib.run(tiny(tmp_path, norm="bn"))
    bnlib.run(tiny(tmp_path, norm="bn_minus"))
    running = tmp_path / "fake-run"
    running.mkdir()
    (running / "config.json").write_text(json.dumps({"params": {"norm": "bn"}}))
    (running / "status.json").write_text(json.dumps({"status": "running"}))
    from bnlib.records import RunDir
    with RunDir(running).lock():  # as the live process running it would
        runs = bnlib.load_runs(tmp_path)
    assert sorted(runs.runs.norm) == ["bn", "bn_minus"]
    assert set(runs.epochs.norm) == {"bn", "bn_minus"} and "arch" in runs.epochs and "best_val_acc" in runs.runs
    assert set(runs.norm_params.norm) == {"bn"}  # bn_minus has no γ/β to track
    assert [r for _, r in runs.skipped] == ["status 'running'"]
    # once nothing holds it, it is reported as interrupted
    assert "no live process holds it: interrupted; rerun to resume" in bnlib.load_runs(tmp_path).skipped[0][1]


def test_lr_schedules():
    cfg = bnlib.validate(schedule="cosine", warmup_epochs=1.0, final_lr_frac=0.0)
    f = [lr_at(s, 100, cfg, steps_per_epoch=10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warm-up over 10 steps
    assert f[10] == pytest.approx(1.0) and f[99] < 0.01 and all(a >= b for a, b in zip(f[10:], f[11:]))
    cfg = bnlib.validate(schedule="step", step_milestones=[0.5, 0.75], step_gamma=0.1)
    assert [lr_at(s, 100, cfg, 10) for s in (0, 49, 50, 75)] == pytest.approx([1, 1, 0.1, 0.01])
    cfg = bnlib.validate(schedule="constant")
    assert {lr_at(s, 100, cfg, 10) for s in range(100)} == {1.0}


def test_param_groups_separate_scales_biases_weights():
    cfg = bnlib.validate(arch="resnet8", gamma_lr_mult=0.01, weight_decay=1e-4, bias_wd=0.0, gamma_wd=0.0)
    model = build_model(cfg)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    scales = {id(m.weight) for _, m in model.norm_layers()}
    assert {id(p) for p in groups["scale"]["params"]} == scales
    assert groups["scale"]["lr"] == pytest.approx(0.001) and groups["scale"]["weight_decay"] == 0
    assert groups["bias"]["weight_decay"] == 0 and all(p.ndim == 1 for p in groups["bias"]["params"])
    assert groups["weight"]["weight_decay"] == 1e-4 and all(p.ndim >= 2 for p in groups["weight"]["params"])
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_skipinit_alpha_is_tracked_and_grouped(tmp_path):
    res = bnlib.run(tiny(tmp_path, norm="none", residual_gain=True, alpha0=0.0, lr=0.05))
    npar = pd.read_parquet(res.run_dir / "norm_params.parquet")
    alpha = npar[npar.param == "alpha"]
    assert len(alpha[alpha.epoch == 0]) == 3 and (alpha[alpha.epoch == 0]["mean"] == 0).all()
    assert (alpha[alpha.epoch == 2]["mean"] != 0).any()  # α learns

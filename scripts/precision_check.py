"""Does bf16 autocast change the qualitative results? Runs the same small grid in bf16 and
fp32 and compares (1) which runs diverge, and at which learning rate, and (2) γ/β drift
(mean |Δ| from init at the last epoch) and accuracy.

    .venv/bin/python scripts/precision_check.py [--out outputs/precision_check]
"""
import argparse
import tempfile

import pandas as pd

import bnlib

BASE = dict(arch="resnet18", width=0.125, synthetic_size=2000, n_test=400, epochs=2, batch_size=64,
            schedule="constant", progress=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    a = ap.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="bnlib-precision-")
    for precision in ("bf16", "fp32"):
        for norm in ("bn", "none"):
            for lr in (0.003, 0.03, 0.3):
                bnlib.run(BASE, norm=norm, lr=lr, precision=precision, out_dir=out)
    runs = bnlib.load_runs(out)
    r = runs.runs
    div = r.pivot_table(index=["norm", "lr"], columns="precision", values="status", aggfunc="first")
    acc = r.pivot_table(index=["norm", "lr"], columns="precision", values="best_val_acc")
    npar = runs.norm_params
    last = npar[npar.epoch == npar.epoch.max()]
    drift = last.pivot_table(index=["lr", "param"], columns="precision", values="mean_abs_delta", aggfunc="mean")
    pd.set_option("display.width", 140)
    print("status (diverged or not) by precision:\n", div, "\n")
    print("best validation accuracy by precision:\n", acc.round(3), "\n")
    print("bn: mean |Δ| of γ and β from init at the last epoch, averaged over layers:\n", drift.round(4), "\n")
    same = (div["bf16"] == div["fp32"]).all()
    print(f"divergence pattern identical in bf16 and fp32: {same}")
    ratio = (drift["bf16"] / drift["fp32"])
    print(f"γ/β drift bf16/fp32 ratio: min {ratio.min():.2f}, max {ratio.max():.2f}")


if __name__ == "__main__":
    main()

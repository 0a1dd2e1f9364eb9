"""How hard is the embedded synthetic data set? Prints the test accuracy of
(1) a linear classifier (softmax regression) on standardized raw pixels, trained to convergence
    with AdamW on the full training pool, and
(2) bnlib's default run (ResNet18, width 1/4, BN) for a few epochs, per epoch.

    .venv/bin/python scripts/synthetic_baselines.py [--epochs 5]
"""
import argparse
import json
import tempfile
import time

import torch
import torch.nn.functional as F

import bnlib
from bnlib.data import make_synthetic


def linear_probe(size: int, seed: int = 0, epochs: int = 30) -> dict:
    xtr, ytr = make_synthetic(size, seed, "train")
    xte, yte = make_synthetic(size // 5, seed, "test")
    xtr, xte = (torch.from_numpy(a).float().flatten(1) / 255 for a in (xtr, xte))
    mu, sd = xtr.mean(0), xtr.std(0)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    ytr, yte = torch.from_numpy(ytr), torch.from_numpy(yte)
    torch.manual_seed(seed)
    lin = torch.nn.Linear(xtr.shape[1], 10)
    opt = torch.optim.AdamW(lin.parameters(), 1e-3, weight_decay=1e-2)
    for _ in range(epochs):
        for idx in torch.randperm(len(ytr)).split(256):
            loss = F.cross_entropy(lin(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return {"train_acc": (lin(xtr).argmax(1) == ytr).float().mean().item(),
                "test_acc": (lin(xte).argmax(1) == yte).float().mean().item()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--size", type=int, default=bnlib.RunConfig().synthetic_size)
    a = ap.parse_args()
    print("linear classifier on raw pixels:", json.dumps(linear_probe(a.size)), flush=True)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        res = bnlib.run(out_dir=d, epochs=a.epochs, synthetic_size=a.size, progress=False)
        ep = bnlib.load_runs(d).epochs
        print(f"bnlib default run (resnet18 width 0.25, bn), {time.perf_counter() - t:.0f} s:")
        print(ep[["epoch", "train_acc", "val_acc", "test_acc", "seconds"]].round(3).to_string(index=False))
        print("status:", res["status"])


if __name__ == "__main__":
    main()

"""The popular CIFAR loop bnlib is compared against: a Dataset of PIL images, torchvision
transforms (RandomCrop(32, 4), RandomHorizontalFlip, ToTensor, Normalize), a DataLoader with
2 workers, fp32 NCHW, SGD with momentum, loss.item() per step, as in the PyTorch tutorial."""
from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image

from ..device import configure_backends
from ..models import create_model
from .meters import sync
from .workload import BATCH

__all__ = ["WARM_IMAGES", "PILImages", "ReferenceLoop"]

WARM_IMAGES = 8000  # reference_warm's epoch: long enough that nothing but steady state shows


class PILImages(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10-style: HWC uint8 array in memory, a PIL image made per item,
    the transform applied to it; returns (tensor, label)."""

    def __init__(self, x_nchw_u8: np.ndarray, labels: np.ndarray, transform):
        self.data = np.ascontiguousarray(x_nchw_u8.transpose(0, 2, 3, 1))  # (N, H, W, C)
        self.targets = [int(t) for t in labels]
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.fromarray(self.data[i])
        return self.transform(img), self.targets[i]


class ReferenceLoop:
    """The popular CIFAR loop. The model, optimizer and DataLoader live across rounds (a long
    run). Cold (`reference`): each timed epoch starts the DataLoader's workers afresh, as the
    default (persistent_workers=False) loop does every epoch; on a short epoch that start-up is
    a large share of the time. Warm (`reference_warm`): persistent workers, started before the
    first timed epoch, on an epoch of >= WARM_IMAGES images: the loop's steady state."""

    def __init__(self, data, width: float, device: torch.device, seed: int = 0, persistent: bool = False):
        import torchvision.transforms as T

        self.device, self.persistent = device, persistent
        tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(data.mean, data.std)])
        ds = PILImages(data.x_train.cpu().numpy(), data.y_train.cpu().numpy(), tf)
        g = torch.Generator().manual_seed(seed)
        self.loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, drop_last=True,
                                                  num_workers=2, generator=g, persistent_workers=persistent)
        torch.manual_seed(seed)
        # the transform normalizes, so the model takes its input as it is (input_norm='raw')
        self.model = create_model("resnet18", norm="bn", stem="cifar", width=width, input_norm="raw",
                                  num_classes=data.num_classes).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        self.crit = torch.nn.CrossEntropyLoss()
        # fixed batch for untimed warm-up steps (kernel caches), the same step as the loop's
        x0, y0 = next(iter(torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=0)))
        self.warm = (x0.to(device), y0.to(device))

    def step(self, x, y) -> float:
        out = self.model(x)
        loss = self.crit(out, y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()

    def warmup(self, steps: int):
        # the backend flags are process-wide and every bnlib run sets them: fix them here too, so
        # each round's reference runs the same arithmetic (IEEE fp32; cuDNN autotuning on CUDA)
        configure_backends({"device": str(self.device), "precision": "fp32"})
        self.model.train()
        for _ in range(steps):
            self.step(*self.warm)
        if self.persistent:  # start the workers now, untimed: they live on into every timed epoch
            for k, _ in enumerate(self.loader):
                if k >= 1:
                    break
        sync(self.device)

    def epoch(self) -> dict:
        self.model.train()
        running, n = 0.0, 0
        sync(self.device)
        t0 = time.perf_counter()
        for x, y in self.loader:
            x, y = x.to(self.device), y.to(self.device)
            running += self.step(x, y)
            n += len(y)
        sync(self.device)
        sec = time.perf_counter() - t0
        return {"img_per_s": n / sec, "seconds": sec, "images": n, "train_loss": running / max(1, n // BATCH)}


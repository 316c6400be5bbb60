"""Training-step throughput of the preset networks on this machine (cuda if present).

Prints samples/s for one optimiser step (forward + backward) at the preset input sizes.
Usage: python bench/train_step.py [--steps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedpacs.common.engine import make_loss
from fedpacs.common.models import build_model, pick_device
from fedpacs.common.nets.googlenet import training_loss
from fedpacs.common.tasks import TASK_PRESETS


def bench(task_name: str, batch: int, steps: int, device: torch.device) -> float:
    task = TASK_PRESETS[task_name]
    model = build_model(task).to(device).train()
    loss_fn = make_loss(task)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, task.in_channels, *task.input_shape, device=device)
    if task.kind == "segmentation":
        y = torch.randint(0, task.num_classes, (batch, 1, *task.input_shape), device=device)
    else:
        y = torch.randint(0, task.num_classes, (batch,), device=device)
    for i in range(steps + 1):  # first step is warm-up
        if i == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        opt.zero_grad()
        training_loss(loss_fn, model(x), y).backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device("auto")
    print(f"device {device}, torch threads {torch.get_num_threads()}")
    for task, batch in (("hippocampus", 4), ("breastmnist", 32), ("adrenalmnist3d", 16)):
        t = TASK_PRESETS[task]
        rate = bench(task, batch, args.steps, device)
        print(f"{task:15s} {t.network:10s} input {'x'.join(map(str, t.input_shape)):9s} "
              f"batch {batch:3d}: {rate:8.1f} samples/s")


if __name__ == "__main__":
    main()

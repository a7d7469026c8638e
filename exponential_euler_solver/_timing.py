"""Wall-clock timing of the costly parts of a step (gradients, curvature products, eigensolver work)."""

from __future__ import annotations

import time

import torch

__all__ = ["synchronize", "clock"]


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA only; a no-op elsewhere), so that a clock reading covers it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device=None) -> float:
    """``time.perf_counter()`` after the device's queued work is done."""
    if device is not None:
        synchronize(device)
    return time.perf_counter()

"""What every build stage shares: pixel conversions, the seeded scene stream, the learning-rate schedule, one
optimisation step, and per-thread torch thread counts."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator

import numpy as np
import torch

from ..render import render_batch
from ..scene import Scene, sample_scene


def to_pixels(arr: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [-1, 1] -> (N, H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.05) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def lr_schedule(opt: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`cosine_lr` over ``total`` steps with ``min(warmup, total)`` warm-up steps."""
    warmup = min(warmup, total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total, warmup))


def optimise(loss: torch.Tensor, opt, lr_sched, params) -> None:
    """One optimisation step: backward, clip the gradient norm at 1, step, schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    lr_sched.step()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` torch CPU threads (a per-OS-thread setting), then restore the previous count.

    The count changes the float summation order, so a stage is reproduced bit for bit only at the same count."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


class SceneStream:
    """Random training scenes, rendered on the fly, from one seeded stream."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def batch(self, n: int) -> tuple[torch.Tensor, list[Scene]]:
        scenes = [sample_scene(self.rng) for _ in range(n)]
        return to_pixels(render_batch(scenes)), scenes

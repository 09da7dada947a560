"""The one training loop of the world's models (CLIP, checker, classifiers, VAE, generator).

Each trainer builds its model, optimiser and a ``step(t) -> loss`` function (the batch of step t and the
loss on it; the batch is a function of t and the seeds, so a run is deterministic); ``train_loop`` sets the
learning rate, steps the optimiser, caps the wall time, calls ``after`` (EMA, checkpoints) and logs. The
learning-rate schedules and the records every trainer writes are here too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


def cosine_lr(t: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if t < warmup:
        return lr * (t + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, steps - warmup)))


def cosine(tc) -> Callable[[int], float]:
    """The cosine schedule of a training config with ``steps``, ``lr`` and ``warmup``."""
    return lambda t: cosine_lr(t, tc.steps, tc.lr, tc.warmup)


def progress(name: str) -> Callable[[int, float], str]:
    """The plain log line "<name> step t  loss x  <seconds since this call>s"."""
    t0 = time.time()
    return lambda t, loss: f"{name} step {t:4d}  loss {loss:.4f}  {time.time() - t0:6.0f}s"


def constant_lr(t: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then constant (any checkpoint is as usable as the last)."""
    return lr * min(1.0, (t + 1) / warmup)


def conv_stages(channels) -> tuple[torch.nn.Sequential, int]:
    """The conv trunk the world's small image models share: one stage per entry of ``channels`` (one 3x3
    conv at full resolution, then two per stage, the first with stride 2), BatchNorm and ReLU after each.
    Returns the trunk and its output channels."""
    from torch import nn

    layers, c_in = [], 3
    for i, c in enumerate(channels):
        for j in range(2 if i > 0 else 1):
            stride = 2 if (i > 0 and j == 0) else 1
            layers += [nn.Conv2d(c_in, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
    return nn.Sequential(*layers), c_in


def decay_groups(
    named: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float, skip: str | None = None
) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices and kernels only (not biases, norms, or names
    containing ``skip``)."""
    decay, no_decay = [], []
    for n, p in named:
        (decay if p.ndim >= 2 and not (skip and skip in n) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def prefetched(make: Callable[[int], T], steps: int) -> Iterator[T]:
    """``make(0), make(1), ..., make(steps - 1)``, each built in a background thread while the caller trains
    on the previous one (scene rendering is numpy/PIL work that overlaps with a 1-thread torch step)."""
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(make, 0) if steps > 0 else None
        for t in range(steps):
            current = pending.result()
            if t + 1 < steps:
                pending = pool.submit(make, t + 1)
            yield current


@dataclass
class LoopResult:
    done: int  # steps finished, counting those of a resumed run
    final_loss: float  # the last step's loss
    seconds: float  # what ``clock`` read at the end (training seconds)


def train_loop(
    opt: torch.optim.Optimizer,
    step: Callable[[int], torch.Tensor],
    steps: int,
    lr: Callable[[int], float],
    *,
    start: int = 0,
    clip_grad: Iterable[torch.nn.Parameter] | None = None,
    minutes: float | None = None,
    clock: Callable[[], float] | None = None,
    after: Callable[[int, float], None] | None = None,
    log_every: int = 25,
    log_line: Callable[[int, float], str] | None = None,
    log: Callable[[str], None] = print,
) -> LoopResult:
    """Steps ``start .. steps - 1``: set the rate ``lr(t)``, ``loss = step(t)``, backward, clip the gradient
    norm of ``clip_grad`` to 1, step; then ``after(t, loss)`` and, every ``log_every`` steps and at the
    last, ``log(log_line(t, loss))``. ``minutes`` stops early once ``clock()`` (seconds; default: since the
    call) passes it; the schedule is not shortened, so prefer a step count."""
    t0 = time.time()
    clock = clock or (lambda: time.time() - t0)
    params = list(clip_grad) if clip_grad is not None else None
    done, loss_val = start, float("nan")
    for t in range(start, steps):
        if minutes is not None and clock() > 60 * minutes:
            break
        for g in opt.param_groups:
            g["lr"] = lr(t)
        loss = step(t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if params is not None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        done, loss_val = t + 1, loss.item()
        if after is not None:
            after(t, loss_val)
        if log_line is not None and (t % log_every == 0 or t == steps - 1):
            log(log_line(t, loss_val))
    return LoopResult(done, loss_val, clock())


def run_record(seconds: float) -> dict:
    """What every trainer records about the run itself."""
    return {
        "wall_time_s": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }

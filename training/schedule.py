"""Learning-rate schedule: linear warmup, then linear or cosine decay (ViT paper, Sec. 4.1).

The schedule is a pure function of the optimizer step, so the only scheduler state a
checkpoint needs is the step itself; a resumed run recomputes exactly the same rates.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int,
          decay: str = "linear", min_lr_ratio: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based: the first update uses ``lr_at(0)``).

    Warmup rises linearly from ``peak_lr / warmup_steps`` to ``peak_lr`` over the first
    ``warmup_steps`` updates (never 0, which would waste a step); decay then goes from
    ``peak_lr`` at the end of warmup to ``min_lr_ratio * peak_lr`` after ``total_steps``.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)  # in [0, 1]
    if decay == "linear":
        frac = 1.0 - progress
    elif decay == "cosine":
        frac = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay == "constant":
        frac = 1.0
    else:
        raise ValueError(f"unknown decay {decay!r} (linear, cosine, constant)")
    return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * frac)


class WarmupDecaySchedule:
    """Sets the optimizer's learning rate for each step; ``state_dict`` is just the step."""

    def __init__(self, optimizer, *, peak_lr: float, warmup_steps: int, total_steps: int,
                 decay: str = "linear", min_lr_ratio: float = 0.0):
        self.optimizer = optimizer
        self.kwargs = dict(peak_lr=peak_lr, warmup_steps=warmup_steps, total_steps=total_steps,
                           decay=decay, min_lr_ratio=min_lr_ratio)
        self.step_count = 0  # optimizer updates applied so far

    def lr(self, step: int | None = None) -> float:
        return lr_at(self.step_count if step is None else step, **self.kwargs)

    def apply(self) -> float:
        """Set the rate for the next update (``step_count``) on every param group; return it."""
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def advance(self) -> None:
        self.step_count += 1

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, **self.kwargs}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])

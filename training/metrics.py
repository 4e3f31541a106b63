"""Training metrics: JSONL + TensorBoard events + one console line per log interval.

Only rank 0 logs. Per interval we report the mean loss over its steps, the learning
rate, images/s (global), mean step time, the fraction of wall time spent waiting for
the next batch, and model FLOPs utilisation when the accelerator's peak is known.

Logs are written to a local directory (the run directory itself when storage is
local); with remote storage the files are copied to ``<run>/logs/`` at every
checkpoint, so a resumed run on another node continues the same files.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import torch

# Dense bf16 tensor-core peaks (FLOP/s) of accelerators we know; MFU is reported only for
# these. Sparse-tensor numbers from spec sheets are halved away. Keys match substrings
# of ``torch.cuda.get_device_name()``.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is lower (756e12), matched first below
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
}
_PEAK_OVERRIDES = {"H100 PCIe": 756e12}


def device_peak_flops(device: torch.device | str) -> float | None:
    """Peak dense bf16 FLOP/s of ``device``, or None where unknown (CPUs, unlisted GPUs)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in {**_PEAK_OVERRIDES, **PEAK_BF16_FLOPS}.items():
        if key in name:
            return peak
    return None


class IntervalTimer:
    """Accumulates step time and data-wait time between two log points (seconds)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.steps = 0
        self.images = 0
        self.loss_sum = 0.0

    def exclude(self, seconds: float):
        """Leave ``seconds`` (e.g. a checkpoint save) out of the interval's wall time."""
        self.start += seconds

    def add_step(self, loss: float, images: int, data_wait: float):
        self.steps += 1
        self.images += images
        self.loss_sum += loss
        self.data_wait += data_wait

    def summary(self, train_flops_per_image: float | None, peak_flops_total: float | None) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        images_per_s = self.images / elapsed
        out = {
            "loss": self.loss_sum / max(self.steps, 1),
            "images_per_s": images_per_s,
            "step_time_s": elapsed / max(self.steps, 1),
            "data_wait_frac": self.data_wait / elapsed,
        }
        if train_flops_per_image and peak_flops_total:
            out["mfu"] = images_per_s * train_flops_per_image / peak_flops_total
        return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the value readable
    return v


class MetricsLogger:
    """Rank-0 writer of ``metrics.jsonl`` and TensorBoard events in ``log_dir``."""

    def __init__(self, log_dir: str, *, start_step: int = 0, total_steps: int | None = None,
                 enabled: bool = True, console: bool = True):
        self.enabled = enabled
        self.console = console
        self.total_steps = total_steps
        self.log_dir = log_dir
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, "metrics.jsonl")
        if os.path.exists(path):
            _truncate_after(path, start_step)
        self._jsonl = open(path, "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a previous attempt wrote past the checkpoint we resume from.
        self._tb = SummaryWriter(log_dir=os.path.join(log_dir, "tb"),
                                 purge_step=start_step + 1 if start_step else None)

    def event(self, kind: str, **fields):
        """A non-metric record (run start, resume, stop reason) in the JSONL stream."""
        if not self.enabled:
            return
        rec = {"event": kind, "time": time.time(), **{k: _jsonable(v) for k, v in fields.items()}}
        self._jsonl.write(json.dumps(rec) + "\n")
        if self.console:
            _console(f"[vitray] {kind}: " + ", ".join(f"{k}={v}" for k, v in fields.items()))

    def log(self, step: int, metrics: dict):
        if not self.enabled:
            return
        rec = {"step": step, "time": time.time(), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(rec) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(f"train/{key}", value, step)
        if self.console:
            _console(self.progress_line(step, metrics))

    def progress_line(self, step: int, m: dict) -> str:
        total = f"/{self.total_steps}" if self.total_steps else ""
        parts = [f"step {step}{total}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.3e}",
                 f"{m['images_per_s']:.1f} img/s", f"step {1000 * m['step_time_s']:.1f} ms",
                 f"data {100 * m['data_wait_frac']:.0f}%"]
        if "mfu" in m:
            parts.append(f"MFU {100 * m['mfu']:.1f}%")
        return " | ".join(parts)

    def flush(self):
        if self.enabled:
            self._jsonl.flush()
            self._tb.flush()

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _truncate_after(path: str, step: int) -> None:
    """Drop records past ``step``: a crashed attempt's steps that the resumed run redoes."""
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short when the writer was killed
                continue
            if rec.get("step", 0) <= step:
                keep.append(json.dumps(rec) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _console(line: str) -> None:
    """One line on the console. Not ``print``: Ray Train patches it to tee into its logger,
    which shows every line twice on the driver."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()

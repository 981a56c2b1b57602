"""What a run tells its user while it trains: the metrics log, TensorBoard scalars, progress.

- `metrics.jsonl`: one JSON record per `log_interval` steps (loss, learning rate) and per
  evaluation. It holds only values the training computes, so an interrupted and resumed run
  writes the same file as an uninterrupted one.
- `timing.jsonl`: one record per epoch with wall-clock figures (images/s, data-wait fraction,
  seconds); appended across resumes.
- TensorBoard scalars (`tensorboard/`) of both, when `torch.utils.tensorboard` is importable and
  `tensorboard: true`.
- Progress on stderr: in a terminal a bar per epoch; otherwise (a log file) one line per epoch
  with loss, learning rate, images/s, data-wait fraction and the stage's ETA.
"""
from __future__ import annotations

import json
import os
import sys
import time


class MetricsLog:
    """metrics.jsonl, timing.jsonl and TensorBoard scalars, written by the main process only."""

    def __init__(self, out_dir: str | None, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled and out_dir is not None
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None
        self.timing_path = os.path.join(out_dir, "timing.jsonl") if out_dir else None
        self.want_tensorboard = tensorboard
        self.tb = None

    def open_tensorboard(self) -> bool:
        """Starts the TensorBoard writer (after the output folder is settled); False when
        tensorboard is not installed."""
        if not (self.enabled and self.want_tensorboard) or self.tb is not None:
            return self.tb is not None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return False
        self.tb = SummaryWriter(os.path.join(self.out_dir, "tensorboard"))
        return True

    def offset(self) -> int:
        return os.path.getsize(self.path) if self.enabled and os.path.exists(self.path) else 0

    def truncate(self, offset: int) -> None:
        """Drops records written after the checkpoint being resumed (they will be redone)."""
        if self.enabled and os.path.exists(self.path):
            with open(self.path, "r+b") as f:
                f.truncate(offset)

    def _scalars(self, record: dict, step: int) -> None:
        if self.tb is None:
            return
        group = record.get("stage", "run")
        for name, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                    name not in ("step", "epoch"):
                self.tb.add_scalar(f"{group}/{name}", value, step)
        self.tb.flush()

    def write(self, record: dict, step: int | None = None) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self._scalars(record, record.get("step", step if step is not None else 0))

    def write_timing(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        with open(self.timing_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self._scalars({**record, "stage": f"{record.get('stage', 'run')}_timing"}, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    seconds = int(round(seconds))
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Progress of the epochs on `stream` (stderr): `mode` is bar, line, none or auto (a bar in
    a terminal, a line per epoch otherwise)."""

    def __init__(self, mode: str = "auto", enabled: bool = True, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "bar" if isatty is not None and isatty() else "line"
        self.mode = mode if enabled else "none"
        self.enabled = enabled

    def epoch(self, desc: str, steps: int, images_per_step: int, epochs_left: int = 0) -> "Meter":
        return Meter(self, desc, steps, images_per_step, epochs_left)

    def note(self, text: str) -> None:
        """A notice for the user (shown even with progress: none, on the main process)."""
        if self.enabled:
            print(text, file=self.stream, flush=True)


class Meter:
    """Measures one pass over a loader: wall time, time waiting for the loader, images.

    `wrap(loader)` yields its batches and adds the time each `next()` blocks to the data wait;
    `step()` counts a step; `finish(**values)` closes the bar or prints the line and returns
    {seconds, images_per_s, data_wait_fraction, steps}. No device synchronisation happens here.
    """

    def __init__(self, progress: Progress, desc: str, steps: int, images_per_step: int,
                 epochs_left: int):
        self.progress, self.desc, self.steps = progress, desc, steps
        self.images_per_step, self.epochs_left = images_per_step, epochs_left
        self.done, self.wait = 0, 0.0
        self.bar = None
        if progress.mode == "bar":
            from tqdm import tqdm
            try:
                width = os.get_terminal_size(progress.stream.fileno()).columns
            except (AttributeError, OSError, ValueError):
                width = 0
            # A terminal that reports no width (some pseudo-terminals) still gets a bar.
            self.bar = tqdm(total=steps, desc=desc, leave=True, mininterval=1.0,
                            file=progress.stream, dynamic_ncols=width > 0,
                            ncols=None if width > 0 else 100, nrows=None if width > 0 else 50,
                            unit="step")
        self.started = time.perf_counter()

    def wrap(self, iterable):
        iterator = iter(iterable)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t0
            yield item

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def finish(self, **values) -> dict:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        stats = {"seconds": round(seconds, 3), "steps": self.done,
                 "images_per_s": round(self.done * self.images_per_step / seconds, 2),
                 "data_wait_fraction": round(min(1.0, self.wait / seconds), 4)}
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in values.items() if v is not None)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{shown}  {stats['images_per_s']:.1f} img/s  data "
                                     f"{stats['data_wait_fraction']:.0%}".strip(), refresh=False)
            self.bar.close()
        elif self.progress.mode == "line":
            eta = f"  ETA {_duration(self.epochs_left * seconds)}" if self.epochs_left else ""
            print(f"{self.desc}: {shown}  {stats['images_per_s']:.1f} img/s  data "
                  f"{stats['data_wait_fraction']:.0%}  {_duration(seconds)}{eta}".replace(
                      ":   ", ": "), file=self.progress.stream, flush=True)
        return stats

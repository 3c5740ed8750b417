"""Per-epoch metrics of a run: JSONL (complete), CSV (flat), TensorBoard events; progress lines within an epoch."""
from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: seconds between progress lines within an epoch when no progress bar is shown (a log file, a cluster job)
HEARTBEAT_SECONDS = 300.0


def duration(seconds: float) -> str:
    """``1 h 05 min``, ``4 min 10 s`` or ``12 s``: how logs write a time span."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class Heartbeat:
    """Logs ``<label>: step k of N, loss x; 10 min 00 s in, about 30 min 00 s left`` at most every ``interval`` seconds
    (default :data:`HEARTBEAT_SECONDS`), so a log file shows that a long epoch is alive and how fast it goes
    (``total`` None: no estimate; ``disable``: logs nothing, as when a progress bar shows the same)."""

    def __init__(self, logger: logging.Logger, label: str, total: int | None, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic, disable: bool = False):
        self.logger, self.label, self.total, self.clock, self.disable = logger, label, total, clock, disable
        self.interval = HEARTBEAT_SECONDS if interval is None else interval
        self.start = self.last = clock()

    def tick(self, steps: int, loss: float) -> None:
        if self.disable:
            return
        now = self.clock()
        if now - self.last < self.interval or steps <= 0:
            return
        self.last = now
        elapsed = now - self.start
        of_total = f" of {self.total}" if self.total else ""
        left = (f", about {duration(elapsed / steps * (self.total - steps))} left"
                if self.total and self.total > steps else "")
        self.logger.info("%s: step %d%s, loss %.3f; %s in%s", self.label, steps, of_total, loss, duration(elapsed), left)


class MetricsLog:
    """Appends one record per epoch to ``metrics.jsonl`` and ``metrics.csv`` and TensorBoard scalars."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def truncate_after(self, epoch: int) -> None:
        """Drop records past ``epoch`` (a resumed run rewrites what the killed one logged after its checkpoint)."""
        records = [r for r in self.records() if r["epoch"] <= epoch]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
        self._rewrite_csv(records)

    def records(self) -> list[dict[str, Any]]:
        if not self.jsonl.is_file():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def append(self, record: dict[str, Any]) -> None:
        with self.jsonl.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        self._rewrite_csv(self.records())
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in {"epoch", "stage_index"}:
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    def _rewrite_csv(self, records: list[dict[str, Any]]) -> None:
        if not records:
            self.csv.unlink(missing_ok=True)
            return
        fields = list(dict.fromkeys(key for record in records for key in record))
        with self.csv.open("w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=fields)
            writer.writeheader()
            writer.writerows(records)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def rounded(value: Any, digits: int = 4) -> Any:
    """``value`` with every float rounded to ``digits`` decimals (summaries are read by people)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value

"""Run summary of a batch prediction: one row per case (CSV and JSON) plus totals and throughput."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from seg_transfer.atomic import write_atomic

Status = Literal["ok", "failed", "skipped"]


@dataclass
class CaseResult:
    """What happened to one case. ``voxels`` counts output voxels per class name (ok/skipped cases);
    ``carried_over``: an ok row of an earlier run's summary, kept by ``--continue`` with its timing and counts."""

    case: str
    input: str
    output: str
    status: Status
    reason: str = ""
    seconds: float = 0.0
    voxels: dict[str, int] = field(default_factory=dict)
    input_voxels: int = 0
    carried_over: bool = False


def summary_stem(num_parts: int = 1, part_id: int = 0) -> str:
    """``summary``, or ``summary.part<K>of<N>`` for a shard, so array jobs never overwrite each other."""
    return "summary" if num_parts == 1 else f"summary.part{part_id}of{num_parts}"


def totals(results: list[CaseResult], wall_seconds: float) -> dict[str, float | int]:
    """Counts per status, time and throughput. ``ok`` includes the rows carried over from an earlier run
    (``carried_over``), as do ``predict_seconds`` and voxels per second; ``cases_per_second`` counts the cases
    predicted within ``wall_seconds`` (this run) only."""
    done = [r for r in results if r.status == "ok"]
    busy = sum(r.seconds for r in done)
    voxels = sum(r.input_voxels for r in done)
    carried = sum(r.carried_over for r in done)
    return {
        "cases": len(results),
        "ok": len(done),
        "carried_over": carried,
        "failed": sum(r.status == "failed" for r in results),
        "skipped": sum(r.status == "skipped" for r in results),
        "wall_seconds": round(wall_seconds, 3),
        "predict_seconds": round(busy, 3),
        "cases_per_second": round((len(done) - carried) / wall_seconds, 4) if wall_seconds > 0 else 0.0,
        "voxels_per_second": round(voxels / busy, 1) if busy > 0 else 0.0,
    }


def write_summary(results: list[CaseResult], class_names: list[str], out_dir: Path, stem: str,
                  wall_seconds: float, extra: dict | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.csv`` (one row per case) and ``<stem>.json`` (rows, totals, ``extra``) atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["case", "input", "output", "status", "reason", "seconds"] + [f"voxels_{name}" for name in class_names]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow({"case": r.case, "input": r.input, "output": r.output, "status": r.status, "reason": r.reason,
                         "seconds": f"{r.seconds:.3f}", **{f"voxels_{n}": r.voxels.get(n, "") for n in class_names}})
    document = {"totals": totals(results, wall_seconds), **(extra or {}), "cases": [asdict(r) for r in results]}
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    write_atomic(csv_path, text.getvalue())
    write_atomic(json_path, json.dumps(document, indent=2))
    return csv_path, json_path


def previous_results(json_path: Path) -> dict[str, CaseResult]:
    """Rows of an earlier summary by case name ({} if none or unreadable): ``--continue`` keeps their counts."""
    try:
        rows = json.loads(Path(json_path).read_text())["cases"]
        return {row["case"]: CaseResult(**row) for row in rows}
    except (OSError, ValueError, KeyError, TypeError):
        return {}

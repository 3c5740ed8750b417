"""``seg-transfer compare``: run a study (resumable), analyse the finished runs, write the report."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from seg_transfer.atomic import write_atomic
from seg_transfer.study.analysis import analyse
from seg_transfer.study.config import StudyConfig, load_study_config
from seg_transfer.study.report import write_report
from seg_transfer.study.runner import StudyProgress, check_equal_steps, run_study
from seg_transfer.study.transferability import agreement, rank_subsets, read_scores


@dataclass
class CompareOutcome:
    progress: StudyProgress
    results: dict
    files: dict[str, Path]


def compare(study_path: str | Path, output: str | Path, *, device: str = "auto", max_runs: int | None = None,
            shard: tuple[int, int] = (0, 1)) -> CompareOutcome:
    """Run (or continue) the study in ``study_path`` into ``output`` and write its report from the finished runs."""
    study = load_study_config(study_path)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write_atomic(output / "study.json", json.dumps(study.model_dump(mode="json"), indent=2) + "\n")
    progress = run_study(study, output, device=device, max_runs=max_runs, shard=shard)
    if study.rank_encoders is not None and shard[0] == 0:
        rank_subsets(progress.specs, output, study.rank_encoders, device)
    check_equal_steps(progress.records, study.allow_unequal_budgets)
    results = {"study": study_summary(study, output, progress), **analyse(progress.records, study),
               "peers": read_peer_rows(output), "transferability": agreement(progress.records, read_scores(output, progress.records))}
    files = write_report(results, output) if progress.records else {}
    return CompareOutcome(progress, results, files)


PEER_FILE = "peer_nnunet.json"  # written by benchmarks/nnunet_peer.py on the same cases


def read_peer_rows(output: Path) -> list[dict]:
    """Peer rows (nnU-Net trained on the study's cases, scored with our evaluator), if any were written."""
    path = Path(output) / PEER_FILE
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())
    return rows.get("rows", []) if isinstance(rows, dict) else rows


def study_summary(study: StudyConfig, output: Path, progress: StudyProgress) -> dict:
    """The study's design as it ran: arms, sizes, seeds, the fixed cases and each size's training subsets."""
    cases, specs = progress.cases, progress.specs
    subsets = {f"n{s.size}_seed{s.seed}": s.splits["train"] for s in specs if s.arm == study.control}
    return {
        "name": study.name, "config": study.model_dump(mode="json"), "dataset": str(next(iter(cases.cases.values())).image.parent.parent),
        "arms": [arm.name for arm in study.arms], "control": study.control, "seeds": study.seeds,
        "sizes": sorted({s.size for s in specs}), "n_test": len(cases.test), "n_val": len(cases.val), "n_pool": len(cases.pool),
        "test_cases": cases.test, "val_cases": cases.val, "train_subsets": subsets,
        "finished_runs": len(progress.records), "total_runs": progress.total_runs, "target_dice": study.target_dice,
        "alpha": study.alpha,
    }

"""Train every category of a data set in turn (the seed's ``run_training.py``): RUNS/<category>/ per
category; a finished run is skipped, an unfinished one resumed from its checkpoint, so the same command
continues after an interruption."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slsg_train.checkpoint import load_checkpoint
from slsg_train.data.loco import list_categories
from slsg_train.training.config import TrainConfig

FINISHED, UNFINISHED, NEW = "finished", "unfinished", "new"


@dataclass
class CategoryRun:
    category: str
    run_dir: Path
    before: str  # FINISHED (skipped), UNFINISHED (resumed) or NEW
    finished: bool  # after this call


def run_status(run_dir: Path) -> str:
    """Whether ``run_dir`` holds a finished run (calibrated checkpoint), an unfinished one, or none."""
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        return NEW
    return FINISHED if load_checkpoint(path).stage == "done" else UNFINISHED


def train_all_categories(data_root: str | Path, runs_root: str | Path, config_for: Callable[[str], TrainConfig],
                         until_step: int | None = None, overrides: dict[str, Any] | None = None,
                         report: Callable[[str], None] = print) -> list[CategoryRun]:
    """Train each category folder under ``data_root`` into ``runs_root/<category>`` with
    ``config_for(category)``; ``until_step`` and ``overrides`` as for one ``slsg train``."""
    from slsg_train.training.trainer import TrainingRun

    categories = list_categories(data_root)
    if not categories:
        raise ValueError(f"no category folders under {data_root}")
    runs = []
    for category in categories:
        run_dir = Path(runs_root) / category
        before = run_status(run_dir)
        if before == FINISHED:
            report(f"{category}: finished, skipped ({run_dir})")
        else:
            report(f"{category}: {'resuming' if before == UNFINISHED else 'training'} in {run_dir}")
            TrainingRun(config_for(category), data_root, run_dir, resume=before == UNFINISHED, until_step=until_step,
                        overrides=overrides).run()
        runs.append(CategoryRun(category, run_dir, before, run_status(run_dir) == FINISHED))
    return runs

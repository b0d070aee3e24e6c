"""Experiment tracking as transformers' ``report_to`` reads it (``tracking_args.report_to``): every round's figures
into TensorBoard event files and an offline W&B run, both under the run folder. Nothing leaves the machine: the W&B
run is offline (``wandb sync <output_dir>/wandb/offline-run-*`` uploads it, if its owner wants).

A round's figures are logged once they are all in: its evaluation (what each client received, before it trained)
is made during the next round, so round t is logged after round t + 1, and the last round after the final
evaluation. The simulator and the Ray engine log while they run; a cross-silo deployment logs once it has
collected its parties' metrics.
"""
from __future__ import annotations

import importlib.util
import math
import statistics
from pathlib import Path

from fedml_pfedseq.config import Recipe, RecipeError
from fedml_pfedseq.results import MetricsLog

EVALUATED = ("validation_accuracy", "validation_loss", "test_accuracy", "test_loss")


def round_scalars(log: MetricsLog, round_idx: int) -> dict[str, float]:
    """Round t's figures: the clients' mean evaluation (``eval/...``) and training loss (``train/loss``), the
    server's row (``server/...``: participants, bytes, and pFedSeq's learner statistics) and the round's wall time."""
    scalars = {}
    evaluated = log.at(round_idx)
    for key in EVALUATED:
        values = [r[key] for r in evaluated if _number(r.get(key))]
        if values:
            scalars[f"eval/{key}"] = statistics.fmean(values)
    losses = [r["train_loss"] for r in log.train_rows if r["round"] == round_idx and _number(r.get("train_loss"))]
    if losses:
        scalars["train/loss"] = statistics.fmean(losses)
    for row in log.server_rows:
        if row["round"] == round_idx:
            scalars.update({f"server/{k}": float(v) for k, v in row.items() if k != "round" and _number(v)})
    if 1 <= round_idx <= len(log.round_seconds):
        scalars["time/round_seconds"] = log.round_seconds[round_idx - 1]
    return scalars


def check_reporters(recipe: Recipe) -> None:
    """RecipeError naming the package a backend of ``report_to`` needs and this environment lacks (checked before a
    run writes anything)."""
    missing = [name for name in recipe.tracking_args.reporters if importlib.util.find_spec(name) is None]
    if missing:
        raise RecipeError(f"tracking_args.report_to names {missing}, which is not installed here "
                          f"(pip install {' '.join(missing)})")


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class Tracker:
    """The backends a recipe's ``tracking_args.report_to`` names (``check_reporters`` passed), writing under
    ``output_dir``."""

    def __init__(self, recipe: Recipe, output_dir: Path):
        reporters = recipe.tracking_args.reporters
        self.tensorboard = self.wandb = None
        if "tensorboard" in reporters:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        if "wandb" in reporters:
            import wandb

            self.wandb = wandb.init(mode="offline", dir=str(output_dir), project="fedml-pfedseq", name=recipe.name,
                                    config=recipe.to_dict(), reinit=True, settings=wandb.Settings(silent=True))

    @classmethod
    def of(cls, recipe: Recipe, output_dir: Path) -> Tracker | None:
        """A tracker where the recipe asks for one, else None."""
        return cls(recipe, output_dir) if recipe.tracking_args.reporters else None

    def log_round(self, log: MetricsLog, round_idx: int) -> None:
        scalars = round_scalars(log, round_idx)
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, round_idx)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=round_idx)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def track_all(recipe: Recipe, output_dir: Path, log: MetricsLog) -> None:
    """Every round of a finished run's ``log`` to the recipe's backends (a deployment, whose metrics are collected
    from its parties at the end)."""
    tracker = Tracker.of(recipe, output_dir)
    if tracker is None:
        return
    try:
        for round_idx in sorted({r["round"] for r in log.rows} | {r["round"] for r in log.server_rows}):
            tracker.log_round(log, round_idx)
    finally:
        tracker.close()

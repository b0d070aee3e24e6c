"""Run outputs: per-round per-client metrics (JSON + CSV), a learning-curve PNG and a final table."""
from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

EVAL_FIELDS = ["round", "client", "validation_accuracy", "validation_loss", "validation_samples",
               "test_accuracy", "test_loss", "test_samples"]


@dataclass
class MetricsLog:
    rows: list[dict] = field(default_factory=list)  # evaluation: one row per (round, client)
    train_rows: list[dict] = field(default_factory=list)  # local training: one row per (round, client)
    server_rows: list[dict] = field(default_factory=list)  # server-side measurements: one row per round
    round_seconds: list[float] = field(default_factory=list)  # per round: the whole round
    train_seconds: list[float] = field(default_factory=list)  # per round: all clients' local training
    eval_seconds: list[float] = field(default_factory=list)  # per round: all clients' evaluation before training

    def add(self, **row) -> None:
        self.rows.append(row)

    def add_train(self, **row) -> None:
        self.train_rows.append(row)

    def add_server(self, **row) -> None:
        self.server_rows.append(row)

    def at(self, round_idx: int) -> list[dict]:
        return [r for r in self.rows if r["round"] == round_idx]

    def mean_at(self, round_idx: int, key: str) -> float:
        return statistics.fmean(r[key] for r in self.at(round_idx))

    @property
    def rounds(self) -> list[int]:
        return sorted({r["round"] for r in self.rows})


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))  # rows may add keys as a run goes on
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def mean_test_curve(rows: list[dict]) -> tuple[list[int], list[float]]:
    """Rounds and the mean over clients of local test accuracy at each."""
    log = MetricsLog(rows=rows)
    return log.rounds, [log.mean_at(t, "test_accuracy") for t in log.rounds]


def save_accuracy_plot(ax, fig, title: str, path: Path,
                       ylabel: str = "local test accuracy (mean over clients)") -> None:
    ax.set_xlabel("round (aggregations completed)")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(ax.get_lines()) > 6:  # many curves: the legend beside the plot, not over it
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    else:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_learning_curve(log: MetricsLog, title: str, path: Path) -> None:
    """Mean test accuracy over clients per round, with each client's curve faint behind it."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for client in sorted({r["client"] for r in log.rows}):
        points = [(r["round"], r["test_accuracy"]) for r in log.rows if r["client"] == client]
        ax.plot(*zip(*points), color="grey", alpha=0.25, linewidth=0.8)
    ax.plot(*mean_test_curve(log.rows), color="C0", linewidth=2, marker="o", label="mean over clients")
    save_accuracy_plot(ax, fig, title, path)


def plot_suite(curves: dict[str, list[dict]], title: str, path: Path) -> None:
    """One mean test-accuracy curve per run (name -> its evaluation rows)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in curves.items():
        ax.plot(*mean_test_curve(rows), marker="o", label=name)
    save_accuracy_plot(ax, fig, title, path)


def format_table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (readable in a terminal too)."""
    cells = [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def write_run_outputs(log: MetricsLog, recipe, output_dir: Path, wall_seconds: float) -> dict:
    """Write metrics.json/.csv, train/server_metrics.csv, learning_curve.png, final_table.md; return the summary."""
    write_csv(output_dir / "metrics.csv", [{k: r.get(k) for k in EVAL_FIELDS} for r in log.rows])
    write_csv(output_dir / "train_metrics.csv", log.train_rows)
    write_csv(output_dir / "server_metrics.csv", log.server_rows)
    (output_dir / "metrics.json").write_text(json.dumps(
        {"eval": log.rows, "train": log.train_rows, "server": log.server_rows, "round_seconds": log.round_seconds,
         "train_seconds": log.train_seconds, "eval_seconds": log.eval_seconds}, indent=1))
    plot_learning_curve(log, f"{recipe.name} ({recipe.train_args.federated_optimizer})",
                        output_dir / "learning_curve.png")

    final_round = log.rounds[-1]
    final = sorted(log.at(final_round), key=lambda r: r["client"])
    test = [r["test_accuracy"] for r in final]
    table = format_table(["client", "test acc", "val acc", "test n"],
                         [[r["client"], r["test_accuracy"], r["validation_accuracy"], r["test_samples"]]
                          for r in final] + [["mean", statistics.fmean(test),
                                              statistics.fmean(r["validation_accuracy"] for r in final), ""]])
    (output_dir / "final_table.md").write_text(table + "\n")
    print(f"\n{recipe.name}: {recipe.train_args.federated_optimizer}, round {final_round}\n{table}")
    return {
        "recipe": recipe.name,
        "method": recipe.train_args.federated_optimizer,
        "dataset": recipe.data_args.dataset,
        "scenario": recipe.common_args.federated_scenario,
        "seed": recipe.common_args.random_seed,
        "rounds": final_round,
        "clients": len(final),
        "final_test_accuracy_mean": statistics.fmean(test),
        "final_test_accuracy_std": statistics.pstdev(test) if len(test) > 1 else 0.0,
        "final_validation_accuracy_mean": statistics.fmean(r["validation_accuracy"] for r in final),
        "best_validation_round": max(log.rounds, key=lambda t: log.mean_at(t, "validation_accuracy")),
        "mean_round_seconds": statistics.fmean(log.round_seconds) if log.round_seconds else math.nan,
        "wall_seconds": round(wall_seconds, 1),
    }

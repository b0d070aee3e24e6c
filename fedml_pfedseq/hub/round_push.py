"""Pushing during a run: every ``hub_args.hub_push_every`` rounds, a checkpoint commit to the run's repo.

The checkpoint after round r holds what a finished run after r rounds would: each client's model as it was evaluated
at round r, the server's state after r aggregations (global adapter, SeqLearner), the metrics so far and a card. It
is assembled in ``<output_dir>/hub_checkpoint/`` (never pushed with the final run) and pushed with ``push_run``, so
every commit of the repo loads on its own; the final push replaces it. A checkpoint that fails to push is reported
on stderr and the run goes on: the final push (or ``pfedseq push``) still lands the whole run.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml

from fedml_pfedseq.hub.adapters import AdapterWriter
from fedml_pfedseq.hub.push import CHECKPOINT_DIR, PushError, push_run
from fedml_pfedseq.results import MetricsLog, write_run_outputs


def checkpoint_due(recipe, round_idx: int) -> bool:
    """Whether a checkpoint is pushed after round ``round_idx``: every ``hub_push_every`` rounds, not the last."""
    every = recipe.hub_args.hub_push_every
    return bool(every) and 0 < round_idx < recipe.train_args.comm_round and round_idx % every == 0


class RoundPusher:
    """Saves the evaluated client models of each due round, then pushes them before the server aggregates again."""

    def __init__(self, fed, output_dir: Path):
        self.fed, self.recipe = fed, fed.recipe
        self.directory = Path(output_dir) / CHECKPOINT_DIR
        self.writer: AdapterWriter | None = None
        self.writer_round: int | None = None
        self.started = time.perf_counter()
        self.pushed: list[int] = []  # rounds whose checkpoint landed

    def after_evaluation(self, round_idx: int, client_id: int, client) -> None:
        if not checkpoint_due(self.recipe, round_idx):
            return
        if self.writer_round != round_idx:  # a fresh folder per checkpoint
            self.writer = AdapterWriter(self.directory / "adapters", self.recipe)
            self.writer_round = round_idx
        self.writer.save_client(client_id, client.model, client.data, self.fed.data.label_names)

    def before_aggregation(self, round_idx: int, log: MetricsLog) -> None:
        if not checkpoint_due(self.recipe, round_idx) or self.writer_round != round_idx:
            return
        directory, recipe, hub = self.directory, self.recipe, self.recipe.hub_args
        (directory / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        self.fed.server.save_artifacts(directory)
        so_far = MetricsLog(rows=[r for r in log.rows if r["round"] <= round_idx],
                            train_rows=[r for r in log.train_rows if r["round"] <= round_idx],
                            server_rows=[r for r in log.server_rows if r["round"] <= round_idx],
                            round_seconds=log.round_seconds[:round_idx], train_seconds=log.train_seconds[:round_idx],
                            eval_seconds=log.eval_seconds[:round_idx])
        summary = write_run_outputs(so_far, recipe, directory, wall_seconds=time.perf_counter() - self.started)
        (directory / "summary.json").write_text(json.dumps(summary, indent=2))
        self.writer.finish(self.fed.server, self.fed.model, log.at(round_idx), self.fed.data.label_names)
        try:
            push_run(directory, hub.hub_repo_id, private=hub.hub_private,
                     commit_message=f"pfedseq: {recipe.name} ({recipe.train_args.federated_optimizer}), checkpoint "
                                    f"after round {round_idx}, mean test accuracy "
                                    f"{summary['final_test_accuracy_mean']:.4f}")
            self.pushed.append(round_idx)
        except PushError as err:
            print(f"pfedseq: warning: the checkpoint after round {round_idx} was not pushed; the run goes on and "
                  f"pushes when it ends.\n{err}", file=sys.stderr)

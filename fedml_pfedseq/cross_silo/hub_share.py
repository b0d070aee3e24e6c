"""Each cross-silo party's share of the run folder and of the Hub repo: what it writes and pushes when the run ends
(``save_server_share`` / ``push_share``) and, with ``hub_args.hub_push_every: K``, after every K rounds
(``push_server_checkpoint`` / ``push_client_checkpoint``).

The server never holds a client's model or accuracy, so each party pushes only what it owns, in its own commit
(hub/push.py). A checkpoint after round r is assembled in ``<output_dir>/hub_checkpoint/`` in the run's layout, as
the simulator's (hub/round_push.py): the server writes its state after r aggregations before payload r + 1 goes
out; client k writes its model as it evaluated it at round r, when payload r + 1 arrives. Once every party's commit
for round r has landed, that revision loads like a finished run of r rounds. A client not sampled for round r + 1
does not evaluate at round r, so it pushes nothing for that checkpoint and the repo keeps its earlier folder. A
checkpoint that fails to push is a warning: the run goes on, and the final push lands the whole run.
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from fedml_pfedseq.config import Recipe
from fedml_pfedseq.hub.adapters import AdapterWriter
from fedml_pfedseq.hub.push import CHECKPOINT_DIR, PushError, push_client, push_run
from fedml_pfedseq.results import write_csv

EXIT_NOT_PUSHED = 4  # the party's run is complete and written; only its push to the Hub failed


def save_server_share(recipe: Recipe, output_dir: Path, server, model, label_names: list[str],
                      num_clients: int, server_rows: list[dict]) -> None:
    """The server's share of the run folder: the recipe, its metrics and, with save_adapters, its part of
    ``adapters/`` (the global adapter, a manifest listing the clients' folders)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    write_csv(output_dir / "server_metrics.csv", server_rows)
    if recipe.hub_args.save_adapters:
        AdapterWriter(output_dir / "adapters", recipe, fresh=False).finish(
            server, model, [], label_names, party_clients=num_clients)


def save_client_share(recipe: Recipe, output_dir: Path, client_id: int, model, data, label_names: list[str],
                      row: dict) -> None:
    """Client ``client_id``'s share: the model it just evaluated (on ``data``, its ClientData), with that evaluation's
    ``row`` in client.json."""
    AdapterWriter(output_dir / "adapters", recipe, fresh=False).save_client(client_id, model, data, label_names,
                                                                            report=row)


def push(recipe: Recipe, output_dir: Path, client: int | None, commit_message: str | None = None) -> None:
    """Push the share of the party ``client`` (None: the server) found in ``output_dir``."""
    hub = recipe.hub_args
    if client is None:
        push_run(output_dir, hub.hub_repo_id, private=hub.hub_private, commit_message=commit_message)
    else:
        push_client(output_dir, client, hub.hub_repo_id, private=hub.hub_private, commit_message=commit_message)


def push_share(recipe: Recipe, output_dir: Path, client: int | None) -> None:
    """Push this party's share at the end of the run; a failure is reported and ends the party with
    EXIT_NOT_PUSHED, its files kept."""
    try:
        push(recipe, output_dir, client)
    except PushError as err:
        print(f"pfedseq: error: training finished and this party's files are written, but its push failed: {err}",
              file=sys.stderr, flush=True)
        raise SystemExit(EXIT_NOT_PUSHED) from None


def push_checkpoint(recipe: Recipe, output_dir: Path, client: int | None, round_idx: int) -> None:
    """Push the party's share of the checkpoint after ``round_idx`` from ``hub_checkpoint/``; a failure warns."""
    party = "server" if client is None else f"client {client}"
    message = (f"pfedseq: {recipe.name} ({recipe.train_args.federated_optimizer}), checkpoint after round "
               f"{round_idx}, cross-silo {party}")
    try:
        push(recipe, output_dir / CHECKPOINT_DIR, client, message)
    except PushError as err:
        print(f"pfedseq: warning: {party}'s checkpoint after round {round_idx} was not pushed; the run goes on and "
              f"pushes when it ends.\n{err}", file=sys.stderr, flush=True)


def push_server_checkpoint(recipe: Recipe, output_dir: Path, server, model, label_names: list[str],
                           num_clients: int, server_rows: list[dict], round_idx: int) -> None:
    """The server's state after ``round_idx`` aggregations, written to ``hub_checkpoint/`` and pushed."""
    directory = output_dir / CHECKPOINT_DIR
    save_server_share(recipe, directory, server, model, label_names, num_clients, server_rows)
    server.save_artifacts(directory)
    push_checkpoint(recipe, output_dir, None, round_idx)


def push_client_checkpoint(recipe: Recipe, output_dir: Path, client_id: int, model, data, label_names: list[str],
                           row: dict) -> None:
    """Client ``client_id``'s model as it evaluated it at ``row["round"]``, written to ``hub_checkpoint/`` and
    pushed."""
    save_client_share(recipe, output_dir / CHECKPOINT_DIR, client_id, model, data, label_names, row)
    push_checkpoint(recipe, output_dir, client_id, row["round"])

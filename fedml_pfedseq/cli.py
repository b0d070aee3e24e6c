"""The ``pfedseq`` command: run a recipe or a suite in the simulator, deploy it with FedML, run one FedML party,
check a recipe without running it, push a run to the Hub, evaluate a pushed adapter, or serve a local Hub."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedml_pfedseq.config import RecipeError, load_recipe, load_yaml
from fedml_pfedseq.data.partition import PartitionError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pfedseq", description="Personalized federated adapter tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [("run", "run one recipe in the in-process simulator"),
                            ("suite", "run every recipe of a suite file and compare them"),
                            ("grid", "run a grid of methods x scenarios x seeds (tuned on validation first if it "
                                     "says so); resumes an interrupted grid; writes mean +- std tables"),
                            ("deploy", "run a recipe as a FedML cross-silo deployment on this machine "
                                       "(server + one process per client, gRPC on 127.0.0.1)"),
                            ("check", "load and validate a recipe (or suite, or grid), run nothing")]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("path", type=Path)
        if name != "check":
            p.add_argument("--no-progress", action="store_true")
        if name == "run":
            p.add_argument("--resume", action="store_true", help="continue from the checkpoint in the output "
                           "folder (an interrupted run, or a finished one given a larger comm_round)")
            p.add_argument("--resume-from", default=None, metavar="RUN_DIR_OR_REPO",
                           help="continue the run whose checkpoint is in this folder or Hub repo ($HF_ENDPOINT)")
        if name == "grid":
            p.add_argument("--workers", type=int, default=1, help="cells run at once, one process each (several "
                           "`pfedseq grid` processes may also share the output folder)")
    party = sub.add_parser("party", help="run one FedML cross-silo party (what each silo runs)")
    party.add_argument("--cf", dest="path", type=Path, required=True, help="the recipe (FedML's --cf)")
    party.add_argument("--rank", type=int, required=True, help="0: the server; k >= 1: client k-1")
    party.add_argument("--role", choices=["server", "client"], required=True)
    party.add_argument("--run-id", default="0")
    party.add_argument("--resume", action="store_true", help="continue from this party's checkpoint "
                       "(parties/<party>/checkpoint.safetensors): the server with the round in progress, a client "
                       "with its saved state (fresh without one); needs comm_args.upload_timeout")
    for p in sub.choices.values():
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a recipe key (repeatable), e.g. --set train_args.comm_round=3")
        if p is not sub.choices["check"]:
            p.add_argument("--output-dir", type=Path, default=None)
    push = sub.add_parser("push", help="push a finished run (adapters, learners, recipe, metrics, card) to a Hub "
                                       "repo in one commit ($HF_ENDPOINT, $HF_TOKEN)")
    push.add_argument("path", type=Path, help="the run's output folder")
    push.add_argument("--repo-id", required=True, help="owner/name of the model repo")
    push.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    push.add_argument("--endpoint", default=None, help="the Hub endpoint (default: $HF_ENDPOINT, else the Hub)")
    push.add_argument("--with-checkpoint", action="store_true", help="also push checkpoint.safetensors (every "
                      "client's state), so that `pfedseq run --resume-from REPO` continues the run")
    hub_eval = sub.add_parser("hub-eval", help="evaluate client K's pushed adapter on its split of the data")
    hub_eval.add_argument("repo", help="a Hub repo id (or a local run folder)")
    hub_eval.add_argument("--client", type=int, required=True)
    hub_eval.add_argument("--recipe", type=Path, default=None, help="default: the recipe.yaml pushed with the run")
    hub_eval.add_argument("--split", choices=["test", "validation", "train"], default="test")
    hub_eval.add_argument("--revision", default=None, help="a branch or commit id (default: main)")
    hub_eval.add_argument("--endpoint", default=None)
    hub_eval.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    serve = sub.add_parser("hub-serve", help="serve a Hub-compatible endpoint on this machine (offline rehearsal)")
    serve.add_argument("--root", type=Path, required=True, help="folder that holds the repos")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8808)
    serve.add_argument("--token", default=None, help="require this token (default: accept any)")
    args = parser.parse_args(argv)

    from fedml_pfedseq.checkpoint import CheckpointError
    from fedml_pfedseq.cross_silo.launcher import DeploymentError, deploy
    from fedml_pfedseq.cross_silo.party import run_party
    from fedml_pfedseq.hub import HubLoadError, PushError, evaluate_client, push_run
    from fedml_pfedseq.hub.load import recipe_from_repo
    from fedml_pfedseq.hub.warm_start import fetch_checkpoint
    from fedml_pfedseq.hub.local_endpoint import serve as serve_hub
    from fedml_pfedseq.simulation import run_recipe
    from fedml_pfedseq.grid import load_grid, run_grid
    from fedml_pfedseq.suite import load_suite, run_suite

    try:
        if args.command == "push":
            push_run(args.path, args.repo_id, private=not args.public, endpoint=args.endpoint,
                     with_checkpoint=args.with_checkpoint)
        elif args.command == "hub-eval":
            recipe = load_recipe(args.recipe, args.overrides) if args.recipe else \
                recipe_from_repo(args.repo, args.overrides, args.revision, args.endpoint)
            result = evaluate_client(args.repo, args.client, recipe, args.split, args.revision, args.endpoint)
            print(json.dumps(result))
        elif args.command == "hub-serve":
            serve_hub(args.root, args.host, args.port, args.token)
        elif args.command == "run":
            recipe = load_recipe(args.path, args.overrides)
            if args.resume_from:
                fetch_checkpoint(args.resume_from, args.output_dir or recipe.output_dir)
            run_recipe(recipe, args.output_dir, progress=not args.no_progress,
                       resume=args.resume or bool(args.resume_from))
        elif args.command == "suite":
            run_suite(args.path, args.overrides, args.output_dir, progress=not args.no_progress)
        elif args.command == "grid":
            print(run_grid(args.path, args.overrides, args.output_dir, progress=not args.no_progress,
                           workers=args.workers)["markdown"])
        elif args.command == "deploy":
            deploy(load_recipe(args.path, args.overrides), args.output_dir, progress=not args.no_progress)
        elif args.command == "party":
            recipe = load_recipe(args.path, args.overrides)
            run_party(recipe, args.rank, args.role, args.output_dir or recipe.output_dir, args.run_id, args.resume)
        else:
            raw = load_yaml(args.path)
            if isinstance(raw, dict) and "methods" in raw:
                grid = load_grid(args.path, args.overrides)
                seeds, tuning = len(grid.seed_cells({})), len(grid.planned_tuning_cells())
                print(f"ok: grid of {seeds} seed cell(s) and {tuning} tuning run(s) over scenarios "
                      f"{list(grid.scenarios)}")
                return 0
            is_suite = isinstance(raw, dict) and "recipes" in raw
            loaded = load_suite(args.path, args.overrides)[0] if is_suite else [load_recipe(args.path, args.overrides)]
            print(f"ok: {len(loaded)} recipe(s): {', '.join(r.name for r in loaded)}")
    except (RecipeError, PartitionError, FileNotFoundError, DeploymentError, PushError, HubLoadError,
            CheckpointError) as err:
        print(f"pfedseq: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

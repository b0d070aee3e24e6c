"""The ``pfedseq`` command: run a recipe or a suite in the simulator, deploy it with FedML, run one FedML party,
check a recipe without running it, list the recipe keys, push a run to the Hub, evaluate a pushed adapter, or serve a
local Hub.

Each command imports what it needs when it runs (torch, PEFT and FedML take seconds to import), so ``--help`` and
``keys`` answer at once. A user's mistake (a bad recipe, a missing file, a refused checkpoint) ends with one line
``pfedseq: error: ...`` and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from fedml_pfedseq.errors import UserError

EXAMPLES = """\
start here (about a minute on a laptop CPU, on the Omniglot data shipped with the package):
  pfedseq run omniglot_pfedseq --output-dir runs/first --set train_args.comm_round=3 \\
      --set data_args.samples_per_client=40 --set algorithm_args.warmup_rounds=1

more:
  pfedseq recipes                                    the shipped recipes, suites and grids, by name
  pfedseq recipe omniglot_pfedseq > mine.yaml        a copy of one to edit (then: pfedseq run mine.yaml)
  pfedseq check omniglot_pfedseq                     validate a recipe (or suite, or grid) without running it
  pfedseq keys --method pFedSeq                      every recipe key with its default and meaning
  pfedseq run runs/first/recipe.yaml --resume --set train_args.comm_round=5    extend a run in place
  pfedseq suite suites/default                       the default comparison (what `make run` runs)
  pfedseq deploy omniglot_pfedseq                    the same recipe as real FedML processes on 127.0.0.1
  pfedseq push runs/first --repo-id me/first         share the run's adapters and card ($HF_ENDPOINT, $HF_TOKEN)

A recipe, suite or grid is a file, or the name of a shipped one (`pfedseq recipes`).
`pfedseq COMMAND --help` describes each command's options."""

COMMANDS = {
    "run": "run one recipe in the in-process simulator",
    "suite": "run every recipe of a suite file and compare them in one table and plot",
    "grid": "run a grid of methods x scenarios x seeds (tuned on validation first if it says so); resumes an "
            "interrupted grid; writes mean +- std tables",
    "deploy": "run a recipe as a FedML cross-silo deployment on this machine (server + one process per client, gRPC "
              "on 127.0.0.1)",
    "party": "run one FedML cross-silo party (what each silo runs)",
    "certs": "issue a federation's TLS certificates: a CA in DIR unless one is there, then one certificate and key "
             "per party (party-0: the server, party-k: client k-1) that has none; give each party ca.crt and its own "
             "pair",
    "check": "load and validate a recipe (or suite, or grid), find its data and backbone on this machine, and say "
             "what it would run; runs nothing",
    "keys": "print every recipe key with its default and meaning (from the config dataclasses)",
    "recipes": "list the recipes, suites and grids shipped with the package, by the name every command takes",
    "recipe": "print a shipped recipe, suite or grid (pfedseq recipe NAME > mine.yaml: a copy to edit)",
    "push": "push a finished run (adapters, learners, recipe, metrics, card) to a Hub repo in one commit "
            "($HF_ENDPOINT, $HF_TOKEN)",
    "hub-eval": "evaluate client K's pushed adapter on its split of the data",
    "hub-serve": "serve a Hub-compatible endpoint on this machine (offline rehearsal of push and load)",
    "docs": "write the reference pages (docs/reference/: recipe keys, commands, API, methods, layout) from the "
            "code's docstrings and help texts; --check: fail if they are stale",
    "env": "print library versions, the devices torch and accelerate see, bf16, and which selective scan the "
           "learner runs on CUDA (mamba-ssm's kernel, or why not)",
}


def add_recipe_options(p: argparse.ArgumentParser, output: bool = True, progress: bool = True) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe key (repeatable; values are YAML), e.g. --set train_args.comm_round=3")
    if output:
        p.add_argument("--output-dir", type=Path, default=None,
                       help="where the run writes (default: the recipe's common_args.output_dir)")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bars (logs and CI)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfedseq", description="Personalized federated adapter tuning (pFedSeq and "
                                     "12 baselines) on Hugging Face ViT + PEFT LoRA, simulated or deployed with FedML.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = {name: sub.add_parser(name, help=text, description=text) for name, text in COMMANDS.items()}

    p["run"].add_argument("path", type=Path, help="the recipe (YAML, FedML's config format)")
    p["run"].add_argument("--resume", action="store_true", help="continue from the checkpoint in the output folder "
                          "(an interrupted run, or a finished one given a larger comm_round)")
    p["run"].add_argument("--resume-from", default=None, metavar="RUN_DIR_OR_REPO",
                          help="continue the run whose checkpoint is in this folder or Hub repo ($HF_ENDPOINT)")
    p["suite"].add_argument("path", type=Path, help="the suite file (a list of recipes)")
    p["grid"].add_argument("path", type=Path, help="the grid file (methods x scenarios x seeds)")
    p["grid"].add_argument("--workers", type=int, default=1, help="cells run at once, one process each (several "
                           "`pfedseq grid` processes may also share the output folder)")
    p["grid"].add_argument("--engine", choices=["local", "ray"], default="local",
                           help="local: cells in processes of this machine (--workers); ray: each cell a Ray task on "
                                "the Ray the recipes' ray_args name (a local one by default; pip install '.[ray]')")
    p["grid"].add_argument("--rows", nargs="+", default=None, metavar="NAME",
                           help="run only these rows (method names as in the grid's table); their cells are the "
                                "whole grid's, so a later run of every row keeps them")
    p["grid"].add_argument("--seeds", nargs="+", type=int, default=None, metavar="K",
                           help="run only these seeds' cells (of the grid's seeds), as --rows does rows: one seed "
                                "of every row first gives paired comparisons first")
    p["deploy"].add_argument("path", type=Path, help="the recipe")
    p["check"].add_argument("path", type=Path, help="a recipe, suite or grid file")
    for name in ("run", "suite", "grid", "deploy"):
        add_recipe_options(p[name])
    add_recipe_options(p["check"], output=False, progress=False)

    party = p["party"]
    party.add_argument("--cf", dest="path", type=Path, required=True, help="the recipe (FedML's --cf)")
    party.add_argument("--rank", type=int, required=True, help="0: the server; k >= 1: client k-1")
    party.add_argument("--role", choices=["server", "client"], required=True, help="this party's role")
    party.add_argument("--run-id", default="0", help="FedML's run id (the same for every party of a deployment)")
    party.add_argument("--resume", action="store_true", help="continue from this party's checkpoint "
                       "(parties/<party>/checkpoint.safetensors): the server with the round in progress, a client "
                       "with its saved state (fresh without one); needs comm_args.upload_timeout")
    add_recipe_options(party, progress=False)

    certs = p["certs"]
    certs.add_argument("path", type=Path, metavar="DIR", help="the folder of the CA and the parties' files")
    certs.add_argument("--clients", type=int, required=True, help="the federation's client count N (ranks 1..N)")
    certs.add_argument("--days", type=int, default=365, help="how long new certificates are valid")

    p["docs"].add_argument("--check", action="store_true", help="write nothing; exit 1 naming the pages that "
                           "differ from the code")
    p["recipe"].add_argument("name", help="a name that `pfedseq recipes` lists, e.g. omniglot_pfedseq")
    p["keys"].add_argument("--method", default=None, help="only this method's algorithm_args (default: every method)")
    p["keys"].add_argument("--markdown", action="store_true", help="as Markdown tables (the docs' recipe reference)")

    push = p["push"]
    push.add_argument("path", type=Path, help="the run's output folder")
    push.add_argument("--repo-id", required=True, help="owner/name of the model repo")
    push.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    push.add_argument("--endpoint", default=None, help="the Hub endpoint (default: $HF_ENDPOINT, else the Hub)")
    push.add_argument("--with-checkpoint", action="store_true", help="also push checkpoint.safetensors (every "
                      "client's state), so that `pfedseq run --resume-from REPO` continues the run")

    hub_eval = p["hub-eval"]
    hub_eval.add_argument("repo", help="a Hub repo id (or a local run folder)")
    hub_eval.add_argument("--client", type=int, required=True, help="the client index k (0-based)")
    hub_eval.add_argument("--recipe", type=Path, default=None, help="default: the recipe.yaml pushed with the run")
    hub_eval.add_argument("--split", choices=["test", "validation", "train"], default="test",
                          help="which of the client's splits to evaluate")
    hub_eval.add_argument("--revision", default=None, help="a branch or commit id (default: main)")
    hub_eval.add_argument("--endpoint", default=None, help="the Hub endpoint (default: $HF_ENDPOINT, else the Hub)")
    add_recipe_options(hub_eval, output=False, progress=False)

    serve = p["hub-serve"]
    serve.add_argument("--root", type=Path, required=True, help="folder that holds the repos")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8808, help="port to listen on")
    serve.add_argument("--token", default=None, help="require this token (Authorization: Bearer) on every request "
                       "(default: accept any)")
    return parser


def run(args) -> None:
    from fedml_pfedseq.config import load_recipe
    from fedml_pfedseq.simulation import run_folder_of, run_recipe

    recipe = load_recipe(args.path, args.overrides)
    resume_from = None
    if args.resume_from:
        from fedml_pfedseq.hub.warm_start import find_checkpoint

        resume_from = find_checkpoint(args.resume_from)
    run_recipe(recipe, args.output_dir or run_folder_of(args.path), progress=not args.no_progress,
               resume=args.resume, resume_from=resume_from)


def suite(args) -> None:
    from fedml_pfedseq.suite import run_suite

    run_suite(args.path, args.overrides, args.output_dir, progress=not args.no_progress)


def grid(args) -> None:
    from fedml_pfedseq.grid import run_grid

    print(run_grid(args.path, args.overrides, args.output_dir, progress=not args.no_progress, workers=args.workers,
                   rows=args.rows, engine=args.engine, seeds=args.seeds)["markdown"])


def deploy(args) -> None:
    from fedml_pfedseq.config import load_recipe
    from fedml_pfedseq.cross_silo.launcher import deploy as deploy_recipe

    deploy_recipe(load_recipe(args.path, args.overrides), args.output_dir, progress=not args.no_progress)


def party(args) -> None:
    from fedml_pfedseq.config import load_recipe
    from fedml_pfedseq.cross_silo.party import run_party

    recipe = load_recipe(args.path, args.overrides)
    run_party(recipe, args.rank, args.role, args.output_dir or recipe.output_dir, args.run_id, args.resume)


def certs(args) -> None:
    from fedml_pfedseq.cross_silo.certificates import CA_CERT, issue_federation

    if args.clients < 1 or args.days < 1:
        raise UserError("--clients and --days must be >= 1")
    issued = issue_federation(args.path, args.clients, args.days)
    print(f"{args.path}: issued party certificates for ranks {issued or 'none (all present)'}; every party's recipe "
          f"names comm_args.ca_cert: {args.path / CA_CERT}, party_cert: {args.path}/party-{{rank}}.crt, party_key: "
          f"{args.path}/party-{{rank}}.key (copy each party only ca.crt and its own pair; keep ca.key offline)")


def check(args) -> None:
    from fedml_pfedseq.config import load_recipe, load_yaml, recipe_warnings
    from fedml_pfedseq.inputs import missing_inputs

    raw = load_yaml(args.path)
    if isinstance(raw, dict) and "methods" in raw:
        from fedml_pfedseq.grid import load_grid

        loaded = load_grid(args.path, args.overrides)
        recipes = [cell.recipe for cell in loaded.seed_cells({})]
        summary = (f"grid of {len(recipes)} seed cell(s) and {len(loaded.planned_tuning_cells())} tuning run(s) over "
                   f"scenarios {list(loaded.scenarios)}")
    elif isinstance(raw, dict) and "recipes" in raw:
        from fedml_pfedseq.suite import load_suite

        recipes = load_suite(args.path, args.overrides)[0]
        summary = f"{len(recipes)} recipe(s): {', '.join(r.name for r in recipes)}"
    else:
        recipes = [load_recipe(args.path, args.overrides)]
        summary = f"1 recipe(s): {recipes[0].name}"
    for message in dict.fromkeys(m for recipe in recipes for m in recipe_warnings(recipe)):
        print(f"pfedseq: warning: {message}", file=sys.stderr)
    found = [missing_inputs(recipe) for recipe in recipes]
    for item in dict.fromkeys(d for _, downloads in found for d in downloads):
        print(f"pfedseq: note: a run will download {item}", file=sys.stderr)
    missing = list(dict.fromkeys(m for lacking, _ in found for m in lacking))
    if missing:
        raise UserError(f"this machine lacks {len(missing)} input(s) of {summary}: {'; '.join(missing)}")
    print(f"ok: {summary}")


def keys(args) -> None:
    from fedml_pfedseq.config import recipe_key_reference

    print(recipe_key_reference(args.method, markdown=args.markdown), end="")


def recipes(args) -> None:
    from fedml_pfedseq.shipped import shipped_recipes

    shipped = shipped_recipes()
    width = max(map(len, shipped))
    for name, path in shipped.items():
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        print(f"{name:<{width}}  {first}")


def recipe(args) -> None:
    import difflib

    from fedml_pfedseq.shipped import shipped_recipes

    shipped = shipped_recipes()
    name = args.name.removesuffix(".yaml").removeprefix("recipes/")
    if name not in shipped:
        close = difflib.get_close_matches(name, shipped, n=3)
        raise UserError(f"no shipped recipe {args.name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                        + "; `pfedseq recipes` lists them")
    print(shipped[name].read_text(), end="")


def docs(args) -> int:
    from fedml_pfedseq import reference_docs

    if args.check:
        pages = reference_docs.stale()
        if pages:
            print(f"pfedseq: stale generated docs: {pages}; run `pfedseq docs`",
                  file=sys.stderr)
            return 1
        print(f"{reference_docs.DOCS}: up to date")
        return 0
    changed = reference_docs.write()
    print(f"{reference_docs.DOCS}: {len(changed)} page(s) rewritten {changed}")
    return 0


def push(args) -> None:
    from fedml_pfedseq.hub.push import push_run

    push_run(args.path, args.repo_id, private=not args.public, endpoint=args.endpoint,
             with_checkpoint=args.with_checkpoint)


def hub_eval(args) -> None:
    from fedml_pfedseq.config import load_recipe
    from fedml_pfedseq.hub.load import evaluate_client, recipe_from_repo

    recipe = load_recipe(args.recipe, args.overrides) if args.recipe else \
        recipe_from_repo(args.repo, args.overrides, args.revision, args.endpoint)
    print(json.dumps(evaluate_client(args.repo, args.client, recipe, args.split, args.revision, args.endpoint)))


def hub_serve(args) -> None:
    from fedml_pfedseq.testing.hub_server import serve

    serve(args.root, args.host, args.port, args.token)


def env(args) -> None:
    from fedml_pfedseq.environment import describe

    rows = describe()
    width = max(len(what) for what, _ in rows)
    print("\n".join(f"{what:<{width}}  {value}" for what, value in rows))


HANDLERS = {"run": run, "suite": suite, "grid": grid, "deploy": deploy, "party": party, "certs": certs, "check": check,
            "keys": keys, "recipes": recipes, "recipe": recipe, "docs": docs, "push": push, "hub-eval": hub_eval,
            "hub-serve": hub_serve, "env": env}


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A recipe warning as one line, like the errors; any other warning as Python shows it."""
    from fedml_pfedseq.config import RecipeWarning  # light: the config module imports only yaml

    if issubclass(category, RecipeWarning):
        print(f"pfedseq: warning: {message}", file=file or sys.stderr)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = show_warning
    if args.command in ("run", "suite", "grid", "deploy", "party", "check"):
        from fedml_pfedseq.shipped import resolve_recipe  # light: importlib only

        args.path = resolve_recipe(args.path)  # a file, or the name of a shipped one
    if args.command not in ("check", "keys", "hub-serve", "certs", "recipes", "recipe"):
        from fedml_pfedseq.console import quiet_libraries

        quiet_libraries()
    try:
        return HANDLERS[args.command](args) or 0  # a handler returns an exit code only where it can fail quietly
    except (UserError, FileNotFoundError, NotADirectoryError) as err:
        print(f"pfedseq: error: {one_line(err)}", file=sys.stderr)
        return 2


def one_line(err: Exception) -> str:
    """The message on one line (a FileNotFoundError from the OS names its file in ``filename``)."""
    text = str(err) if str(err) else type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())

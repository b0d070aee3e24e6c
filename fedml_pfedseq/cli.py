"""The ``pfedseq`` command: run a recipe, run a suite, or check a recipe without running it."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedml_pfedseq.config import RecipeError, load_recipe, load_yaml
from fedml_pfedseq.data.partition import PartitionError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pfedseq", description="Personalized federated adapter tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [("run", "run one recipe in the in-process simulator"),
                            ("suite", "run every recipe of a suite file and compare them"),
                            ("check", "load and validate a recipe (or suite), run nothing")]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("path", type=Path)
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a recipe key (repeatable), e.g. --set train_args.comm_round=3")
        if name != "check":
            p.add_argument("--output-dir", type=Path, default=None)
            p.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from fedml_pfedseq.simulation import run_recipe
    from fedml_pfedseq.suite import load_suite, run_suite

    try:
        if args.command == "run":
            run_recipe(load_recipe(args.path, args.overrides), args.output_dir, progress=not args.no_progress)
        elif args.command == "suite":
            run_suite(args.path, args.overrides, args.output_dir, progress=not args.no_progress)
        else:
            raw = load_yaml(args.path)
            is_suite = isinstance(raw, dict) and "recipes" in raw
            loaded = load_suite(args.path, args.overrides)[0] if is_suite else [load_recipe(args.path, args.overrides)]
            print(f"ok: {len(loaded)} recipe(s): {', '.join(r.name for r in loaded)}")
    except (RecipeError, PartitionError, FileNotFoundError) as err:
        print(f"pfedseq: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

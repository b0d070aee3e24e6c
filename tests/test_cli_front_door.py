"""The command line as a newcomer meets it: help with a place to start, every recipe key listed from the config
dataclasses (and the docs page generated from them kept current), and imports paid only by the commands that need
them."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedml_pfedseq import reference_docs
from fedml_pfedseq.algorithm_args import ALGORITHM_ARGS, LEARNER_ARCHITECTURES
from fedml_pfedseq.cli import build_parser, main
from fedml_pfedseq.config import SECTIONS, recipe_key_reference
from fedml_pfedseq.models.seq_learner import ARCHITECTURES
from fedml_pfedseq.strategies import METHODS

REPO = Path(__file__).resolve().parents[1]


def test_help_starts_with_a_first_run_and_every_option_is_explained(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "start here" in text and "pfedseq run omniglot_pfedseq --output-dir runs/first" in text
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    for name, command in sub.choices.items():
        for action in command._actions:
            assert action.help, f"pfedseq {name}: {action.option_strings or action.dest} has no help text"


def test_every_recipe_key_has_a_meaning_and_keys_prints_it(capsys):
    assert main(["keys", "--method", "pfedseq"]) == 0
    out = capsys.readouterr().out
    for cls in [*SECTIONS.values(), *(m.Args for m in METHODS.values())]:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no meaning"
    assert "warmup_rounds: int = 10\n      W: rounds that send only the global adapter" in out
    assert "algorithm_args (pFedSeq):" in out and "algorithm_args (Ditto)" not in out
    assert main(["keys", "--method", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_the_generated_reference_pages_are_current():
    assert reference_docs.stale() == [], "regenerate: pfedseq docs"
    assert recipe_key_reference(markdown=True) in (reference_docs.DOCS / "recipe-keys.md").read_text()


def test_docs_check_fails_naming_a_stale_page_or_count_and_docs_rewrites_it(tmp_path, monkeypatch, capsys):
    pages, prose = tmp_path / "reference", tmp_path / "repo"
    for name, _, _ in reference_docs.METHOD_COUNTS:
        (prose / name).parent.mkdir(parents=True, exist_ok=True)
        (prose / name).write_text((REPO / name).read_text())
    monkeypatch.setattr(reference_docs, "DOCS", pages)
    monkeypatch.setattr(reference_docs, "PROSE_ROOT", prose)
    assert main(["docs"]) == 0 and main(["docs", "--check"]) == 0
    assert sorted(p.name for p in pages.iterdir()) == sorted(["README.md", *reference_docs.PAGES])
    (pages / "methods.md").write_text((pages / "methods.md").read_text().replace("FedAvg", "FedSGD", 1))
    (pages / "api.md").unlink()
    readme, index, n = prose / "README.md", prose / "docs" / "index.md", len(METHODS)
    readme.write_text(readme.read_text().replace(f"Around it: {n - 1} other", "Around it: 99 other"))
    index.write_text(index.read_text().replace(f"Methods: {n} (", "Methods: 98 (").replace(f"the {n} registered",
                                                                                             "the 97 registered"))
    capsys.readouterr()
    assert main(["docs", "--check"]) == 1
    assert "['api.md', 'methods.md', 'README.md', 'docs/index.md']" in capsys.readouterr().err
    main(["docs"])
    assert main(["docs", "--check"]) == 0
    assert f"Around it: {n - 1} other methods" in readme.read_text()
    assert f"Methods: {n} (" in index.read_text() and f"the {n} registered methods" in index.read_text()


def test_check_names_ray_where_the_engine_needs_it_and_this_machine_lacks_it(monkeypatch, capsys):
    recipe = str(REPO / "recipes" / "omniglot_fedavg.yaml")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    assert main(["check", recipe]) == 0  # the local engine needs no Ray
    capsys.readouterr()
    assert main(["check", recipe, "--set", "common_args.engine=ray"]) == 2
    assert "Ray, which common_args.engine: ray needs: pip install '.[ray]'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["check", str(REPO / "recipes" / "omniglot_fedavg.yaml")]])
def test_help_and_a_failed_check_import_neither_torch_nor_fedml(argv, tmp_path):
    """`pfedseq --help` and a recipe refused by `check` answer without torch, transformers or FedML (seconds each)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("train_args: {comm_rounds: 3}\n")
    argv = argv if argv == ["--help"] else ["check", str(bad)]
    probe = ("import sys, runpy; sys.argv = ['pfedseq', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('fedml_pfedseq.cli', run_name='__main__')\n"
             "except SystemExit: pass\n"
             "print(sorted({'torch', 'transformers', 'fedml', 'peft'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=REPO)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr
    if argv[0] == "check":
        assert "unknown key 'comm_rounds' (did you mean 'comm_round'?)" in done.stderr


@pytest.mark.parametrize("argv", [["check", "recipes/omniglot_pfedseq.yaml"], ["check", "recipes/suites/default.yaml"],
                                  ["check", "recipes/grids/table1.yaml"], ["keys"]], ids=" ".join)
def test_check_and_keys_import_no_torch(argv, tmp_path):
    """`pfedseq check` (of a recipe, a suite or a grid) and `pfedseq keys` read algorithm_args from
    fedml_pfedseq.algorithm_args, not from the strategies: none of the libraries that take seconds to import."""
    for name in ("pacs112.parquet", "cifar10_test.parquet"):  # the check looks for the grid's data files
        (tmp_path / name).write_bytes(b"")
    probe = ("import sys\nfrom fedml_pfedseq.cli import main\nassert main(sys.argv[1:]) == 0\n"
             "print(sorted({'torch', 'transformers', 'peft', 'evaluate', 'datasets', 'fedml'}"
             " & {m.split('.')[0] for m in sys.modules}))")
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PFEDSEQ_DATA_DIR": str(tmp_path)})
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


def test_the_methods_read_without_importing_the_strategies_are_the_registered_ones():
    """``ALGORITHM_ARGS`` (read from the strategy files' ``METHOD`` lines, for torch-free recipe checks) holds the
    imported registry's methods, in its order (`pfedseq keys` lists them), each with its ``Args``; pFedSeq's
    architectures are the learner's."""
    assert [(m.name, m.Args) for m in METHODS.values()] == list(ALGORITHM_ARGS.items())
    assert LEARNER_ARCHITECTURES == ARCHITECTURES


@pytest.mark.slow
def test_check_names_the_data_and_backbone_this_machine_lacks(tmp_path, monkeypatch, capsys):
    grid = str(REPO / "recipes" / "grids" / "table1.yaml")  # PACS and CIFAR-10 from parquet files
    monkeypatch.setenv("PFEDSEQ_DATA_DIR", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *args, **kwargs: None)  # nothing cached
    assert main(["check", grid]) == 2
    err = capsys.readouterr().err
    assert "this machine lacks 2 input(s) of grid of" in err
    assert f"data file 'pacs112.parquet' not found in: {tmp_path}" in err and "'cifar10_test.parquet'" in err
    assert "omniglot28.parquet" not in err  # embedded in the repository
    for name in ("pacs112.parquet", "cifar10_test.parquet"):
        (tmp_path / name).write_bytes(b"")
    assert main(["check", grid]) == 0 and "ok: grid of" in capsys.readouterr().out
    recipe = str(REPO / "recipes" / "omniglot_fedavg.yaml")
    assert main(["check", recipe, "--set", "model_args.model=no-such-backbone"]) == 2
    assert "backbone 'no-such-backbone' is not a directory, not a model bundled" in capsys.readouterr().err
    # the paper-scale grid reads PACS and CIFAR-10 from the Hub: what a run would download is a note, not an error
    (tmp_path / "pacs112.parquet").unlink()
    assert main(["check", str(REPO / "recipes" / "grids" / "paper_scale" / "table1.yaml")]) == 0
    err = capsys.readouterr().err
    downloads = ("backbone 'google/vit-base-patch16-224-in21k'", "dataset 'flwrlabs/pacs'", "dataset 'uoft-cs/cifar10'")
    for note in downloads:
        assert f"pfedseq: note: a run will download {note} from the Hub" in err


def test_recipes_lists_every_shipped_file_and_recipe_prints_one_to_copy(capsys):
    """The package ships the checkout's recipes, suites and grids (fedml_pfedseq/assets/recipes links to them),
    each under the name every command takes."""
    from fedml_pfedseq.shipped import RECIPES_DIR, shipped_recipes

    files = sorted((REPO / "recipes").rglob("*.yaml"))
    assert RECIPES_DIR.resolve() == (REPO / "recipes").resolve()
    assert sorted(shipped_recipes()) == sorted(p.relative_to(REPO / "recipes").with_suffix("").as_posix()
                                               for p in files)
    assert main(["recipes"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "omniglot_pfedseq" in listed and "suites/default" in listed and "grids/paper_scale/table1" in listed
    assert main(["recipe", "omniglot_pfedseq"]) == 0
    assert capsys.readouterr().out == (REPO / "recipes" / "omniglot_pfedseq.yaml").read_text()
    assert main(["recipe", "omniglot_pfedsq"]) == 2
    assert "no shipped recipe 'omniglot_pfedsq' (did you mean omniglot_pfedseq" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["omniglot_pfedseq", "omniglot_pfedseq.yaml", "recipes/omniglot_pfedseq.yaml",
                                  "suites/default", "grids/rotated"])
def test_a_shipped_recipe_is_found_by_name_from_any_folder(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no recipes/ here
    monkeypatch.setenv("PFEDSEQ_DATA_DIR", str(tmp_path))
    (tmp_path / "cifar10_test.parquet").write_bytes(b"")  # the rotated grid's data file, looked for only
    assert main(["check", name]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("ok: ")
    (tmp_path / "omniglot_pfedseq.yaml").write_text("train_args: {comm_round: 1}\n")  # a file wins over the name
    assert main(["check", "omniglot_pfedseq.yaml"]) == 0
    assert "1 recipe(s): omniglot_pfedseq" in capsys.readouterr().out
    assert main(["check", "omniglot_nothing"]) == 2
    assert "recipe file not found: omniglot_nothing" in capsys.readouterr().err


def test_the_package_finds_its_backbone_data_and_card_template_through_its_own_assets():
    from fedml_pfedseq.data.loading import EMBEDDED_DATA_DIR
    from fedml_pfedseq.hub.card import TEMPLATE
    from fedml_pfedseq.inputs import bundled_models, resolve_backbone
    from fedml_pfedseq.shipped import ASSETS

    assert bundled_models() == ["vit-small-cifar10"]
    assert Path(resolve_backbone("vit-small-cifar10")).parent == ASSETS / "hf_models"
    assert EMBEDDED_DATA_DIR == ASSETS / "data" and (EMBEDDED_DATA_DIR / "omniglot28.parquet").is_file()
    assert TEMPLATE.is_relative_to(ASSETS) and TEMPLATE.is_file()

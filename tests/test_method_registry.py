"""A method is one strategy file (docs/adding-a-method.md): the registry is read from the files themselves, and a
file that registers no method, or has no recipe, fails here."""
from __future__ import annotations

import shutil

import pytest

from fedml_pfedseq.algorithm_args import STRATEGIES, DittoArgs, NoArgs, registered_methods
from fedml_pfedseq.config import load_recipe
from fedml_pfedseq.shipped import RECIPES_DIR as RECIPES
from fedml_pfedseq.strategies import METHODS
from fedml_pfedseq.strategies import __path__ as strategies_path


def strategy_modules() -> list[str]:
    return sorted(path.stem for path in STRATEGIES.glob("*.py") if path.name != "__init__.py")


def test_every_strategy_module_registers_a_method_and_ships_its_recipe():
    """Each module has recipes/omniglot_<module>.yaml running its method (what the docs, the grids and the tests
    start from)."""
    assert len(METHODS) == len(strategy_modules())
    for module, method in zip(strategy_modules(), METHODS.values()):
        recipe = RECIPES / f"omniglot_{module}.yaml"
        assert recipe.is_file(), f"fedml_pfedseq/strategies/{module}.py has no recipe recipes/{recipe.name}"
        assert load_recipe(recipe).train_args.federated_optimizer == method.name, recipe


def copy_of_strategies(tmp_path):
    folder = tmp_path / "strategies"
    shutil.copytree(strategies_path[0], folder, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def test_a_new_strategy_file_is_a_registered_method_with_its_args(tmp_path):
    folder = copy_of_strategies(tmp_path)
    (folder / "mine.py").write_text('"""Mine."""\nMETHOD = Method("Mine", FedAvgServer, DittoClient, Args=DittoArgs)\n')
    (folder / "plain.py").write_text('METHOD = Method("Plain", FedAvgServer, FedAvgClient)\n')
    found = registered_methods(folder)
    modules = sorted([*strategy_modules(), "mine", "plain"])
    assert [list(found).index(name) for name in ("Mine", "Plain")] == [modules.index("mine"), modules.index("plain")]
    assert found["Mine"] is DittoArgs and found["Plain"] is NoArgs
    assert len(found) == len(METHODS) + 2


@pytest.mark.parametrize("text, problem", [
    ('"""A helper with no method."""\n', "registers no method"),
    ('NAME = "Mine"\nMETHOD = Method(NAME, S, C)\n', "first argument must be the method's name as a string literal"),
    ('METHOD = Method("Mine", S, C, Args=MineArgs)\n', "Args=MineArgs is not a dataclass of"),
    ('METHOD = Method("fedavg", S, C)\n', "registers the method 'fedavg' a second time"),
])
def test_a_strategy_file_the_registry_cannot_read_is_refused_naming_it(tmp_path, text, problem):
    folder = copy_of_strategies(tmp_path)
    (folder / "zz_mine.py").write_text(text)
    with pytest.raises(ImportError, match="fedml_pfedseq/strategies/zz_mine.py") as refused:
        registered_methods(folder)
    assert problem in str(refused.value)

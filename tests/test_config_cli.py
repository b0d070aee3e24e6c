"""Recipes and the CLI: every shipped recipe loads; bad recipes stop with a message naming the problem."""
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from fedml_pfedseq.cli import main
from fedml_pfedseq.config import SECTIONS, RecipeError, load_recipe
from fedml_pfedseq.strategies import METHODS

REPO = Path(__file__).resolve().parents[1]
GOOD = REPO / "recipes" / "omniglot_fedavg.yaml"


def write_recipe(tmp_path, mutate) -> Path:
    raw = yaml.safe_load(GOOD.read_text())
    mutate(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("path", sorted((REPO / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_and_suite_checks(path, capsys):
    assert main(["check", str(path)]) == 0
    assert capsys.readouterr().out.startswith("ok:")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_key_names_are_unique_across_sections_because_fedml_flattens_them(method):
    """A recipe holds one method's algorithm_args, so each method's keys must differ from every section's."""
    names = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    names += [f.name for f in dataclasses.fields(METHODS[method].Args)]
    assert len(names) == len(set(names))


def test_overrides_reach_the_recipe():
    recipe = load_recipe(GOOD, ["train_args.comm_round=3", "data_args.split_fractions=[0.8, 0.1, 0.1]"])
    assert recipe.train_args.comm_round == 3 and recipe.data_args.split_fractions == [0.8, 0.1, 0.1]


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["train_args"].update(comm_rounds=5), "unknown key 'comm_rounds' (did you mean 'comm_round'?)"),
    (lambda r: r.update(train_arg={}), "unknown section 'train_arg' (did you mean 'train_args'?)"),
    (lambda r: r["train_args"].update(comm_round=0), "train_args.comm_round must be >= 1"),
    (lambda r: r["train_args"].update(comm_round="ten"), "train_args.comm_round: expected int"),
    (lambda r: r["train_args"].update(learning_rate=-0.1), "train_args.learning_rate must be > 0"),
    (lambda r: r["data_args"].update(split_fractions=[0.5, 0.1, 0.1]), "split_fractions must be three"),
    (lambda r: r["train_args"].update(client_num_per_round=30), "exceeds client_num_in_total"),
    (lambda r: r["train_args"].update(federated_optimizer="FedAwg"), "unknown method 'FedAwg'"),
    (lambda r: r["data_args"].update(partition_method="random"),
     "partition_method must be 'column', 'dirichlet' or 'silo'"),
    (lambda r: r.update(algorithm_args={"beta": 1}), "algorithm_args: unknown key 'beta'"),
])
def test_bad_recipes_fail_with_the_key_named(tmp_path, mutate, message):
    path = write_recipe(tmp_path, mutate)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert message in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("section, values, key", [
    ("common_args", {"training_type": "cross_device"}, "common_args.training_type"),
    ("data_args", {"partition_alpha": 0.0}, "data_args.partition_alpha"),
    ("data_args", {"partition_method": "silo"}, "data_args.data_files"),
    ("model_args", {"lora_target_modules": []}, "model_args.lora_target_modules"),
    ("train_args", {"client_num_in_total": 3, "client_num_per_round": 4}, "train_args.client_num_per_round"),
    ("validation_args", {"frequency_of_the_test": 0}, "validation_args.frequency_of_the_test"),
    ("device_args", {"mixed_precision": "fp8"}, "device_args.mixed_precision"),
    ("comm_args", {"upload_timeout": 1000.0}, "comm_args.upload_timeout"),
    ("hub_args", {"push_to_hub": True}, "hub_args.hub_repo_id"),
])
def test_each_section_checks_its_own_keys_when_built(section, values, key):
    """A section dataclass refuses its own impossible values in __post_init__, also when code builds it directly."""
    with pytest.raises(RecipeError, match=re.escape(key)):
        SECTIONS[section](**values)


def test_rules_across_sections_are_checked_with_the_whole_recipe(tmp_path):
    path = write_recipe(tmp_path, lambda r: r.setdefault("hub_args", {}).update(hub_learner_init="me/learner"))
    with pytest.raises(RecipeError, match=f"{re.escape(str(path))}: hub_args.hub_learner_init warm-starts pFedSeq"):
        load_recipe(path)


def test_cli_reports_errors_on_stderr_and_exits_2(tmp_path, capsys):
    assert main(["check", str(tmp_path / "missing.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("train_args: [unclosed\n")
    assert main(["check", str(broken)]) == 2
    assert "malformed YAML" in capsys.readouterr().err
    bad = write_recipe(tmp_path, lambda r: r["train_args"].update(epochs=0))
    assert main(["run", str(bad)]) == 2
    assert "train_args.epochs must be >= 1" in capsys.readouterr().err


def test_missing_data_file_names_every_place_searched(tmp_path, capsys, tiny_vit):
    recipe = write_recipe(tmp_path, lambda r: (r["data_args"].update(dataset="pacs", data_dir=str(tmp_path),
                                                                   partition_column="domain"),
                                               r["model_args"].update(model=tiny_vit)))
    assert main(["run", str(recipe), "--set", "train_args.client_num_in_total=4",
                 "--set", "train_args.client_num_per_round=4", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pacs112.parquet" in err and str(tmp_path) in err


def test_suite_with_a_bad_recipe_fails_before_running_anything(tmp_path, capsys):
    bad = write_recipe(tmp_path, lambda r: r["model_args"].update(lora_rank=8))
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"recipes": [str(GOOD), bad.name], "output_dir": str(tmp_path / "out")}))
    assert main(["suite", str(suite)]) == 2
    assert "unknown key 'lora_rank' (did you mean 'lora_r'?)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_backbone_fails_at_once_naming_the_bundled_models(tmp_path, capsys):
    recipe = write_recipe(tmp_path, lambda r: r["model_args"].update(model="vit-does-not-exist"))
    assert main(["run", str(recipe), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "backbone 'vit-does-not-exist' is not a directory" in err and "owner/name" in err


def test_variant_suite_entries_override_one_recipe_each():
    from fedml_pfedseq.suite import load_suite

    recipes, _ = load_suite(REPO / "recipes/suites/pfedseq_variants.yaml")
    by_name = {r.name: r.algorithm_args for r in recipes}
    assert by_name["omniglot_pfedseq"].global_aggregation and by_name["omniglot_pfedseq"].seq_len == 6
    assert not by_name["variant_a_no_global_aggregation"].global_aggregation
    assert by_name["variant_b_no_cross_step"].seq_len == 1
    assert not by_name["variant_c_no_cross_client"].cross_client
    assert by_name["variant_d_mlp_learner"].learner_architecture == "mlp"
    assert by_name["variant_e_lstm_learner"].learner_architecture == "lstm"


@pytest.mark.parametrize("entry, message", [
    ({"recipe": "omniglot_fedavg.yaml", "sett": []}, "recipes\\[0\\]: expected a path or a mapping"),
    ({"recipe": "omniglot_fedavg.yaml", "set": "x=1"}, "'set' must be a list"),
    ({"recipe": "omniglot_fedavg.yaml", "set": ["algorithm_args.seq_len=1"]}, "unknown key 'seq_len'"),
])
def test_bad_suite_entries_are_named(tmp_path, capsys, entry, message):
    suite = tmp_path / "suite.yaml"
    entry = {**entry, "recipe": str(GOOD)}
    suite.write_text(yaml.safe_dump({"recipes": [entry]}))
    assert main(["check", str(suite)]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_two_runs_of_a_suite_may_not_share_a_name(tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"recipes": [str(GOOD), str(GOOD)]}))
    assert main(["check", str(suite)]) == 2
    assert "share a name" in capsys.readouterr().err


def test_exponent_floats_without_a_dot_are_numbers_in_recipes_and_overrides(tmp_path):
    """PyYAML reads `1e-3` as a string (YAML 1.1); a float key takes it as the number, a str key keeps the text."""
    path = tmp_path / "r.yaml"
    path.write_text("train_args: {federated_optimizer: pFedSeq, learning_rate: 5e-2}\n"
                    "common_args: {federated_scenario: 1e-2}\n")
    recipe = load_recipe(path, ["algorithm_args.learner_lr=1e-2"])
    assert recipe.train_args.learning_rate == 0.05 and recipe.algorithm_args.learner_lr == 0.01
    assert recipe.common_args.federated_scenario == "1e-2"
    with pytest.raises(RecipeError, match="expected float, got 'fast'"):
        load_recipe(path, ["algorithm_args.learner_lr=fast"])

"""Checkpoint and resume: a run cut short and resumed continues exactly as the uninterrupted run, for every method;
the file is written atomically, holds no pickle, and a checkpoint from another run is refused."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import small_recipe, three_clients

from fedml_pfedseq import checkpoint as ckpt
from fedml_pfedseq.checkpoint import CheckpointError, read_checkpoint
from fedml_pfedseq.cli import main
from fedml_pfedseq.federation import build_federation
from fedml_pfedseq.simulation import CHECKPOINT_FILE, resume_federation, run_federation, run_recipe
from fedml_pfedseq.strategies import METHODS


def small(method: str, tiny_vit: str, tmp_path: Path, rounds: int, learning_rate: float = 0.5, **algorithm_args):
    """``three_clients`` with 30 drawings per drawer, ``rounds`` rounds at ``learning_rate``."""
    return three_clients(method, tiny_vit, tmp_path, algorithm_args=algorithm_args,
                         data_args={"samples_per_client": 30},
                         train_args={"learning_rate": learning_rate, "comm_round": rounds})


class Crash(Exception):
    """Stands in for a killed process."""


def crash_before_aggregating(round_idx: int):
    def hook(t_minus_1: int, log) -> None:
        if t_minus_1 + 1 == round_idx:
            raise Crash(f"killed in round {round_idx}")
    return hook


def decoded(path: Path) -> dict:
    """A checkpoint's content with tensors in place."""
    skeleton, decode = read_checkpoint(path)
    content = {"parts": skeleton["parts"], "extra": decode(skeleton["extra"])}
    for name, part in content["parts"].items():
        content["parts"][name] = {key: tree(node, decode) for key, node in part.items()}
    return content


def tree(node, decode):
    """Modules and optimisers' saved state_dicts decoded too."""
    if isinstance(node, dict) and ("__module__" in node or "__optimizer__" in node):
        return decode(node.get("__module__", node.get("__optimizer__")))
    return decode(node)


def assert_same(a, b, where="") -> None:
    """Equal to the bit, except wall-clock timings (keys ending in _seconds)."""
    if where.endswith("_seconds"):
        return
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)) or type(a).__name__ == "deque":
        assert type(a) is type(b) and len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{k}]")
    elif hasattr(a, "__dataclass_fields__"):
        assert_same(vars(a), vars(b), where)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def interrupted_and_resumed(recipe, tmp_path: Path, crash_round: int) -> Path:
    """Run ``recipe`` until it is killed in ``crash_round``, then resume it in a freshly built federation."""
    path = tmp_path / "resumed" / CHECKPOINT_FILE
    with pytest.raises(Crash):
        run_federation(build_federation(recipe), progress=False, checkpoint=path,
                       before_aggregation=crash_before_aggregating(crash_round))
    assert read_checkpoint(path)[1](read_checkpoint(path)[0]["extra"])["round"] == crash_round - 1
    fed = build_federation(recipe)
    run_federation(fed, progress=False, checkpoint=path, resumed=resume_federation(path, fed))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_resumes_to_the_uninterrupted_run(method, matrix_reference, tmp_path):
    """3 rounds uninterrupted (the matrix's reference run) == 2 rounds, killed, resumed for the third: same metrics,
    payloads, every strategy's state (learners, optimisers, histories, personal models, heads) to the bit."""
    recipe, reference = matrix_reference(method)
    resumed = interrupted_and_resumed(recipe, tmp_path, crash_round=3)
    assert_same(decoded(reference / CHECKPOINT_FILE), decoded(resumed))


def test_the_cluster_oracle_resumes_to_the_uninterrupted_run(tiny_vit, tmp_path):
    """FedAvg with local heads told the clusters (oracle_clusters): the per-cluster adapters it sent before the
    kill are what the resumed run starts from."""
    recipe = small_recipe("FedAvgLocalHead", tiny_vit, tmp_path, algorithm_args={"oracle_clusters": True},
                          data_args={"partition_method": "dirichlet", "partition_alpha": 0.5, "samples_per_client": 30,
                                     "cluster_transforms": ["identity", "rot90"]},
                          train_args={"client_num_in_total": 3, "learning_rate": 0.5, "comm_round": 3},
                          device_args={"num_threads": 1, "using_gpu": False})
    straight = tmp_path / "straight" / CHECKPOINT_FILE
    run_federation(build_federation(recipe), progress=False, checkpoint=straight)
    resumed = interrupted_and_resumed(recipe, tmp_path, crash_round=3)
    a = decoded(straight)
    assert_same(a, decoded(resumed))
    sent = a["parts"]["server"]["sent"]
    lora = lambda i: torch.cat([v.reshape(-1) for v in sent[i]["lora"].values()])  # noqa: E731
    assert torch.equal(lora(0), lora(2)) and not torch.equal(lora(0), lora(1))  # one adapter per cluster


@pytest.mark.slow
def test_pfedseq_six_rounds_equal_three_plus_resume_plus_three(tiny_vit, tmp_path):
    """The issue's check on pFedSeq with the learner personalizing on both sides of the cut (W=1, L=3): the
    metrics and the final learner, Adam state, history and calibrations equal."""
    recipe = small("pFedSeq", tiny_vit, tmp_path, rounds=6, warmup_rounds=1, seq_len=3)
    straight = tmp_path / "straight"
    fed = build_federation(recipe)
    log = run_federation(fed, progress=False, checkpoint=straight / CHECKPOINT_FILE)
    resumed = interrupted_and_resumed(recipe, tmp_path, crash_round=4)
    a, b = decoded(straight / CHECKPOINT_FILE), decoded(resumed)
    assert_same(a, b)
    assert a["extra"]["log"]["rows"] == [row for row in log.rows if row["round"] < 6]  # then the final evaluation
    server = a["parts"]["server"]
    assert server["round"] == 6 and len(server["history"]) == 3 and server["calibrations"] is not None
    assert any(v.abs().sum() > 0 for v in server["optimizer"]["state"][0].values())  # Adam moments were saved


def test_run_recipe_resume_writes_the_same_outputs(tiny_vit, tmp_path):
    """`run_recipe(resume=True)` after a kill gives the uninterrupted run's summary (CLI: `pfedseq run --resume`);
    a finished run extended by one round equals the longer run where the method does not read comm_round."""
    recipe = small("FedAvg", tiny_vit, tmp_path, rounds=3)
    expected = run_recipe(recipe, tmp_path / "straight", progress=False)
    shorter = small("FedAvg", tiny_vit, tmp_path, rounds=2)
    run_recipe(shorter, tmp_path / "extended", progress=False)
    extended = run_recipe(recipe, tmp_path / "extended", progress=False, resume=True)
    for key in ("final_test_accuracy_mean", "final_test_accuracy_std", "final_validation_accuracy_mean", "rounds"):
        assert extended[key] == expected[key]
    metrics = json.loads((tmp_path / "extended" / "metrics.json").read_text())
    assert sorted({r["round"] for r in metrics["eval"]}) == [0, 1, 2, 3]


@pytest.mark.slow
def test_a_resumed_run_does_not_read_the_learners_warm_start_source_again(tiny_vit, tmp_path):
    """The checkpoint holds the learner, so a run warm-started by ``hub_args.hub_learner_init`` resumes after its
    source is gone (a deleted folder, an offline Hub) and gives the uninterrupted run's outputs."""
    source = tmp_path / "source"
    run_recipe(small("pFedSeq", tiny_vit, tmp_path, rounds=1), source, progress=False)  # writes seq_learner/

    def warm(rounds: int):
        recipe = small("pFedSeq", tiny_vit, tmp_path, rounds=rounds)
        return dataclasses.replace(recipe, hub_args=dataclasses.replace(recipe.hub_args,
                                                                        hub_learner_init=str(source)))

    expected = run_recipe(warm(3), tmp_path / "straight", progress=False)
    run_recipe(warm(2), tmp_path / "extended", progress=False)
    shutil.rmtree(source)
    extended = run_recipe(warm(3), tmp_path / "extended", progress=False, resume=True)
    assert extended["final_test_accuracy_mean"] == expected["final_test_accuracy_mean"]

    def final_losses(run: str) -> list[float]:
        rows = json.loads((tmp_path / run / "metrics.json").read_text())["eval"]
        return [r["test_loss"] for r in rows if r["round"] == 3]

    assert final_losses("extended") == final_losses("straight")


def test_cli_resume(tiny_vit, tmp_path, capsys):
    recipe_file = tmp_path / "r.yaml"
    recipe = small("FedAvgLocalHead", tiny_vit, tmp_path, rounds=1)
    import yaml
    recipe_file.write_text(yaml.safe_dump(recipe.to_dict()))
    out = tmp_path / "run"
    assert main(["run", str(recipe_file), "--output-dir", str(out), "--no-progress"]) == 0
    assert main(["run", str(recipe_file), "--output-dir", str(out), "--no-progress", "--resume",
                 "--set", "train_args.comm_round=2"]) == 0
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2
    assert main(["run", str(recipe_file), "--output-dir", str(tmp_path / "none"), "--resume"]) == 2
    assert "cannot resume: no checkpoint.safetensors" in capsys.readouterr().err


# --- refusals and atomicity ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tiny_vit, tmp_path_factory):
    """A 1-round FedAvg run with its checkpoint."""
    tmp_path = tmp_path_factory.mktemp("finished")
    recipe = small("FedAvg", tiny_vit, tmp_path, rounds=1)
    run_recipe(recipe, tmp_path / "run", progress=False)
    return recipe, tmp_path / "run"


def test_resume_with_another_recipe_is_refused_naming_the_key(finished, tiny_vit, tmp_path):
    recipe, run = finished
    other = small("FedAvg", tiny_vit, tmp_path, rounds=2, learning_rate=0.1)
    with pytest.raises(CheckpointError, match=r"train_args.learning_rate: 0.5 -> 0.1"):
        resume_federation(run / CHECKPOINT_FILE, build_federation(other))


def test_resume_of_another_method_is_refused_naming_the_keys(finished, tiny_vit, tmp_path):
    _, run = finished
    other = small("pFedSeq", tiny_vit, tmp_path, rounds=2)
    with pytest.raises(CheckpointError, match=r"train_args.federated_optimizer: 'FedAvg' -> 'pFedSeq'"):
        resume_federation(run / CHECKPOINT_FILE, build_federation(other))


def test_a_crash_while_writing_keeps_the_previous_checkpoint(finished, tmp_path):
    recipe, run = finished
    path = tmp_path / CHECKPOINT_FILE
    path.write_bytes((run / CHECKPOINT_FILE).read_bytes())
    before = path.read_bytes()
    fed = build_federation(recipe)

    def half_written(tensors, filename, metadata):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError("disk full")

    with mock.patch.object(ckpt, "save_file", half_written), pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, {"server": fed.server}, {"round": 2})
    assert path.read_bytes() == before
    assert read_checkpoint(path)[0]["parts"].keys() == {"server", "client_0", "client_1", "client_2"}


def test_a_damaged_or_foreign_file_is_refused(tmp_path):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        read_checkpoint(damaged)
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="is not a pfedseq-checkpoint/1 checkpoint"):
        read_checkpoint(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        read_checkpoint(tmp_path / "missing.safetensors")


def test_only_this_packages_dataclasses_are_rebuilt():
    decode = ckpt._Decoder({})
    with pytest.raises(CheckpointError, match="refusing to rebuild os:PathLike"):
        decode({"__dataclass__": "os:PathLike", "fields": {}})


def test_an_unsupported_attribute_is_named():
    class Strategy:
        def __init__(self):
            self.handle = open(__file__)

    strategy = Strategy()
    with pytest.raises(CheckpointError, match=r"server.handle: cannot checkpoint a TextIOWrapper"):
        ckpt.save_checkpoint(Path("unused"), {"server": strategy}, {})
    strategy.handle.close()


def retag(path: Path, device: str) -> None:
    """Rewrite a checkpoint as if every non-generator tensor had been saved from ``device`` (a GPU run's file)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    skeleton = json.loads(metadata["skeleton"])

    def walk(node):
        if isinstance(node, dict):
            if "__tensor__" in node:
                node["device"] = device
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(skeleton["parts"])
    walk(skeleton["extra"])
    save_file(tensors, str(path), metadata={**metadata, "skeleton": json.dumps(skeleton)})


class Holder:
    """A strategy-like object with one tensor attribute."""

    def __init__(self, tensor: torch.Tensor):
        self.weights = tensor


def test_a_checkpoint_written_on_a_gpu_restores_onto_this_processes_device(tmp_path):
    path = tmp_path / CHECKPOINT_FILE
    ckpt.save_checkpoint(path, {"server": Holder(torch.arange(4.0))}, {"round": 3, "payload": torch.ones(2)})
    retag(path, "cuda:0")
    assert read_checkpoint(path)[0]["parts"]["server"]["weights"]["device"] == "cuda:0"

    here = Holder(torch.zeros(4))
    extra = ckpt.load_checkpoint(path, {"server": here})  # no GPU here: restoring to cuda:0 would raise
    assert here.weights.device.type == "cpu" and torch.equal(here.weights, torch.arange(4.0))
    assert extra["payload"].device.type == "cpu" and extra["round"] == 3

    # onto whatever device the process runs on (meta stands in for a GPU); CPU-saved generator states stay put
    on_meta = Holder(torch.zeros(4))
    extra = ckpt.load_checkpoint(path, {"server": on_meta}, device="meta")
    assert on_meta.weights.device.type == "meta" and extra["payload"].device.type == "meta"
    assert torch.get_rng_state().device.type == "cpu"


def test_a_gpu_written_run_checkpoint_resumes_on_cpu(tiny_vit, tmp_path):
    recipe = small("pFedSeq", tiny_vit, tmp_path, rounds=2, warmup_rounds=1)
    run = tmp_path / "run"
    whole = run_recipe(recipe, run, progress=False)
    partial = tmp_path / "partial"
    run_recipe(small("pFedSeq", tiny_vit, tmp_path, rounds=1, warmup_rounds=1), partial, progress=False)
    retag(partial / CHECKPOINT_FILE, "cuda:0")
    resumed = run_recipe(recipe, partial, progress=False, resume=True)
    assert resumed["final_test_accuracy_mean"] == whole["final_test_accuracy_mean"]
    assert_same(json.loads((partial / "metrics.json").read_text()), json.loads((run / "metrics.json").read_text()))

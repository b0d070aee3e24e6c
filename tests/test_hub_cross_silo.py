"""Pushing a cross-silo deployment: real party processes (``pfedseq deploy``, gRPC on 127.0.0.1) each push their own
share of the run to a Hub-compatible endpoint on 127.0.0.1; client k's adapter arrives in client k's own commit, the
server's commit holds no client's files, and a fresh process reloads each client with the accuracy it reported."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import hub_environment, small_recipe
from huggingface_hub import HfApi, ModelCard
from test_hub import closed_port

from fedml_pfedseq.cross_silo.launcher import deploy
from fedml_pfedseq.hub import PushError
from fedml_pfedseq.testing.hub_server import LocalHubServer

REPO = "local-user/omniglot-pfedseq-cross-silo"
CLIENTS = 2
CLIENT_FILES = {"adapter_config.json", "adapter_model.safetensors", "head.safetensors", "head_config.json",
                "splits.json", "client.json"}
SRC = Path(__file__).resolve().parents[1]


def silo_recipe(tiny_vit, tmp_path, rounds: int):
    """pFedSeq on two clients of a Dirichlet split of the embedded Omniglot, personalized from round 2 (W=1)."""
    return small_recipe(
        "pFedSeq", tiny_vit, tmp_path,
        data_args={"partition_method": "dirichlet", "partition_alpha": 0.5, "samples_per_client": 40},
        train_args={"client_num_in_total": CLIENTS, "comm_round": rounds, "learning_rate": 0.5},
        device_args={"num_threads": 1}, algorithm_args={"warmup_rounds": 1, "seq_len": 2},
        hub_args={"push_to_hub": True, "hub_repo_id": REPO, "hub_push_every": 1})


def reported(run_dir: Path, round_idx: int = 2) -> dict[int, dict]:
    """Each client party's evaluation row of ``round_idx`` (default: the final one), from its own metrics file."""
    rows = {}
    for k in range(CLIENTS):
        eval_rows = json.loads((run_dir / "parties" / f"client_{k}" / "metrics.json").read_text())["eval"]
        (rows[k],) = [r for r in eval_rows if r["round"] == round_idx]
    return rows


@pytest.fixture(scope="module")
def deployed(tiny_vit, tmp_path_factory):
    """One 2-round deployment whose three parties push to a local endpoint, after round 1 and at the end."""
    root = tmp_path_factory.mktemp("hub_cross_silo")
    server = LocalHubServer(root / "repos").start()
    with pytest.MonkeyPatch.context() as mp:
        env = hub_environment(mp, server.url, root / "cache")
        summary = deploy(silo_recipe(tiny_vit, root, rounds=2), root / "out", progress=False)
    yield SimpleNamespace(server=server, run_dir=root / "out", summary=summary, env=env, root=root)
    server.stop()


@pytest.fixture
def hub_env(deployed, monkeypatch, tmp_path):
    return hub_environment(monkeypatch, deployed.server.url, tmp_path / "cache")


def touched(api: HfApi, commit: str, parent: str) -> set[str]:
    """The paths a commit added, changed or deleted: its tree against its parent's."""
    def tree(revision: str) -> dict[str, str]:
        return {f.path: f.blob_id for f in api.list_repo_tree(REPO, recursive=True, revision=revision)
                if f.__class__.__name__ == "RepoFile"}

    before, after = tree(parent), tree(commit)
    return {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}


def party_commits(api: HfApi) -> list[tuple[str, str, set[str]]]:
    """(title, commit id, paths it touched) of every commit after the repo's creation, oldest first."""
    commits = api.list_repo_commits(REPO)[::-1]
    return [(c.title, c.commit_id, touched(api, c.commit_id, parent.commit_id))
            for parent, c in zip(commits, commits[1:])]


@pytest.mark.slow
@pytest.mark.parametrize("when", ["checkpoint after round 1", "final"])
def test_each_party_pushes_only_its_own_share_in_its_own_commit(deployed, hub_env, when):
    commits = party_commits(HfApi())
    assert len(commits) == 2 * (1 + CLIENTS)  # per party: its checkpoint after round 1, then its final push
    checkpoints = 1 + CLIENTS
    assert all("checkpoint after round 1" in title for title, _, _ in commits[:checkpoints])  # then the final ones
    by_title = {t: paths for t, _, paths in (commits[checkpoints:] if when == "final" else commits[:checkpoints])}
    for k in range(CLIENTS):
        (title,) = [t for t in by_title if f"cross-silo client {k}" in t]
        own = {f"adapters/client_{k}/{name}" for name in CLIENT_FILES}
        changed = {f"adapters/client_{k}/{name}" for name in ("adapter_model.safetensors", "head.safetensors",
                                                              "client.json")}  # the config stays as it was
        assert by_title[title] == own if when != "final" else changed <= by_title[title] <= own
    (server_title,) = [t for t in by_title if "cross-silo server" in t]
    server_paths = by_title[server_title]
    assert not [p for p in server_paths if p.startswith(("adapters/client_", "parties/", "logs/", "hub_checkpoint/"))]
    assert not server_paths & {"metrics.json", "summary.json", "grpc_ipconfig.csv"}
    trained = {"server_metrics.csv", "adapters/global/adapter_model.safetensors", "seq_learner/model.safetensors"}
    first = {"README.md", "recipe.yaml", "adapters/manifest.json", "backbone/model.safetensors"}  # then unchanged
    assert server_paths >= (trained if when == "final" else trained | first)


def test_the_deploy_folder_is_the_simulators_run_folder_with_each_clients_accuracy(deployed):
    manifest = json.loads((deployed.run_dir / "adapters" / "manifest.json").read_text())
    assert "party" not in manifest and [c["client"] for c in manifest["clients"]] == list(range(CLIENTS))
    for k, row in reported(deployed.run_dir).items():
        entry = manifest["clients"][k]
        assert (entry["test_accuracy"], entry["validation_accuracy"], entry["test_samples"]) == \
            (row["test_accuracy"], row["validation_accuracy"], row["test_samples"])
        assert {p.name for p in (deployed.run_dir / "adapters" / f"client_{k}").iterdir()} == CLIENT_FILES


@pytest.mark.parametrize("round_idx", [1, 2])
@pytest.mark.slow
def test_a_fresh_process_reloads_each_client_with_the_accuracy_it_reported(deployed, hub_env, round_idx):
    """Round 2: the repo's head; round 1: the revision once every party's checkpoint after round 1 has landed."""
    revision = party_commits(HfApi())[CLIENTS][1] if round_idx == 1 else None
    code = f"""
import json
from fedml_pfedseq.hub.load import evaluate_client, recipe_from_repo
recipe = recipe_from_repo("{REPO}", ["device_args.num_threads=1"], revision={revision!r})
print(json.dumps([evaluate_client("{REPO}", k, recipe, revision={revision!r}) for k in range({CLIENTS})]))
"""
    done = subprocess.run([sys.executable, "-c", code], env=hub_env, capture_output=True, text=True, timeout=300,
                          cwd=SRC)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for k, row in reported(deployed.run_dir, round_idx).items():
        assert results[k]["accuracy"] == results[k]["reported_accuracy"] == row["test_accuracy"]
        assert (results[k]["loss"], results[k]["samples"]) == (row["test_loss"], row["test_samples"])


def test_the_servers_card_says_where_each_clients_accuracy_is(deployed, hub_env):
    card = ModelCard.load(REPO)
    card.validate()
    assert card.data.library_name == "peft" and not card.data.eval_results
    for needle in ("cross-silo deployment", "adapters/client_1/client.json", "pFedSeq",
                   "PeftConfig.from_pretrained(client)"):
        assert needle in card.text, needle
    manifest = json.loads(Path(HfApi().hf_hub_download(REPO, "adapters/manifest.json")).read_text())
    assert manifest["party"] == "server" and manifest["clients"] == [
        {"client": k, "path": f"adapters/client_{k}"} for k in range(CLIENTS)]


@pytest.mark.slow
def test_an_endpoint_that_is_down_is_a_clear_error_and_keeps_every_partys_files(deployed, tiny_vit, tmp_path,
                                                                                 monkeypatch):
    down = f"http://127.0.0.1:{closed_port()}"
    hub_environment(monkeypatch, down, tmp_path / "cache")
    run_dir = tmp_path / "out"
    with pytest.raises(PushError) as err:
        deploy(silo_recipe(tiny_vit, tmp_path, rounds=1), run_dir, progress=False)
    message = str(err.value)
    assert "server, client_0, client_1 could not push" in message
    assert down in message and REPO in message and f"pfedseq push {run_dir} --repo-id {REPO}" in message
    manifest = json.loads((run_dir / "adapters" / "manifest.json").read_text())
    assert [c["test_accuracy"] for c in manifest["clients"]] == \
        [r["test_accuracy"] for r in reported(run_dir, round_idx=1).values()]
    for k in range(CLIENTS):
        assert {p.name for p in (run_dir / "adapters" / f"client_{k}").iterdir()} == CLIENT_FILES
    assert (run_dir / "summary.json").is_file() and (run_dir / "seq_learner" / "model.safetensors").is_file()


def test_the_endpoint_serialises_concurrent_creates_and_commits(tmp_path):
    with LocalHubServer(tmp_path / "repos") as hub:
        api = HfApi(endpoint=hub.url, token="dummy")

        def party(k: int) -> None:
            api.create_repo("local-user/race", exist_ok=True)
            api.upload_file(path_or_fileobj=str(k).encode(), path_in_repo=f"adapters/client_{k}/x.json",
                            repo_id="local-user/race", commit_message=f"client {k}")

        threads = [threading.Thread(target=party, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(api.list_repo_files("local-user/race")) == [f"adapters/client_{k}/x.json" for k in range(8)]
        assert len(api.list_repo_commits("local-user/race")) == 1 + 8

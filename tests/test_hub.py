"""Sharing on the Hub, offline: a run's adapters on disk in PEFT format, pushed to a Hub-compatible endpoint on
127.0.0.1 with the real ``huggingface_hub`` client, loaded back through PEFT in a fresh process with identical
logits and the reported accuracy; failures (endpoint down, refusing, a commit breaking off) keep everything intact."""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, run_shipped_recipe
from huggingface_hub import HfApi, ModelCard, constants
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ViTForImageClassification

from fedml_pfedseq.cli import main
from fedml_pfedseq.config import RecipeError, load_recipe, parse_recipe
from fedml_pfedseq.federation import build_federation
from fedml_pfedseq.hub import PersonalizedClassifier, PushError, load_client_classifier, push_run
from fedml_pfedseq.hub.card import build_card
from fedml_pfedseq.hub.warm_start import warm_start_learner
from fedml_pfedseq.training import evaluate_model, make_loader

CLIENT = 3
CLIENT_FILES = {"adapter_config.json", "adapter_model.safetensors", "head.safetensors", "head_config.json",
                "splits.json"}
SRC = Path(__file__).resolve().parents[1]


def client_inputs(fed, client: int, count: int = 8) -> torch.Tensor:
    return next(iter(make_loader(fed.data.clients[client].test, count, shuffle=False)))["pixel_values"]


def reference_logits(fed, client: int, x: torch.Tensor) -> torch.Tensor:
    """What client ``client`` evaluated: its state put into the shared model by its own ``load`` (which may take a
    gradient step: Per-FedAvg adapts before it evaluates)."""
    fed.clients[client].load()
    fed.clients[client].model.eval()
    with torch.no_grad():
        return fed.clients[client].model(x)


def load_by_hand(folder: Path, base: str) -> nn.Module:
    """Client k's classifier from its adapters/client_<k> folder, with PEFT and safetensors only."""
    vit = ViTForImageClassification.from_pretrained(base, use_safetensors=True)
    vit.classifier = nn.Identity()
    backbone = PeftModel.from_pretrained(vit, str(folder))
    state = load_file(str(folder / "head.safetensors"))
    head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    return PersonalizedClassifier(backbone, head).eval()  # head(backbone(pixel_values).logits), nothing loaded


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- A: run outputs ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_run_writes_each_clients_evaluated_model_in_peft_format(pushed, tiny_vit):
    adapters = pushed.run_dir / "adapters"
    manifest = json.loads((adapters / "manifest.json").read_text())
    assert [c["client"] for c in manifest["clients"]] == list(range(20)) and manifest["method"] == "pFedSeq"
    for k in range(20):
        assert {p.name for p in (adapters / f"client_{k}").iterdir()} == CLIENT_FILES
        assert manifest["clients"][k]["test_accuracy"] == pushed.final[k]["test_accuracy"]
    x = client_inputs(pushed.fed, CLIENT)
    model = load_by_hand(adapters / f"client_{CLIENT}", tiny_vit)
    with torch.no_grad():
        logits = model(x)
    assert torch.equal(logits, reference_logits(pushed.fed, CLIENT, x))
    loader = make_loader(pushed.fed.data.clients[CLIENT].test, 256, shuffle=False)
    assert evaluate_model(model, loader)["accuracy"] == pushed.final[CLIENT]["test_accuracy"]


def test_pfedseq_clients_get_their_personalized_adapter_and_the_global_one_is_saved_apart(pushed):
    adapters = pushed.run_dir / "adapters"
    client = load_file(str(adapters / f"client_{CLIENT}" / "adapter_model.safetensors"))
    other = load_file(str(adapters / "client_0" / "adapter_model.safetensors"))
    global_ = load_file(str(adapters / "global" / "adapter_model.safetensors"))
    assert client.keys() == global_.keys()
    assert any(not torch.equal(client[k], global_[k]) for k in client)  # theta_g + xi_i, not theta_g
    assert any(not torch.equal(client[k], other[k]) for k in client)
    server_global = pushed.fed.server.global_state["lora"]
    assert all(torch.equal(global_[k], server_global[k]) for k in global_)
    assert not (adapters / "global" / "head.safetensors").exists()  # pFedSeq's heads are local


@pytest.mark.slow
@pytest.mark.parametrize("method, has_global, has_backbone", [
    ("perfedavg", True, False),  # the evaluated model is the meta-model after one adaptation step
    ("apple", False, False),  # the mix of all cores; APPLE aggregates no global adapter
    ("pfedlora", True, True),  # each client trains its own (cut) backbone: saved as a transformers checkpoint
    ("ffa_lora", True, False),  # the global adapter: the A every client froze with the averaged B
    ("fedsa_lora", False, False),  # the averaged A with the client's own B
    ("flora", False, True),  # the merged weights: a backbone of its own, theta^0's adapter on it
])
def test_reloaded_client_models_reproduce_what_each_method_evaluated(method, has_global, has_backbone, tiny_vit,
                                                                      tmp_path):
    depths = ("model_args.client_depths=[2, 1]",) if method == "pfedlora" else ()
    fed, _, metrics = run_shipped_recipe(method, tiny_vit, tmp_path, overrides=depths)
    adapters = tmp_path / "out" / "adapters"
    manifest = json.loads((adapters / "manifest.json").read_text())
    assert (adapters / "global").is_dir() == has_global and (manifest["global"] is not None) == has_global
    entry = manifest["clients"][CLIENT]
    assert (entry["backbone"] is not None) == has_backbone
    base = str(tmp_path / "out" / entry["backbone"]) if has_backbone else tiny_vit
    model = load_by_hand(adapters / f"client_{CLIENT}", base)
    x = client_inputs(fed, CLIENT)
    with torch.no_grad():
        logits = model(x)
    assert torch.equal(logits, reference_logits(fed, CLIENT, x))
    reported = next(r for r in metrics["eval"] if r["round"] == 2 and r["client"] == CLIENT)
    accuracy = evaluate_model(model, make_loader(fed.data.clients[CLIENT].test, 256, shuffle=False))["accuracy"]
    assert accuracy == reported["test_accuracy"] == entry["test_accuracy"]


def test_save_adapters_false_writes_no_adapters(tiny_vit, tmp_path):
    run_shipped_recipe("local", tiny_vit, tmp_path, overrides=("hub_args.save_adapters=false",
                                                               "train_args.comm_round=1"))
    assert (tmp_path / "out" / "summary.json").is_file() and not (tmp_path / "out" / "adapters").exists()


@pytest.mark.parametrize("hub_args, common, message", [
    ({"push_to_hub": True}, {}, "hub_args.hub_repo_id must be 'owner/name'"),
    ({"push_to_hub": True, "hub_repo_id": "no-owner"}, {}, "hub_args.hub_repo_id must be 'owner/name'"),
    ({"push_to_hub": True, "hub_repo_id": "a/b", "save_adapters": False}, {}, "hub_args.save_adapters must be true"),
    ({"push_every": 2}, {}, "unknown key 'push_every'"),
    ({"hub_learner_init": "a/b"}, {}, "hub_args.hub_learner_init warm-starts pFedSeq's SeqLearner"),
    ({"hub_push_every": 2}, {}, "hub_args.hub_push_every needs push_to_hub: true"),
    ({"hub_push_every": 0, "push_to_hub": True, "hub_repo_id": "a/b"}, {}, "hub_args.hub_push_every must be null"),
])
def test_bad_hub_args_are_refused_naming_the_key(hub_args, common, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"hub_args": hub_args, "common_args": common})


def test_push_every_k_rounds_must_fall_on_evaluated_rounds():
    with pytest.raises(RecipeError, match=r"multiple >= 1 of validation_args.frequency_of_the_test \(2\)"):
        parse_recipe({"hub_args": {"hub_push_every": 3, "push_to_hub": True, "hub_repo_id": "a/b"},
                      "validation_args": {"frequency_of_the_test": 2}})


# --- B + C: the endpoint and the push ------------------------------------------------------------------------

def test_push_puts_learners_adapters_backbone_recipe_metrics_and_card_on_the_endpoint(pushed, hub_env):
    files = set(HfApi().list_repo_files(REPO))
    expected = {"README.md", "recipe.yaml", "summary.json", "metrics.json", "metrics.csv", "final_table.md",
                "adapters/manifest.json", "adapters/global/adapter_config.json",
                "adapters/global/adapter_model.safetensors", "seq_learner/config.json",
                "seq_learner/model.safetensors", "backbone/config.json", "backbone/model.safetensors",
                "backbone/preprocessor_config.json"}
    expected |= {f"adapters/client_{k}/{name}" for k in range(20) for name in CLIENT_FILES}
    assert expected <= files
    assert not [f for f in files if f.endswith((".pt", ".bin", ".pkl", ".pth"))]
    local = set(digest(pushed.run_dir)) - {"checkpoint.safetensors"}  # pushed only when asked (see the last test)
    assert local <= files and "README.md" not in local
    assert HfApi().model_info(REPO).private


def test_seq_learner_loads_back_from_the_repo(pushed, hub_env):
    from fedml_pfedseq.models.seq_learner import SeqLearnerModel

    learner = SeqLearnerModel.from_pretrained(REPO, subfolder="seq_learner", use_safetensors=True)
    original = pushed.fed.server.learner.state_dict()
    assert all(torch.equal(v, original[k].cpu()) for k, v in learner.state_dict().items())


@pytest.mark.slow
def test_fresh_process_loads_client_k_with_the_documented_lines_and_gets_identical_logits(pushed, hub_env, tmp_path):
    x = client_inputs(pushed.fed, CLIENT)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    code = f'''
import sys, torch
from huggingface_hub import hf_hub_download
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ViTForImageClassification

torch.load = None  # nothing may be unpickled
repo, k = "{REPO}", {CLIENT}
base = ViTForImageClassification.from_pretrained(repo, subfolder="backbone", use_safetensors=True)
base.classifier = nn.Identity()
backbone = PeftModel.from_pretrained(base, repo, subfolder=f"adapters/client_{{k}}")
head_state = load_file(hf_hub_download(repo, "head.safetensors", subfolder=f"adapters/client_{{k}}"))
head = nn.Linear(head_state["weight"].shape[1], head_state["weight"].shape[0])
head.load_state_dict(head_state)
with torch.no_grad():
    logits = head(backbone.eval()(pixel_values=load_file(sys.argv[1])["x"]).logits)
save_file({{"logits": logits}}, sys.argv[2])
'''
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.safetensors"), str(tmp_path / "y.st")],
                          env=hub_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.equal(load_file(str(tmp_path / "y.st"))["logits"], reference_logits(pushed.fed, CLIENT, x))


@pytest.mark.slow
def test_hub_eval_in_a_fresh_process_reproduces_the_reported_accuracy(pushed, hub_env):
    done = subprocess.run([sys.executable, "-m", "fedml_pfedseq.cli", "hub-eval", REPO, "--client", str(CLIENT),
                           "--set", "device_args.num_threads=1"],
                          env=hub_env, capture_output=True, text=True, timeout=300, cwd=SRC)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    reported = pushed.final[CLIENT]
    assert result["accuracy"] == result["reported_accuracy"] == reported["test_accuracy"]
    assert result["samples"] == reported["test_samples"]


def test_library_loader_refuses_pickle_files_planted_in_the_repo(pushed, hub_env, monkeypatch, tmp_path):
    api = HfApi()
    planted = tmp_path / "evil.bin"
    planted.write_bytes(b"not a pickle you want to load")
    api.create_repo("local-user/planted", exist_ok=True)
    api.upload_folder(repo_id="local-user/planted", folder_path=str(pushed.run_dir / "adapters"),
                      path_in_repo="adapters", commit_message="adapters")
    api.upload_file(path_or_fileobj=str(planted), path_in_repo=f"adapters/client_{CLIENT}/adapter_model.bin",
                    repo_id="local-user/planted")

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load was called on a downloaded file")

    monkeypatch.setattr(torch, "load", forbidden)
    model = load_client_classifier("local-user/planted", CLIENT, base_model=pushed.fed.recipe.model_args.model)
    x = client_inputs(pushed.fed, CLIENT)
    with torch.no_grad():
        logits = model(x)
    assert torch.equal(logits, reference_logits(pushed.fed, CLIENT, x))
    cached = Path(constants.HF_HUB_CACHE)
    assert not list(cached.rglob("*.bin")) and list(cached.rglob("adapter_model.safetensors"))


def test_card_is_generated_from_the_run_and_validated_by_the_endpoint(pushed, hub_env):
    card = ModelCard.load(REPO)
    card.validate()  # POST /api/validate-yaml on the endpoint
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "image-classification"
    assert "pfedseq" in card.data.tags and card.data.eval_results[0].metric_type == "accuracy"
    assert abs(card.data.eval_results[0].metric_value - pushed.summary["final_test_accuracy_mean"]) < 1e-4
    text = card.text
    for needle in ("pFedSeq", "drawer", "Intended use and limits", f'repo, k = "{REPO}"', "learning_rate",
                   f"{pushed.final[CLIENT]['test_accuracy']:.4f}", "PeftConfig.from_pretrained(client)"):
        assert needle in text, needle
    broken = str(card).replace("library_name: peft", "library_name: [1, 2]")
    with pytest.raises(ValueError, match="library_name"):
        ModelCard(broken).validate()


def test_card_needs_a_finished_run(tmp_path):
    (tmp_path / "recipe.yaml").write_text("{}")
    with pytest.raises(ValueError, match="adapters/manifest.json is missing"):
        build_card(tmp_path, REPO, backbone_pushed=False)


# --- failure paths -------------------------------------------------------------------------------------------

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_down_is_a_clear_error_and_keeps_the_local_files(pushed, hub_env, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(pushed.run_dir, run_dir)
    before = digest(run_dir)
    down = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(PushError) as err:
        push_run(run_dir, "local-user/elsewhere", endpoint=down)
    message = str(err.value)
    assert down in message and "local-user/elsewhere" in message and f"pfedseq push {run_dir}" in message
    assert digest(run_dir) == before
    assert main(["push", str(run_dir), "--repo-id", "local-user/elsewhere", "--endpoint", down]) == 2
    assert down in capsys.readouterr().err


@pytest.fixture
def strict_endpoint(tmp_path):
    """`pfedseq hub-serve --token the-right-token` in its own process, as a user starts it to rehearse a push."""
    port = closed_port()
    server = subprocess.Popen([sys.executable, "-m", "fedml_pfedseq.cli", "hub-serve", "--root",
                               str(tmp_path / "strict"), "--port", str(port), "--token", "the-right-token"],
                              cwd=SRC, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = server.stdout.readline()  # printed once it listens
    assert first.startswith("local Hub endpoint serving"), first + server.stderr.read()
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", root=tmp_path / "strict")
    server.terminate()
    server.wait(timeout=30)


@pytest.mark.parametrize("token, refusal", [
    (None, "requires a token .* and the request sent none"),
    ("a-wrong-token", "Invalid credentials"),
    ("the-right-token", None),
])
def test_an_endpoint_with_a_token_refuses_pushes_without_it(pushed, hub_env, strict_endpoint, monkeypatch, tmp_path,
                                                           token, refusal):
    monkeypatch.delenv("HF_TOKEN")  # only what is passed is sent: no environment variable, no token file
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    repo = "local-user/strict"
    if refusal is None:
        result = push_run(pushed.run_dir, repo, endpoint=strict_endpoint.url, token=token)
        assert "adapters/manifest.json" in HfApi(endpoint=strict_endpoint.url, token=token).list_repo_files(repo)
        assert result.commit in result.commit_url
        return
    with pytest.raises(PushError, match=rf"(?s){repo} on {strict_endpoint.url}.*401.*{refusal}.*Check that the token"
                                        r".*pfedseq push"):
        push_run(pushed.run_dir, repo, endpoint=strict_endpoint.url, token=token)
    assert not (strict_endpoint.root / "models").exists()


def test_a_commit_failing_midway_leaves_the_previous_revision_whole_and_loadable(pushed, hub_env, tmp_path):
    api = HfApi()
    head = api.model_info(REPO).sha
    files = api.list_repo_files(REPO)
    run_dir = tmp_path / "run"
    shutil.copytree(pushed.run_dir, run_dir)
    for adapter in (run_dir / "adapters").glob("client_*/adapter_model.safetensors"):  # 20 changed files
        save_file({k: v + 1.0 for k, v in load_file(str(adapter)).items()}, str(adapter))
    pushed.server.hub.fail_commit_after_files = 10  # the server breaks off after storing 10 of them
    with pytest.raises(PushError, match="500"):
        push_run(run_dir, REPO)
    assert api.model_info(REPO).sha == head and api.list_repo_files(REPO) == files
    x = client_inputs(pushed.fed, CLIENT)
    with torch.no_grad():
        logits = load_client_classifier(REPO, CLIENT)(x)
    assert torch.equal(logits, reference_logits(pushed.fed, CLIENT, x))


def test_a_request_body_that_breaks_off_commits_nothing(pushed, hub_env):
    head = HfApi().model_info(REPO).sha
    host, port = pushed.server.httpd.server_address[:2]
    line = json.dumps({"key": "file", "value": {"path": f"adapters/client_{CLIENT}/adapter_model.safetensors",
                                                 "content": "AAAA", "encoding": "base64"}})
    body = (json.dumps({"key": "header", "value": {"summary": "half"}}) + "\n" + line + "\n").encode()
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.putrequest("POST", f"/api/models/{REPO}/commit/main")
    conn.putheader("Content-Type", "application/x-ndjson")
    conn.putheader("Content-Length", str(len(body) + 1000))  # announces more than it sends
    conn.endheaders()
    conn.send(body)
    conn.sock.shutdown(socket.SHUT_WR)
    assert conn.getresponse().status == 400
    conn.close()
    assert HfApi().model_info(REPO).sha == head


def test_old_revisions_stay_downloadable_by_commit_id(pushed, hub_env, tmp_path):
    api = HfApi()
    first = api.model_info(REPO).sha
    original = Path(api.hf_hub_download(REPO, "final_table.md")).read_text()
    api.upload_file(path_or_fileobj=b"changed\n", path_in_repo="final_table.md", repo_id=REPO)
    api.upload_file(path_or_fileobj=b"stale\n", path_in_repo="adapters/client_99/head.safetensors", repo_id=REPO)
    assert Path(api.hf_hub_download(REPO, "final_table.md")).read_text() == "changed\n"
    assert Path(api.hf_hub_download(REPO, "final_table.md", revision=first)).read_text() == original
    result = push_run(pushed.run_dir, REPO)  # a retried push restores the run exactly, stale files deleted
    assert Path(api.hf_hub_download(REPO, "final_table.md")).read_text() == original
    assert result.deleted == ["adapters/client_99/head.safetensors"]
    assert "adapters/client_99/head.safetensors" not in api.list_repo_files(REPO)


# --- warm start ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_warm_starts_its_seq_learner_from_the_pushed_repo(pushed, hub_env, tiny_vit, tmp_path):
    fed, _, _ = run_shipped_recipe("pfedseq", tiny_vit, tmp_path, overrides=(
        "train_args.comm_round=1", f"hub_args.hub_learner_init={REPO}"))  # one round: the learner takes no step
    trained = pushed.fed.server.learner.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in fed.server.learner.state_dict().items())
    cold = dataclasses.replace(fed.recipe, hub_args=dataclasses.replace(fed.recipe.hub_args, hub_learner_init=None))
    fresh = build_federation(cold).server.learner.state_dict()  # its own seeded init differs
    assert not all(torch.equal(v, trained[k]) for k, v in fresh.items())


def test_a_learner_of_another_shape_is_refused_naming_what_differs(pushed, hub_env, tiny_vit, tmp_path):
    recipe = load_recipe(SRC / "recipes" / "omniglot_pfedseq.yaml", [
        f"model_args.model={tiny_vit}", "data_args.samples_per_client=40", "algorithm_args.seq_len=3",
        "algorithm_args.learner_memory=true", "device_args.using_gpu=false"])
    with pytest.raises(RecipeError, match="max_seq_len: saved 6, this run 3; memory: saved False, this run True"):
        warm_start_learner(build_federation(recipe).server, REPO)


# --- pushing every K rounds ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_push_every_round_commits_a_loadable_checkpoint_then_the_final_run(pushed, hub_env, tiny_vit, tmp_path):
    repo = "local-user/omniglot-fedavg"
    fed, _, metrics = run_shipped_recipe("fedavg", tiny_vit, tmp_path, overrides=(
        "hub_args.push_to_hub=true", f"hub_args.hub_repo_id={repo}", "hub_args.hub_push_every=1"))
    api = HfApi()
    commits = api.list_repo_commits(repo)  # newest first
    assert [c.title.split(", ")[1] for c in commits[:2]] == ["round 2", "checkpoint after round 1"]
    checkpoint = commits[1].commit_id
    manifest = json.loads(Path(api.hf_hub_download(repo, "adapters/manifest.json", revision=checkpoint)).read_text())
    assert manifest["round"] == 1
    model = load_client_classifier(repo, CLIENT, revision=checkpoint)
    got = evaluate_model(model, make_loader(fed.data.clients[CLIENT].test, 256, shuffle=False))
    at_round_1 = next(r for r in metrics["eval"] if r["round"] == 1 and r["client"] == CLIENT)
    assert (got["accuracy"], got["loss"]) == (at_round_1["test_accuracy"], at_round_1["test_loss"])
    final = api.list_repo_files(repo)
    assert not [f for f in final if f.startswith("hub_checkpoint/")]
    assert json.loads(Path(api.hf_hub_download(repo, "adapters/manifest.json")).read_text())["round"] == 2


# --- continuing a run from the Hub ---------------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_pushed_with_its_checkpoint_continues_from_the_repo_exactly(pushed, hub_env, tiny_vit, tmp_path,
                                                                       capsys):
    """The default push leaves the checkpoint out; pushed with it, `pfedseq run --resume-from REPO` given one more
    round reproduces the 3-round run's metrics (the learner, its Adam state and history came back whole)."""
    assert "checkpoint.safetensors" not in HfApi().list_repo_files(REPO)
    repo = "local-user/omniglot-pfedseq-resumable"
    assert main(["push", str(pushed.run_dir), "--repo-id", repo, "--with-checkpoint"]) == 0
    overrides = [f"model_args.model={tiny_vit}", "data_args.samples_per_client=40", "device_args.num_threads=1",
                 "device_args.using_gpu=false", "algorithm_args.warmup_rounds=1", "train_args.comm_round=3"]
    args = ["run", str(SRC / "recipes" / "omniglot_pfedseq.yaml"), "--no-progress", "--resume-from", repo,
            "--output-dir", str(tmp_path / "continued"), *[x for o in overrides for x in ("--set", o)]]
    assert main(args) == 0
    _, expected, straight = run_shipped_recipe("pfedseq", tiny_vit, tmp_path, out="straight",
                                               overrides=("algorithm_args.warmup_rounds=1", "train_args.comm_round=3"))
    continued = json.loads((tmp_path / "continued" / "metrics.json").read_text())
    assert continued["eval"] == straight["eval"] and continued["train"] == straight["train"]
    assert main([*args[:4], "local-user/nothing-here", *args[5:]]) == 2
    assert "local-user/nothing-here has no checkpoint.safetensors" in capsys.readouterr().err

"""A pushed run used by someone with Hugging Face libraries alone: the model card's snippet, run as written in a
process that cannot import fedml-pfedseq, evaluates client 0 on its own test split to the accuracy the run reported;
the repo names its base model, labels, clients and splits in files; the SeqLearner loads through ``AutoModel`` with
the code pushed beside it."""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_shipped_recipe
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from safetensors.torch import load_file, save_file
from test_hub import client_inputs, reference_logits

from fedml_pfedseq.data.loading import find_data_file, load_image_dataset
from fedml_pfedseq.federation import build_data
from fedml_pfedseq.hub import push_run

PROJECT = ("fedml_pfedseq",)
WITHOUT_PROJECT = f'''
import importlib.abc, runpy, sys


class NoProject(importlib.abc.MetaPathFinder):
    """fedml-pfedseq is installed here (editable): refuse its packages, so that only Hugging Face libraries serve."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {PROJECT}:
            raise ModuleNotFoundError(f"{{name}} is fedml-pfedseq code")


sys.meta_path.insert(0, NoProject())
sys.argv = sys.argv[1:]  # the snippet's own argv
runpy.run_path(sys.argv[0], run_name="__main__")
assert not [m for m in sys.modules if m.partition(".")[0] in {PROJECT}]
'''


def run_without_project(code: str, folder: Path, env: dict, *args: str) -> str:
    """Run ``code`` in ``folder`` with ``python -I`` (no project folder on sys.path) and the project's imports
    refused, against the endpoint (HF_HUB_OFFLINE unset); return its stdout."""
    (folder / "snippet.py").write_text(code)
    (folder / "without_project.py").write_text(WITHOUT_PROJECT)
    env = {k: v for k, v in env.items() if k != "HF_HUB_OFFLINE"} | {"HF_MODULES_CACHE": str(folder / "modules")}
    done = subprocess.run([sys.executable, "-I", "without_project.py", "snippet.py", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def assert_the_cards_snippet_gets_client_0s_accuracy(repo: str, fed, run_dir: Path, env: dict,
                                                     folder: Path) -> float:
    """The python block of ``repo``'s card, run as written in ``folder`` (with the data file the card asks for),
    prints client 0's reported test accuracy and the predictions of client 0's model as the run evaluated it;
    returns the accuracy printed."""
    card = ModelCard.load(repo)
    (snippet,) = re.findall(r"```python\n(.*?)```", card.text, re.DOTALL)
    manifest = json.loads((run_dir / "adapters" / "manifest.json").read_text())
    data_file = manifest["data"]["load_dataset"]["data_files"]
    assert f"put `{data_file}` in the working folder" in card.text
    (folder / data_file).symlink_to(find_data_file(data_file))
    accuracy, predicted = run_without_project(snippet, folder, env).splitlines()[-2:]
    client_0 = manifest["clients"][0]
    assert accuracy.startswith(f"client 0 (drawer {client_0['partition_value']}): test accuracy")
    assert float(accuracy.split()[-1]) == client_0["test_accuracy"]
    test = fed.data.clients[0].test  # its few images are one batch: the last five are predicted by name
    expected = reference_logits(fed, 0, client_inputs(fed, 0, len(test))).argmax(-1)[-5:].tolist()
    assert predicted == f"its last images: {[fed.data.label_names[i] for i in expected]}"
    return float(accuracy.split()[-1])


@pytest.mark.slow
def test_the_cards_snippet_run_as_written_gets_client_0s_reported_accuracy(pushed, hub_env, tmp_path):
    accuracy = assert_the_cards_snippet_gets_client_0s_accuracy(REPO, pushed.fed, pushed.run_dir, hub_env, tmp_path)
    assert accuracy == pushed.final[0]["test_accuracy"]  # what the run's own evaluation gave


@pytest.mark.slow
def test_the_snippet_loads_a_clients_own_backbone_too(pushed, hub_env, tiny_vit, tmp_path):
    """pFedLoRA trains each client's backbone (cut to its depth): adapter_config.json names the client's folder."""
    repo = "local-user/omniglot-pfedlora"
    fed, _, _ = run_shipped_recipe("pfedlora", tiny_vit, tmp_path, overrides=(
        "model_args.client_depths=[1, 2]", "train_args.comm_round=1"))
    push_run(tmp_path / "out", repo)
    config = json.loads(Path(hf_hub_download(repo, "adapters/client_0/adapter_config.json")).read_text())
    assert config["base_model_name_or_path"] == "adapters/client_0/backbone"
    folder = tmp_path / "snippet"
    folder.mkdir()
    assert_the_cards_snippet_gets_client_0s_accuracy(repo, fed, tmp_path / "out", hub_env, folder)


def test_the_repo_names_base_model_labels_clients_and_splits(pushed, hub_env):
    card = ModelCard.load(REPO)
    assert card.data.base_model == REPO  # the bundled backbone is not on the Hub on its own: it is in backbone/
    assert "`0` Alphabet_of_the_Magi" in card.text and "k-th distinct value of the column `drawer`" in card.text
    client_files = {}
    for name in ("adapter_config.json", "head_config.json", "splits.json"):
        client_files[name] = json.loads(Path(hf_hub_download(REPO, f"adapters/client_3/{name}")).read_text())
    assert client_files["adapter_config.json"]["base_model_name_or_path"] == "backbone"
    assert "backbone/config.json" in HfApi().list_repo_files(REPO)
    labels = pushed.fed.data.label_names
    head = client_files["head_config.json"]
    assert [head["id2label"][str(i)] for i in range(len(labels))] == labels and head["label2id"][labels[7]] == 7
    assert (head["in_features"], head["out_features"]) == (32, len(labels))
    splits = client_files["splits.json"]
    lazy = copy.deepcopy(pushed.fed.recipe)
    lazy.data_args.preprocess = False  # a split transformed lazily keeps its index map into the data file
    tested = build_data(lazy).clients[3].test._indices.column("indices").to_pylist()
    assert splits["rows"]["test"] == tested
    drawer = load_image_dataset("omniglot").data.column("drawer").to_numpy()
    drawers = np.unique(drawer)
    assert splits["partition_value"] == drawers[3]  # client k: the k-th drawer in sorted order
    assert {drawer[row] for split in splits["rows"].values() for row in split} == {drawers[3]}
    manifest = json.loads(Path(hf_hub_download(REPO, "adapters/manifest.json")).read_text())
    assert manifest["base_model_name_or_path"] == "backbone" and manifest["label_names"] == labels
    assert [c["partition_value"] for c in manifest["clients"]] == drawers.tolist()


@pytest.mark.slow
def test_the_seq_learner_loads_with_auto_model_and_its_pushed_code_alone(pushed, hub_env, tmp_path):
    files = HfApi().list_repo_files(REPO)
    assert {"seq_learner/modeling_seq_learner.py", "seq_learner/configuration_seq_learner.py"} <= set(files)
    config = json.loads(Path(hf_hub_download(REPO, "seq_learner/config.json")).read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_seq_learner.SeqLearnerConfig",
                                  "AutoModel": "modeling_seq_learner.SeqLearnerModel"}
    learner = pushed.fed.server.learner
    updates = torch.randn(5, 2, learner.config.num_clients, generator=torch.Generator().manual_seed(0))
    save_file({"updates": updates}, str(tmp_path / "updates.safetensors"))
    code = f'''
import sys
from pathlib import Path

from huggingface_hub import snapshot_download
from safetensors.torch import load_file, save_file
from transformers import AutoModel

root = Path(snapshot_download("{REPO}", allow_patterns=["seq_learner/*"]))
learner = AutoModel.from_pretrained(root / "seq_learner", trust_remote_code=True).eval()
assert type(learner).__module__.startswith("transformers_modules."), type(learner).__module__
xi = learner.calibrate(load_file(sys.argv[1])["updates"], 0.5, layer=1)
save_file({{"xi": xi, **learner.state_dict()}}, sys.argv[2])
'''
    run_without_project(code, tmp_path, hub_env, "updates.safetensors", "out.safetensors")
    out = load_file(str(tmp_path / "out.safetensors"))
    assert all(torch.equal(out[k], v) for k, v in learner.state_dict().items())
    # the pushed code has no cpu_kernels.c beside it, so it runs the blocks' PyTorch code: equal to float rounding
    torch.testing.assert_close(out["xi"], learner.calibrate(updates, 0.5, layer=1), rtol=1e-5, atol=1e-7)

"""Hub ids for data and backbones, exercised offline: the same loading code a networked machine runs."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import ViTImageProcessor

from fedml_pfedseq.config import DataArgs
from fedml_pfedseq.data.federated import build_federated_data
from fedml_pfedseq.data.loading import load_image_dataset
from fedml_pfedseq.inputs import resolve_backbone


def test_a_hub_style_dataset_repository_loads_through_hub_id(tmp_path):
    """datasets resolves a repository id and a local repository folder with the same builder; use the latter."""
    repo = tmp_path / "omniglot-repo"
    (repo / "data").mkdir(parents=True)
    load_image_dataset("omniglot").select(range(0, 32460, 31)).to_parquet(repo / "data" / "train-00000.parquet")
    args = DataArgs(dataset="omniglot", hub_id=str(repo), partition_method="column", partition_column="drawer")
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    data = build_federated_data(args, processor, num_clients=None, seed=0)
    sizes = [len(c.train) + len(c.validation) + len(c.test) for c in data.clients]
    assert len(data.clients) == 20 and sum(sizes) == 1048 and data.num_labels == 50
    assert data.clients[0].train[0]["pixel_values"].shape == (3, 32, 32)


def test_hub_ids_pass_through_unchanged_and_bare_names_resolve_to_bundled_models():
    assert resolve_backbone("google/vit-base-patch16-224-in21k") == "google/vit-base-patch16-224-in21k"
    assert Path(resolve_backbone("vit-small-cifar10")).name == "vit-small-cifar10"


@pytest.mark.slow
def test_a_backbone_named_by_hub_id_loads_from_the_hub_cache_offline(tiny_vit, tmp_path):
    """Lay the tiny ViT out as the Hub cache does (models--owner--name/snapshots/<commit>), then load it by id."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--example--tiny-vit"
    shutil.copytree(tiny_vit, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = ("from fedml_pfedseq.adapter_model import AdapterModel; import torch;"
            "m = AdapterModel('example/tiny-vit', num_labels=3);"
            "print(tuple(m(torch.zeros(1, 3, 32, 32)).shape))")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("(1, 3)")

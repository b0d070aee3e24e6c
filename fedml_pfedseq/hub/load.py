"""Load client k's personalized classifier from a pushed run (a Hub repo or a local run folder), and evaluate it.

The few lines it stands for (see the README, "Sharing on the Hub")::

    base = ViTForImageClassification.from_pretrained(repo, subfolder="backbone", use_safetensors=True)
    base.classifier = nn.Identity()
    backbone = PeftModel.from_pretrained(base, repo, subfolder=f"adapters/client_{k}")
    head = nn.Linear(...); head.load_state_dict(load_file(hf_hub_download(repo, "head.safetensors",
                                                                          subfolder=f"adapters/client_{k}")))

Only ``*.json`` and ``*.safetensors`` files are downloaded, and weights load with ``use_safetensors=True`` and
PEFT's safetensors reader: nothing from a downloaded repo is ever unpickled.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from fedml_pfedseq.errors import UserError
from fedml_pfedseq.hub.adapters import BACKBONE_DIR, CLIENT_FILE, HEAD_FILE, MANIFEST, client_dir_name
from fedml_pfedseq.hub.push import hub_endpoint

SAFE_PATTERNS = ("*.json", "*.safetensors")


class HubLoadError(UserError, ValueError):
    """A repo or folder that does not hold what was asked for (no such client, no backbone to load onto)."""


class PersonalizedClassifier(nn.Module):
    """A client's model as it evaluated it: the PEFT backbone (ViT with LoRA, classifier = Identity) + its head.

    It has ``AdapterModel``'s ``backbone`` / ``head`` / ``forward(pixel_values)``, so the library's evaluation runs
    on it unchanged."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, info: dict | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.info = info or {}  # the client's manifest entry: reported accuracy, paths

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(pixel_values=pixel_values).logits)


def load_head(path: Path) -> nn.Linear:
    state = load_file(str(path))
    out_features, in_features = state["weight"].shape
    head = nn.Linear(in_features, out_features)
    head.load_state_dict(state)
    return head


def fetch(repo_or_dir: str | Path, client: int, revision: str | None = None, endpoint: str | None = None,
          cache_dir: str | Path | None = None) -> Path:
    """A local folder with the manifest, client ``client``'s files and the pushed backbone (if any).

    A local run folder is used as it is; a repo id is downloaded (json + safetensors only) into the Hub cache."""
    if Path(repo_or_dir).is_dir():
        return Path(repo_or_dir)
    from huggingface_hub import snapshot_download

    own = f"adapters/{client_dir_name(client)}"
    patterns = [f"adapters/{MANIFEST}"] + [f"{folder}/{p}" for folder in (own, f"{own}/{BACKBONE_DIR}", BACKBONE_DIR)
                                           for p in SAFE_PATTERNS]
    return Path(snapshot_download(str(repo_or_dir), revision=revision, allow_patterns=patterns,
                                  endpoint=hub_endpoint(endpoint), cache_dir=cache_dir))


def client_entry(root: Path, manifest: dict, client: int, where: str) -> dict:
    """The client's manifest entry; a cross-silo client's own ``client.json`` where it pushed one (the server's
    manifest lists only its folder)."""
    for entry in manifest["clients"]:
        if entry["client"] == client:
            own = root / entry["path"] / CLIENT_FILE
            return json.loads(own.read_text()) if own.is_file() else entry
    for entry in manifest.get("missing_clients", []):
        if entry["client"] == client:
            raise HubLoadError(f"{where} has no adapter for client {client}: {entry['reason']}")
    raise HubLoadError(f"{where} has no adapter for client {client}; it has clients "
                       f"{[e['client'] for e in manifest['clients']]}")


def load_client_classifier(repo_or_dir: str | Path, client: int, revision: str | None = None,
                           endpoint: str | None = None, base_model: str | None = None,
                           cache_dir: str | Path | None = None) -> PersonalizedClassifier:
    """Client ``client``'s classifier from a Hub repo id or a local run folder, in eval mode.

    The backbone it goes on is, in order: the client's own ``backbone/`` (pFedLoRA, cut backbones), ``base_model``,
    the repo's ``backbone/``, or the Hub id the manifest names."""
    from peft import PeftModel
    from transformers import ViTForImageClassification

    root = fetch(repo_or_dir, client, revision, endpoint, cache_dir)
    manifest_path = root / "adapters" / MANIFEST
    if not manifest_path.is_file():
        raise HubLoadError(f"{repo_or_dir} has no adapters/{MANIFEST}: not a pushed fedml-pfedseq run")
    manifest = json.loads(manifest_path.read_text())
    entry = client_entry(root, manifest, client, str(repo_or_dir))
    if entry.get("backbone"):
        base = str(root / entry["backbone"])
    elif base_model:
        base = base_model
    elif (root / BACKBONE_DIR / "config.json").is_file():
        base = str(root / BACKBONE_DIR)
    elif manifest.get("base_model_hub_id"):
        base = manifest["base_model_hub_id"]
    else:
        raise HubLoadError(f"{repo_or_dir} has no backbone/ and its base model {manifest.get('base_model')!r} is "
                           "not a Hub id: pass base_model= (a local ViT folder)")
    vit = ViTForImageClassification.from_pretrained(base, use_safetensors=True)
    vit.classifier = nn.Identity()
    backbone = PeftModel.from_pretrained(vit, str(root / entry["path"]))
    model = PersonalizedClassifier(backbone, load_head(root / entry["path"] / HEAD_FILE), entry)
    return model.eval()


def evaluate_client(repo_or_dir: str | Path, client: int, recipe, split: str = "test",
                    revision: str | None = None, endpoint: str | None = None) -> dict:
    """Client ``client``'s pushed classifier on its ``split`` of the recipe's data (partitioned as in the run).

    Returns the metrics beside the accuracy the run reported for that client."""
    from fedml_pfedseq.federation import build_party_data, set_threads
    from fedml_pfedseq.training import evaluate_model, loader_workers, make_loader, select_device

    set_threads(recipe)
    model = load_client_classifier(repo_or_dir, client, revision, endpoint)
    model.to(select_device(recipe.device_args.using_gpu))
    own, _ = build_party_data(recipe, client)  # with "silo" data, only its own file
    loader = make_loader(getattr(own, split), recipe.validation_args.eval_batch_size, shuffle=False,
                         workers=loader_workers(recipe.device_args))
    metrics = evaluate_model(model, loader)
    return {"client": client, "split": split, **metrics,
            "reported_accuracy": model.info.get(f"{split}_accuracy")}


def recipe_from_repo(repo_or_dir: str | Path, overrides: list[str], revision: str | None = None,
                     endpoint: str | None = None):
    """The run's own recipe.yaml (downloaded), with its backbone pointed at the pushed one when the recipe names a
    folder of the machine that ran it (the data pipeline needs the backbone's image processor)."""
    from huggingface_hub import snapshot_download

    from fedml_pfedseq.config import load_recipe
    from fedml_pfedseq.inputs import resolve_backbone

    if Path(repo_or_dir).is_dir():
        root = Path(repo_or_dir)
    else:
        root = Path(snapshot_download(str(repo_or_dir), revision=revision, endpoint=hub_endpoint(endpoint),
                                      allow_patterns=["recipe.yaml", f"{BACKBONE_DIR}/*.json"]))
    extra = []
    recipe = load_recipe(root / "recipe.yaml", overrides)
    try:
        resolve_backbone(recipe.model_args.model)
    except FileNotFoundError:
        if (root / BACKBONE_DIR / "preprocessor_config.json").is_file():
            extra = [f"model_args.model={root / BACKBONE_DIR}"]
    return load_recipe(root / "recipe.yaml", extra + overrides) if extra else recipe

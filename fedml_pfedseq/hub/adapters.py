"""A run's personalized models on disk, in standard PEFT format, so that anyone can load client k's classifier.

At the end of a simulator run each client's evaluated model (what ``client.load()`` put into the shared
``AdapterModel``: pFedSeq's theta_g + xi_i, Ditto's personal model, Per-FedAvg's adapted model, APPLE's mix...) is
written under ``<output_dir>/adapters/``::

    adapters/manifest.json             method, base model, labels, and per client its path and reported accuracy
    adapters/global/                   the server's global adapter (+ head.safetensors if the head is shared),
                                       for methods that average one (absent for Local, APPLE, pFedHN, PeFLL, pFedLA)
    adapters/client_<k>/adapter_config.json, adapter_model.safetensors   (PeftModel.save_pretrained)
    adapters/client_<k>/head.safetensors                                 (the nn.Linear on the [CLS] features)
    adapters/client_<k>/backbone/      only where the client's backbone is not the pretrained one (pFedLoRA trains
                                       its local model; model_args.client_depths cuts it): a transformers
                                       ViTForImageClassification checkpoint to load the adapter onto

Tensors are safetensors only. The head is separate from the PEFT adapter because ``AdapterModel`` keeps it outside
the PEFT model (the LoRA state clients exchange never holds it).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import ViTForImageClassification

from fedml_pfedseq.adapter_model import AdapterModel, resolve_backbone

MANIFEST = "manifest.json"
HEAD_FILE = "head.safetensors"
BACKBONE_DIR = "backbone"
GLOBAL_DIR = "global"


def client_dir_name(client: int) -> str:
    return f"client_{client}"


def is_hub_id(name: str) -> bool:
    """A backbone named by a Hub id (``owner/name``) rather than a local directory or a model bundled here."""
    try:
        return resolve_backbone(name) == name and not Path(name).is_dir()
    except FileNotFoundError:
        return False


def plain_backbone_weights(model: AdapterModel) -> dict[str, torch.Tensor]:
    """The backbone's own weights under transformers' names (PEFT's ``base_model.model.`` and ``base_layer.``
    wrappers removed), so that they load into a plain ViTForImageClassification."""
    return {name.removeprefix("base_model.model.").replace(".base_layer.", "."): p.detach().cpu().contiguous()
            for name, p in model.backbone_parameters().items()}


def save_head(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path),
              metadata={"in_features": str(state["weight"].shape[1]), "out_features": str(state["weight"].shape[0])})


def save_peft_adapter(model: AdapterModel, directory: Path, base_model_name: str) -> None:
    """``PeftModel.save_pretrained`` (adapter_config.json + adapter_model.safetensors), recording the recipe's
    backbone name instead of this machine's path, and without PEFT's per-folder README (the run has one card)."""
    model.backbone.save_pretrained(str(directory), safe_serialization=True)
    (directory / "README.md").unlink(missing_ok=True)
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model_name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def remove_stale(directory: Path) -> None:
    """Remove a previous run's ``adapters/`` from a reused output folder: it always belongs to the last run."""
    shutil.rmtree(directory, ignore_errors=True)


class AdapterWriter:
    """Writes ``adapters/``: each client's model right after its final evaluation (``save_client``), then the
    global adapter and the manifest once the run's final metrics are known (``finish``)."""

    def __init__(self, directory: Path, recipe, initial_global_lora):
        self.directory = Path(directory)
        remove_stale(self.directory)
        self.recipe = recipe
        self.base_name = recipe.model_args.model if is_hub_id(recipe.model_args.model) \
            else Path(recipe.model_args.model).name
        self.initial_global_lora = initial_global_lora  # the server's theta^0 object: replaced iff it aggregated
        self.clients: dict[int, dict] = {}
        self._pretrained: dict[str, torch.Tensor] | None = None
        self.num_labels: int | None = None

    def pretrained_weights(self) -> dict[str, torch.Tensor]:
        if self._pretrained is None:
            vit = ViTForImageClassification.from_pretrained(resolve_backbone(self.recipe.model_args.model))
            self._pretrained = {k: v for k, v in vit.state_dict().items() if not k.startswith("classifier.")}
        return self._pretrained

    def backbone_is_pretrained(self, weights: dict[str, torch.Tensor]) -> bool:
        reference = self.pretrained_weights()
        return weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)

    def save_client(self, client_id: int, model: AdapterModel) -> None:
        """Client ``client_id``'s model as it now stands in ``model`` (call right after its final evaluation)."""
        directory = self.directory / client_dir_name(client_id)
        directory.mkdir(parents=True, exist_ok=True)
        save_peft_adapter(model, directory, self.base_name)
        save_head(model.get_head_state(), directory / HEAD_FILE)
        weights = plain_backbone_weights(model)
        own_backbone = not self.backbone_is_pretrained(weights)
        if own_backbone:
            save_backbone(model, weights, directory / BACKBONE_DIR)
        self.num_labels = model.head.out_features
        self.clients[client_id] = {"client": client_id, "path": f"adapters/{client_dir_name(client_id)}",
                                   "backbone": f"adapters/{client_dir_name(client_id)}/{BACKBONE_DIR}"
                                   if own_backbone else None,
                                   "num_layers": model.backbone.get_base_model().config.num_hidden_layers}

    def finish(self, server, model: AdapterModel, final_rows: list[dict], label_names: list[str]) -> dict:
        """Write the global adapter (where the server aggregated one) and ``manifest.json``; return the manifest."""
        global_state = getattr(server, "global_state", {})
        has_global = "lora" in global_state and global_state["lora"] is not self.initial_global_lora
        if has_global:
            directory = self.directory / GLOBAL_DIR
            directory.mkdir(parents=True, exist_ok=True)
            model.set_lora_state(global_state["lora"])
            save_peft_adapter(model, directory, self.base_name)
            if "head" in global_state:
                save_head(global_state["head"], directory / HEAD_FILE)
        accuracy = {r["client"]: r for r in final_rows}
        manifest = {
            "format": "fedml-pfedseq personalized adapters, version 1",
            "recipe": self.recipe.name,
            "method": self.recipe.train_args.federated_optimizer,
            "base_model": self.recipe.model_args.model,
            "base_model_hub_id": self.base_name if is_hub_id(self.recipe.model_args.model) else None,
            "num_labels": self.num_labels,
            "label_names": list(label_names),
            "round": final_rows[0]["round"] if final_rows else None,
            "global": {"path": f"adapters/{GLOBAL_DIR}", "head": "head" in global_state} if has_global else None,
            "clients": [{**info, **{key: accuracy.get(k, {}).get(key) for key in
                                    ("test_accuracy", "test_samples", "validation_accuracy")}}
                        for k, info in sorted(self.clients.items())],
        }
        (self.directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        return manifest


def save_backbone(model: AdapterModel, weights: dict[str, torch.Tensor], directory: Path) -> None:
    """A client's own backbone (its trained or cut local model) as a transformers checkpoint without classifier."""
    config = model.backbone.get_base_model().config
    vit = ViTForImageClassification(config)
    vit.classifier = nn.Identity()
    vit.load_state_dict(weights, strict=True)
    vit.save_pretrained(str(directory), safe_serialization=True)

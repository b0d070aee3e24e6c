"""A run's personalized models on disk, in standard PEFT format, so that anyone can load client k's classifier.

At the end of a simulator run each client's evaluated model (what ``client.load()`` put into the shared
``AdapterModel``: pFedSeq's theta_g + xi_i, Ditto's personal model, Per-FedAvg's adapted model, APPLE's mix...) is
written under ``<output_dir>/adapters/``::

    adapters/manifest.json             method, base model, labels, the data, and per client its path, partition
                                       value (e.g. its drawer) and reported accuracy
    adapters/global/                   the server's global adapter (+ head.safetensors if the head is shared),
                                       for methods that average one (absent for Local, APPLE, pFedHN, PeFLL, pFedLA)
    adapters/client_<k>/adapter_config.json, adapter_model.safetensors   (PeftModel.save_pretrained)
    adapters/client_<k>/local/         FedDPA only: the client's local adapter (PEFT's folder for a second adapter)
    adapters/client_<k>/head.safetensors                                 (the nn.Linear on the [CLS] features)
    adapters/client_<k>/head_config.json   the head's sizes and label names (id2label, label2id)
    adapters/client_<k>/splits.json    its partition value and its rows (train / validation / test) of the data file,
                                       with the ``datasets.load_dataset`` arguments that load that file
    adapters/client_<k>/backbone/      only where the client's backbone is not the pretrained one (pFedLoRA trains
                                       its local model; model_args.client_depths cuts it): a transformers
                                       ViTForImageClassification checkpoint (+ image processor) to load the adapter onto

``base_model_name_or_path`` in each adapter_config.json is what loads the backbone the adapter goes on: the recipe's
Hub id, else a folder relative to the pushed repo's root (``backbone``, which ``pfedseq push`` uploads, or the
client's own ``adapters/client_<k>/backbone``). PEFT cannot name a repo's subfolder there, so with a folder the
adapter loads from a download of the repo (``snapshot_download``), as the model card shows.

Tensors are safetensors only. The head is separate from the PEFT adapter because ``AdapterModel`` keeps it outside
the PEFT model (the LoRA state clients exchange never holds it).

In a cross-silo deployment each party writes only its own part of ``adapters/`` (``fresh=False``): client k its
``client_<k>/`` plus ``client_<k>/client.json`` (its manifest entry with the accuracies it reported, which no other
party sees), the server ``global/`` and a manifest marked ``"party": "server"`` that lists the clients' folders
only. ``complete_manifest`` merges the clients' own entries into it where one machine holds every folder
(``pfedseq deploy``), giving the simulator's manifest.
"""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import ViTForImageClassification

from fedml_pfedseq.adapter_model import AdapterModel, load_image_processor
from fedml_pfedseq.data.federated import ClientData, columns, load_dataset_args, partition_column
from fedml_pfedseq.inputs import resolve_backbone

MANIFEST = "manifest.json"
CLIENT_FILE = "client.json"  # a cross-silo client's own manifest entry, in its folder
ACCURACY_KEYS = ("test_accuracy", "test_samples", "validation_accuracy")
HEAD_FILE = "head.safetensors"
HEAD_CONFIG_FILE = "head_config.json"
SPLITS_FILE = "splits.json"
SPLITS = ("train", "validation", "test")
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


def head_config(state: dict[str, torch.Tensor], label_names: list[str]) -> dict:
    """What the head is, beside its weights: its sizes and the names of its outputs (the backbone's own config names
    its pretraining task's labels, which these are not)."""
    out_features, in_features = state["weight"].shape
    return {"in_features": in_features, "out_features": out_features,
            "input": "the [CLS] features of the backbone with its classifier replaced by nn.Identity",
            "id2label": {str(i): name for i, name in enumerate(label_names)},
            "label2id": {name: i for i, name in enumerate(label_names)}}


def save_peft_adapter(model: AdapterModel, directory: Path, base_model_name_or_path: str) -> None:
    """``PeftModel.save_pretrained`` (adapter_config.json + adapter_model.safetensors), recording where the pushed
    repo's backbone loads from instead of this machine's path, and without PEFT's per-folder README (the run has
    one card)."""
    model.backbone.save_pretrained(str(directory), safe_serialization=True)
    (directory / "README.md").unlink(missing_ok=True)
    for config_path in directory.rglob("adapter_config.json"):  # a second adapter (FedDPA's) is in a subfolder
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base_model_name_or_path
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def remove_stale(directory: Path) -> None:
    """Remove a previous run's ``adapters/`` from a reused output folder: it always belongs to the last run."""
    shutil.rmtree(directory, ignore_errors=True)


def reported(entry: dict, row: dict) -> dict:
    """A client's manifest entry with the accuracies it reported (``row``: its final evaluation)."""
    return {**entry, **{key: row.get(key) for key in ACCURACY_KEYS}}


@functools.lru_cache(maxsize=1)
def pretrained_weights(model: str) -> dict[str, torch.Tensor]:
    """The backbone's pretrained weights without its classifier, read once per process (every writer, e.g. one per
    checkpoint pushed every K rounds, compares against them); callers must not modify them."""
    vit = ViTForImageClassification.from_pretrained(resolve_backbone(model))
    return {k: v for k, v in vit.state_dict().items() if not k.startswith("classifier.")}


class AdapterWriter:
    """Writes ``adapters/``: each client's model right after its final evaluation (``save_client``), then the
    global adapter and the manifest once the run's final metrics are known (``finish``).

    ``fresh``: remove the whole ``adapters/`` first (a run that writes all of it); a cross-silo party shares the
    folder with the others on one machine, so it replaces only what it writes."""

    def __init__(self, directory: Path, recipe, fresh: bool = True):
        self.directory = Path(directory)
        if fresh:
            remove_stale(self.directory)
        self.recipe = recipe
        self.base_path = recipe.model_args.model if is_hub_id(recipe.model_args.model) else BACKBONE_DIR
        self.clients: dict[int, dict] = {}

    def backbone_is_pretrained(self, weights: dict[str, torch.Tensor]) -> bool:
        reference = pretrained_weights(self.recipe.model_args.model)
        return weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)

    def save_client(self, client_id: int, model: AdapterModel, data: ClientData, label_names: list[str],
                    report: dict | None = None) -> None:
        """Client ``client_id``'s model as it now stands in ``model`` (call right after its final evaluation), with
        its head's label names and where its ``data`` came from; with ``report`` (a cross-silo client's final
        evaluation row) also its entry and accuracies in client.json."""
        path = f"adapters/{client_dir_name(client_id)}"
        directory = self.directory / client_dir_name(client_id)
        remove_stale(directory)
        directory.mkdir(parents=True)
        weights = plain_backbone_weights(model)
        own_backbone = None if self.backbone_is_pretrained(weights) else f"{path}/{BACKBONE_DIR}"
        if own_backbone:
            save_backbone(model, weights, directory / BACKBONE_DIR, self.recipe.model_args.model)
        save_peft_adapter(model, directory, own_backbone or self.base_path)
        head = model.get_head_state()
        save_head(head, directory / HEAD_FILE)
        write_json(directory / HEAD_CONFIG_FILE, head_config(head, label_names))
        (directory / SPLITS_FILE).write_text(json.dumps(self.splits(client_id, data)) + "\n")  # one line: long rows
        self.clients[client_id] = {"client": client_id, "path": path, "backbone": own_backbone,
                                   "num_layers": model.backbone.get_base_model().config.num_hidden_layers,
                                   "partition_value": data.partition_value, "shift": data.shift}
        if report is not None:
            write_json(directory / CLIENT_FILE, reported(self.clients[client_id], report))

    def splits(self, client_id: int, data: ClientData) -> dict:
        """Client ``client_id``'s splits.json: where its rows are, its partition value and the rows themselves."""
        args = self.recipe.data_args
        image_column, label_column = columns(args)
        return {"client": client_id, "partition_method": args.partition_method,
                "partition_column": partition_column(args), "partition_value": data.partition_value,
                "shift": data.shift,
                "load_dataset": load_dataset_args(args, client_id), "image_column": image_column,
                "label_column": label_column, "rows": data.rows}

    def finish(self, server, model: AdapterModel, final_rows: list[dict], label_names: list[str],
               party_clients: int | None = None) -> dict:
        """Write the global adapter (where the server aggregated one) and ``manifest.json``; return the manifest.

        ``party_clients``: a cross-silo server's manifest for that many clients, whose folders and accuracies their
        own parties write; it lists their paths and is marked ``"party": "server"``."""
        global_state = getattr(server, "global_state", {})
        has_global = getattr(server, "global_adapter", False) and "lora" in global_state
        remove_stale(self.directory / GLOBAL_DIR)
        if has_global:
            directory = self.directory / GLOBAL_DIR
            directory.mkdir(parents=True, exist_ok=True)
            model.set_lora_state(global_state["lora"])
            save_peft_adapter(model, directory, self.base_path)
            if "head" in global_state:
                save_head(global_state["head"], directory / HEAD_FILE)
        accuracy = {r["client"]: r for r in final_rows}
        if party_clients is None:
            clients = [reported(info, accuracy.get(k, {})) for k, info in sorted(self.clients.items())]
        else:
            clients = [{"client": k, "path": f"adapters/{client_dir_name(k)}"} for k in range(party_clients)]
        manifest = {
            "format": "fedml-pfedseq personalized adapters, version 1",
            "recipe": self.recipe.name,
            "method": self.recipe.train_args.federated_optimizer,
            "base_model": self.recipe.model_args.model,
            "base_model_hub_id": self.base_path if is_hub_id(self.recipe.model_args.model) else None,
            "base_model_name_or_path": self.base_path,  # as in adapter_config.json: a Hub id, or a folder of the repo
            "num_labels": model.head.out_features,
            "hidden_size": model.head.in_features,
            "label_names": list(label_names),
            "data": {"dataset": self.recipe.data_args.dataset, "load_dataset": load_dataset_args(self.recipe.data_args),
                     "partition_method": self.recipe.data_args.partition_method,
                     "partition_column": partition_column(self.recipe.data_args)},
            "round": final_rows[0]["round"] if final_rows else self.recipe.train_args.comm_round,
            "global": {"path": f"adapters/{GLOBAL_DIR}", "head": "head" in global_state} if has_global else None,
            "clients": clients,
            **({"party": "server"} if party_clients is not None else {}),
        }
        write_json(self.directory / MANIFEST, manifest)
        return manifest


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n")


def complete_manifest(directory: Path) -> dict:
    """A cross-silo server's manifest with each client's own entry (``client_<k>/client.json``) in place of its
    path, as the simulator writes it. A client that wrote none (its party died) moves to ``missing_clients``, so
    loaders and cards name it instead of reaching for a folder that is not there."""
    directory = Path(directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    clients, missing = [], []
    for entry in manifest["clients"]:
        own = directory / client_dir_name(entry["client"]) / CLIENT_FILE
        if own.is_file():
            clients.append(json.loads(own.read_text()))
        else:
            missing.append({"client": entry["client"], "reason": f"its party wrote no {entry['path']}/{CLIENT_FILE}: "
                                                                 "it did not finish the deployment"})
    manifest.pop("party", None)
    manifest["clients"] = clients
    if missing:
        manifest["missing_clients"] = missing
    write_json(directory / MANIFEST, manifest)
    return manifest


def save_backbone(model: AdapterModel, weights: dict[str, torch.Tensor], directory: Path, base_model: str) -> None:
    """A client's own backbone (its trained or cut local model) as a transformers checkpoint without classifier,
    with the base model's image processor, so that the folder loads like the shared ``backbone/``."""
    config = model.backbone.get_base_model().config
    vit = ViTForImageClassification(config)
    vit.classifier = nn.Identity()
    vit.load_state_dict(weights, strict=True)
    vit.save_pretrained(str(directory), safe_serialization=True)
    load_image_processor(base_model).save_pretrained(str(directory))

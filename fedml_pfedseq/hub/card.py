"""The model card of a run: ``cards/templates/personalized_adapters.md`` filled from the run folder.

Everything comes from the files a run writes (recipe.yaml, adapters/manifest.json), so a card can be made for any
finished run, on any machine. Its snippet loads client k and evaluates it on its own test split with transformers,
peft and datasets alone, reading what it needs from the client's folder (adapter_config.json's base model,
head_config.json, splits.json): no fedml-pfedseq code, and nothing the reader must learn from this project's source.
A cross-silo server's manifest has no client accuracies (each client party reports its own in
``adapters/client_<k>/client.json``); its card says where they are instead of tabulating them.

The YAML header is built with ``huggingface_hub.ModelCardData`` (the Hub's metadata format, with the mean test
accuracy as a model-index result) and checked by parsing the card back with ``ModelCard``; the Hub (or the local
endpoint) validates it again when the card is pushed.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from fedml_pfedseq.errors import UserError
from fedml_pfedseq.hub.adapters import CLIENT_FILE, MANIFEST, is_hub_id
from fedml_pfedseq.results import format_table
from fedml_pfedseq.shipped import CARD_TEMPLATES_DIR

TEMPLATE = CARD_TEMPLATES_DIR / "personalized_adapters.md"


class CardError(UserError, ValueError):
    """A run folder a card cannot be made from, or a card whose metadata does not validate."""


def read_run(run_dir: Path) -> tuple[dict, dict]:
    """The run's recipe (raw sections) and adapter manifest, naming whichever file is missing."""
    run_dir = Path(run_dir)
    found = []
    for name in ("recipe.yaml", f"adapters/{MANIFEST}"):
        path = run_dir / name
        if not path.is_file():
            hint = " (run with hub_args.save_adapters: true)" if name.startswith("adapters") else ""
            raise CardError(f"{run_dir} is not a finished run folder: {name} is missing{hint}")
        found.append(yaml.safe_load(path.read_text()) if name.endswith(".yaml") else json.loads(path.read_text()))
    return tuple(found)


def partition_text(data: dict) -> str:
    if data["partition_method"] == "column":
        return f"one client per value of the column `{data['partition_column']}` (natural, real-world split)"
    if data["partition_method"] == "silo":
        return "each client's own data, kept on its silo (one file per client; not in this repo)"
    return f"Dirichlet label skew, alpha = {data['partition_alpha']}"


def client_meaning(data: dict, manifest: dict, seed: int) -> str:
    """Which part of the data client k is, in words (the partition is deterministic, but not obvious), and the
    transform its images pass through where the recipe gives clusters one."""
    shifts = data.get("cluster_transforms")
    shifted = (f"; client k's images pass through transform k mod {len(shifts)} (counting from 0) of "
               f"{', '.join(shifts)} (`data_args.cluster_transforms`)") if shifts else ""
    return where_client_data(data, manifest, seed) + shifted


def where_client_data(data: dict, manifest: dict, seed: int) -> str:
    """Which rows of the data client k holds."""
    if data["partition_method"] == "column":
        column = data["partition_column"]
        first = {c["client"]: c.get("partition_value") for c in manifest["clients"]}.get(0)
        example = f" (client 0 is {column} {first})" if first is not None else ""
        return f"client k holds the k-th distinct value of the column `{column}`, in sorted order{example}"
    if data["partition_method"] == "silo":
        return "client k is the silo whose file is the k-th of the recipe's `data_args.data_files`"
    return (f"client k is the k-th part of a Dirichlet(alpha = {data['partition_alpha']}) label split of the whole "
            f"dataset, drawn with the recipe's seed ({seed})")


def load_dataset_args(source: dict) -> str:
    """``datasets.load_dataset``'s arguments as Python source: the path first, then the keywords."""
    rest = [f"{key}={json.dumps(value)}" for key, value in source.items() if key != "path"]
    return ", ".join([json.dumps(source["path"]), *rest])


def label_list(label_names: list[str]) -> str:
    return ", ".join(f"`{i}` {name}" for i, name in enumerate(label_names))


def reported_by_clients(clients: list[dict]) -> dict:
    """The card's results for a manifest whose clients each report their accuracy in their own folder."""
    table = format_table(["client", "its model and reported accuracy"],
                         [[c["client"], f"`{c['path']}/`, `{c['path']}/{CLIENT_FILE}`"] for c in clients])
    return {"results_table": table}


def results(clients: list[dict], partition_column: str | None) -> dict:
    """The card's results: the per-client table (with each client's partition value, e.g. its drawer) and the means
    over clients."""
    test = [c["test_accuracy"] for c in clients]
    sizes = [c["test_samples"] for c in clients]
    by_value = [partition_column] if partition_column else []
    by_shift = ["image transform"] if any(c.get("shift", "identity") != "identity" for c in clients) else []
    table = format_table(["client", *by_value, *by_shift, "test accuracy", "validation accuracy", "test images",
                          "own backbone"],
                         [[c["client"], *[c.get("partition_value") for _ in by_value],
                           *[c.get("shift") for _ in by_shift], c["test_accuracy"], c["validation_accuracy"],
                           c["test_samples"], "yes" if c.get("backbone") else "no"] for c in clients])
    return {"results_table": table, "mean_test_accuracy": f"{statistics.fmean(test):.4f}",
            "std_test_accuracy": f"{statistics.pstdev(test):.4f}",
            "mean_validation_accuracy": f"{statistics.fmean(c['validation_accuracy'] for c in clients):.4f}",
            "test_samples_range": f"{min(sizes)}-{max(sizes)}" if min(sizes) != max(sizes) else str(sizes[0])}


def build_card(run_dir: str | Path, repo_id: str, backbone_pushed: bool) -> ModelCard:
    """The filled card for ``run_dir`` as it will be pushed to ``repo_id``."""
    run_dir = Path(run_dir)
    recipe, manifest = read_run(run_dir)
    model, data, train = recipe["model_args"], recipe["data_args"], recipe["train_args"]
    clients = manifest["clients"]
    by_server = manifest.get("party") == "server"
    base_hub_id = manifest.get("base_model_hub_id")
    base_display = base_hub_id or Path(manifest["base_model"]).name  # a bundled name, or a local folder's name
    source = (manifest.get("data") or {}).get("load_dataset")  # None with "silo" data: each client's own file
    partition_column = data["partition_column"] if data["partition_method"] == "column" else None
    card_data = ModelCardData(
        model_name=repo_id.split("/")[-1],
        library_name="peft",
        pipeline_tag="image-classification",
        base_model=base_hub_id or repo_id,  # a pushed backbone is not on the Hub on its own: it is in this repo
        datasets=[data["hub_id"]] if data.get("hub_id") else None,
        tags=["federated-learning", "personalized-federated-learning", "lora", "peft", "fedml", "vit",
              manifest["method"].lower()],
        eval_results=None if by_server else [EvalResult(
            task_type="image-classification", dataset_type=data["dataset"],
            dataset_name=f"{data['dataset']} (local test split of each client)", dataset_split="test",
            metric_type="accuracy", metric_name="mean client accuracy",
            metric_value=round(statistics.fmean(c["test_accuracy"] for c in clients), 4))],
    )
    hyperparameters = {"train_args": {k: train[k] for k in ("comm_round", "epochs", "batch_size", "learning_rate",
                                                             "client_optimizer", "momentum", "weight_decay")},
                       "model_args": model, "algorithm_args": recipe.get("algorithm_args") or {}}
    head_hidden = manifest.get("hidden_size") or _hidden_size(run_dir, clients)  # older manifests lack it
    card = ModelCard.from_template(
        card_data, template_path=str(TEMPLATE), repo_id=repo_id,
        model_name=repo_id.split("/")[-1], method=manifest["method"], recipe_name=manifest["recipe"],
        rounds=manifest["round"], num_clients=len(clients) + len(manifest.get("missing_clients", [])),
        missing_clients=", ".join(str(m["client"]) for m in manifest.get("missing_clients", [])),
        base_model=base_display,
        backbone_pushed=backbone_pushed,
        label_list=label_list(manifest["label_names"]),
        client_meaning=client_meaning(data, manifest, recipe["common_args"]["random_seed"]),
        partition_column=partition_column,
        by_silo=source is None,
        load_dataset_args=source and load_dataset_args(source),
        data_file=source and source.get("data_files"),
        eval_batch_size=recipe["validation_args"]["eval_batch_size"],
        has_global=manifest.get("global") is not None,
        global_head=bool(manifest.get("global") and manifest["global"].get("head")),
        has_learner=(run_dir / "seq_learner" / "config.json").is_file(),
        any_client_backbone=any(c.get("backbone") for c in clients),
        local_adapters=(run_dir / clients[0]["path"] / "local" / "adapter_config.json").is_file(),
        by_server=by_server,
        lora_r=model["lora_r"], lora_alpha=model["lora_alpha"], lora_dropout=model["lora_dropout"],
        lora_target_modules=", ".join(f"`{m}`" for m in model["lora_target_modules"]),
        hidden_size=head_hidden, num_labels=manifest["num_labels"], seed=recipe["common_args"]["random_seed"],
        dataset=data["dataset"], dataset_split=data["dataset_split"], dataset_hub_id=data.get("hub_id"),
        partition=partition_text(data), split_fractions=" / ".join(str(f) for f in data["split_fractions"]),
        samples_per_client=data.get("samples_per_client"),
        scenario=recipe["common_args"].get("federated_scenario") or "not stated in the recipe",
        hyperparameters=yaml.safe_dump(hyperparameters, sort_keys=False).strip(),
        **(reported_by_clients(clients) if by_server else results(clients, partition_column)),
    )
    check_card(card)
    return card


def _hidden_size(run_dir: Path, clients: list[dict]) -> int | str:
    """The head's input width, read from client 0's head.safetensors header (no tensor is loaded)."""
    from safetensors import safe_open

    with safe_open(str(run_dir / clients[0]["path"] / "head.safetensors"), framework="pt") as f:
        return int(f.metadata().get("in_features", "0")) or "?"


def check_card(card: ModelCard) -> None:
    """Parse the card back as the Hub client does; its metadata must survive the round trip."""
    try:
        parsed = ModelCard(str(card))
    except ValueError as err:
        raise CardError(f"the generated model card's metadata does not parse: {err}") from None
    if parsed.data.to_dict() != card.data.to_dict():
        raise CardError("the generated model card's metadata changed when parsed back")


def write_card(run_dir: str | Path, repo_id: str, backbone_pushed: bool) -> Path:
    """Write the card as ``<run_dir>/README.md`` (the repo's front page once pushed)."""
    path = Path(run_dir) / "README.md"
    path.write_text(str(build_card(run_dir, repo_id, backbone_pushed)))
    return path


def backbone_needs_push(base_model: str) -> bool:
    """A backbone that is not on the Hub (a local folder or one bundled here) travels with the run, in ``backbone/``."""
    return not is_hub_id(base_model)

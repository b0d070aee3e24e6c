"""Push a finished run to a Hugging Face Hub model repo, in one commit, with ``huggingface_hub.HfApi``.

What goes up (the layout is documented in the README, "Sharing on the Hub"): the model card (README.md, made
here from the run), ``recipe.yaml``, the metrics, ``adapters/`` (every client's PEFT adapter and head, the global
adapter, the manifest), server artifacts such as pFedSeq's ``seq_learner/`` (its weights and the code that loads them
with ``trust_remote_code``), and ``backbone/`` when the recipe's backbone is not a Hub id (a bundled or local model),
so that the repo loads on its own. Files the repo holds from an earlier push but this run does not have are deleted
in the same commit: after a push the repo is exactly this run.

Tensors go up as safetensors only: files that need pickle to load (.pt, .bin, .pkl, ...) are skipped and listed.
The commit is one request, so a failed push leaves the repo's previous revision as it was; the run folder is never
modified (the card is made in memory), and ``pfedseq push RUN_DIR --repo-id ...`` retries.

In a cross-silo deployment every party pushes only what it owns, each in its own commit, and deletes stale files
only among those: client k ``adapters/client_<k>/`` (``push_client``), the server everything else but the metrics
assembled from the clients' reports (``push_run`` on a folder whose manifest says ``"party": "server"``). So the
parties may push at once, in any order. ``push_run`` tells the three kinds of folder apart, so ``pfedseq push``
retries any of them.
"""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants

from fedml_pfedseq.checkpoint import CHECKPOINT_FILE
from fedml_pfedseq.errors import UserError
from fedml_pfedseq.hub.adapters import BACKBONE_DIR, CLIENT_FILE, MANIFEST, client_dir_name
from fedml_pfedseq.hub.card import CardError, backbone_needs_push, build_card, read_run
from fedml_pfedseq.inputs import resolve_backbone

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib")
CHECKPOINT_DIR = "hub_checkpoint"  # where hub_args.hub_push_every assembles a round's checkpoint (round_push.py)
LOCAL_ONLY = ("logs", "parties", CHECKPOINT_DIR, "grpc_ipconfig.csv", CHECKPOINT_FILE)  # deployment logs, progress,
# address book, checkpoints: not the model (the run's checkpoint goes up only when asked: ``with_checkpoint``)
CLIENT_OUTPUTS = ("summary.json", "metrics.json", "metrics.csv", "train_metrics.csv", "final_table.md",
                  "learning_curve.png")  # assembled from every client's metrics: never pushed by a cross-silo server
BACKBONE_FILES = ("config.json", "preprocessor_config.json")


class PushError(UserError, RuntimeError):
    """A push that did not land; the message names the endpoint, the repo and how to retry."""


@dataclass
class PushResult:
    repo_id: str
    endpoint: str
    commit: str
    commit_url: str
    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # local files not pushed (pickle formats), with the reason


def hub_endpoint(endpoint: str | None = None) -> str:
    """The endpoint a push goes to: the argument, else $HF_ENDPOINT (read now, not at import), else the Hub."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def server_owns(path: str) -> bool:
    """What a cross-silo server pushes: not the clients' folders, not the outputs made from their metrics."""
    return not path.startswith("adapters/client_") and path not in CLIENT_OUTPUTS


def everything(path: str) -> bool:
    return True


def run_files(run_dir: Path, under: str = "", owns=everything) -> tuple[dict[str, Path], list[str]]:
    """The files in ``run_dir / under`` that ``owns`` by their path in the repo, and those left out because they
    would need pickle. Folders it does not own are not even listed: on one machine the parties of a deployment
    share the run folder, and the others may be rewriting theirs."""
    files, skipped = {}, []
    for folder, dirs, names in os.walk(run_dir / under):
        rel = Path(folder).relative_to(run_dir).as_posix()
        prefix = "" if rel == "." else rel + "/"
        dirs[:] = [d for d in dirs if not d.startswith(".") and (prefix or d not in LOCAL_ONLY)
                   and owns(f"{prefix}{d}/")]
        for name in names:
            path = prefix + name
            if name.startswith(".") or (not prefix and name in LOCAL_ONLY) or not owns(path):
                continue
            if Path(name).suffix.lower() in PICKLE_SUFFIXES:
                skipped.append(f"{path} (a pickle format; only safetensors are pushed)")
                continue
            files[path] = Path(folder) / name
    return dict(sorted(files.items())), sorted(skipped)


def backbone_files(base_model: str) -> dict[str, Path]:
    """The backbone's config, image processor and safetensors weights, under ``backbone/``."""
    try:
        directory = Path(resolve_backbone(base_model))
    except FileNotFoundError as err:
        raise PushError(f"the run's backbone {base_model!r} is not on the Hub and not on this machine, so the repo "
                        f"could not be loaded on its own: {err}") from None
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        raise PushError(f"backbone {directory} has no .safetensors weights; only safetensors are pushed")
    found = [directory / name for name in BACKBONE_FILES if (directory / name).is_file()] + weights
    return {f"{BACKBONE_DIR}/{p.name}": p for p in found}


def explain(err: Exception, repo_id: str) -> str:
    """One line on what went wrong: the error, the server's own message, and what to check."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = f"{type(err).__name__}: {first}"
    server = getattr(err, "server_message", None)
    if server and server not in text:
        text += f" ({server.strip()})"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):
        text += f". Check that the token ($HF_TOKEN or `hf auth login`) may write to {repo_id}"
    elif "connect" in type(err).__name__.lower() or "timeout" in type(err).__name__.lower():
        text += ". The endpoint did not answer: is it running and is HF_ENDPOINT (or --endpoint) right?"
    return text


def commit(run_dir: Path, repo_id: str, files: dict[str, Path | bytes], skipped: list[str], owns, message: str,
           private: bool, endpoint: str | None, token: str | None) -> PushResult:
    """Create ``repo_id`` if needed (exist_ok: parties may race to create it) and commit ``files`` in one commit,
    deleting the repo's files that ``owns`` and ``files`` lacks; nothing else in the repo is touched."""
    endpoint = hub_endpoint(endpoint)
    retry = (f"The run's files are kept in {run_dir}; the repo's previous revision is unchanged (a commit lands "
             f"whole or not at all). Retry with: pfedseq push {run_dir} --repo-id {repo_id}")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        stale = sorted(p for p in set(api.list_repo_files(repo_id, repo_type="model")) - set(files)
                       if p != ".gitattributes" and owns(p))
        operations = [CommitOperationDelete(path_in_repo=p) for p in stale]
        operations += [CommitOperationAdd(path_in_repo=p, path_or_fileobj=local if isinstance(local, bytes)
                                          else str(local)) for p, local in files.items()]
        info = api.create_commit(repo_id, operations, commit_message=message, repo_type="model")
    except Exception as err:  # noqa: BLE001 - any failure of the transfer is reported the same way, with its cause
        raise PushError(f"pushing {run_dir} to {repo_id} on {endpoint} failed: {explain(err, repo_id)}\n{retry}") \
            from err
    result = PushResult(repo_id, endpoint, info.oid, info.commit_url, sorted(files), stale, skipped)
    print(f"pushed {run_dir} to {endpoint}/{repo_id}: {len(files)} files, {len(stale)} stale deleted "
          f"(commit {info.oid})" + (f"; not pushed: {', '.join(skipped)}" if skipped else ""))
    return result


def push_client(run_dir: str | Path, client: int, repo_id: str, private: bool = True, endpoint: str | None = None,
                token: str | None = None, commit_message: str | None = None) -> PushResult:
    """A cross-silo client party's push: its ``adapters/client_<k>/`` alone (with ``client.json``, its reported
    accuracies), in a commit of its own naming the party."""
    run_dir, folder = Path(run_dir), f"adapters/{client_dir_name(client)}"
    entry_path = run_dir / folder / CLIENT_FILE
    if not entry_path.is_file():
        raise PushError(f"cannot push client {client} of {run_dir} to {repo_id}: {folder}/{CLIENT_FILE} is missing "
                        "(a cross-silo client party writes it after its final evaluation)")
    entry = json.loads(entry_path.read_text())
    owns = lambda path: path.startswith(folder + "/")  # noqa: E731
    files, skipped = run_files(run_dir, folder, owns)
    message = commit_message or f"pfedseq: cross-silo client {client}: its adapter and head"
    return commit(run_dir, repo_id, files, skipped, owns, f"{message}, test accuracy {entry['test_accuracy']:.4f}",
                  private, endpoint, token)


def push_run(run_dir: str | Path, repo_id: str, private: bool = True, endpoint: str | None = None,
             token: str | None = None, commit_message: str | None = None, with_checkpoint: bool = False) -> PushResult:
    """Make the run's card, then create ``repo_id`` (if needed) and commit the run and the card in one commit.
    ``with_checkpoint``: also the run's ``checkpoint.safetensors`` (every client's state: heads, personal models,
    PeFLL's feature statistics), so that ``pfedseq run --resume-from REPO`` continues the run.

    What goes up depends on whose folder it is: a simulator run or an assembled deployment, whole; a cross-silo
    server's folder (its manifest says ``"party": "server"``), everything it owns (``server_owns``); a cross-silo
    client's folder (one ``adapters/client_<k>/client.json``, no manifest), that client's folder (``push_client``)."""
    run_dir = Path(run_dir)
    own = sorted(run_dir.glob(f"adapters/client_*/{CLIENT_FILE}"))
    if not (run_dir / "adapters" / MANIFEST).is_file() and len(own) == 1:
        return push_client(run_dir, json.loads(own[0].read_text())["client"], repo_id, private, endpoint, token)
    try:
        _, manifest = read_run(run_dir)
        extra = backbone_files(manifest["base_model"]) if backbone_needs_push(manifest["base_model"]) else {}
        card = str(build_card(run_dir, repo_id, backbone_pushed=bool(extra))).encode()
    except CardError as err:
        raise PushError(f"cannot push {run_dir} to {repo_id}: {err}") from None
    by_server = manifest.get("party") == "server"
    owns = server_owns if by_server else everything
    files, skipped = run_files(run_dir, owns=owns)
    files.update(extra)
    if with_checkpoint:
        if not (run_dir / CHECKPOINT_FILE).is_file():
            raise PushError(f"cannot push {run_dir} with its checkpoint: it has no {CHECKPOINT_FILE} "
                            "(common_args.checkpoint: false?)")
        files[CHECKPOINT_FILE] = run_dir / CHECKPOINT_FILE
    files["README.md"] = card  # the card, made for this repo (the run folder is left as it is)
    title = f"pfedseq: {manifest['recipe']} ({manifest['method']}), round {manifest['round']}"
    message = commit_message or (f"{title}, cross-silo server: global adapter, server state, recipe, card" if by_server
                                 else f"{title}, mean test accuracy "
                                      f"{statistics.fmean(c['test_accuracy'] for c in manifest['clients']):.4f}")
    return commit(run_dir, repo_id, files, skipped, owns, message, private, endpoint, token)

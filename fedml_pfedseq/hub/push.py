"""Push a finished run to a Hugging Face Hub model repo, in one commit, with ``huggingface_hub.HfApi``.

What goes up (the layout is documented in the README, "Sharing on the Hub"): the model card (README.md, made
here from the run), ``recipe.yaml``, the metrics, ``adapters/`` (every client's PEFT adapter and head, the global
adapter, the manifest), server artifacts such as pFedSeq's ``seq_learner/``, and ``backbone/`` when the recipe's
backbone is not a Hub id (a bundled or local model), so that the repo loads on its own. Files the repo holds from an
earlier push but this run does not have are deleted in the same commit: after a push the repo is exactly this run.

Tensors go up as safetensors only: files that need pickle to load (.pt, .bin, .pkl, ...) are skipped and listed.
The commit is one request, so a failed push leaves the repo's previous revision as it was; the run folder is never
modified (the card is made in memory), and ``pfedseq push RUN_DIR --repo-id ...`` retries.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants

from fedml_pfedseq.adapter_model import resolve_backbone
from fedml_pfedseq.hub.adapters import BACKBONE_DIR
from fedml_pfedseq.hub.card import CardError, backbone_needs_push, build_card, read_run

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib")
CHECKPOINT_DIR = "hub_checkpoint"  # where hub_args.hub_push_every assembles a round's checkpoint (round_push.py)
LOCAL_ONLY_DIRS = ("logs", "parties", CHECKPOINT_DIR)  # deployment logs and progress, checkpoints: not the model
BACKBONE_FILES = ("config.json", "preprocessor_config.json")


class PushError(RuntimeError):
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


def run_files(run_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """The run folder's files by their path in the repo, and those left out because they would need pickle."""
    files, skipped = {}, []
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(run_dir)
        if rel.parts[0] in LOCAL_ONLY_DIRS or any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in PICKLE_SUFFIXES:
            skipped.append(f"{rel.as_posix()} (a pickle format; only safetensors are pushed)")
            continue
        files[rel.as_posix()] = path
    return files, skipped


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


def push_run(run_dir: str | Path, repo_id: str, private: bool = True, endpoint: str | None = None,
             token: str | None = None, commit_message: str | None = None) -> PushResult:
    """Make the run's card, then create ``repo_id`` (if needed) and commit the run and the card in one commit."""
    run_dir = Path(run_dir)
    endpoint = hub_endpoint(endpoint)
    retry = (f"The run's files are kept in {run_dir}; the repo's previous revision is unchanged (a commit lands "
             f"whole or not at all). Retry with: pfedseq push {run_dir} --repo-id {repo_id}")
    try:
        _, summary, manifest = read_run(run_dir)
        extra = backbone_files(manifest["base_model"]) if backbone_needs_push(manifest["base_model"]) else {}
        card = str(build_card(run_dir, repo_id, backbone_pushed=bool(extra))).encode()
    except CardError as err:
        raise PushError(f"cannot push {run_dir} to {repo_id}: {err}") from None
    files, skipped = run_files(run_dir)
    files.update(extra)
    files["README.md"] = card  # the card, made for this repo (the run folder is left as it is)
    message = commit_message or (f"pfedseq: {manifest['recipe']} ({manifest['method']}), round {manifest['round']}, "
                                 f"mean test accuracy {summary['final_test_accuracy_mean']:.4f}")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        stale = sorted(set(api.list_repo_files(repo_id, repo_type="model")) - set(files) - {".gitattributes"})
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

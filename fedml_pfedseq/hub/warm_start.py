"""Warm starts from a pushed (or saved) run: continue the run itself from its checkpoint (``find_checkpoint``, what
``pfedseq run --resume-from`` does), or start a new pFedSeq run with that run's SeqLearner (``warm_start_learner``).

``hub_args.hub_learner_init`` names a Hub repo id or a run folder holding ``seq_learner/`` (what pFedSeq's
``save_artifacts`` writes and ``pfedseq push`` uploads). The learner's weights (psi) carry over; the server's
history of updates, its normalisers and Adam's moments start afresh, so the first L rounds of the new run refill
the window the learner reads. Loaded with ``use_safetensors=True``: no pickle.
"""
from __future__ import annotations

from pathlib import Path

from fedml_pfedseq.checkpoint import CHECKPOINT_FILE, CheckpointError
from fedml_pfedseq.config import RecipeError
from fedml_pfedseq.hub.push import hub_endpoint

LEARNER_DIR = "seq_learner"
SHAPING = ("num_clients", "num_adapter_layers", "max_seq_len", "architecture", "cross_client", "num_blocks",
           "state_size", "expand", "conv_kernel", "dt_rank", "hidden_size", "magnitude_preserving", "mixing_rank",
           "memory")


def find_checkpoint(source: str | Path, revision: str | None = None, endpoint: str | None = None) -> Path:
    """The checkpoint file of ``source`` (a run folder, or a repo pushed with ``hub_args.push_checkpoint``, downloaded
    to the Hub cache), for ``run_recipe(resume_from=...)``, which copies it into the run once it is accepted."""
    missing = CheckpointError(f"--resume-from: {source} has no {CHECKPOINT_FILE} (push the run with "
                              "hub_args.push_checkpoint: true or `pfedseq push --with-checkpoint`)")
    if Path(source).is_dir():
        found = Path(source) / CHECKPOINT_FILE
        if not found.is_file():
            raise missing
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            found = Path(hf_hub_download(str(source), CHECKPOINT_FILE, revision=revision,
                                         endpoint=hub_endpoint(endpoint)))
        except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
            raise missing from None
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
            raise CheckpointError(f"--resume-from: cannot download {CHECKPOINT_FILE} of {source} from "
                                  f"{hub_endpoint(endpoint)}: {err}") from None
    return found


def load_learner(source: str | Path, revision: str | None = None, endpoint: str | None = None):
    """The SeqLearner saved under ``<source>/seq_learner`` (a run folder) or in the repo ``source``."""
    from fedml_pfedseq.models.seq_learner import SeqLearnerModel

    if Path(source).is_dir():
        return SeqLearnerModel.from_pretrained(str(Path(source) / LEARNER_DIR), use_safetensors=True)
    from huggingface_hub import snapshot_download

    local = snapshot_download(str(source), revision=revision, endpoint=hub_endpoint(endpoint),
                              allow_patterns=[f"{LEARNER_DIR}/*.json", f"{LEARNER_DIR}/*.safetensors"])
    if not (Path(local) / LEARNER_DIR / "config.json").is_file():
        raise RecipeError(f"hub_args.hub_learner_init: {source} has no {LEARNER_DIR}/ (push a pFedSeq run)")
    return SeqLearnerModel.from_pretrained(str(Path(local) / LEARNER_DIR), use_safetensors=True)


def warm_start_learner(server, source: str | Path, revision: str | None = None, endpoint: str | None = None) -> None:
    """Copy the saved learner's weights into ``server.learner``; its shape-giving config must match this run's."""
    learner = getattr(server, "learner", None)
    if learner is None:
        raise RecipeError(f"hub_args.hub_learner_init: {type(server).__name__} has no SeqLearner to warm-start")
    loaded = load_learner(source, revision, endpoint)
    differ = [f"{k}: saved {getattr(loaded.config, k)!r}, this run {getattr(learner.config, k)!r}"
              for k in SHAPING if getattr(loaded.config, k) != getattr(learner.config, k)]
    if differ:
        raise RecipeError(f"hub_args.hub_learner_init: the learner in {source} does not fit this run "
                          f"({'; '.join(differ)})")
    learner.load_state_dict(loaded.state_dict())

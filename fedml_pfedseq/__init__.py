"""fedml-pfedseq: personalized federated adapter tuning (pFedSeq) as a FedML plugin around Hugging Face models.

The public names below are imported on first use (PEP 562), so ``import fedml_pfedseq`` and the ``pfedseq`` command
do not pay for torch, PEFT and FedML until something needs them.
"""
import importlib

_PUBLIC = {
    "AdapterModel": "fedml_pfedseq.adapter_model",
    "LayerLayout": "fedml_pfedseq.lora_state",
    "METHODS": "fedml_pfedseq.strategies",
    "PushError": "fedml_pfedseq.hub.push",
    "Recipe": "fedml_pfedseq.config",
    "RecipeError": "fedml_pfedseq.config",
    "build_federated_data": "fedml_pfedseq.data.federated",
    "build_federation": "fedml_pfedseq.federation",
    "deploy": "fedml_pfedseq.cross_silo.launcher",
    "evaluate_client": "fedml_pfedseq.hub.load",
    "load_client_classifier": "fedml_pfedseq.hub.load",
    "load_recipe": "fedml_pfedseq.config",
    "method_class": "fedml_pfedseq.strategies",
    "partition_by_column": "fedml_pfedseq.data.partition",
    "partition_dirichlet": "fedml_pfedseq.data.partition",
    "push_run": "fedml_pfedseq.hub.push",
    "run_federation": "fedml_pfedseq.simulation",
    "run_recipe": "fedml_pfedseq.simulation",
    "run_suite": "fedml_pfedseq.suite",
    "split_train_val_test": "fedml_pfedseq.data.partition",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fedml_pfedseq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

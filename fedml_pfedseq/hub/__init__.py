"""Sharing runs on the Hugging Face Hub: adapters on disk in PEFT format, pushing a run with its model card, and
loading a client's personalized classifier back (a Hub stand-in for offline use: ``fedml_pfedseq.testing``).

Names are imported on first use (PEP 562), so reading a card needs no torch."""
import importlib

_PUBLIC = {
    "AdapterWriter": "adapters", "CardError": "card", "build_card": "card", "write_card": "card",
    "HubLoadError": "load", "PersonalizedClassifier": "load", "evaluate_client": "load",
    "load_client_classifier": "load", "PushError": "push", "PushResult": "push",
    "push_client": "push", "push_run": "push",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fedml_pfedseq.hub' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    globals()[name] = value
    return value

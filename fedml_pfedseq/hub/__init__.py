"""Sharing runs on the Hugging Face Hub: adapters on disk in PEFT format, a Hub-compatible local endpoint, pushing
a run with its model card, and loading a client's personalized classifier back."""
from fedml_pfedseq.hub.adapters import AdapterWriter
from fedml_pfedseq.hub.card import CardError, build_card, write_card
from fedml_pfedseq.hub.load import HubLoadError, PersonalizedClassifier, evaluate_client, load_client_classifier
from fedml_pfedseq.hub.local_endpoint import LocalHubServer
from fedml_pfedseq.hub.push import PushError, PushResult, push_client, push_run

__all__ = [
    "AdapterWriter", "CardError", "HubLoadError", "LocalHubServer", "PersonalizedClassifier", "PushError",
    "PushResult", "build_card", "evaluate_client", "load_client_classifier", "push_client", "push_run", "write_card",
]

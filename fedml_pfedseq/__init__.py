"""fedml-pfedseq: personalized federated adapter tuning (pFedSeq) as a FedML plugin around Hugging Face models."""
from fedml_pfedseq.adapter_model import AdapterModel
from fedml_pfedseq.config import Recipe, RecipeError, load_recipe
from fedml_pfedseq.cross_silo.launcher import deploy
from fedml_pfedseq.data.federated import build_federated_data
from fedml_pfedseq.data.partition import partition_by_column, partition_dirichlet, split_train_val_test
from fedml_pfedseq.federation import build_federation
from fedml_pfedseq.hub import LocalHubServer, PushError, evaluate_client, load_client_classifier, push_run
from fedml_pfedseq.lora_state import LayerLayout
from fedml_pfedseq.simulation import run_federation, run_recipe
from fedml_pfedseq.strategies import METHODS, method_class
from fedml_pfedseq.suite import run_suite

__all__ = [
    "AdapterModel", "LayerLayout", "LocalHubServer", "METHODS", "PushError", "Recipe", "RecipeError",
    "build_federated_data", "build_federation", "deploy", "evaluate_client", "load_client_classifier", "load_recipe",
    "method_class", "partition_by_column", "partition_dirichlet", "push_run", "run_federation", "run_recipe",
    "run_suite", "split_train_val_test",
]

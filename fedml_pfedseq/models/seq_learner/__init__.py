"""pFedSeq's sequential learner as a Hugging Face model (configuration + modeling, as in transformers).

Importing this package registers it with the Auto classes: ``AutoModel.from_pretrained(dir)`` loads a saved learner.
It also marks both classes for the Auto classes' remote code, so that ``save_pretrained`` writes ``auto_map`` into
config.json and copies the modeling code beside the weights: a pushed learner then loads with
``AutoModel.from_pretrained(folder, trust_remote_code=True)`` where this project is not installed, ``folder`` being
``seq_learner/`` of a download of the repo (transformers looks for remote code at a repo's root, never in the
``subfolder`` it is given).
"""
from transformers import AutoConfig, AutoModel

from .configuration_seq_learner import ARCHITECTURES, SeqLearnerConfig
from .modeling_seq_learner import SeqLearnerModel
from .proxy_gradient import update_proxy_gradient
from .scan import selective_scan, selective_scan_loop

AutoConfig.register(SeqLearnerConfig.model_type, SeqLearnerConfig, exist_ok=True)
AutoModel.register(SeqLearnerConfig, SeqLearnerModel, exist_ok=True)
SeqLearnerConfig.register_for_auto_class("AutoConfig")
SeqLearnerModel.register_for_auto_class("AutoModel")

__all__ = ["ARCHITECTURES", "SeqLearnerConfig", "SeqLearnerModel", "selective_scan", "selective_scan_loop",
           "update_proxy_gradient"]

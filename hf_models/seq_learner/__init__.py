"""pFedSeq's sequential learner as a Hugging Face model (configuration + modeling, as in transformers).

Importing this package registers it with the Auto classes: ``AutoModel.from_pretrained(dir)`` loads a saved learner.
"""
from transformers import AutoConfig, AutoModel

from hf_models.seq_learner.configuration_seq_learner import ARCHITECTURES, SeqLearnerConfig
from hf_models.seq_learner.modeling_seq_learner import SeqLearnerModel
from hf_models.seq_learner.scan import selective_scan, selective_scan_loop

AutoConfig.register(SeqLearnerConfig.model_type, SeqLearnerConfig, exist_ok=True)
AutoModel.register(SeqLearnerConfig, SeqLearnerModel, exist_ok=True)

__all__ = ["ARCHITECTURES", "SeqLearnerConfig", "SeqLearnerModel", "selective_scan", "selective_scan_loop"]

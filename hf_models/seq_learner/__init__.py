"""pFedSeq's sequential learner as a Hugging Face model (configuration + modeling, as in transformers)."""
from hf_models.seq_learner.configuration_seq_learner import ARCHITECTURES, SeqLearnerConfig
from hf_models.seq_learner.modeling_seq_learner import SeqLearnerModel
from hf_models.seq_learner.scan import selective_scan, selective_scan_loop

__all__ = ["ARCHITECTURES", "SeqLearnerConfig", "SeqLearnerModel", "selective_scan", "selective_scan_loop"]

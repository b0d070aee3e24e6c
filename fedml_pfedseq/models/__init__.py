"""Hugging Face model packages of this library, each self-contained as a transformers model folder is (its
configuration, its modeling code and what they need, nothing else of fedml-pfedseq): pFedSeq's ``seq_learner``."""

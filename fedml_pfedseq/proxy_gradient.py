"""Training a server-side network with clients' updates as gradient proxies (pFedSeq eq. 5, pFedHN eq. 4): the one
helper lives beside the SeqLearner (hf_models/seq_learner/proxy_gradient.py), whose pushed code must not import this
library; pFedHN, PeFLL and pFedLA use it from here."""
from hf_models.seq_learner.proxy_gradient import update_proxy_gradient

__all__ = ["update_proxy_gradient"]

"""Training a server-side network with clients' updates as gradient proxies (pFedSeq eq. 5, pFedHN eq. 4).

A server network with parameters psi produces what a client receives (an adapter, a calibration). The client
trains it and returns its update Delta = trained - received, a descent direction of its loss, so -Delta stands in
for dL/d(received) and the chain rule gives the network's gradient without any client data at the server.

It lives here, beside the learner, because ``save_pretrained`` pushes this folder's code with the learner's weights:
``AutoModel.from_pretrained(..., trust_remote_code=True)`` then loads it without fedml-pfedseq installed.
"""
from __future__ import annotations

import torch


def update_proxy_gradient(outputs: torch.Tensor, params: list[torch.nn.Parameter], update: torch.Tensor,
                          retain_graph: bool = False) -> list[torch.Tensor]:
    """g = (d outputs / d params)^T (-update), one tensor per parameter (zeros where outputs do not depend on it)."""
    if update.shape != outputs.shape:
        raise ValueError(f"update shape {tuple(update.shape)} != outputs shape {tuple(outputs.shape)}")
    grads = torch.autograd.grad(outputs, params, grad_outputs=-update.to(outputs.dtype), allow_unused=True,
                                retain_graph=retain_graph)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

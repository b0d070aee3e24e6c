"""Configuration of pFedSeq's sequential learner (one learner per adapted backbone layer, grouped in one model)."""
from __future__ import annotations

import math

from transformers import PretrainedConfig

ARCHITECTURES = ("mamba", "mlp", "lstm")  # the paper's Selective SSM; variant D; variant E


class SeqLearnerConfig(PretrainedConfig):
    """What shapes the learner: its input is a window of updates [D, L, N] per layer (batch D, sequence L, channels N).

    Args:
        num_clients: N, the channel count (clients' updates of one round, stacked).
        num_adapter_layers: how many backbone layers carry an adapter; each gets its own learner.
        max_seq_len: L_max, the longest window of rounds the learner reads (the MLP reads exactly this many).
        architecture: "mamba" (Selective SSM, the paper's), "mlp" (variant D) or "lstm" (variant E).
        cross_client: False is variant C: one learner reads each client's own sequence (1 channel) separately.
        mixing_rank: R (beyond the paper): the learner reads R learned mixtures of the N client channels and maps its
            R outputs back to the N clients, so its cost grows with N R instead of N^2 (for hundreds of clients);
            None: every channel is a client (the paper's full mixing).
        num_blocks: Mamba blocks (paper: 2), or MLP hidden layers / LSTM layers.
        state_size: M, the SSM state per channel (paper: 16).
        expand: E, channel expansion inside a Mamba block (our choice: 2, as Mamba).
        conv_kernel: the causal depthwise convolution's width over rounds.
        dt_rank: rank of the input-dependent step size's projection (None: ceil(channels / 16)).
        hidden_size: width of the MLP and LSTM learners.
        output_scale_init: initial value of each layer's learnable output scale, so that an untrained learner adds a
            calibration of about this fraction of an update's RMS (see ``SeqLearnerModel``).
        magnitude_preserving: True (default): the blocks' norm only caps outliers, the readout has no bias and the
            latest update has a path to the output, so the output scales with the input; False: the learner of runs
            before this design. A saved config.json without the key was written by such a run, so it loads as
            False (``transformers_version`` marks a config read from a file).
        memory: True (beyond the paper): the learner also reads what it output last, xi^{t-1}, and adds it to its
            output, xi^t = xi^{t-1} + f(window, xi^{t-1}), so a per-entry state persists across rounds (see
            ``SeqLearnerModel``); False: xi^t is a function of the window alone (the paper's).
        memory_decay: rho in (0, 1] (with ``memory``): the learner reads rho xi^{t-1} in its place, xi^t =
            rho xi^{t-1} + f(window, rho xi^{t-1}), a state that forgets at rate rho a round (1: keeps all).
    """

    model_type = "pfedseq_seq_learner"

    def __init__(self, num_clients: int = 20, num_adapter_layers: int = 12, max_seq_len: int = 10,
                 architecture: str = "mamba", cross_client: bool = True, num_blocks: int = 2, state_size: int = 16,
                 expand: int = 2, conv_kernel: int = 4, dt_rank: int | None = None, hidden_size: int = 64,
                 output_scale_init: float = 0.1, rms_norm_eps: float = 1e-5, magnitude_preserving: bool | None = None,
                 mixing_rank: int | None = None, memory: bool = False, memory_decay: float = 1.0, **kwargs):
        checks = {"num_clients": num_clients, "num_adapter_layers": num_adapter_layers, "max_seq_len": max_seq_len,
                  "num_blocks": num_blocks, "state_size": state_size, "expand": expand, "conv_kernel": conv_kernel,
                  "hidden_size": hidden_size}
        for name, value in checks.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SeqLearnerConfig.{name} must be a positive integer, got {value!r}")
        if mixing_rank is not None and (not isinstance(mixing_rank, int) or mixing_rank < 1 or not cross_client):
            raise ValueError("SeqLearnerConfig.mixing_rank must be a positive integer (or None) and needs "
                             f"cross_client, got {mixing_rank!r} with cross_client={cross_client}")
        if not 0 < memory_decay <= 1 or (memory_decay != 1 and not memory):
            raise ValueError(f"SeqLearnerConfig.memory_decay must be in (0, 1], and 1 without memory, got "
                             f"{memory_decay!r} with memory={memory}")
        if architecture not in ARCHITECTURES:
            raise ValueError(f"SeqLearnerConfig.architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        self.num_clients = num_clients
        self.num_adapter_layers = num_adapter_layers
        self.max_seq_len = max_seq_len
        self.architecture = architecture
        self.cross_client = cross_client
        self.mixing_rank = mixing_rank
        self.memory = memory
        self.memory_decay = memory_decay
        self.num_blocks = num_blocks
        self.state_size = state_size
        self.expand = expand
        self.conv_kernel = conv_kernel
        self.dt_rank = dt_rank or math.ceil(self.num_channels / 16)
        self.hidden_size = hidden_size
        self.output_scale_init = output_scale_init
        self.rms_norm_eps = rms_norm_eps
        if magnitude_preserving is None:  # absent: a new learner, or one saved before the key existed
            magnitude_preserving = "transformers_version" not in kwargs
        self.magnitude_preserving = magnitude_preserving
        super().__init__(**kwargs)

    @property
    def num_channels(self) -> int:
        """Channels the learner sees: all clients, R mixtures of them (``mixing_rank``), or one (variant C)."""
        return (self.mixing_rank or self.num_clients) if self.cross_client else 1

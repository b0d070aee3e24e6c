"""pFedSeq's sequential learner (paper eq. 2, 6, 7; Fig. 3b) as a Hugging Face ``PreTrainedModel``.

For each adapted backbone layer l, the learner reads the window of the last L rounds of all clients' updates of that
layer, Delta in R^{D_l x L x N}: the D_l adapter parameters are the batch, the L rounds the sequence, the N clients
the channels. Its output at the last round is the calibration xi in R^{D_l x N}, one column per client. So the
learner's size depends on N, never on D; ``d_chunk`` bounds memory by processing the batch in slices.

Imports within this folder are relative and nothing else of fedml-pfedseq is imported: ``save_pretrained`` copies
this file and the ones it imports next to the weights (the Auto classes are registered in ``__init__``), so a pushed
``seq_learner/`` loads with ``AutoModel.from_pretrained(..., trust_remote_code=True)`` and transformers alone.

Normalisation (our choice; the paper's appendix is not available): updates are ~1e-4..1e-2, so the caller passes a
per-layer scale s (the server's running RMS of updates) and the learner computes xi = s * f(Delta / s), with
f(x) = output_scale * (x_last + g(x)): a learnable per-layer ``output_scale`` (initialised to
``config.output_scale_init``) times the latest normalised update plus what the architecture g reads from the window.
Nothing inside f scales a parameter's N client values up to unit size (the blocks' norm only caps rows above the
layer's RMS, ``CappedRMSNorm``) and g's readout has no bias, so the output keeps the input's magnitude: f(c x)
follows c, and xi = c * Delta is f with g = 0. An untrained learner adds about ``output_scale_init`` of an update.
``magnitude_preserving=False`` is the learner before this design (an RMSNorm over the client channels in each block
and before a biased readout, no path from the latest update), kept to measure what the change does.

Memory (``config.memory``, beyond the paper): the learner also reads what it output last, m = xi^{t-1} / s, and
adds it to its output, f(x, m) = m + output_scale * (x_last + g(x + w * cap(m))). So xi keeps a state per entry
across rounds, which the window alone cannot (it holds the last L updates, and they shrink as xi nears its
ideal). m enters g added to every round's input with a learnt weight w per channel (zero at first, so an untrained
learner with memory moves xi as one without it does), each row capped like the blocks' norm (an RMS over its
channels above 1 is scaled to 1: xi grows to many updates' size); g's channel mixing then decides which clients'
states to pool. The caller holds xi^{t-1} (the server's last calibrations) and treats it as an input: a gradient
flows through f's last step, not back through the rounds that produced it. ``config.memory_decay`` rho < 1 reads
m = rho xi^{t-1} / s in its place, so the state forgets at rate rho a round.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .configuration_seq_learner import SeqLearnerConfig
from .cpu_kernels import FusedConvSiLU, kernels_apply
from .proxy_gradient import update_proxy_gradient
from .scan import apart, selective_scan, side_by_side

Descent = Callable[[torch.Tensor, slice], torch.Tensor]  # (xi of a chunk of rows, the rows) -> that chunk's descent


class CappedRMSNorm(nn.RMSNorm):
    """RMSNorm that only shrinks: a row whose RMS over the channels is above 1 is scaled to 1, a smaller one passes
    as it is (times the learnt gain). Inputs are in units of the layer's update RMS, so typical rows keep their
    magnitude, while an outlier cannot drive a block, whose B, C and gate all grow with its input, into
    overflow (without any norm, one outlier entry reached 1e7 update RMSs on the known-answer problem)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., c]
        return capped_rms_norm(x, self.weight, self.eps)


def capped_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # x: [..., c]
    rms = x.pow(2).mean(-1, keepdim=True).add(eps).sqrt()
    return x / rms.clamp_min(1.0) * weight


def causal_conv_silu(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """silu of a depthwise causal convolution over rounds: u [..., b, L, e], weight [..., e, K], bias [..., e] ->
    [..., b, L, e], leading dims being groups with their own weight and bias. The fused CPU kernel where it runs (on
    CPU the grouped convolution's backward cost more than the rest of a block), else ``F.conv1d`` over the groups'
    channels side by side with its right padding dropped."""
    if kernels_apply(u, weight, bias):
        return FusedConvSiLU.apply(u, weight, bias)
    side, (length, kernel) = side_by_side(u), (u.shape[-2], weight.shape[-1])  # [b, G e, L]
    v = F.conv1d(side, weight.reshape(-1, 1, kernel), bias.reshape(-1), padding=kernel - 1, groups=side.shape[1])
    return F.silu(apart(v[..., :length], u.shape))


def blocks_forward(blocks: list[MambaBlock], x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
    """G layers' blocks (one each, alike in shape) at once: x [G, b, L, c] -> [G, b, L, c], or with ``last_only``
    [G, b, c]. The projections are batched matmuls over the layers, and the conv and scan take the layers as their
    leading dim, so a round's learner steps cost one call per block instead of one per layer and block; every
    tensor stays in that [G, b, L, ...] layout."""
    first, (G, c) = blocks[0], (x.shape[0], x.shape[-1])

    def stack(name: str) -> torch.Tensor:  # [G, ...]: that parameter of each layer's block
        return torch.stack([operator.attrgetter(name)(block) for block in blocks])

    def project(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # [G, ..., k] @ [G, n, k]^T -> [G, ..., n]
        return torch.bmm(t.reshape(G, -1, t.shape[-1]), weight.transpose(1, 2)).reshape(*t.shape[:-1], -1)

    h = x
    if isinstance(first.norm, CappedRMSNorm):
        h = capped_rms_norm(h, stack("norm.weight")[:, None, None], first.norm.eps)
    else:  # the legacy RMSNorm
        h = F.rms_norm(h, (c,), eps=first.norm.eps) * stack("norm.weight")[:, None, None]
    u, z = (project(h, w) for w in stack("in_proj.weight").chunk(2, dim=1))  # [G, b, L, e] each
    m = first.state_size
    u = causal_conv_silu(u, stack("conv1d.weight").squeeze(2), stack("conv1d.bias"))  # weight [G, e, K]
    dt, B, C = project(u, stack("x_proj.weight")).split([first.dt_rank, m, m], dim=-1)
    dt = project(dt, stack("dt_proj.weight"))  # [G, b, L, e]; the scan adds the bias (softplus)
    y = selective_scan(u, dt, -torch.exp(stack("A_log")), B, C, stack("D"), z=z, dt_bias=stack("dt_proj.bias"),
                       dt_softplus=True, last_only=last_only)  # [G, b, L, e], or [G, b, e]
    out = project(y, stack("out_proj.weight"))
    return x[:, :, -1] + out if last_only else x + out


def learners_forward(learners: list[MambaLearner], x: torch.Tensor) -> torch.Tensor:
    """G layers' Mamba learners at once: x [G, b, L, c] -> [G, b, c] (``blocks_forward`` block by block)."""
    for k in range(len(learners[0].blocks) - 1):
        x = blocks_forward([learner.blocks[k] for learner in learners], x)
    x = blocks_forward([learner.blocks[-1] for learner in learners], x, last_only=True)  # [G, b, c]
    if isinstance(learners[0].norm, nn.RMSNorm):  # the legacy learner's norm before its readout
        gains = torch.stack([learner.norm.weight for learner in learners])[:, None]
        x = F.rms_norm(x, (x.shape[-1],), eps=learners[0].norm.eps) * gains
    out = torch.bmm(x, torch.stack([learner.readout.weight for learner in learners]).transpose(1, 2))
    if learners[0].readout.bias is not None:
        out = out + torch.stack([learner.readout.bias for learner in learners])[:, None]
    return out


class MambaBlock(nn.Module):
    """norm -> in_proj -> causal depthwise conv -> SiLU -> selective SSM -> gate SiLU(z) -> out_proj -> residual."""

    def __init__(self, config: SeqLearnerConfig):
        super().__init__()
        c, e, m = config.num_channels, config.expand * config.num_channels, config.state_size
        self.dt_rank, self.state_size = config.dt_rank, m
        # over the N clients of one parameter: the legacy RMSNorm sets each parameter's N-vector to unit size
        norm = CappedRMSNorm if config.magnitude_preserving else nn.RMSNorm
        self.norm = norm(c, eps=config.rms_norm_eps)
        self.in_proj = nn.Linear(c, 2 * e, bias=False)
        self.conv1d = nn.Conv1d(e, e, config.conv_kernel, groups=e, padding=config.conv_kernel - 1)
        self.x_proj = nn.Linear(e, self.dt_rank + 2 * m, bias=False)  # input-dependent dt, B, C
        self.dt_proj = nn.Linear(self.dt_rank, e)
        self.A_log = nn.Parameter(torch.empty(e, m))
        self.D = nn.Parameter(torch.empty(e))
        self.out_proj = nn.Linear(e, c, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's initialisation of the SSM: A = -(1..M), D = 1, dt log-uniform in [1e-3, 1e-1]."""
        e, m = self.A_log.shape
        self.A_log.copy_(torch.log(torch.arange(1, m + 1, dtype=torch.float32)).repeat(e, 1))
        self.D.fill_(1.0)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(e) * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x: [b, L, c] -> [b, L, c], or with ``last_only`` the last round's [b, c] (all that a learner's last block
        has to give: the rest of its rounds then skip the scan's readout, the gate and the output projection)."""
        return blocks_forward([self], x[None], last_only)[0]


class MambaLearner(nn.Module):
    """The paper's learner: a stack of Mamba blocks; the last round's output read out per channel."""

    def __init__(self, config: SeqLearnerConfig):
        super().__init__()
        legacy = not config.magnitude_preserving
        self.blocks = nn.ModuleList(MambaBlock(config) for _ in range(config.num_blocks))
        self.norm = nn.RMSNorm(config.num_channels, eps=config.rms_norm_eps) if legacy else nn.Identity()
        self.readout = nn.Linear(config.num_channels, config.num_channels, bias=legacy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [b, L, c] -> [b, c]
        return learners_forward([self], x[None])[0]


class MLPLearner(nn.Module):
    """Variant D: an MLP over the flattened window [L_max * c]; rounds before the first are zeros. Without biases
    (magnitude-preserving) a ReLU MLP is positively homogeneous: f(c x) = c f(x) for c > 0."""

    def __init__(self, config: SeqLearnerConfig):
        super().__init__()
        self.max_seq_len = config.max_seq_len
        widths = [config.max_seq_len * config.num_channels] + [config.hidden_size] * config.num_blocks
        bias = not config.magnitude_preserving
        layers = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(width_in, width_out, bias=bias), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(widths[-1], config.num_channels, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [b, L, c] -> [b, c]
        x = F.pad(x, (0, 0, self.max_seq_len - x.shape[1], 0))  # [b, L_max, c], zero rounds in front
        return self.net(x.flatten(1))


class LSTMLearner(nn.Module):
    """Variant E: an LSTM over rounds (same cell at every step, no selectivity); the last step read out. Without
    biases (magnitude-preserving) an all-zero window gives a zero output, as the Mamba stack does."""

    def __init__(self, config: SeqLearnerConfig):
        super().__init__()
        bias = not config.magnitude_preserving
        self.lstm = nn.LSTM(config.num_channels, config.hidden_size, num_layers=config.num_blocks, batch_first=True,
                            bias=bias)
        self.readout = nn.Linear(config.hidden_size, config.num_channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [b, L, c] -> [b, c]
        return self.readout(self.lstm(x)[0][:, -1])


LEARNERS = {"mamba": MambaLearner, "mlp": MLPLearner, "lstm": LSTMLearner}


class ClientMixing(nn.Module):
    """A learner R channels wide between two linear maps (``mixing_rank``): N clients -> R mixtures -> learner -> R
    outputs -> N clients. Its cost then grows with N R, where the full learner's projections grow with N^2. Neither
    map has a bias, so the magnitude-preserving design holds."""

    def __init__(self, config: SeqLearnerConfig, learner: nn.Module):
        super().__init__()
        self.mix = nn.Linear(config.num_clients, config.mixing_rank, bias=False)
        self.learner = learner
        self.unmix = nn.Linear(config.mixing_rank, config.num_clients, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [b, L, N] -> [b, N]
        return self.unmix(self.learner(self.mix(x)))


def build_learner(config: SeqLearnerConfig) -> nn.Module:
    """One layer's learner: the configured architecture, between client mixing maps where ``mixing_rank`` is set."""
    learner = LEARNERS[config.architecture](config)
    return ClientMixing(config, learner) if config.mixing_rank else learner


def row_chunks(rows: int, d_chunk: int | None) -> list[slice]:
    """Slices of ``d_chunk`` rows covering ``rows`` (one slice when d_chunk is None)."""
    step = d_chunk or rows
    if step < 1:
        raise ValueError(f"d_chunk must be positive, got {d_chunk}")
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


class SeqLearnerModel(PreTrainedModel):
    """One sequential learner per adapted backbone layer, saved and loaded together."""

    config_class = SeqLearnerConfig
    base_model_prefix = "seq_learner"
    main_input_name = "updates"

    def __init__(self, config: SeqLearnerConfig):
        super().__init__(config)
        self.learners = nn.ModuleList(build_learner(config) for _ in range(config.num_adapter_layers))
        self.output_scale = nn.Parameter(torch.full((config.num_adapter_layers,), float(config.output_scale_init)))
        if config.memory:  # w: each input channel's weight of the capped memory, per layer
            self.memory_weight = nn.Parameter(torch.zeros(config.num_adapter_layers, config.num_clients
                                                          if config.cross_client else 1))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's own initialisation for every module (and Mamba's for the SSM), not transformers' N(0, 0.02)."""
        if module is self:
            self.output_scale.fill_(self.config.output_scale_init)
            if self.config.memory:
                self.memory_weight.zero_()
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()

    def _check(self, updates: torch.Tensor, layer: int, previous: torch.Tensor | None) -> None:
        c = self.config
        if not 0 <= layer < c.num_adapter_layers:
            raise IndexError(f"layer {layer} out of range: this learner has {c.num_adapter_layers} layers")
        if updates.dim() != 3 or updates.shape[2] != c.num_clients:
            raise ValueError(f"updates must be [D, L, N={c.num_clients}], got {tuple(updates.shape)}")
        if not 1 <= updates.shape[1] <= c.max_seq_len:
            raise ValueError(f"window of {updates.shape[1]} rounds; this learner reads 1..{c.max_seq_len}")
        if c.memory and (previous is None or previous.shape != (updates.shape[0], updates.shape[2])):
            got = None if previous is None else tuple(previous.shape)
            raise ValueError(f"a learner with memory reads its last output [D, N] = "
                             f"{(updates.shape[0], updates.shape[2])} beside the updates, got {got}")
        if not c.memory and previous is not None:
            raise ValueError("previous calibrations given to a learner without memory (config.memory is False)")

    def forward(self, updates: torch.Tensor, layer: int, previous: torch.Tensor | None = None) -> torch.Tensor:
        """f(updates) for one layer: normalised updates [D, L, N] -> normalised calibrations [D, N]; with memory,
        f(updates, previous), ``previous`` [D, N] being the last output in the same units."""
        return self.forward_layers(updates[None], [layer], None if previous is None else previous[None])[0]

    def forward_layers(self, updates: torch.Tensor, layers: list[int],
                       previous: torch.Tensor | None = None) -> torch.Tensor:
        """``forward`` for several layers with the same D at once: [G, D, L, N] (and previous [G, D, N]) ->
        [G, D, N]. Their Mamba learners run together, one call per block (``learners_forward``)."""
        for i, layer in enumerate(layers):
            self._check(updates[i], layer, None if previous is None else previous[i])
        g, d, length, n = updates.shape
        inputs = updates
        if self.config.memory:  # m = rho previous; w * cap(m), the same for every round of the window
            previous = previous * self.config.memory_decay
            capped = previous / previous.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1.0)
            inputs = updates + (capped * self.memory_weight[layers][:, None]).unsqueeze(2)
        if not self.config.cross_client:  # variant C: each client's own sequence, as 1-channel rows
            updates, inputs = (x.permute(0, 1, 3, 2).reshape(g, d * n, length, 1) for x in (updates, inputs))
        learners = [self.learners[layer] for layer in layers]
        if all(isinstance(learner, MambaLearner) for learner in learners):
            out = learners_forward(learners, inputs)  # [G, b, c]
        else:
            out = torch.stack([learner(x) for learner, x in zip(learners, inputs)])
        if self.config.magnitude_preserving:
            out = updates[:, :, -1] + out  # the path from the latest update: xi = c * Delta is g = 0
        out = out.reshape(g, d, n) * self.output_scale[layers][:, None, None]
        return previous + out if self.config.memory else out

    def _scaled(self, updates: torch.Tensor, scales: list[float], layers: list[int], units: list[float | None],
                previous: torch.Tensor | None) -> torch.Tensor:
        """unit * f(updates / scale) per layer: [G, D, L, N] -> [G, D, N]."""
        scale = updates.new_tensor(scales)[:, None, None]
        unit = updates.new_tensor([s if u is None else u for s, u in zip(scales, units)])[:, None, None]
        return unit * self.forward_layers(updates / scale[..., None], layers,
                                          None if previous is None else previous / unit)

    @torch.no_grad()
    def calibrate(self, updates: torch.Tensor, scale: float, layer: int, d_chunk: int | None = None,
                  unit: float | None = None, previous: torch.Tensor | None = None) -> torch.Tensor:
        """xi = unit * f(updates / scale): [D, L, N] -> [D, N], computed ``d_chunk`` rows at a time.

        ``unit`` is the output's unit, by default ``scale`` (xi at the updates' size); variant A, whose output is the
        adapter itself, passes the adapter's own size. A learner with memory also reads ``previous`` [D, N], its
        last output (xi^{t-1}, in xi's units).
        """
        return self.calibrate_layers([updates], [scale], [layer], d_chunk, [unit],
                                     None if previous is None else [previous])[0]

    @torch.no_grad()
    def calibrate_layers(self, updates: list[torch.Tensor], scales: list[float], layers: list[int],
                         d_chunk: int | None = None, units: list[float | None] | None = None,
                         previous: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """``calibrate`` for several layers, each with its own window [D_l, L, N]: the layers of one D together."""
        chunks = [[] for _ in layers]
        for group, _, xi in self._chunks(updates, scales, layers, d_chunk, units, previous):
            for k, i in enumerate(group):
                chunks[i].append(xi[k])
        return [torch.cat(chunk) for chunk in chunks]

    def _chunks(self, updates, scales, layers, d_chunk, units, previous):
        """(layer indices of one D, the chunk's rows, their xi [G, rows, N] with its graph) for each group of layers
        alike in shape and each chunk of ``d_chunk`` rows."""
        units = units or [None] * len(layers)
        groups: dict[tuple, list[int]] = {}
        for i, window in enumerate(updates):
            groups.setdefault(tuple(window.shape), []).append(i)
        for group in groups.values():
            stacked = torch.stack([updates[i] for i in group])
            memory = None if previous is None else torch.stack([previous[i] for i in group])
            group_scales, group_layers, group_units = ([values[i] for i in group] for values in (scales, layers, units))
            for rows in row_chunks(stacked.shape[1], d_chunk):
                yield group, rows, self._scaled(stacked[:, rows], group_scales, group_layers, group_units,
                                                None if memory is None else memory[:, rows])

    def layer_parameters(self, layer: int) -> list[nn.Parameter]:
        """The parameters that a layer's calibration depends on: its learner's, the output scales (and the memory
        weights)."""
        return self.layers_parameters([layer])

    def layers_parameters(self, layers: list[int]) -> list[nn.Parameter]:
        """The parameters that these layers' calibrations depend on: their learners', then the shared ones."""
        shared = [self.output_scale, self.memory_weight] if self.config.memory else [self.output_scale]
        return [p for layer in layers for p in self.learners[layer].parameters()] + shared

    def proxy_gradient(self, updates: torch.Tensor, scale: float, layer: int, descent: torch.Tensor | Descent,
                       d_chunk: int | None = None, unit: float | None = None,
                       previous: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The learner's gradient with a client update as the proxy of the loss gradient (paper eq. 5).

        ``descent`` [D, N] is the clients' updates Delta^t, a descent direction, so -Delta stands for dL/dxi:
        g = sum_i (d xi_i / d psi)^T (-Delta_i), accumulated over chunks of ``d_chunk`` rows. ``descent`` may
        instead be a function of (xi of a chunk, its rows) giving that chunk's descent: ``target[rows] - xi`` is the
        gradient of 0.5 ||xi - target||^2 (a regression of xi onto a target, whose gradient at xi = sent is eq. 5's
        with target = sent + Delta). ``previous`` is a memory learner's last output, as in ``calibrate``: an input,
        so the gradient is f's last step's.
        Returns one gradient per parameter of ``layer_parameters(layer)`` (every other parameter's is zero) and
        xi [D, N] (detached).
        """
        grads, xis = self.proxy_gradient_layers([updates], [scale], [layer], [descent], d_chunk, [unit],
                                                None if previous is None else [previous])
        return grads, xis[0]

    def proxy_gradient_layers(self, updates: list[torch.Tensor], scales: list[float], layers: list[int],
                              descents: list[torch.Tensor | Descent], d_chunk: int | None = None,
                              units: list[float | None] | None = None, previous: list[torch.Tensor] | None = None,
                              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``proxy_gradient`` of the sum over several layers (the layers of one D in one call per block and chunk):
        one gradient per parameter of ``layers_parameters(layers)``, and xi per layer (detached)."""
        for window, descent in zip(updates, descents):
            if not callable(descent) and descent.shape != (window.shape[0], window.shape[2]):
                raise ValueError(f"descent must be [D, N] = {(window.shape[0], window.shape[2])}, "
                                 f"got {tuple(descent.shape)}")
        params = self.layers_parameters(layers)
        grads = [torch.zeros_like(p) for p in params]
        calibrations = [[] for _ in layers]
        for group, rows, xi in self._chunks(updates, scales, layers, d_chunk, units, previous):
            chunk_descent = torch.stack([descents[i](xi[k].detach(), rows) if callable(descents[i])
                                         else descents[i][rows] for k, i in enumerate(group)])
            torch._foreach_add_(grads, update_proxy_gradient(xi, params, chunk_descent))
            for k, i in enumerate(group):
                calibrations[i].append(xi[k].detach())
        return grads, [torch.cat(chunks) for chunks in calibrations]

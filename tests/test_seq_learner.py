"""The sequential learner: the scan against a plain recurrence, causality, chunking, the proxy gradient, variants."""
from __future__ import annotations

import functools

import pytest
import torch

from fedml_pfedseq.models.seq_learner import (
    SeqLearnerConfig,
    SeqLearnerModel,
    cpu_kernels,
    selective_scan,
    selective_scan_loop,
)
from fedml_pfedseq.models.seq_learner import modeling_seq_learner as modeling
from fedml_pfedseq.models.seq_learner import scan as scan_module
from fedml_pfedseq.models.seq_learner.modeling_seq_learner import causal_conv_silu
from fedml_pfedseq.models.seq_learner.reference import reference_implementation


def scan_inputs(b=3, length=6, d=4, m=5, dtype=torch.float64, seed=0, groups=None):
    """u, dt, A, B, C, D; with a leading dim of ``groups`` scans where it is given."""
    g = torch.Generator().manual_seed(seed)
    lead = () if groups is None else (groups,)
    u = torch.randn(*lead, b, length, d, generator=g, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(*lead, b, length, d, generator=g, dtype=dtype))
    A = -torch.rand(*lead, d, m, generator=g, dtype=dtype) * 2 - 0.1
    B = torch.randn(*lead, b, length, m, generator=g, dtype=dtype)
    C = torch.randn(*lead, b, length, m, generator=g, dtype=dtype)
    D = torch.randn(*lead, d, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (u, dt, A, B, C, D)]


def reference_scan(u, dt, A, B, C, D):
    """A plain recurrence written independently: scalar state per (row, channel, state), discretised up front."""
    b, length, d = u.shape
    m = A.shape[1]
    dA = torch.exp(dt[..., None] * A)  # [b, L, d, m]
    dBu = dt[..., None] * B[:, :, None, :] * u[..., None]  # [b, L, d, m]
    y = []
    for row in range(b):
        h = [[u.new_zeros(()) for _ in range(m)] for _ in range(d)]
        out_row = []
        for j in range(length):
            out_step = []
            for c in range(d):
                h[c] = [dA[row, j, c, k] * h[c][k] + dBu[row, j, c, k] for k in range(m)]
                out_step.append(sum(h[c][k] * C[row, j, k] for k in range(m)) + D[c] * u[row, j, c])
            out_row.append(torch.stack(out_step))
        y.append(torch.stack(out_row))
    return torch.stack(y)


def test_scan_matches_plain_recurrence_forward_and_gradients():
    inputs = scan_inputs()
    fast, slow = selective_scan(*inputs), reference_scan(*inputs)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * weights).sum(), inputs)
    grads_slow = torch.autograd.grad((slow * weights).sum(), inputs)
    for name, gf, gs in zip("u dt A B C D".split(), grads_fast, grads_slow):
        torch.testing.assert_close(gf, gs, rtol=1e-10, atol=1e-12, msg=f"gradient w.r.t. {name}")


def test_scan_gradients_match_finite_differences():
    assert torch.autograd.gradcheck(selective_scan_loop, tuple(scan_inputs(b=2, length=4, d=2, m=3)))


def loop_with_extras(u, dt, A, B, C, D, z=None, dt_bias=None, dt_softplus=False):
    """mamba-ssm's ``selective_scan_fn`` semantics written out around the loop: softplus(dt + bias) steps, silu(z)
    gate."""
    dt = dt + (0 if dt_bias is None else dt_bias[..., None, None, :])
    y = selective_scan_loop(u, torch.nn.functional.softplus(dt) if dt_softplus else dt, A, B, C, D)
    return y if z is None else y * torch.nn.functional.silu(z)


def mamba_ssm_stand_in(calls):
    """mamba-ssm's ``selective_scan_fn`` on its layout, written with the loop: u, dt, z [b, G e, L], A [G e, M],
    B and C [b, G, M, L] (group g's e channels read B[:, g]), D and delta_bias [G e]; records the shapes it gets."""
    def kernel(u, dt, A, B, C, D, z=None, delta_bias=None, delta_softplus=False):
        calls.append((u.shape, B.shape, None if z is None else z.shape, delta_softplus))
        e, t = u.shape[1] // B.shape[1], (lambda x: None if x is None else x.transpose(1, 2))  # noqa: E731
        return torch.cat([t(loop_with_extras(
            t(u[:, ch]), t(dt[:, ch]), A[ch], t(B[:, g]), t(C[:, g]), D[ch], None if z is None else t(z[:, ch]),
            None if delta_bias is None else delta_bias[ch], delta_softplus))
            for g, ch in enumerate(torch.arange(u.shape[1]).split(e))], dim=1)
    return kernel


@pytest.mark.parametrize("groups", [None, 3], ids=["one scan", "3 groups"])
def test_scan_hands_the_cuda_kernel_its_channels_first_layout(monkeypatch, groups):
    """The mamba-ssm path hands the kernel its [b, d, L] / [b, G, M, L] layout, the leading dim's groups side by
    side as its n_groups, passes the gate and the step's bias and softplus on, and brings the result back; a
    stand-in kernel with that layout must give the loop's result."""
    calls = []
    monkeypatch.setattr(scan_module, "cuda_kernel", lambda u: mamba_ssm_stand_in(calls))
    inputs = [x.detach().float() for x in scan_inputs(b=2, length=5, d=3, m=4, groups=groups)]
    lead = inputs[0].shape[:-3]
    z, bias = torch.randn(*lead, 2, 5, 3), torch.randn(*lead, 3)
    for last_only in (False, True):
        expected = loop_with_extras(*inputs, z, bias, True)
        torch.testing.assert_close(scan_module.selective_scan(*inputs, z=z, dt_bias=bias, dt_softplus=True,
                                                              last_only=last_only),
                                   expected[..., -1, :] if last_only else expected)
    G = groups or 1
    assert calls == [(torch.Size([2, 3 * G, 5]), torch.Size([2, G, 4, 5]), torch.Size([2, 3 * G, 5]), True)] * 2


@pytest.mark.parametrize("groups", [None, 3], ids=["one scan", "3 groups"])
@pytest.mark.parametrize("last_only", [False, True])
@pytest.mark.parametrize("extras", ["none", "gate", "bias+softplus", "all"])
def test_the_fused_cpu_scan_matches_the_loop(last_only, extras, groups):
    """cpu_kernels.FusedScan, forward and every gradient, against the loop with the extras written out (float64,
    so only rounding differs); one scan, or a leading dim of groups with their own parameters."""
    assert cpu_kernels.status()[0], cpu_kernels.status()[1]  # the kernels build on the machines the tests run on
    inputs = scan_inputs(b=3, length=6, d=6, m=4, groups=groups)
    lead = inputs[0].shape[:-3]
    g = torch.Generator().manual_seed(3)
    z = torch.randn(*lead, 3, 6, 6, generator=g, dtype=torch.float64, requires_grad=True) \
        if extras in ("gate", "all") else None
    bias = torch.randn(*lead, 6, generator=g, dtype=torch.float64, requires_grad=True) \
        if extras in ("bias+softplus", "all") else None
    softplus = bias is not None
    fused = scan_module.selective_scan(*inputs, z=z, dt_bias=bias, dt_softplus=softplus, last_only=last_only)
    loop = loop_with_extras(*inputs, z, bias, softplus)
    loop = loop[..., -1, :] if last_only else loop
    torch.testing.assert_close(fused, loop, rtol=1e-12, atol=1e-12)
    leaves = [*inputs, *(t for t in (z, bias) if t is not None)]
    weights = torch.randn(fused.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((fused * weights).sum(), leaves),
                    torch.autograd.grad((loop * weights).sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_fused_cpu_scan_in_float32_is_as_exact_as_the_float32_loop():
    """float32 (the kernel's inlined exp, clamped below e^-87): as close to the float64 loop as PyTorch's float32
    loop is, over steps dt * A from 0 to -300 (far past the clamp)."""
    g = torch.Generator().manual_seed(5)
    b, length, d, m = 256, 6, 8, 4
    u, B, C = (torch.randn(*shape, generator=g) for shape in ((b, length, d), (b, length, m), (b, length, m)))
    dt = torch.rand(b, length, d, generator=g) * 3
    A, D = -torch.rand(d, m, generator=g) * 100, torch.randn(d, generator=g)
    exact = selective_scan_loop(*(t.double() for t in (u, dt, A, B, C, D)))
    for y in (cpu_kernels.FusedScan.apply(u, dt, A, B, C, D, None, None, False, False),
              selective_scan_loop(u, dt, A, B, C, D)):
        torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))


def test_the_fused_cpu_scan_passes_gradcheck():
    u, dt, A, B, C, D = scan_inputs(b=2, length=4, d=3, m=2)
    z, bias = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64,
                                                                                          requires_grad=True)
    def scan(*x, last_only):
        return cpu_kernels.FusedScan.apply(*x[:6], x[6][:, -1] if last_only else x[6], x[7], True, last_only)

    for last_only in (False, True):
        assert torch.autograd.gradcheck(functools.partial(scan, last_only=last_only), (u, dt, A, B, C, D, z, bias))


@pytest.mark.parametrize("code", ["fused kernel", "PyTorch code"])
def test_the_causal_conv_matches_the_grouped_convolution(monkeypatch, code):
    """causal_conv_silu on CPU (the fused kernel, or the F.conv1d it falls back on) against each group's own
    nn.Conv1d with its right padding dropped, two groups with their own weights as the leading dim, for windows
    shorter and longer than the kernel width, forward and gradients."""
    if code == "PyTorch code":
        monkeypatch.setattr(modeling, "kernels_apply", lambda *tensors: False)
    convs = [torch.nn.Conv1d(5, 5, 4, groups=5, padding=3).double() for _ in range(2)]
    params = [p for conv in convs for p in (conv.weight, conv.bias)]
    for length in (1, 3, 7):
        u = torch.randn(2, 3, length, 5, dtype=torch.float64, requires_grad=True)
        ours = causal_conv_silu(u, torch.stack([conv.weight[:, 0] for conv in convs]),
                                torch.stack([conv.bias for conv in convs]))
        module = torch.stack([torch.nn.functional.silu(conv(x.transpose(1, 2))[..., :length].transpose(1, 2))
                              for conv, x in zip(convs, u)])
        torch.testing.assert_close(ours, module)
        weights = torch.randn_like(ours)
        for a, b in zip(torch.autograd.grad((ours * weights).sum(), [u, *params]),
                        torch.autograd.grad((module * weights).sum(), [u, *params])):
            torch.testing.assert_close(a, b)


def test_the_fused_conv_passes_gradcheck():
    assert torch.autograd.gradcheck(lambda *x: cpu_kernels.FusedConvSiLU.apply(*x),
                                    (torch.randn(2, 2, 5, 3, dtype=torch.float64, requires_grad=True),
                                     torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True),
                                     torch.randn(2, 3, dtype=torch.float64, requires_grad=True)))


def test_scan_on_cpu_never_asks_for_the_cuda_kernel():
    assert scan_module.cuda_kernel(torch.zeros(1)) is None


def make_learner(seed=0, **kwargs) -> SeqLearnerModel:
    defaults = dict(num_clients=4, num_adapter_layers=2, max_seq_len=5, state_size=4, hidden_size=8)
    torch.manual_seed(seed)
    return SeqLearnerModel(SeqLearnerConfig(**{**defaults, **kwargs}))


def window(d=11, length=5, n=4, seed=1):
    return torch.randn(d, length, n, generator=torch.Generator().manual_seed(seed))


def test_mamba_blocks_are_causal():
    """The stack's output at round j ignores rounds after j."""
    learner = make_learner().learners[0]
    x = window()
    later = x.clone()
    later[:, 3:] += torch.randn_like(later[:, 3:])

    def run(h):
        for block in learner.blocks:
            h = block(h)
        return h

    torch.testing.assert_close(run(x)[:, :3], run(later)[:, :3], rtol=0, atol=0)
    assert not torch.allclose(run(x)[:, 3:], run(later)[:, 3:])


@pytest.mark.parametrize("architecture", ["mamba", "mlp", "lstm"])
def test_any_window_length_up_to_the_maximum(architecture):
    learner = make_learner(architecture=architecture)
    for length in range(1, 6):
        assert learner(window(length=length), layer=1).shape == (11, 4)
    with pytest.raises(ValueError, match="reads 1..5"):
        learner(window(length=6), layer=0)


def test_bad_inputs_are_named():
    learner = make_learner()
    with pytest.raises(ValueError, match=r"\[D, L, N=4\]"):
        learner(window(n=3), layer=0)
    with pytest.raises(IndexError, match="layer 2"):
        learner(window(), layer=2)
    with pytest.raises(ValueError, match="descent must be"):
        learner.proxy_gradient(window(), 1.0, 0, torch.zeros(11, 3))


@pytest.mark.parametrize("kwargs", [{}, {"architecture": "mlp"}, {"architecture": "lstm"}, {"cross_client": False}])
def test_d_chunking_gives_the_unchunked_results(kwargs):
    learner, x, descent = make_learner(**kwargs), window(d=50), torch.randn(50, 4)
    torch.testing.assert_close(learner.calibrate(x, 0.5, 1, d_chunk=7), learner.calibrate(x, 0.5, 1, d_chunk=None))
    (g_chunked, xi_chunked), (g_whole, xi_whole) = (learner.proxy_gradient(x, 0.5, 1, descent, d_chunk=c)
                                                    for c in (7, None))
    torch.testing.assert_close(xi_chunked, xi_whole)
    for a, b in zip(g_chunked, g_whole):
        torch.testing.assert_close(a, b)


def test_proxy_gradient_is_the_gradient_of_the_surrogate():
    """g = sum_i (d xi_i/d psi)^T (-Delta_i) is the gradient of -<xi, Delta>, computed here by plain backward."""
    learner, x, descent, scale = make_learner(), window(), torch.randn(11, 4), 0.3
    grads, xi = learner.proxy_gradient(x, scale, 0, descent, d_chunk=4)
    learner.zero_grad()
    surrogate = -(scale * learner(x / scale, 0) * descent).sum()
    surrogate.backward()
    for p, g in zip(learner.layer_parameters(0), grads, strict=True):
        torch.testing.assert_close(g, p.grad)
    assert all(g.abs().sum() > 0 for g in grads)
    others = [p for p in learner.parameters() if all(p is not q for q in learner.layer_parameters(0))]
    assert others and all(p.grad is None for p in others)  # layer 0's xi does not depend on layer 1's learner


def test_normalisation_is_undone_on_the_output():
    """xi = s * f(Delta / s): scaling the updates and the normaliser together scales the calibration."""
    learner, x = make_learner(), window()
    torch.testing.assert_close(learner.calibrate(x * 1e-3, 1e-3, 0), learner.calibrate(x, 1.0, 0) * 1e-3)


def test_save_pretrained_round_trip(tmp_path):
    learner = make_learner(architecture="mamba", num_adapter_layers=3)
    learner.save_pretrained(tmp_path)
    loaded = SeqLearnerModel.from_pretrained(tmp_path)
    ignored = {"_name_or_path"}
    assert ({k: v for k, v in loaded.config.to_dict().items() if k not in ignored}
            == {k: v for k, v in learner.config.to_dict().items() if k not in ignored})
    for layer in range(3):
        torch.testing.assert_close(loaded(window(), layer), learner(window(), layer), rtol=0, atol=0)
    assert not torch.equal(learner(window(), 0), learner(window(), 1))  # one learner per layer
    from transformers import AutoModel

    assert isinstance(AutoModel.from_pretrained(tmp_path), SeqLearnerModel)


def test_variant_c_keeps_clients_apart():
    """cross_client=False: a client's calibration depends only on its own updates."""
    x = window()
    other = x.clone()
    other[:, :, 3] += 1.0
    separate, joint = make_learner(cross_client=False), make_learner(cross_client=True)
    torch.testing.assert_close(separate(x, 0)[:, :3], separate(other, 0)[:, :3], rtol=0, atol=0)
    assert not torch.allclose(joint(x, 0)[:, :3], joint(other, 0)[:, :3])


def test_variant_d_mlp_zero_pads_missing_rounds():
    learner, short = make_learner(architecture="mlp"), window(length=2)
    padded = torch.cat([torch.zeros(11, 3, 4), short], dim=1)
    torch.testing.assert_close(learner(short, 0), learner(padded, 0), rtol=0, atol=0)


@pytest.mark.parametrize("architecture", ["mamba", "lstm"])
def test_recurrent_learners_remember_early_rounds(architecture):
    """Variant E (LSTM) and the Selective SSM both carry round 1 into the last output through their state."""
    learner, x = make_learner(architecture=architecture), window()
    changed = x.clone()
    changed[:, 0] += 1.0
    assert not torch.allclose(learner(x, 0), learner(changed, 0))


@pytest.mark.parametrize("architecture", ["mamba", "mlp", "lstm"])
def test_the_learner_can_express_xi_equal_c_times_the_latest_update(architecture):
    """With its readout at zero the learner is f(x) = output_scale * x_last: xi = c * Delta, at any size."""
    learner, x = make_learner(architecture=architecture), window()
    g = learner.learners[0]
    with torch.no_grad():
        (g.net[-1] if architecture == "mlp" else g.readout).weight.zero_()
        learner.output_scale[0] = 0.7
    for size in (1e-3, 8.0):
        torch.testing.assert_close(learner.calibrate(size * x, 1.0, 0), 0.7 * size * x[:, -1])


def test_the_output_scales_with_the_input_unlike_the_channel_normalised_learner():
    """An input 1e-3 or 8 times larger (in normalised units): the output follows it; the legacy learner's stays one
    size (the issue's measurement: 0.053-0.065 for both)."""
    x = window()
    new, legacy = make_learner(), make_learner(magnitude_preserving=False)
    growth = {name: float(m(8 * x, 0).norm() / m(1e-3 * x, 0).norm()) for name, m in (("new", new), ("legacy", legacy))}
    assert growth["new"] > 1000
    assert growth["legacy"] < 10


@pytest.mark.parametrize("architecture", ["mamba", "mlp", "lstm"])
def test_no_calibration_without_updates(architecture):
    """No bias shifts a parameter the clients never moved (the legacy readout's bias did)."""
    zeros = torch.zeros(11, 5, 4)
    assert torch.equal(make_learner(architecture=architecture)(zeros, 0), torch.zeros(11, 4))
    assert make_learner(architecture=architecture, magnitude_preserving=False)(zeros, 0).abs().max() > 0


def test_variant_c_reads_magnitudes_not_signs():
    """One channel: the legacy RMSNorm over it is sign(x), so nearly every output sat near one of two values."""
    x = torch.randn(400, 5, 4, generator=torch.Generator().manual_seed(3))

    def near_two_values(model) -> float:
        out = model(x, 0).flatten()
        spread = out.max() - out.min()
        centres = torch.stack([out[out <= out.median()].median(), out[out > out.median()].median()])
        return float(((out[:, None] - centres).abs().min(1).values < 0.01 * spread).float().mean())

    assert near_two_values(make_learner(cross_client=False, magnitude_preserving=False)) > 0.6
    assert near_two_values(make_learner(cross_client=False)) < 0.3


def test_a_callable_descent_gives_the_regression_gradient():
    """descent(xi, rows) = target[rows] - xi is the gradient of 0.5 ||xi - target||^2, by plain backward."""
    learner, x, target, scale = make_learner(), window(), torch.randn(11, 4), 0.3
    grads, _ = learner.proxy_gradient(x, scale, 0, lambda xi, rows: target[rows] - xi, d_chunk=4)
    learner.zero_grad()
    (0.5 * (scale * learner(x / scale, 0) - target).pow(2).sum()).backward()
    for p, g in zip(learner.layer_parameters(0), grads, strict=True):
        torch.testing.assert_close(g, p.grad)


def test_the_capped_norm_only_shrinks_rows_above_unit_rms():
    from fedml_pfedseq.models.seq_learner.modeling_seq_learner import CappedRMSNorm

    norm = CappedRMSNorm(4, eps=0.0)
    small, large = torch.full((1, 4), 0.5), torch.tensor([[3.0, -4.0, 0.0, 0.0]])
    torch.testing.assert_close(norm(small), small)
    torch.testing.assert_close(norm(large), large / 2.5)  # RMS 2.5 -> 1


def test_a_learner_saved_before_magnitude_preservation_loads_as_it_was(tmp_path):
    """A config.json without ``magnitude_preserving`` comes from an older run: it loads as the legacy learner, so its
    weights (the final norm, the readout's bias) fit and its outputs are the ones it was saved with."""
    import json

    old = make_learner(magnitude_preserving=False)
    old.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["magnitude_preserving"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = SeqLearnerModel.from_pretrained(tmp_path)
    assert loaded.config.magnitude_preserving is False
    torch.testing.assert_close(loaded(window(), 0), old(window(), 0), rtol=0, atol=0)
    assert SeqLearnerConfig().magnitude_preserving is True


def test_pfedseq_recipe_keys_build_the_learner_config_with_the_same_defaults():
    """A default pFedSeq recipe builds the learner a default SeqLearnerConfig describes: the recipe keys are
    mapped in one place (PFedSeqArgs.learner_config) and their defaults cannot drift from the model's."""
    from fedml_pfedseq.algorithm_args import LEARNER_CONFIG_KEYS, PFedSeqArgs

    built = SeqLearnerConfig(**PFedSeqArgs().learner_config(num_clients=7, num_adapter_layers=3))
    default = SeqLearnerConfig(num_clients=7, num_adapter_layers=3)
    assert built.to_dict() == default.to_dict()
    changed = PFedSeqArgs(seq_len=5, learner_architecture="lstm", learner_hidden_size=12, cross_client=False)
    config = SeqLearnerConfig(**changed.learner_config(num_clients=7, num_adapter_layers=3))
    assert (config.max_seq_len, config.architecture, config.hidden_size, config.num_channels) == (5, "lstm", 12, 1)
    assert set(LEARNER_CONFIG_KEYS.values()) <= set(default.to_dict())


LEARNERS = {"mamba": {}, "mamba, legacy (not magnitude-preserving)": {"magnitude_preserving": False},
            "mamba, variant C (per client)": {"cross_client": False}, "mamba, one block": {"num_blocks": 1},
            "mlp (variant D)": {"architecture": "mlp"}, "lstm (variant E)": {"architecture": "lstm"},
            "mamba, client mixing R = 2": {"mixing_rank": 2}}


@pytest.mark.parametrize("d_chunk", [None, 4])
@pytest.mark.parametrize("kwargs", LEARNERS.values(), ids=LEARNERS.keys())
def test_the_fast_learner_gives_the_reference_calibrations_and_proxy_gradients(kwargs, d_chunk):
    """The package's learner against reference.py's (the learner as first written: grouped conv, loop scan over
    every round), in float32 as the server runs it: calibrations and proxy gradients of a layer, for windows of
    every length."""
    learner = make_learner(**kwargs)
    descent = torch.randn(11, 4)
    for length in (1, 2, 5):
        x = window(length=length) * 1e-3
        fast = learner.calibrate(x, 1e-3, 1, d_chunk), *learner.proxy_gradient(x, 1e-3, 1, descent, d_chunk)
        with reference_implementation():
            reference = learner.calibrate(x, 1e-3, 1, d_chunk), *learner.proxy_gradient(x, 1e-3, 1, descent, d_chunk)
        torch.testing.assert_close(fast[0], reference[0], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(fast[2], reference[2], rtol=1e-5, atol=1e-9)
        for a, b in zip(fast[1], reference[1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())
    assert not torch.equal(fast[0], 1e-3 * learner.output_scale[1] * x[:, -1])  # the blocks did contribute


def test_without_the_c_kernels_the_blocks_run_their_pytorch_code(monkeypatch, tmp_path, caplog):
    """No compiler: the status says so once, and the learner still gives the reference's calibrations."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PFEDSEQ_KERNEL_CACHE", str(tmp_path / "cache"))
    for cached in (cpu_kernels.library, cpu_kernels.status, cpu_kernels._builds):
        cached.cache_clear()
    try:
        with caplog.at_level("WARNING", logger=cpu_kernels.__name__):
            runs, line = cpu_kernels.status()
            learner, x = make_learner(), window() * 1e-3
            fast = learner.calibrate(x, 1e-3, 0)
        assert not runs and "no C compiler" in line and not cpu_kernels.kernels_apply(x)
        assert [r.getMessage() for r in caplog.records] == [f"Mamba blocks on CPU tensors: {line}"]
        with reference_implementation():
            torch.testing.assert_close(fast, learner.calibrate(x, 1e-3, 0))
    finally:
        for cached in (cpu_kernels.library, cpu_kernels.status, cpu_kernels._builds):
            cached.cache_clear()


def test_pfedseq_scan_loop_turns_the_c_kernels_off(monkeypatch):
    monkeypatch.setenv("PFEDSEQ_SCAN", "loop")
    cpu_kernels.status.cache_clear()
    try:
        assert cpu_kernels.status() == (False, "PyTorch code (PFEDSEQ_SCAN=loop)")
    finally:
        cpu_kernels.status.cache_clear()


def test_the_kernels_are_cached_by_source_and_leave_denormals_alone(monkeypatch, tmp_path):
    """A fresh cache builds one library per scalar type and reuses it; loading it does not switch the process to
    flush-to-zero (which linking with -ffast-math would)."""
    monkeypatch.setenv("PFEDSEQ_KERNEL_CACHE", str(tmp_path))
    cpu_kernels.library.cache_clear()
    try:
        cpu_kernels.library(torch.float32)
        cpu_kernels.library(torch.float64)
        built = sorted(p.name for p in tmp_path.iterdir())
        assert [name.split("_")[2] for name in built] == ["double", "float"]
        cpu_kernels.library.cache_clear()
        cpu_kernels.library(torch.float32)
        assert sorted(p.name for p in tmp_path.iterdir()) == built
    finally:
        cpu_kernels.library.cache_clear()
    assert torch.tensor(1e-40, dtype=torch.float32) * 1.0 != 0  # a float32 denormal survives


def test_client_mixing_reads_r_mixtures_and_grows_linearly_with_the_clients(tmp_path):
    """mixing_rank R: the learner inside is R channels wide between an N -> R and an R -> N map, so its size grows
    with N R (the full learner's with N^2); it saves and loads like any learner."""
    sizes = {}
    for n in (40, 80):
        for rank in (None, 4):
            learner = make_learner(num_clients=n, mixing_rank=rank)
            sizes[n, rank] = sum(p.numel() for p in learner.learners[0].parameters())
    assert sizes[80, None] / sizes[40, None] > 3.5  # ~N^2
    mix = 2 * 4  # the two maps, per client
    assert sizes[80, 4] - sizes[40, 4] == 40 * mix  # linear in N
    learner = make_learner(mixing_rank=2)
    inner = learner.learners[0]
    assert (inner.mix.weight.shape, inner.unmix.weight.shape) == ((2, 4), (4, 2))
    assert inner.learner.blocks[0].in_proj.in_features == 2 == learner.config.num_channels
    learner.save_pretrained(tmp_path)
    loaded = SeqLearnerModel.from_pretrained(tmp_path)
    x = window()
    torch.testing.assert_close(loaded.calibrate(x, 0.5, 1), learner.calibrate(x, 0.5, 1))
    with pytest.raises(ValueError, match="mixing_rank"):
        SeqLearnerConfig(num_clients=4, cross_client=False, mixing_rank=2)


def with_memory(learner: SeqLearnerModel, weight: float | None = None) -> SeqLearnerModel:
    """The same learner with memory on (its other weights copied); memory weights ``weight`` (random: None)."""
    torch.manual_seed(5)
    remembering = SeqLearnerModel(SeqLearnerConfig(**{**learner.config.to_dict(), "memory": True}))
    missing, unexpected = remembering.load_state_dict(learner.state_dict(), strict=False)
    assert missing == ["memory_weight"] and not unexpected
    with torch.no_grad():
        if weight is None:
            remembering.memory_weight.normal_()
        else:
            remembering.memory_weight.fill_(weight)
    return remembering


@pytest.mark.parametrize("kwargs", LEARNERS.values(), ids=LEARNERS.keys())
def test_memory_adds_the_last_calibration_and_reads_it(kwargs):
    """With memory, f(x, m) = m + output_scale (x_last + g(x + w cap(m))): at w = 0 exactly the last output plus
    what the memory-less learner gives, for every architecture and variant; w != 0 makes m an input of g too."""
    learner, x = make_learner(**kwargs), window()
    previous = 30 * torch.randn(11, 4, generator=torch.Generator().manual_seed(3))  # rows far above unit RMS
    unread = with_memory(learner, weight=0.0)
    torch.testing.assert_close(unread(x, 1, previous), previous + learner(x, 1), rtol=1e-6, atol=1e-5)
    read = with_memory(learner)
    moved = read(x, 1, previous) - previous
    assert not torch.allclose(moved, learner(x, 1), atol=1e-3)
    capped = previous / previous.pow(2).mean(1, keepdim=True).sqrt()  # each row's RMS over clients is 30 or more
    shift = capped * (read.memory_weight[1] if read.config.cross_client else read.memory_weight[1, 0])
    latest_path = learner.output_scale[1] * shift if learner.config.magnitude_preserving else 0  # reads x_last
    torch.testing.assert_close(moved, learner(x + shift.unsqueeze(1), 1) - latest_path, rtol=1e-5, atol=1e-5)


def test_a_decaying_memory_reads_rho_times_the_last_calibration():
    """memory_decay rho: f(x, previous) is the keeping learner's f(x, rho previous), so xi^t = rho xi^{t-1} + ...;
    a decay needs memory, and lies in (0, 1]."""
    keeping, x, previous = with_memory(make_learner()), window(), torch.randn(11, 4)
    decaying = SeqLearnerModel(SeqLearnerConfig(**{**keeping.config.to_dict(), "memory_decay": 0.5}))
    decaying.load_state_dict(keeping.state_dict())
    torch.testing.assert_close(decaying(x, 1, previous), keeping(x, 1, 0.5 * previous))
    assert not torch.allclose(decaying(x, 1, previous), keeping(x, 1, previous), atol=1e-3)
    for config in ({"memory": True, "memory_decay": 0.0}, {"memory": True, "memory_decay": 1.5},
                   {"memory": False, "memory_decay": 0.5}):
        with pytest.raises(ValueError, match="memory_decay"):
            SeqLearnerConfig(num_clients=4, **config)


def test_a_learner_with_memory_checks_its_input_and_trains_its_weights():
    learner, x, previous = make_learner(memory=True), window(), torch.randn(11, 4)
    with pytest.raises(ValueError, match=r"its last output \[D, N\]"):
        learner(x, 0)
    with pytest.raises(ValueError, match="without memory"):
        make_learner()(x, 0, previous)
    grads, _ = learner.proxy_gradient(x, 1.0, 0, torch.randn(11, 4), d_chunk=4, previous=previous)
    names = {id(p): name for name, p in learner.named_parameters()}
    memory_grad = grads[[names[id(p)] for p in learner.layer_parameters(0)].index("memory_weight")]
    assert memory_grad[0].abs().sum() > 0 and memory_grad[1].abs().sum() == 0  # layer 0's weights, not layer 1's
    (g_chunked, xi_chunked), (g_whole, xi_whole) = (
        learner.proxy_gradient(x, 0.5, 1, torch.randn(11, 4, generator=torch.Generator().manual_seed(0)),
                               d_chunk=c, previous=previous) for c in (3, None))
    torch.testing.assert_close(xi_chunked, xi_whole)
    torch.testing.assert_close(learner.calibrate(x, 0.5, 1, 3, previous=previous), xi_whole)
    for a, b in zip(g_chunked, g_whole):
        torch.testing.assert_close(a, b)


def test_a_learner_with_memory_saves_and_loads(tmp_path):
    learner, x, previous = with_memory(make_learner()), window(), torch.randn(11, 4)
    learner.save_pretrained(tmp_path)
    loaded = SeqLearnerModel.from_pretrained(tmp_path)
    assert loaded.config.memory
    torch.testing.assert_close(loaded(x, 1, previous), learner(x, 1, previous), rtol=0, atol=0)
    assert not make_learner().config.memory  # the paper's learner stays the default


def test_a_grouped_scan_is_each_groups_own_scan():
    """A leading dim of groups: the loop (and so the fused kernel, tested against it above) gives group g the scan
    of its own inputs and parameters, the layout several layers' learners share in one call."""
    u, dt, A, B, C, D = scan_inputs(b=2, length=5, d=2, m=3, groups=3)
    grouped = selective_scan_loop(u, dt, A, B, C, D)
    for g in range(3):
        torch.testing.assert_close(grouped[g], selective_scan_loop(u[g], dt[g], A[g], B[g], C[g], D[g]))


@pytest.mark.parametrize("kwargs", [{}, {"magnitude_preserving": False}, {"num_blocks": 1}],
                         ids=["mamba", "legacy", "one block"])
def test_several_layers_learners_in_one_call_give_each_layers_own_result(kwargs):
    """learners_forward over 3 layers (the layers as the kernels' leading dim, batched projections) against each
    layer's learner on its own: outputs and every parameter's gradient, in float64."""
    from fedml_pfedseq.models.seq_learner.modeling_seq_learner import learners_forward

    model = make_learner(num_adapter_layers=3, **kwargs).double()
    x = torch.randn(3, 7, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    weights = torch.randn(3, 7, 4, dtype=torch.float64)
    together = learners_forward(list(model.learners), x)
    alone = torch.stack([learner(x[i]) for i, learner in enumerate(model.learners)])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)
    params = list(model.learners.parameters())
    for a, b in zip(torch.autograd.grad((together * weights).sum(), params),
                    torch.autograd.grad((alone * weights).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

"""Device and precision: one place picks a process's device (the recipe's using_gpu, then accelerate's accelerator),
and device_args.mixed_precision "bf16" / "fp16" runs the client model's forward under autocast in that type while
weights, logits, losses and the server's networks stay fp32 (fp16 with loss scaling); "fp32" is the fp32 model
exactly."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import small_recipe

import fedml_pfedseq.environment as environment
import fedml_pfedseq.training as training
from fedml_pfedseq.adapter_model import AdapterModel
from fedml_pfedseq.config import RecipeError
from fedml_pfedseq.simulation import run_recipe


def test_the_device_follows_the_recipe_whatever_was_asked_before(monkeypatch):
    monkeypatch.setattr(training, "PartialState", lambda: SimpleNamespace(device=torch.device("cuda", 1)))
    assert training.select_device(False) == torch.device("cpu")  # asked first: must not fix the later answer
    assert training.select_device(True) == torch.device("cuda", 1)
    assert training.select_device(False) == torch.device("cpu")


@pytest.fixture()
def model(tiny_vit):
    torch.manual_seed(0)
    model = AdapterModel(tiny_vit, num_labels=5, lora_r=4, lora_alpha=8)
    model.set_lora_state({k: torch.randn(v.shape) * 0.1 for k, v in model.get_lora_state().items()})
    return model


def test_fp32_is_the_plain_forward(model):
    x = torch.randn(4, 3, 32, 32)
    plain = model.head(model.backbone(pixel_values=x).logits)
    assert model.precision == "fp32" and torch.equal(model(x), plain)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_computes_in_half_and_keeps_logits_weights_and_gradients_in_fp32(model, precision):
    x = torch.randn(4, 3, 32, 32)
    full = model(x)
    model.precision = precision
    half = model(x)
    assert half.dtype == torch.float32
    assert not torch.equal(half, full)  # the products were rounded to 16 bits ...
    assert torch.allclose(half, full, atol=0.05, rtol=0.05)  # ... about 3 significant digits (bf16), or more
    half.logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.trainable_parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.slow
def test_a_half_precision_pfedseq_run_trains_and_its_learner_stays_fp32(tiny_vit, tmp_path, precision):
    recipe = small_recipe("pFedSeq", tiny_vit, tmp_path, algorithm_args={"warmup_rounds": 1},
                          train_args={"comm_round": 3, "learning_rate": 0.5},
                          device_args={"num_threads": 1, "using_gpu": False, "mixed_precision": precision})
    summary = run_recipe(recipe, tmp_path / "run", progress=False)
    losses = [float(row.split(",")[2]) for row in (tmp_path / "run" / "train_metrics.csv").read_text().split()[1:]]
    assert len(losses) == 3 * summary["clients"] \
        and all(0 < loss < 10 for loss in losses)  # every client, every round: finite cross-entropies
    assert 0 <= summary["final_test_accuracy_mean"] <= 1
    from fedml_pfedseq.models.seq_learner import SeqLearnerModel
    learner = SeqLearnerModel.from_pretrained(tmp_path / "run" / "seq_learner")
    assert {p.dtype for p in learner.parameters()} == {torch.float32}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_fp16_skips_a_step_whose_gradients_overflow_where_fp32_takes_it(model, precision):
    """The loss scaler sees the non-finite gradients and skips the step (lowering its scale); fp32 has no scaler."""
    model.precision = precision
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 3])}
    before = [p.detach().clone() for p in model.trainable_parameters()]
    training.train_epochs(model, [batch], 1, learning_rate=0.1, extra_loss=lambda logits, _: logits.sum() * math.inf)
    after = list(model.trainable_parameters())
    if precision == "fp16":
        assert all(torch.equal(a, b) for a, b in zip(after, before))
    else:
        assert not all(torch.isfinite(p).all() for p in after)


def test_fp32_training_with_the_scaler_in_place_is_the_plain_sgd_loop(model):
    """The pass-through scaler changes nothing: train_epochs equals a hand-written SGD loop bit for bit."""
    batches = [{"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 3])} for _ in range(2)]
    reference = copy.deepcopy(model)
    training.train_epochs(model, batches, 1, learning_rate=0.1, momentum=0.9)
    optimizer = torch.optim.SGD(reference.trainable_parameters(), lr=0.1, momentum=0.9)
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(reference(batch["pixel_values"]), batch["labels"]).backward()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model.trainable_parameters(), reference.trainable_parameters()))


@pytest.mark.parametrize("method", ["FedALA", "PerFedAvg", "pFedMe"])
def test_fp16_is_refused_by_methods_with_gradient_steps_of_their_own(tiny_vit, tmp_path, method):
    with pytest.raises(RecipeError, match=f"fp16 needs loss scaling, which {method}'s own gradient steps"):
        small_recipe(method, tiny_vit, tmp_path, train_args={"learning_rate": 0.1},
                     device_args={"mixed_precision": "fp16"})


def test_an_unknown_precision_is_refused_with_the_choices(tiny_vit, tmp_path):
    with pytest.raises(RecipeError, match=r"device_args.mixed_precision must be one of \['fp32', 'bf16', 'fp16'\], "
                                          r"got 'fp8'"):
        small_recipe("FedAvg", tiny_vit, tmp_path, device_args={"mixed_precision": "fp8"})


def test_the_gpus_a_process_may_use_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert environment.gpu_ids() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert environment.gpu_ids() == []  # none allowed
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert environment.gpu_ids() == [str(i) for i in range(torch.cuda.device_count())]

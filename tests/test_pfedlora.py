"""pFedLoRA: backbones of different depth cut from one checkpoint carry one adapter shape; a round trains the local
model (adapter frozen), then the adapter (local model frozen), checked against plain SGD loops; local models stay
per client; and an end-to-end run from its recipe on heterogeneous clients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_LAYERS, assert_every_client_evaluated, run_shipped_recipe, small_recipe
from transformers import ViTForImageClassification

import fedml_pfedseq.strategies.pfedlora as pfedlora
from fedml_pfedseq.adapter_model import AdapterModel
from fedml_pfedseq.config import RecipeError, parse_recipe
from fedml_pfedseq.data.federated import client_seed
from fedml_pfedseq.federation import build_federation
from fedml_pfedseq.lora_state import subtract
from fedml_pfedseq.training import make_loader, train_epochs
from fedml_pfedseq.transport import check_plain


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def heterogeneous(tiny_vit, tmp_path, **algorithm_args):
    """20 drawers on backbones of 2, 1, 2, 1, ... layers; LoRA on the first layer of each."""
    recipe = small_recipe("pFedLoRA", tiny_vit, tmp_path, model_args={"model": tiny_vit, "client_depths": [2, 1]},
                          train_args={"learning_rate": 0.5},
                          algorithm_args=algorithm_args, device_args={"num_threads": 1})
    return build_federation(recipe)


def test_a_cut_backbone_computes_the_first_layers_of_the_checkpoint(tiny_vit):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    cut = AdapterModel(tiny_vit, num_labels=5, num_layers=1, lora_layers=1)
    full = ViTForImageClassification.from_pretrained(tiny_vit).vit
    with torch.no_grad():  # by hand: embeddings, layer 0, the final layernorm, the [CLS] token (LoRA's B is 0)
        expected = full.layernorm(full.layers[0](full.embeddings(x), None))[:, 0]
        assert torch.allclose(cut.backbone(pixel_values=x).logits, expected, atol=1e-6)
        deeper = full.layernorm(full.layers[1](full.layers[0](full.embeddings(x), None), None))[:, 0]
        assert not torch.allclose(expected, deeper, atol=1e-3)  # the cut matters
    assert len(cut.backbone.base_model.model.vit.layers) == 1


def test_backbones_of_every_depth_carry_one_adapter_with_the_same_init(tiny_vit, tmp_path):
    fed = heterogeneous(tiny_vit, tmp_path)
    depths = [len(c.model.backbone.base_model.model.vit.layers) for c in fed.clients]
    assert depths == [2, 1] * 10
    assert fed.clients[0].model is fed.clients[2].model and fed.clients[1].model is fed.clients[3].model
    assert fed.clients[0].model is not fed.clients[1].model
    states = [c.model.get_lora_state() for c in fed.clients]
    assert all(equal(states[0], s) for s in states)  # one shape, one init (A seeded, B = 0)
    assert all(".layers.0." in k for k in states[0])  # LoRA only on the layer every backbone has
    assert equal(fed.server.initial_payloads()[1]["lora"], states[0])
    backbone_sizes = [sum(t.numel() for t in c.state["backbone"].values()) for c in fed.clients[:2]]
    assert backbone_sizes[0] > backbone_sizes[1]  # the local models differ in size


def test_bad_depths_are_refused_with_the_key_named(tiny_vit, tmp_path):
    for depths in ([], [0, 1]):
        raw = {"model_args": {"model": tiny_vit, "client_depths": depths},
               "train_args": {"federated_optimizer": "pFedLoRA"}}
        with pytest.raises(RecipeError, match="model_args.client_depths"):
            parse_recipe(raw)
    with pytest.raises(ValueError, match=f"num_layers=3 must be in 1..{TINY_LAYERS}"):
        AdapterModel(tiny_vit, num_labels=5, num_layers=3)
    for key, value in (("pfedlora_model_epochs", 0), ("pfedlora_model_lr", 0.0), ("pfedlora_model_lr", float("nan"))):
        with pytest.raises(RecipeError, match=key):
            parse_recipe({"train_args": {"federated_optimizer": "pFedLoRA"}, "algorithm_args": {key: value}})


def test_a_round_trains_the_local_model_then_the_adapter_and_uploads_only_the_adapter(tiny_vit, tmp_path,
                                                                                        monkeypatch):
    fed = heterogeneous(tiny_vit, tmp_path, pfedlora_model_epochs=2, pfedlora_model_lr=0.05)
    client = fed.clients[2]
    model = client.model
    lora_ids = {id(p) for p in model.lora_parameters()}
    local_ids = {id(p) for p in model.backbone_parameters().values()} | {id(p) for p in model.head.parameters()}
    calls = []

    def recording(model, loader, epochs, lr, *sgd, parameters=None, extra_loss=None):
        before = model.get_lora_state(), model.get_head_state(), model.get_backbone_state()
        with_grad = {id(p) for p in model.parameters() if p.requires_grad}
        stats = train_epochs(model, loader, epochs, lr, *sgd, parameters=parameters, extra_loss=extra_loss)
        after = model.get_lora_state(), model.get_head_state(), model.get_backbone_state()
        calls.append({"epochs": epochs, "lr": lr, "trained": {id(p) for p in parameters}, "with_grad": with_grad,
                      "changed": [not equal(b, a) for b, a in zip(before, after)]})
        return stats

    monkeypatch.setattr(pfedlora, "train_epochs", recording)
    payload = fed.server.initial_payloads()[2]
    client.receive(payload)
    start = {part: dict(client.state[part]) for part in ("head", "backbone")}
    upload = client.train(1)

    model_phase, adapter_phase = calls
    assert model_phase == {"epochs": 2, "lr": 0.05, "trained": local_ids, "with_grad": local_ids,
                           "changed": [False, True, True]}  # (lora, head, backbone)
    assert adapter_phase == {"epochs": 1, "lr": 0.5, "trained": lora_ids, "with_grad": lora_ids,
                             "changed": [True, False, False]}
    assert {id(p) for p in model.parameters() if p.requires_grad} == lora_ids | {id(p) for p in model.head.parameters()}
    assert set(upload) == {"client_id", "num_samples", "lora"}
    assert equal(upload["lora"], subtract(client.state["lora"], payload["lora"]))
    check_plain(upload, "upload")

    # independently: plain SGD, every local-model weight on the frozen received adapter, then the adapter alone
    model.set_lora_state(payload["lora"])
    model.set_head_state(start["head"])
    model.set_backbone_state(start["backbone"])
    loader = make_loader(client.data.train, 32, shuffle=True, seed=client_seed(0, 2, purpose=1001))
    local = [p for p in model.parameters() if id(p) in local_ids]
    for params, epochs, lr in [(local, 2, 0.05), (model.lora_parameters(), 1, 0.5)]:
        for p in model.parameters():
            p.requires_grad_(id(p) in {id(q) for q in params})
        optimizer = torch.optim.SGD(params, lr=lr)
        for _ in range(epochs):
            for batch in loader:
                optimizer.zero_grad()
                F.cross_entropy(model(batch["pixel_values"]), batch["labels"]).backward()
                optimizer.step()
    for part, got in (("lora", model.get_lora_state()), ("head", model.get_head_state()),
                      ("backbone", model.get_backbone_state())):
        assert all(torch.allclose(client.state[part][k], got[k], atol=1e-6) for k in got), part


def test_each_client_keeps_its_own_local_model_on_a_shared_backbone(tiny_vit, tmp_path):
    fed = heterogeneous(tiny_vit, tmp_path)
    payloads = fed.server.initial_payloads()
    first, third = fed.clients[0], fed.clients[2]  # both on the depth-2 model
    for c in (first, third):
        c.receive(payloads[c.client_id])
    before = third.evaluate(("test",))
    third_backbone = dict(third.state["backbone"])
    first.train(1)
    assert not equal(first.state["backbone"], third_backbone)  # client 0 moved its own weights...
    assert equal(third.state["backbone"], third_backbone)  # ...not client 2's
    assert third.evaluate(("test",)) == before  # evaluating loads client 2's own local model again


@pytest.mark.slow
def test_pfedlora_runs_from_its_recipe_on_heterogeneous_clients(tiny_vit, tmp_path):
    fed, summary, metrics = run_shipped_recipe("pfedlora", tiny_vit, tmp_path,
                                               overrides=("model_args.client_depths=[2, 1]",))
    assert_every_client_evaluated(metrics)
    assert {len(c.model.backbone.base_model.model.vit.layers) for c in fed.clients} == {1, 2}
    assert {"model_train_loss", "train_loss"} <= set(metrics["train"][0])
    heads = [c.state["head"]["weight"] for c in fed.clients]
    assert not torch.equal(heads[0], heads[1])  # heads stay local
    assert summary["final_test_accuracy_mean"] == pytest.approx(
        sum(r["test_accuracy"] for r in metrics["eval"] if r["round"] == 2) / 20)

"""FedDPA: the two adapters mixed per instance against weights merged by hand, the instance weights against their
formula, the server's average by hand values, what stays on a client, and a run end to end from its recipe."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_every_client_evaluated, run_shipped_recipe, small_recipe
from peft import PeftModel, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from transformers import ViTForImageClassification

from fedml_pfedseq.adapter_model import AdapterModel
from fedml_pfedseq.config import RecipeError
from fedml_pfedseq.federation import build_federation
from fedml_pfedseq.strategies import method_class
from fedml_pfedseq.strategies.feddpa import GLOBAL, LOCAL, instance_weights, mixed_adapters


def two_adapter_model(tiny_vit: str) -> AdapterModel:
    """The tiny ViT with a global and a local adapter, both random (B != 0), in eval mode."""
    model = AdapterModel(tiny_vit, num_labels=3)
    model.backbone.add_adapter(LOCAL, model.backbone.peft_config[GLOBAL])
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.3)
    model.backbone.base_model.set_adapter(GLOBAL)
    return model.eval()


def merged_logits(model: AdapterModel, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """W0 + (1 - alpha) s B_g A_g + alpha s B_l A_l written into each adapted layer's base weight, no adapter
    active: the reference for one instance's mixture."""
    backbone = model.backbone
    layers = [layer for layer in backbone.modules() if isinstance(layer, LoraLayer)]
    originals = [layer.base_layer.weight.detach().clone() for layer in layers]
    with torch.no_grad(), backbone.disable_adapter():
        for layer in layers:
            for name, weight in ((GLOBAL, 1 - alpha), (LOCAL, alpha)):
                delta = layer.lora_B[name].weight @ layer.lora_A[name].weight * layer.scaling[name]
                layer.base_layer.weight += weight * delta
        logits = model(x)
        for layer, original in zip(layers, originals):
            layer.base_layer.weight.copy_(original)
    return logits


def test_mixed_adapters_give_each_instance_its_own_merged_weights(tiny_vit):
    model, x = two_adapter_model(tiny_vit), torch.randn(3, 3, 32, 32)
    alpha = torch.tensor([0.0, 0.3, -0.4])
    with torch.no_grad(), mixed_adapters(model.backbone, {GLOBAL: 1 - alpha, LOCAL: alpha}):
        mixed = model(x)
    for i in range(3):
        torch.testing.assert_close(mixed[i], merged_logits(model, x[i:i + 1], float(alpha[i]))[0],
                                   rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # alpha 0 is the global adapter alone
        torch.testing.assert_close(mixed[0], model(x[:1])[0], rtol=1e-5, atol=1e-6)
    assert model.backbone.active_adapters == [GLOBAL]  # the block restores the global adapter alone
    assert all(p.requires_grad == (f".{GLOBAL}." in name)
               for name, p in model.backbone.named_parameters() if ".lora_" in name)


def test_instance_weights_are_the_scaled_mean_cosine_similarity():
    g = torch.Generator().manual_seed(0)
    features, references = torch.randn(2, 4, generator=g), torch.randn(6, 4, generator=g)
    picks = torch.tensor([[0, 5, 2], [1, 1, 3]])
    expected = [0.5 * sum(torch.dot(features[b], references[j]) / features[b].norm() / references[j].norm()
                          for j in picks[b]) / 3 for b in range(2)]
    torch.testing.assert_close(instance_weights(features, references, picks, 0.5), torch.stack(expected))
    assert torch.equal(instance_weights(features, features, torch.tensor([[0], [1]]), 0.5), torch.full((2,), 0.5))


def test_the_server_averages_the_global_adapters_by_samples(tmp_path):
    key = "m.layers.0.q_proj.lora_A.weight"
    server = method_class("FedDPA").Server(2, {"lora": {key: torch.tensor([1.0, 2.0])}},
                                           small_recipe("FedDPA", "unused", tmp_path))
    assert server.initial_payloads()[0].keys() == {"client_id", "lora"}  # heads and local adapters never travel
    payloads = server.aggregate({0: {"client_id": 0, "num_samples": 1, "lora": {key: torch.tensor([4.0, 0.0])}},
                                 1: {"client_id": 1, "num_samples": 3, "lora": {key: torch.tensor([0.0, 4.0])}}})
    # [1, 2] + (1 * [4, 0] + 3 * [0, 4]) / 4
    assert torch.equal(payloads[1]["lora"][key], torch.tensor([2.0, 5.0]))


@pytest.mark.parametrize("key, value", [("local_weight", 1.5), ("instance_weight_scale", -0.1),
                                        ("reference_instances", 0)])
def test_bad_feddpa_args_are_named(key, value, tmp_path):
    with pytest.raises(RecipeError, match=key):
        small_recipe("FedDPA", "unused", tmp_path, algorithm_args={key: value})


@pytest.mark.slow
def test_a_client_trains_its_local_adapter_from_its_second_round_and_never_uploads_it(tiny_vit, tmp_path):
    fed = build_federation(small_recipe("FedDPA", tiny_vit, tmp_path, train_args={"learning_rate": 0.5}))
    client, other = fed.clients[0], fed.clients[1]
    assert any(not torch.equal(a, b) for a, b in zip(client.local.values(), other.local.values()))  # own init
    initial = {k: v.clone() for k, v in client.local.items()}
    assert all(v.abs().sum() == 0 for k, v in initial.items() if "lora_B" in k)  # PEFT's init: B = 0
    client.receive(fed.server.initial_payloads()[0])
    first = client.train(1)
    assert all(torch.equal(client.local[k], initial[k]) for k in initial)  # round one trains the global adapter only
    assert first.keys() == {"client_id", "num_samples", "lora"} and first["lora"].keys() == client.state["lora"].keys()
    received = {k: v.clone() for k, v in client.state["lora"].items()}
    client.receive({"client_id": 0, "lora": received})
    second = client.train(2)
    assert "local_train_loss" in client.last_train_stats
    assert any(client.local[k].abs().sum() > 0 for k in client.local if "lora_B" in k)  # the local adapter learnt
    local_keys = get_peft_model_state_dict(fed.model.backbone, adapter_name=LOCAL).keys()
    assert second["lora"].keys() == first["lora"].keys() == local_keys  # the same names: only the global travels
    assert fed.model.backbone.active_adapters == [GLOBAL]


@pytest.mark.slow
def test_feddpa_runs_from_its_recipe_and_saves_both_adapters(tiny_vit, tmp_path):
    """Both adapters of a client load with PEFT as the client held them, and the model card names the local one
    and the rule that mixes them."""
    from fedml_pfedseq.hub.card import build_card

    fed, summary, metrics = run_shipped_recipe("feddpa", tiny_vit, tmp_path)
    assert summary["method"] == "FedDPA"
    assert_every_client_evaluated(metrics)
    folder = tmp_path / "out" / "adapters" / "client_0"
    loaded = PeftModel.from_pretrained(ViTForImageClassification.from_pretrained(tiny_vit), str(folder))
    loaded.load_adapter(str(folder / LOCAL), adapter_name=LOCAL)
    client = fed.clients[0]
    for name, state in ((GLOBAL, client.state["lora"]), (LOCAL, client.local)):
        saved = get_peft_model_state_dict(loaded, adapter_name=name)
        assert all(torch.equal(saved[k], state[k]) for k in state), name
    card = str(build_card(tmp_path / "out", "someone/feddpa-run", backbone_pushed=False))
    assert "adapters/client_<k>/local/" in card and "mean cosine similarity" in card

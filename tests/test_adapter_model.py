"""The client model: which parameters train, LoRA state round trips, and the per-layer flat view."""
import pytest
import torch
from conftest import TINY_HIDDEN, TINY_LAYERS
from peft import PeftModel
from transformers import ViTForImageClassification

from fedml_pfedseq.adapter_model import AdapterModel
from fedml_pfedseq.lora_state import LayerLayout

R = 4


@pytest.fixture()
def model(tiny_vit):
    torch.manual_seed(0)
    return AdapterModel(tiny_vit, num_labels=5, lora_r=R, lora_alpha=8)


def perturbed(state, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in state.items()}


def test_only_lora_and_head_train_and_the_head_is_outside_the_adapter(model):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert {"head.weight", "head.bias"} <= trainable
    lora = model.get_lora_state()
    assert lora and all(("q_proj" in k or "v_proj" in k) and "lora_" in k for k in lora)
    assert not any("head" in k or "classifier" in k for k in lora)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 5)


def test_initial_lora_is_peft_default_with_zero_B(model):
    lora = model.get_lora_state()
    assert all(torch.count_nonzero(v) == 0 for k, v in lora.items() if "lora_B" in k)
    assert all(torch.count_nonzero(v) > 0 for k, v in lora.items() if "lora_A" in k)


def test_lora_state_round_trip_changes_the_model_and_reads_back_exactly(model):
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    new = perturbed(model.get_lora_state(), seed=1)
    model.set_lora_state(new)
    got = model.get_lora_state()
    assert all(torch.equal(got[k], new[k]) for k in new)
    assert not torch.allclose(model(x), before)


def test_set_lora_state_rejects_wrong_keys_or_shapes_and_keeps_the_old_state(model):
    old = model.get_lora_state()
    bad_shape = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in old.items()}
    with pytest.raises(ValueError, match="shape"):
        model.set_lora_state(bad_shape)
    missing = dict(list(old.items())[1:])
    with pytest.raises(KeyError, match="missing"):
        model.set_lora_state(missing)
    assert all(torch.equal(model.get_lora_state()[k], old[k]) for k in old)


def test_head_state_round_trip_and_seeded_init(model):
    a, b, c = model.init_head_state(1), model.init_head_state(1), model.init_head_state(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["weight"], c["weight"])
    model.set_head_state(a)
    assert all(torch.equal(model.get_head_state()[k], a[k]) for k in a)


def test_per_layer_flatten_has_one_vector_per_layer_of_4_r_hidden_and_inverts_exactly(model):
    state = perturbed(model.get_lora_state(), seed=2)
    layout = LayerLayout.of(state)
    vectors = layout.flatten(state)
    assert len(vectors) == TINY_LAYERS
    assert layout.sizes == [4 * R * TINY_HIDDEN] * TINY_LAYERS  # q and v: A [r, h] + B [h, r] each
    back = layout.unflatten(vectors)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    model.set_lora_state(back)  # the unflattened state loads into the adapter
    with pytest.raises(ValueError, match="expected"):
        layout.unflatten(vectors[:1])


def test_stack_puts_each_client_in_one_column_per_layer_and_column_takes_it_back(model):
    states = [perturbed(model.get_lora_state(), seed=s) for s in (4, 5, 6)]
    layout = LayerLayout.of(states[0])
    matrices = layout.stack(states)
    assert [m.shape for m in matrices] == [(size, 3) for size in layout.sizes]
    for i, state in enumerate(states):
        assert all(torch.equal(matrix[:, i], vector) for matrix, vector in zip(matrices, layout.flatten(state)))
        back = layout.column(matrices, i)
        assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
        # each tensor owns its storage, as a payload must (check_plain refuses a view into every column)
        assert all(v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in back.values())


def test_adapter_saves_and_reloads_with_peft_with_identical_features(model, tiny_vit, tmp_path):
    model.set_lora_state(perturbed(model.get_lora_state(), seed=3))
    model.backbone.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    plain = ViTForImageClassification.from_pretrained(tiny_vit)
    plain.classifier = torch.nn.Identity()
    reloaded = PeftModel.from_pretrained(plain, tmp_path / "adapter")
    x = torch.randn(2, 3, 32, 32)
    model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(model.backbone(pixel_values=x).logits, reloaded(pixel_values=x).logits, atol=1e-6)

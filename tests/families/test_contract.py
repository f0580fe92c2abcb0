"""One contract, every registered family, on tiny models built from config."""

import pytest
import torch
from tiny import FAMILIES
from transformers import AutoModelForCausalLM

from owlctl.families import REGISTRY, resolve, share_groups


def test_every_registered_family_has_a_tiny_model():
    assert set(REGISTRY) == set(FAMILIES)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_contract(model_type, tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models(model_type))
    layout = resolve(model)
    assert layout.family.name == model_type
    assert layout.num_blocks == model.config.num_hidden_layers == 3
    # Linears exist, are nn.Linear, and are listed in execution order
    order: list[str] = []
    hooks = []
    for name, lin in layout.linears(0).items():
        assert isinstance(lin, torch.nn.Linear)
        hooks.append(lin.register_forward_pre_hook(lambda m, a, n=name: order.append(n)))
    model(torch.tensor([[1, 2, 3, 4]]))
    for h in hooks:
        h.remove()
    assert order == list(layout.linear_names)
    # shared-input groups really read the same input
    seen: dict[str, torch.Tensor] = {}
    hooks = [lin.register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n, a[0].clone()))
             for name, lin in layout.linears(1).items()]
    model(torch.tensor([[5, 6, 7]]))
    for h in hooks:
        h.remove()
    for name, lead in share_groups(layout).items():
        assert torch.equal(seen[name], seen[lead])
    # embeddings and lm_head are never among the prunable Linears
    all_names = {f"{layout.block_name(i)}.{n}" for i in range(layout.num_blocks) for n in layout.linear_names}
    assert not any("lm_head" in n or "embed" in n for n in all_names)


def test_generic_fallback_warns(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.config.model_type = "my_llama_clone"
    with pytest.warns(UserWarning, match="not registered"):
        layout = resolve(model)
    assert layout.num_blocks == 3
    assert "mlp.down_proj" in layout.linear_names and len(layout.linear_names) == 7


def test_unknown_model_without_blocks_is_a_clear_error():
    from owlctl.errors import ModelError

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "mystery"})()
            self.proj = torch.nn.Linear(2, 2)

    with pytest.raises(ModelError, match="not a registered family"):
        resolve(Fake())

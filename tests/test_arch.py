import pytest
import torch

from qdiag.core.arch import UnsupportedModelError, resolve, weight_matrix
from qdiag.testing import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_resolves(family):
    model = tiny_model(family)
    arch = resolve(model)
    modules = dict(model.named_modules())
    assert arch.n_layers == 2
    for name in arch.linear_names() + [arch.final_norm, arch.unembed, arch.embed] + arch.attn + arch.mlp:
        assert name in modules
    # every decoder weight matrix is covered exactly once
    linear = {n for n, m in modules.items() if n.startswith(arch.layers[0] + ".") and hasattr(m, "weight")
              and m.weight is not None and m.weight.dim() == 2}
    assert linear == set(arch.linear_names([0]))
    assert (arch.gate[0] is not None) == (family not in ("phi3", "gpt2", "gpt_neox"))


def test_weight_matrix_is_out_by_in_for_conv1d():
    model = tiny_model("gpt2")
    arch = resolve(model)
    fc = model.get_submodule(arch.weights[0]["up"])  # Conv1D 64 -> 256
    x = torch.randn(3, 64)
    torch.testing.assert_close(fc(x), x @ weight_matrix(fc).t() + fc.bias)


def test_unsupported_family_names_itself():
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("opt", vocab_size=64, hidden_size=16,
                                                                  num_hidden_layers=1, ffn_dim=32,
                                                                  num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(UnsupportedModelError, match="'opt' is not in qdiag's architecture table"):
        resolve(model)


def test_missing_module_is_named():
    model = tiny_model("llama")
    del model.model.norm
    with pytest.raises(UnsupportedModelError, match="final norm at 'model.norm'"):
        resolve(model)

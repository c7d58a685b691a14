import pytest
import torch

from qdiag.evaluate import encode_prompts
from qdiag.models import wrap
from qdiag.trace import collect
from tests.conftest import FAMILIES, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_collect_matches_the_model_and_restores_attention(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    before = model.config._attn_implementation
    lm = wrap(model, tok)
    batch = encode_prompts(tok, ["the capital of France is", "Paris is in"])
    out = collect(lm, batch)
    assert set(out) == {"attn", "gate", "mlp_act", "mlp_out", "resid"}
    assert all(len(v) == 2 for v in out.values())
    hidden = model(**batch, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out["resid"][0], hidden[1])  # after layer 0
    probs = out["attn"][1]
    assert probs.shape[:2] == (2, model.config.num_attention_heads)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    assert model.config._attn_implementation == before


def test_unknown_kind_raises():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(ValueError, match="unknown activation kinds"):
        collect(wrap(model, tok), encode_prompts(tok, ["Paris"]), what=("logits",))

import pytest
import torch

from qdiag.core.arch import resolve
from qdiag.core.models import wrap
from qdiag.measure.evaluate import encode_prompts
from qdiag.measure.trace import collect
from qdiag.testing import FAMILIES, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_collect_matches_the_model_and_restores_attention(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    before = model.config._attn_implementation
    lm = wrap(model, tok)
    batch = encode_prompts(tok, ["the capital of France is", "Paris is in"])
    out = collect(lm, batch)
    assert set(out) == {"attn", "attn_out", "gate", "mlp_act", "mlp_out", "resid"}
    assert all(len(v) == 2 for v in out.values())
    hidden = model(**batch, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out["resid"][0], hidden[1])  # after layer 0
    seen = []
    handle = model.get_submodule(resolve(model).attn[1]).register_forward_hook(lambda m, a, o: seen.append(o[0]))
    model(**batch)
    handle.remove()
    torch.testing.assert_close(out["attn_out"][1], seen[0])
    probs = out["attn"][1]
    assert probs.shape[:2] == (2, model.config.num_attention_heads)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    assert model.config._attn_implementation == before


def test_unknown_kind_raises():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(ValueError, match="unknown activation kinds"):
        collect(wrap(model, tok), encode_prompts(tok, ["Paris"]), what=("logits",))


def test_collect_keeps_only_the_tokens_asked_for():
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    lm = wrap(model, tok)
    batch = encode_prompts(tok, ["the capital of France is", "Paris is in"])
    full = collect(lm, batch)
    tokens = torch.tensor([[1, 4], [3, 4]])
    part = collect(lm, batch, tokens=tokens)
    for kind in ("gate", "mlp_out", "resid"):
        torch.testing.assert_close(part[kind][1][0], full[kind][1][0, [1, 4]])
        torch.testing.assert_close(part[kind][1][1], full[kind][1][1, [3, 4]])
    attn = part["attn"][0]
    assert attn.shape == (2, 2, model.config.num_attention_heads, 5)
    torch.testing.assert_close(attn[1, 0], full["attn"][0][1, :, 3])

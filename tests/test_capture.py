"""One plain forward with hooks records what the nnsight trace records, in every family."""

import pytest
import torch

from qdiag.core import positions as P
from qdiag.core.models import wrap
from qdiag.measure.capture import capturing
from qdiag.measure.trace import collect, eager_attention
from qdiag.testing import FAMILIES, tiny_model, tiny_tokenizer

PROMPTS = ["The capital of France is", "Japan is located in"]


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_agrees_with_the_nnsight_trace(family):
    lm = wrap(tiny_model(family), tiny_tokenizer())
    batch = P.encode(lm.tokenizer, PROMPTS)
    traced = collect(lm, batch, ("attn", "gate", "mlp_out", "resid"))
    with eager_attention(lm), capturing(lm) as cap, torch.no_grad():
        lm._module(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")})
    for kind in ("attn", "gate", "mlp_out", "resid"):
        for layer, want in enumerate(traced[kind]):
            assert torch.allclose(getattr(cap, kind)[layer].cpu(), want, atol=1e-5), (kind, layer)


def test_mlp_inputs_replace_what_each_mlp_reads():
    lm = wrap(tiny_model("llama"), tiny_tokenizer())
    batch = P.encode(lm.tokenizer, PROMPTS)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with capturing(lm) as ref, torch.no_grad():
        lm._module(**inputs)
    zeros = {0: torch.zeros_like(ref.mlp_in[0])}
    with capturing(lm, mlp_inputs=zeros) as got, torch.no_grad():
        lm._module(**inputs)
    assert torch.equal(got.mlp_in[0], zeros[0])
    assert not torch.allclose(got.mlp_out[0], ref.mlp_out[0])

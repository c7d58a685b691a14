"""Each perturbation does what its mode says, and nothing else: no weight is ever written."""

import hashlib

import pytest
import torch

from qdiag.core import positions as P
from qdiag.core.arch import unwrap
from qdiag.core.models import wrap
from qdiag.diagnosis import perturb as pt
from qdiag.measure import metrics as M
from qdiag.measure.capture import capturing
from qdiag.measure.patch import Rerun
from qdiag.measure.trace import eager_attention
from qdiag.testing import FAMILIES, tiny_model, tiny_tokenizer

PROMPTS = ["The capital of France is", "Germany 's capital city is", "Japan is located in"]


def setup(family="llama"):
    lm = wrap(tiny_model(family, layers=3, scale=4.0), tiny_tokenizer())
    return lm, P.encode(lm.tokenizer, PROMPTS)


def record(lm, batch, width=None, mlp_inputs=None):
    with eager_attention(lm), (width.applied(lm) if width else torch.no_grad()), \
            capturing(lm, mlp_inputs=mlp_inputs) as cap:
        run = Rerun(lm, batch)
    return run, cap


def digest(model) -> str:
    h = hashlib.sha256()
    for p in unwrap(model).state_dict().values():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("make", [lambda m: pt.weight_noise(m, 0.0), lambda m: pt.residual_noise(m, 0.0)],
                         ids=["weight_noise", "residual_noise"])
def test_noise_of_size_zero_changes_nothing(family, make):
    lm, batch = setup(family)
    ref, _ = record(lm, batch)
    got, _ = record(lm, batch, make(lm))
    assert torch.allclose(got.logits, ref.logits, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_perturbations_leave_the_weights_as_they_were(family):
    lm, batch = setup(family)
    before = digest(lm)
    for w in (pt.weight_noise(lm, 0.5), pt.residual_noise(lm, 0.5), pt.uniform_attention(lm, [0, 1]),
              pt.scrambled_gates(lm, [0]), pt.replaced_mlp(lm, [1])):
        record(lm, batch, w)
    assert digest(lm) == before


def test_weight_noise_has_the_asked_relative_size():
    lm, _ = setup()
    hf = unwrap(lm)
    w = pt.weight_noise(lm, 0.2)
    name = "model.layers.0.mlp.down_proj"
    noisy = w.weights.tensors[name].dequantize()
    ref = hf.get_submodule(name).weight
    assert float((noisy - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()) == pytest.approx(0.2, rel=0.05)
    assert torch.equal(noisy, w.weights.tensors[name].dequantize())  # the same noise every forward


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_attention_spreads_evenly_over_visible_keys(family):
    lm, batch = setup(family)
    _, ref = record(lm, batch)
    _, got = record(lm, batch, pt.uniform_attention(lm, [1]))
    assert torch.allclose(got.attn[1], M.uniform_like(ref.attn[1]), atol=1e-5)
    assert torch.allclose(got.attn[0], ref.attn[0])  # the layer before is untouched


@pytest.mark.parametrize("family", FAMILIES)
def test_scrambled_gates_flip_half_the_neurons_in_that_layer_only(family):
    lm, batch = setup(family)
    run, ref = record(lm, batch)
    # feed the reference's MLP inputs, so only the perturbation can change the gates
    _, got = record(lm, batch, pt.scrambled_gates(lm, [0]), mlp_inputs=ref.mlp_in)
    flipped = (torch.sign(got.gate[0]) != torch.sign(ref.gate[0])).float().mean((0, 1))  # per neuron
    assert float((flipped > 0.5).float().mean()) == pytest.approx(0.5, abs=1 / ref.gate[0].shape[-1])
    assert torch.allclose(got.gate[1], ref.gate[1], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_replaced_mlp_computes_something_unrelated(family):
    lm, batch = setup(family)
    _, ref = record(lm, batch)
    _, got = record(lm, batch, pt.replaced_mlp(lm, [0]), mlp_inputs=ref.mlp_in)
    assert abs(float(M.cosines(got.mlp_out[0], ref.mlp_out[0]).mean())) < 0.3


def test_bad_arguments_are_refused():
    lm, _ = setup()
    with pytest.raises(ValueError, match="out of range"):
        pt.scrambled_gates(lm, [7])
    with pytest.raises(ValueError, match="at least 0"):
        pt.weight_noise(lm, -1)
    with pytest.raises(ValueError, match="share of answers"):
        pt.match_damage(lm, [], lambda s: pt.weight_noise(lm, s), 1.5)

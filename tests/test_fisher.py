"""The Fisher factors predict the KL an error costs: checked against the KL measured with the error
swapped in, matrix by matrix, on a tiny model."""

import numpy as np
import pytest
import torch

from qdiag.core.arch import resolve, unwrap, weight_matrix
from qdiag.core.models import wrap
from qdiag.measure import evaluate as ev
from qdiag.measure import fisher
from qdiag.quant.gguf_file import _Dense
from qdiag.quant.swap import QuantizedWeights
from qdiag.testing import calib_ids, tiny_model, tiny_tokenizer


@pytest.fixture
def lm():
    return wrap(tiny_model("llama", scale=4), tiny_tokenizer())


def test_predicted_damage_tracks_the_measured_kl(lm):
    factors = fisher.fisher_factors(lm, calib_ids(32, 48, seed=1), batch_size=4)
    hf = unwrap(lm)
    text = calib_ids(12, 32, seed=2)  # other text than the factors saw
    predicted, measured = [], []
    g = torch.Generator().manual_seed(0)
    for name in resolve(lm).linear_names():
        w = weight_matrix(hf.get_submodule(name)).detach()
        e = torch.randn(w.shape, generator=g) * w.std() * 0.05
        kl = ev.output_fidelity(lm, None, QuantizedWeights({}, {name: _Dense(w + e)}).applied, windows=text)["kl"]
        predicted.append(fisher.damage(factors[f"{name}.weight"], e))
        measured.append(kl)
    ratio = np.array(predicted) / np.array(measured)
    assert np.corrcoef(np.log(predicted), np.log(measured))[0, 1] > 0.8
    assert 0.33 < np.median(ratio) < 3


def test_factors_cover_every_matrix_and_the_tied_embedding_twice(lm):
    factors = fisher.fisher_factors(lm, calib_ids(4, 16), batch_size=2)
    hf = unwrap(lm)
    assert {f"{n}.weight" for n in resolve(lm).linear_names()} <= set(factors)
    embed = "model.embed_tokens.weight"
    tied = hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    assert len(factors[embed]) == (2 if tied else 1)
    for pairs in factors.values():
        for r, c in pairs:
            assert (r >= 0).all() and (c >= 0).all() and r.sum() > 0 and c.sum() > 0
    assert not any(p.requires_grad for p in hf.parameters())  # the weights were not touched


def test_sampled_rows_estimate_the_whole_damage(lm):
    factors = fisher.fisher_factors(lm, calib_ids(8, 16), batch_size=4)
    f = factors["model.embed_tokens.weight"]
    e = torch.randn(256, 64, generator=torch.Generator().manual_seed(3)) * 0.01
    whole = fisher.damage(f, e)
    idx, w = fisher.sample_rows(f, 256, k=64)
    assert len(idx) == 64 and len(set(idx.tolist())) == 64
    assert fisher.sampled_damage(f, e[idx], idx, w) == pytest.approx(whole, rel=0.5)
    idx, w = fisher.sample_rows(f, 256, k=512)  # fewer rows than asked: all, exactly
    assert fisher.sampled_damage(f, e[idx], idx, w) == pytest.approx(whole, rel=1e-9)

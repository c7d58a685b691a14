"""The run store: entries keyed by everything they depend on, written whole, never read stale."""

import inspect

import pandas as pd
import pytest
import torch

from qdiag.core import store
from qdiag.core.arch import unwrap
from qdiag.core.models import wrap
from qdiag.measure import evaluate
from qdiag.measure.widths import Reference, each_width, output_fidelity
from qdiag.quant.quantize import QuantSpec
from qdiag.testing import FACTS, tiny_model, tiny_tokenizer


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("QDIAG_STORE", str(tmp_path / "store"))
    return tmp_path / "store"


@pytest.fixture
def count(monkeypatch):
    """How many times prompts were scored (calls of evaluate.score_prompts)."""
    calls = []
    real = evaluate.score_prompts
    monkeypatch.setattr(evaluate, "score_prompts", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_off_means_no_folder_and_always_computing(monkeypatch, tmp_path):
    monkeypatch.setenv("QDIAG_STORE", "off")
    assert store.root() is None
    assert store.cached("x", "k", lambda: 1) == 1
    assert store.load("x", "k") is None
    monkeypatch.delenv("QDIAG_STORE")
    monkeypatch.setenv("QDIAG_CACHE", str(tmp_path))
    assert store.root() == tmp_path / "store"


def test_digest_sees_values_shapes_and_dtypes():
    a = torch.arange(6.0)
    assert store.digest(a) == store.digest(a.clone())
    assert store.digest(a) != store.digest(a.reshape(2, 3))
    assert store.digest(a) != store.digest(a.double())
    b = a.clone()
    b[3] += 1e-6
    assert store.digest(a) != store.digest(b)
    df = pd.DataFrame({"x": [1, 2]})
    assert store.digest(df) != store.digest(df.assign(x=[1, 3]))


def test_a_changed_weight_changes_the_weights_digest():
    model = tiny_model()
    before = store.weights_digest(model)
    assert store.weights_digest(tiny_model()) == before  # same seed, same weights
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[5, 7] += 1e-3
    assert store.weights_digest(model) != before


def test_stored_scores_equal_recomputed_ones(root, count, monkeypatch):
    lm = wrap(tiny_model(), tiny_tokenizer())
    first = Reference(lm, FACTS)
    w = next(iter(each_width(lm, [QuantSpec(3, 32)], progress=False)))
    q1 = first.score(lm, w)
    assert len(count) == 2 and len(list((root / "scores").glob("*.pkl"))) == 2
    again = Reference(lm, FACTS)
    q2 = again.score(lm, next(iter(each_width(lm, [QuantSpec(3, 32)], progress=False))))
    assert len(count) == 2  # both read back
    pd.testing.assert_frame_equal(first.scored, again.scored)
    pd.testing.assert_frame_equal(q1, q2)
    monkeypatch.setenv("QDIAG_STORE", "off")  # the same numbers computed afresh
    fresh = Reference(lm, FACTS)
    pd.testing.assert_frame_equal(fresh.scored, first.scored)
    pd.testing.assert_frame_equal(fresh.score(lm, next(iter(each_width(lm, [QuantSpec(3, 32)], progress=False)))), q1)


def test_stale_entries_are_never_read(root, count, monkeypatch):
    lm = wrap(tiny_model(), tiny_tokenizer())
    Reference(lm, FACTS).score(lm, next(iter(each_width(lm, [QuantSpec(3, 32)], progress=False))))
    n = len(count)
    # another spec: the reference is read, the configuration scored
    Reference(lm, FACTS).score(lm, next(iter(each_width(lm, [QuantSpec(3, 16)], progress=False))))
    assert len(count) == n + 1
    # other data: scored again
    Reference(lm, FACTS[:-1])
    assert len(count) == n + 2
    # changed weights: scored again, and the quantization's key changes with them
    with torch.no_grad():
        unwrap(lm).model.layers[0].self_attn.o_proj.weight[0, 0] += 1e-2
    Reference(lm, FACTS)
    assert len(count) == n + 3
    # an edit elsewhere in the scoring module: read; a change to the scoring code: scored again
    source = inspect.getsource
    monkeypatch.setattr(inspect, "getsource", lambda m: source(m) + ("#" if m is evaluate.perplexity else ""))
    Reference(lm, FACTS)
    assert len(count) == n + 3
    monkeypatch.setattr(inspect, "getsource", lambda m: source(m) + ("#" if m is evaluate.encode_prompts else ""))
    Reference(lm, FACTS)
    assert len(count) == n + 4


def test_fidelity_is_stored_and_a_configuration_without_a_key_is_not(root):
    lm = wrap(tiny_model(), tiny_tokenizer())
    tokens = torch.randint(4, 200, (96,), generator=torch.Generator().manual_seed(0))
    for w in each_width(lm, [QuantSpec(16), QuantSpec(2, 32)], progress=False):
        first = output_fidelity(lm, tokens, w, window=32)
        assert output_fidelity(lm, tokens, w, window=32) == first
        assert first == evaluate.output_fidelity(lm, tokens, w.applied, 32)
    assert len(list((root / "fidelity").glob("*.pkl"))) == 2
    fp = output_fidelity(lm, tokens, next(iter(each_width(lm, [QuantSpec(16)], progress=False))), window=32)
    assert fp["kl"] == pytest.approx(0, abs=1e-6) and fp["top1_agreement"] == 1
    w = next(iter(each_width(lm, [QuantSpec(2, 32)], progress=False)))
    w.key = None
    output_fidelity(lm, tokens, w, window=32)
    assert len(list((root / "fidelity").glob("*.pkl"))) == 2


def test_the_weights_digest_is_remembered_until_a_weight_is_written():
    model = tiny_model()
    first = store.weights_digest(model)
    assert store.weights_digest(model) == first
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.001)  # in place: seen
    second = store.weights_digest(model)
    assert second != first
    model.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(torch.zeros(128, 64))  # replaced: seen
    assert store.weights_digest(model) not in (first, second)

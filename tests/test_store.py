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
    assert len(count) == 2 and len(list((root / "scores").glob("*.json"))) == 2
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
    assert len(list((root / "fidelity").glob("*.json"))) == 2
    fp = output_fidelity(lm, tokens, next(iter(each_width(lm, [QuantSpec(16)], progress=False))), window=32)
    assert fp["kl"] == pytest.approx(0, abs=1e-6) and fp["top1_agreement"] == 1
    w = next(iter(each_width(lm, [QuantSpec(2, 32)], progress=False)))
    w.key = None
    output_fidelity(lm, tokens, w, window=32)
    assert len(list((root / "fidelity").glob("*.json"))) == 2


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


def test_a_permuted_row_or_two_swapped_values_change_the_weights_digest():
    model = tiny_model()
    before = store.weights_digest(model)
    w = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        w.copy_(w[torch.tensor([1, 0, *range(2, w.shape[0])])])  # rows 0 and 1 swapped: same sums
    permuted = store.weights_digest(model)
    assert permuted != before
    with torch.no_grad():
        a, b = w[3, 4].clone(), w[5, 6].clone()
        w[3, 4], w[5, 6] = b, a  # two values swapped inside one tensor
    assert store.weights_digest(model) not in (before, permuted)


def test_the_accelerator_fingerprint_sees_positions_too():
    # the projection a GPU uses, run here on the CPU
    x = torch.randn(64, 32)
    rows = x[torch.tensor([1, 0, *range(2, 64)])]
    pair = x.clone()
    pair[3, 4], pair[5, 6] = x[5, 6], x[3, 4]
    seen = {store.tensor_fingerprint(t, project=True) for t in (x, rows, pair)}
    assert len(seen) == 3
    assert store.tensor_fingerprint(x.clone(), project=True) == store.tensor_fingerprint(x, project=True)


def test_a_planted_pickle_is_never_loaded(root, tmp_path):
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (root / "x").mkdir(parents=True)
    data = pickle.dumps(Payload())
    (root / "x" / "k.pkl").write_bytes(data)  # where the old store kept its entries
    (root / "x" / "k.json").write_bytes(data)  # and under the name the store reads now
    with pytest.warns(UserWarning, match="ignoring"):
        assert store.cached("x", "k", lambda: {"v": 1}) == {"v": 1}
    assert not marker.exists()
    assert store.load("x", "k") == {"v": 1}  # the bad entry was replaced by the computed one


def test_an_entry_recording_another_key_is_ignored_and_recomputed(root):
    store.save("x", "a", {"v": 1})
    (root / "x" / "b.json").write_bytes((root / "x" / "a.json").read_bytes())  # copied under another key
    with pytest.warns(UserWarning, match="another kind, key or format"):
        assert store.cached("x", "b", lambda: {"v": 2}) == {"v": 2}
    assert store.load("x", "b") == {"v": 2} and store.load("x", "a") == {"v": 1}


def test_tables_come_back_with_their_dtypes_and_exact_floats(root):
    import numpy as np

    df = pd.DataFrame({"fact": ["a", "b", "c"], "template": [0, 1, 2], "correct": [True, False, True],
                       "prob": np.array([0.1, 1 / 3, 2e-30], dtype=np.float32), "kl": [np.nan, 1 / 3, 1e300]})
    store.save("t", "k", df)
    pd.testing.assert_frame_equal(store.load("t", "k"), df, check_exact=True)
    with pytest.raises(TypeError, match="not Tensor"):
        store.save("t", "bad", torch.zeros(2))

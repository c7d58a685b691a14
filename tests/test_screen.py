"""Known-fact screening: a prompt is kept exactly when the reference's top next token is the
answer's first token; scores are stored per prompt and reused; the draw is stratified."""

import collections

import pytest
import torch

from qdiag.core.arch import unwrap
from qdiag.core.data import Fact
from qdiag.core.models import wrap
from qdiag.measure import evaluate
from qdiag.measure.screen import known_facts, screen, summary
from qdiag.testing import knowing_model


@pytest.fixture
def known(tmp_path, monkeypatch):
    monkeypatch.setenv("QDIAG_STORE", str(tmp_path / "store"))
    hf, tok, facts = knowing_model(many=True)
    # the facts it knows, every other one given another fact's object: half right, half wrong
    objects = sorted({f.obj for f in facts})
    pool = [f if i % 2 == 0 else Fact(f.relation, f.subject, next(o for o in objects if o != f.obj), f.templates)
            for i, f in enumerate(facts)]
    return wrap(hf, tok), pool


def one_by_one(lm, facts):
    """The kept prompts computed independently: each prompt alone, no padding, greedy token."""
    hf, tok, kept = unwrap(lm), lm.tokenizer, set()
    with torch.no_grad():
        for f in facts:
            for t, prompt in enumerate(f.prompts()):
                ids = tok(prompt, return_tensors="pt").input_ids
                if hf(input_ids=ids).logits[0, -1].argmax().item() == evaluate.answer_token(tok, f.obj):
                    kept.add((f.id, t))
    return kept


def test_screening_keeps_exactly_the_prompts_the_reference_answers(known):
    lm, pool = known
    screened = screen(lm, pool)
    expected = one_by_one(lm, pool)
    assert 0 < len(expected) < len(screened)  # a real filter
    assert set(map(tuple, screened[screened.correct][["fact", "template"]].to_numpy())) == expected
    drawn = known_facts(screened, pool)
    assert {(f.id, f.templates) for f in drawn} <= {(f.id, f.templates) for f in pool}
    assert {f.id for f in drawn} == {fid for fid, _ in expected}


def test_screening_is_stored_per_prompt_and_extended(known):
    lm, pool = known
    half = screen(lm, pool[: len(pool) // 2])
    assert half.attrs["scored"] == len(half)
    rows = []  # prompts the model actually ran on, counted at its forward
    unwrap(lm).register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    full = screen(lm, pool)
    assert sum(rows) == len(pool) - len(half)  # only the new prompts were scored
    assert full.attrs["stored"] == len(half)
    assert (full.iloc[: len(half)].correct.to_numpy() == half.correct.to_numpy()).all()
    again = screen(lm, pool)
    assert sum(rows) == len(pool) - len(half) and again.correct.equals(full.correct)


def test_the_draw_is_stratified_by_relation_and_seeded(known):
    lm, pool = known
    screened = screen(lm, pool)
    right = screened[screened.correct]
    n = 2 * right.relation.nunique()
    drawn = known_facts(screened, pool, n, seed=1)
    counts = collections.Counter(f.relation for f in drawn for _ in f.templates)
    available = right.relation.value_counts()
    assert sum(counts.values()) == n
    # round robin: a relation gets fewer than its share only when it has no more to give
    share = n // right.relation.nunique()
    assert all(counts[r] >= min(share, available[r]) for r in available.index)
    assert known_facts(screened, pool, n, seed=1) == drawn
    stats = summary(screened, drawn)
    assert stats["reference_right"] == len(right) and stats["prompts_drawn"] == n


def test_a_reference_that_knows_nothing_is_a_clear_error(known):
    lm, pool = known
    wrong = [Fact(f.relation, f.subject, "zzzz", f.templates) for f in pool]
    with pytest.raises(ValueError, match="screen more facts"):
        known_facts(screen(lm, wrong), wrong)

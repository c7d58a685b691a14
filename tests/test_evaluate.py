import math

import numpy as np
import pandas as pd
import pytest
import torch

from qdiag.core.data import Fact
from qdiag.measure import evaluate as ev


def test_perplexity_matches_a_manual_loop(model):
    tokens = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(0))
    nll, n = 0.0, 0
    for w in tokens[:96].reshape(3, 32):  # 3 full windows of 32, the tail of 4 dropped
        logp = torch.log_softmax(model(w[None]).logits[0], -1)
        nll -= sum(logp[i, w[i + 1]].item() for i in range(31))
        n += 31
    assert ev.perplexity(model, tokens, window=32, batch_size=2) == pytest.approx(math.exp(nll / n), rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one window"):
        ev.perplexity(model, tokens[:10], window=32)


FACTS = [Fact("P36", "France", "Paris", ("The capital of [X] is [Y].", "[X]'s capital is [Y].")),
         Fact("P36", "Japan", "Tokyo", ("The capital of [X] is [Y].", "The seat of government of [X] is [Y]."))]


def test_scores_match_single_prompt_forward_passes(model, tokenizer):
    table = ev.prompt_table(FACTS, tokenizer)
    scored = ev.score_prompts(model, tokenizer, table, batch_size=3)  # mixed lengths, left padding
    for _, row in scored.iterrows():
        ids = tokenizer(row.prompt, return_tensors="pt").input_ids
        logits = model(ids).logits[0, -1]
        assert row["rank"] == 1 + int((logits > logits[row.answer_id]).sum())
        assert row.prob == pytest.approx(torch.softmax(logits, -1)[row.answer_id].item(), rel=1e-4)
        assert row.correct == (int(logits.argmax()) == row.answer_id)


def test_fact_accuracy_any_majority_all():
    scored = pd.DataFrame({"fact": ["a"] * 3 + ["b"] * 2 + ["c"] * 2,
                           "correct": [True, True, False, True, False, False, False]})
    acc = ev.fact_accuracy(scored)
    assert acc.loc["a"].tolist() == [True, True, False]
    assert acc.loc["b"].tolist() == [True, False, False]  # exactly half is not a majority
    assert acc.loc["c"].tolist() == [False, False, False]


def test_bootstrap_interval():
    v = np.array([1.0] * 30 + [0.0] * 70)
    lo, hi = ev.bootstrap_ci(v, seed=0)
    assert lo < 0.3 < hi and hi - lo < 0.25
    assert ev.bootstrap_ci(np.ones(10)) == (1.0, 1.0)
    assert all(math.isnan(x) for x in ev.bootstrap_ci(np.array([])))


def test_subsets():
    key = {"fact": ["a", "a", "b"], "template": [0, 1, 0]}
    fp = pd.DataFrame({**key, "correct": [True, True, False]})
    q = pd.DataFrame({**key, "correct": [True, False, True]})
    assert ev.subsets(fp, q).tolist() == ["robust", "failure", "fp_wrong"]


def test_answer_token_is_the_first_piece(tokenizer):
    assert ev.answer_token(tokenizer, "Paris") == tokenizer(" Paris", add_special_tokens=False).input_ids[0]


def test_output_fidelity_of_the_model_against_itself(model, tokenizer):
    from contextlib import nullcontext

    from qdiag.measure.evaluate import output_fidelity, perplexity

    tokens = torch.randint(4, 256, (96,), generator=torch.Generator().manual_seed(0))
    f = output_fidelity(model, tokens, lambda m: nullcontext(m), window=32)
    assert f["kl"] == pytest.approx(0, abs=1e-6) and f["top1_agreement"] == 1
    assert f["ppl"] == pytest.approx(perplexity(model, tokens, 32), rel=1e-5)
    assert f["kl_null"] > 0 and f["n_tokens"] == 3 * 31  # the first token of each window is context only


def test_output_fidelity_sees_a_changed_model(model):
    from qdiag.measure.evaluate import output_fidelity
    from qdiag.measure.widths import quantized_width
    from qdiag.quant.quantize import QuantSpec

    tokens = torch.randint(4, 256, (96,), generator=torch.Generator().manual_seed(0))
    q = quantized_width(model, QuantSpec(2, 32), progress=False)
    f = output_fidelity(model, tokens, q.applied, window=32)
    assert 0 < f["kl_lo"] <= f["kl"] <= f["kl_hi"] and f["top1_agreement"] < 1


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
def test_perplexity_windows_start_with_bos_where_the_tokenizer_adds_one(bos):
    from qdiag.core.data import bos_id
    from qdiag.core.models import wrap
    from qdiag.measure.evaluate import perplexity, text_windows
    from qdiag.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer(bos=bos)
    assert bos_id(tok) == (2 if bos else None)
    hf = tiny_model()
    lm = wrap(hf, tok)
    tokens = torch.randint(4, 40, (64,), generator=torch.Generator().manual_seed(0))
    windows = text_windows(lm, tokens, 32)
    assert windows.shape == (2, 33 if bos else 32)
    # independent computation: every window token scored after a BOS, all but the first without
    nll, count = 0.0, 0
    for w in tokens.reshape(2, 32):
        ids = torch.cat([torch.tensor([2]), w]) if bos else w
        logp = torch.log_softmax(hf(input_ids=ids[None]).logits[0].float(), -1)
        nll -= float(logp[:-1].gather(-1, ids[1:, None]).sum())
        count += ids.numel() - 1
    assert count == (64 if bos else 62)
    assert perplexity(lm, tokens, 32) == pytest.approx(math.exp(nll / count), rel=1e-5)

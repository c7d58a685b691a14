import pytest
import torch

from qdiag.analyses.lens import logit_lens, run_lens
from qdiag.core.models import wrap
from qdiag.measure.evaluate import encode_prompts, prompt_table, score_prompts
from qdiag.quant.quantize import QuantSpec
from qdiag.testing import FACTS, FAMILIES, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_the_last_layer_lens_is_the_output(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    lm = wrap(model, tok)
    batch = encode_prompts(tok, ["the capital of France is", "Paris is in"])
    answer = torch.tensor([5, 9])
    prob, rank = logit_lens(lm, batch, answer)
    probs = torch.softmax(model(**batch).logits[:, -1].float(), -1)
    torch.testing.assert_close(prob[:, -1], probs[torch.arange(2), answer])
    want_rank = 1 + (probs > probs[torch.arange(2), answer][:, None]).sum(-1)
    assert rank[:, -1].tolist() == want_rank.tolist()
    assert prob.shape == (2, model.config.num_hidden_layers)


def test_without_the_final_norm_the_raw_stream_is_unembedded():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    lm = wrap(model, tok)
    batch = encode_prompts(tok, ["the capital of France is"])
    hidden = model(**batch, output_hidden_states=True).hidden_states[1][:, -1]  # after layer 0
    want = torch.softmax(model.lm_head(hidden).float(), -1)[0, 7]
    prob, _ = logit_lens(lm, batch, torch.tensor([7]), final_norm=False)
    assert prob[0, 0].item() == pytest.approx(want.item(), rel=1e-5)


def test_run_lens_rows_and_subsets():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    lm = wrap(model, tok)
    res = run_lens(lm, FACTS, [QuantSpec(16), QuantSpec(2, group_size=32)], progress=False)
    rows = res.rows
    assert set(rows.model) == {"fp", "quantized"}
    fp_all = rows[(rows.method == "fp") & (rows.subset == "all")]
    assert list(fp_all.layer) == [0, 1] and set(fp_all.n) == {3}
    scored = score_prompts(lm, tok, prompt_table(FACTS, tok))
    # the lens's last layer is the output: its mean probability is the scored one
    assert fp_all.prob.iloc[-1] == pytest.approx(scored.prob.mean(), rel=1e-5)
    q = rows[(rows.method == "rtn") & (rows.model == "quantized")]
    n_sub = q[q.layer == 0].set_index("subset").n
    assert n_sub.get("robust", 0) + n_sub.get("failure", 0) == int(scored.correct.sum())
    assert (rows.prob_lo <= rows.prob + 1e-9).all() and (rows.prob <= rows.prob_hi + 1e-9).all()

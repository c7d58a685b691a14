import pytest

from qdiag.core.data import Fact
from qdiag.core.models import wrap
from qdiag.measure.amplify import amplification_grid
from qdiag.testing import tiny_model, tiny_tokenizer


def test_amplification_grid_with_alpha_zero_is_the_plain_model():
    from qdiag.measure.evaluate import prompt_table, score_prompts

    tok = tiny_tokenizer()
    lm = wrap(tiny_model("llama"), tok)  # 2 layers: the upper half is layer 1, the last: too few
    facts = [Fact("P36", "France", "Paris", ("The capital of [X] is [Y]", "[X] 's capital city is [Y]"))]
    table = prompt_table(facts, tok)
    with pytest.raises(ValueError, match="too few layers"):
        amplification_grid(lm, table)
    four = wrap(tiny_model("llama", layers=4), tok)
    grid = amplification_grid(four, table, alphas=(0.0, 3.0))
    plain = score_prompts(four, tok, table)
    zero = grid[(grid.alpha == 0) & (grid.rule == "confident")].merge(plain, on=["fact", "template"])
    assert (zero.correct_x == zero.correct_y).all()
    assert set(grid.layer) == {2, -1}  # the upper half but the last layer, and the per-prompt rule

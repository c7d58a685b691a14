import pytest
import torch

from qdiag.core import positions as P
from qdiag.core.data import Fact
from qdiag.measure.evaluate import prompt_table
from qdiag.testing import tiny_tokenizer


def test_last_subject_token_is_found_under_left_padding():
    tok = tiny_tokenizer()
    prompts = ["the capital of France is", "Japan 's capital city is"]
    ends = [len("the capital of France"), len("Japan")]
    batch = P.encode(tok, prompts, ends)
    ids = batch["input_ids"]
    # prompt 0 has 5 tokens, prompt 1 has 5 ("Japan", "'", "s", ...): find each subject by its id
    for row, word in enumerate(["France", "Japan"]):
        want = (ids[row] == tok.convert_tokens_to_ids(word)).nonzero().item()
        assert batch["last_subject"][row].item() == want
    assert P.token_index(batch, "last").tolist() == [ids.shape[1] - 1] * 2


def test_select_drops_padding_for_all_positions():
    tok = tiny_tokenizer()
    batch = P.encode(tok, ["Paris is in", "the capital of France is"], [5, 21])
    x = torch.arange(batch["input_ids"].numel()).reshape(batch["input_ids"].shape)
    assert P.select(x, batch, "all").numel() == int(batch["attention_mask"].sum())
    assert P.select(x, batch, "last").tolist() == x[:, -1].tolist()


def test_batches_carry_subject_ends_and_cover_every_prompt():
    tok = tiny_tokenizer()
    facts = [Fact("P36", "France", "Paris", ("The capital of [X] is [Y].", "[X] 's capital city is [Y]"))]
    chunks = P.batches(prompt_table(facts, tok), facts, batch_size=1)
    assert sorted(c.subject_end.item() for c in chunks) == [len("France"), len("The capital of France")]


def test_bad_positions_are_refused():
    with pytest.raises(ValueError, match="unknown token positions"):
        P.check(["first"])

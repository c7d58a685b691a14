"""The comparison at equal bytes on a tiny Qwen2 through llama.cpp's own tools: every row within 1% of
its comparator's bytes (EoRA at most them), the bytes counted as the file really stores them, the
prescription's file holding exactly the allocation, and the re-measured numbers those of a plain
computation."""

import numpy as np
import pytest

from qdiag import fixtures
from qdiag.core.models import wrap
from qdiag.diagnosis import equal_bytes
from qdiag.diagnosis.prescribe import prescribe
from qdiag.measure import evaluate as ev
from qdiag.measure.widths import checkpoint_width
from qdiag.quant import llama_cpp
from qdiag.testing import calib_ids, write_gguf

TOOLS = llama_cpp.find()
pytestmark = pytest.mark.skipif(TOOLS is None, reason="llama.cpp's tools are not built: python "
                                "benchmarks/llama_cpp_build.py, then set QDIAG_LLAMA_CPP (make test does both)")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eb")
    hf, tok, facts = fixtures.tiny_knowing_model("qwen2", layers=2)
    lm = wrap(hf, tok)
    f32 = write_gguf(hf, tok, folder / "F32.gguf", "F32")
    user = checkpoint_width(lm, str(equal_bytes.llama_file(f32, "Q2_K", folder, TOOLS)))
    calib = calib_ids(8, 64)
    p = prescribe(lm, user, calib, "+0.25bpw", tools=TOOLS, kl_windows=2, fisher_windows=4, progress=False)
    rows = equal_bytes.alternatives(lm, p, user, f32, folder, TOOLS, calib, ("Q3_K_M",), random=1, progress=False)
    return lm, facts, p, rows, folder


def test_every_row_is_at_the_comparators_bytes(case):
    _, _, p, rows, _ = case
    assert [(r["group"], r["row"]) for r in rows] == [("Q2_K", "file"), ("Q3_K_M", "comparator"),
                                                      ("Q3_K_M", "prescription"), ("Q3_K_M", "random"),
                                                      ("Q3_K_M", "eora")]
    for r in rows[1:]:
        if r["row"] == "eora":
            assert r["bytes"] <= r["budget"] and r["rank"] >= 1
        else:
            assert abs(r["bytes"] / r["budget"] - 1) <= 0.01, r["row"]


def test_bytes_are_what_the_files_store(case):
    """Counted from the tensors' own sizes in the files (the gguf package's reader), independently."""
    import gguf

    _, _, p, rows, folder = case
    names = set(p.tensors.file_name)
    for r in rows[:3]:
        reader = gguf.GGUFReader(r["width"].checkpoint.path)
        stored = sum(int(t.n_bytes) for t in reader.tensors if t.name in names)
        assert stored == r["bytes"], r["row"]


def test_the_measured_numbers_are_a_plain_computation(case):
    lm, facts, p, rows, _ = case
    text = calib_ids(4, 32, seed=5).flatten()
    table = equal_bytes.measure(lm, rows[:2], facts, text, 32, int(p.tensors.n.sum()), progress=False)
    tok = lm.tokenizer
    prompts = ev.prompt_table(facts, tok)
    right = prompts[ev.score_prompts(lm, tok, prompts).correct.to_numpy()]
    with rows[1]["width"].applied(lm):
        wrong = [int(lm(**ev.encode_prompts(tok, [q])).logits[0, -1].argmax()) != a
                 for q, a in zip(right.prompt, right.answer_id)]
    assert table.lost.iloc[1] == pytest.approx(np.mean(wrong))
    assert table.lost_lo.iloc[1] <= table.lost.iloc[1] <= table.lost_hi.iloc[1]
    assert table.bpw.iloc[0] == pytest.approx(8 * rows[0]["bytes"] / int(p.tensors.n.sum()))
    assert (table.kl > 0).all() and (table.top1_agreement <= 1).all()
    text_sentences = equal_bytes.verdict_text(table.assign(row=["prescription", "comparator"], group="g"))
    assert "against g" in text_sentences


def test_a_prescription_of_a_qdiag_quantization_is_refused(case):
    lm, _, p, rows, folder = case
    with pytest.raises(ValueError, match="GGUF file"):
        equal_bytes.alternatives(lm, p, rows[3]["width"], folder / "F32.gguf", folder, TOOLS, calib_ids(2, 16))

import pytest
import torch

from qdiag.core.models import wrap
from qdiag.measure.evaluate import encode_prompts
from qdiag.measure.patch import Edit, Rerun, patch_nnsight
from qdiag.measure.trace import collect
from qdiag.quant.plan import uniform_plan
from qdiag.quant.quantize import QuantSpec
from qdiag.quant.quantizer import quantize_model
from qdiag.testing import FAMILIES, tiny_model, tiny_tokenizer

PROMPTS = ["the capital of France is", "Paris is in", "Japan 's capital city is"]


def setup(family="llama"):
    model, tok = tiny_model(family), tiny_tokenizer()
    lm = wrap(model, tok)
    batch = encode_prompts(tok, PROMPTS)
    return model, lm, batch


@pytest.mark.parametrize("family", FAMILIES)
def test_rerun_without_edits_and_nnsight_without_edits_give_the_output(family):
    model, lm, batch = setup(family)
    want = model(**batch).logits[:, -1].float()
    torch.testing.assert_close(patch_nnsight(lm, batch, []), want)
    run = Rerun(lm, batch)
    torch.testing.assert_close(run.logits, want)
    # rerunning from layer 0 with an edit that writes a layer's own value back changes nothing
    own = collect(lm, batch, ("resid",))["resid"][0]
    logits, _ = run.run([[Edit(0, "resid", None, own)]])
    torch.testing.assert_close(logits[0], want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_sweep_agrees_with_nnsight_patching(family):
    model, lm, batch = setup(family)
    qw = quantize_model(lm, uniform_plan(lm, QuantSpec(2, group_size=32)), progress=False)
    fp = collect(lm, batch, ("resid", "mlp_out"))
    last = torch.full((3,), batch["input_ids"].shape[1] - 1)
    subject = torch.tensor([1, 1, 2])
    with qw.applied(lm):
        variants = [[Edit(1, "resid", last, fp["resid"][1][:, -1])],
                    [Edit(0, "mlp", subject, fp["mlp_out"][0][torch.arange(3), subject])],
                    [Edit(0, "attn", last, 0.0), Edit(1, "mlp", subject, 0.0)],
                    [Edit(1, "resid", None, fp["resid"][1])]]
        run = Rerun(lm, batch)
        fast, _ = run.run(variants)
        for i, edits in enumerate(variants):
            torch.testing.assert_close(fast[i], patch_nnsight(lm, batch, edits), atol=1e-4, rtol=1e-4)
        plain = patch_nnsight(lm, batch, [])
    assert not torch.allclose(fast[1], plain)  # the edits did something


def test_patching_the_fp_residual_after_the_last_layer_gives_the_fp_output():
    model, lm, batch = setup("qwen3")
    fp_logits = model(**batch).logits[:, -1].float()
    fp = collect(lm, batch, ("resid",))["resid"]
    last = torch.full((3,), batch["input_ids"].shape[1] - 1)
    qw = quantize_model(lm, uniform_plan(lm, QuantSpec(2, group_size=32)), progress=False)
    with qw.applied(lm):
        logits, _ = Rerun(lm, batch).run([[Edit(1, "resid", last, fp[1][:, -1])]])
    torch.testing.assert_close(logits[0], fp_logits)


def test_unknown_site_is_refused():
    with pytest.raises(ValueError, match="unknown site"):
        Edit(0, "embedding", None, 0.0)


def test_starting_lower_changes_nothing_and_higher_is_refused():
    model, lm, batch = setup("llama")
    run = Rerun(lm, batch)
    last = torch.full((3,), batch["input_ids"].shape[1] - 1)
    edit = [Edit(1, "mlp", last, 0.0)]
    torch.testing.assert_close(run.run([edit], start=0)[0], run.run([edit])[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="above the first edited layer"):
        run.run([[Edit(0, "mlp", last, 0.0)]], start=1)

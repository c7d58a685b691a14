import pytest
import torch

from qdiag.core.arch import resolve
from qdiag.quant.calibrate import capture_layer_inputs, sequential_quantize
from qdiag.quant.plan import uniform_plan
from qdiag.quant.quantize import QuantSpec
from qdiag.quant.quantizer import quantize_model
from qdiag.testing import FAMILIES, calib_ids, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_inputs_are_the_real_layer_inputs(family):
    model = tiny_model(family)
    ids = calib_ids(n=3, length=20)
    arch = resolve(model)
    first, last = model.get_submodule(arch.layers[0]), model.get_submodule(arch.layers[-1])
    real = {}

    def keep(key):  # returns None, so the hook changes nothing
        return lambda mod, args, *out: real.update({key: (out[0] if out else args[0]).clone()})

    hooks = [first.register_forward_pre_hook(keep("in0")), last.register_forward_pre_hook(keep("in_last")),
             last.register_forward_hook(keep("out_last"))]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    inputs, calls = capture_layer_inputs(model, ids, batch_size=3)
    torch.testing.assert_close(inputs[0], real["in0"])
    # replaying the last layer's captured call on its real input gives its real output
    args, kwargs = calls[0][-1]
    out = last(real["in_last"], *args, **kwargs)
    torch.testing.assert_close(out, real["out_last"])
    assert [x.shape[0] for x in capture_layer_inputs(model, ids, batch_size=2)[0]] == [2, 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_gptq_runs_and_stays_close(family):
    model = tiny_model(family)
    ids = calib_ids(n=4, length=24)
    plan = uniform_plan(model, QuantSpec(bits=8, group_size=16, method="gptq"))
    qw = quantize_model(model, plan, ids, batch_size=2, progress=False)
    assert set(qw.tensors) == set(plan)
    with qw.applied(model):
        q = model(ids).logits
    fp = model(ids).logits
    assert (q - fp).abs().max() < 0.05 * fp.abs().max()


def test_rtn_specs_in_the_sequential_driver_equal_direct_rtn(model):
    ids = calib_ids()
    plan = uniform_plan(model, QuantSpec(bits=3, group_size=16))
    direct = quantize_model(model, plan)
    seq = sequential_quantize(model, plan, ids, batch_size=2, progress=False)
    assert all(torch.equal(seq[n].int_codes(), direct.tensors[n].int_codes()) for n in plan)


@pytest.mark.parametrize("true_sequential", [False, True], ids=["all-at-once", "true-sequential"])
def test_gptq_lowers_output_error_against_rtn(true_sequential):
    model = tiny_model("llama")
    ids = calib_ids(n=8, length=32)
    err = {}
    fp = model(ids).logits
    for method in ("rtn", "gptq"):
        plan = uniform_plan(model, QuantSpec(bits=3, group_size=16, method=method))
        qw = quantize_model(model, plan, ids, true_sequential=true_sequential, progress=False)
        with qw.applied(model):
            err[method] = (model(ids).logits - fp).pow(2).mean().item()
    assert err["gptq"] < err["rtn"]


def test_true_sequential_sees_the_quantized_earlier_stages():
    # the down projection's inputs differ once gate/up are quantized, so its codes must differ too
    model = tiny_model("llama")
    ids = calib_ids(n=8, length=32)
    plan = uniform_plan(model, QuantSpec(bits=2, group_size=16, method="gptq"))
    a = sequential_quantize(model, plan, ids, true_sequential=False, progress=False)
    b = sequential_quantize(model, plan, ids, true_sequential=True, progress=False)
    first = "model.layers.0.self_attn.q_proj"  # the first stage sees the same inputs either way
    assert torch.equal(a[first].int_codes(), b[first].int_codes())
    down = "model.layers.0.mlp.down_proj"
    assert not torch.equal(a[down].int_codes(), b[down].int_codes())


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_calibration_leaves_the_weights_and_still_beats_rtn(family):
    model = tiny_model(family)
    ids = calib_ids(n=8, length=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp = model(ids).logits
    err = {}
    for method, dtype in (("rtn", None), ("gptq", torch.bfloat16)):
        plan = uniform_plan(model, QuantSpec(bits=3, group_size=16, method=method))
        qw = quantize_model(model, plan, ids, calib_dtype=dtype, progress=False)
        with qw.applied(model):
            err[method] = (model(ids).logits - fp).pow(2).mean().item()
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert err["gptq"] < err["rtn"]


@pytest.mark.parametrize("family", FAMILIES)
def test_replaying_kept_block_inputs_changes_no_code(family, monkeypatch):
    # later passes over a layer skip the attention (and, in the output pass, the MLP) once their
    # last matrix's inputs are final: the codes must equal those of recomputing everything
    from qdiag.quant import calibrate as C

    model = tiny_model(family)
    ids = calib_ids(n=8, length=32)
    plan = uniform_plan(model, QuantSpec(bits=3, group_size=16, method="gptq"))
    seen = []

    class Recorded(C._Replay):
        def __init__(self, *a):
            super().__init__(*a)
            seen.append(self)

    monkeypatch.setattr(C, "_Replay", Recorded)
    replayed = sequential_quantize(model, plan, ids, batch_size=2, progress=False)
    assert all(ok for r in seen for ok in r._ok.values()) and sum(len(r._ok) for r in seen) == 4  # 2 layers x 2

    class Off(C._Replay):
        def keep(self, name, x):
            pass

    monkeypatch.setattr(C, "_Replay", Off)
    plain = sequential_quantize(model, plan, ids, batch_size=2, progress=False)
    assert all(torch.equal(replayed[n].int_codes(), plain[n].int_codes()) for n in plan)

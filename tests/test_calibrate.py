import pytest
import torch

from qdiag.core.arch import resolve
from qdiag.quant.calibrate import capture_layer_inputs, input_moments, sequential_quantize
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


@pytest.mark.parametrize("d", [7, 576, 1537])
def test_the_blocked_gram_matrix_is_x_transpose_x(d):
    from qdiag.quant.calibrate import _gram

    x = torch.randn(300, d, dtype=torch.float64)
    torch.testing.assert_close(_gram(x), x.t() @ x)


@pytest.mark.parametrize("family", FAMILIES)
def test_input_moments_are_x_transpose_x_shared_by_modules_of_one_input(family):
    model = tiny_model(family)
    arch = resolve(model)
    names = arch.linear_names([0, 1])
    ids = calib_ids(n=4, length=12)
    seen, hooks = {}, []
    for n in names:  # independent: every input kept, the moments summed here
        hooks.append(model.get_submodule(n).register_forward_pre_hook(
            lambda mod, args, n=n: seen.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1]).double())))
    head_calls = []
    hooks.append(model.get_output_embeddings().register_forward_pre_hook(lambda *a: head_calls.append(1)))
    try:
        with torch.no_grad():
            for start in range(0, 4, 2):
                model(input_ids=ids[start : start + 2], use_cache=False)
        full_passes = len(head_calls)
        H = input_moments(model, names, ids, batch_size=2)
    finally:
        for h in hooks:
            h.remove()
    assert full_passes == 2 and len(head_calls) == 2  # the moments' passes stopped before the unembedding
    for n in names:
        x = torch.cat(seen[n][:2])  # the first two batches: the ones the test's own passes made
        torch.testing.assert_close(H[n].double(), x.t() @ x / x.shape[0], rtol=1e-5, atol=1e-6)
    for group in _groups_by_input(model, names, ids):
        assert all(H[n] is H[group[0]] for n in group)  # one object for modules that read one input


def _groups_by_input(model, names, ids):
    owners, hooks, alive = {}, [], []
    for n in names:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(
            lambda mod, args, n=n: alive.append(args[0]) or owners.setdefault(id(args[0]), []).append(n)))
    try:
        with torch.no_grad():
            model(input_ids=ids[:1], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return list(owners.values())

"""Input moments: X^T X / n summed independently, one object for modules that read one input, and
passes that stop before the unembedding."""

import pytest
import torch

from qdiag.core.arch import resolve
from qdiag.quant.moments import input_moments
from qdiag.testing import FAMILIES, calib_ids, tiny_model


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


@pytest.mark.parametrize("d", [7, 576, 1537])
def test_the_blocked_gram_matrix_is_x_transpose_x(d):
    from qdiag.quant.moments import _gram

    x = torch.randn(300, d, dtype=torch.float64)
    torch.testing.assert_close(_gram(x), x.t() @ x)

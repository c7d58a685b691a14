import math

import pytest
import torch

from qdiag.measure import metrics as M


def causal_uniform(q: int) -> torch.Tensor:
    a = torch.tril(torch.ones(q, q))
    return (a / a.sum(-1, keepdim=True))[None, None]


def test_entropy_uniform_is_one_and_one_hot_is_zero():
    e = M.attention_entropy(causal_uniform(6))
    assert e[..., 0].item() == 0  # one visible key
    torch.testing.assert_close(e[..., 1:], torch.ones(1, 1, 5))
    one_hot = torch.zeros(1, 2, 6, 6)
    one_hot[..., 0] = 1
    assert torch.all(M.attention_entropy(one_hot) == 0)


def test_entropy_by_hand():
    a = torch.tensor([[0.5, 0.25, 0.25]])[None, None]  # one query that sees 3 keys
    want = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(3)
    assert M.attention_entropy(a, visible=torch.tensor([3])).item() == pytest.approx(want)


def test_entropy_with_left_padding_and_a_window():
    # two pad keys then three real ones: uniform over the real keys is still entropy 1
    a = torch.tensor([[0, 0, 1 / 3, 1 / 3, 1 / 3]])[None, None]
    assert M.attention_entropy(a, visible=torch.tensor([3])).item() == pytest.approx(1)
    # a sliding window of 2 keys: uniform over those two is 1, although t + 1 = 5
    b = torch.tensor([[0, 0, 0, 0.5, 0.5]])[None, None]
    assert M.attention_entropy(b, visible=torch.tensor([2])).item() == pytest.approx(1)


def test_jsd_identical_and_disjoint():
    p = torch.tensor([0.2, 0.3, 0.5])
    assert M.js_divergence(p, p).item() == pytest.approx(0, abs=1e-7)
    a, b = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 0, 0.5, 0.5])
    assert M.js_divergence(a, b).item() == pytest.approx(math.log(2))


def test_identical_inputs_give_identity_values():
    x = torch.randn(64, 200, generator=torch.Generator().manual_seed(0))
    assert M.sign_flip_rate(x, x) == 0
    assert M.topk_jaccard(x, x) == 1
    assert M.mean_cosine(x, x) == pytest.approx(1)
    assert M.linear_cka(x, x) == pytest.approx(1)
    assert M.activation_subspace_similarity(x, x, k=10) == pytest.approx(1)


def test_sign_flip_rate_of_negation():
    x = torch.tensor([1.0, -2.0, 3.0, 0.5])
    assert M.sign_flip_rate(x, -x) == 1
    assert M.sign_flip_rate(x, torch.tensor([1.0, 2.0, 3.0, 0.5])) == 0.25


def test_jaccard_by_hand():
    a = torch.tensor([[5.0, 4.0, 0.0, 0.0]])
    b = torch.tensor([[5.0, 0.0, 4.0, 0.0]])
    assert M.topk_jaccard(a, b, fraction=0.5) == pytest.approx(1 / 3)  # {0,1} vs {0,2}


def test_cka_invariances():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100, 8, generator=g)
    y = x @ torch.randn(8, 8, generator=g) + 0.3 * torch.randn(100, 8, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    base = M.linear_cka(x, y)
    assert M.linear_cka(x @ q, y) == pytest.approx(base)  # orthogonal transform
    assert M.linear_cka(3.7 * x, y) == pytest.approx(base)  # isotropic scaling
    assert 0 < base < 1


def test_subspace_same_and_orthogonal():
    eye = torch.eye(6)
    assert M.subspace_similarity(eye[:, :3], eye[:, :3]) == pytest.approx(1)
    assert M.subspace_similarity(eye[:, :3], eye[:, 3:]) == pytest.approx(0)
    rot, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))
    assert M.subspace_similarity(eye[:, :3], eye[:, :3] @ rot) == pytest.approx(1)  # same span


def test_error_alignment_of_isotropic_noise_is_about_k_over_d():
    g = torch.Generator().manual_seed(0)
    d, k = 200, 10
    # a signal with a strong low-rank part, and isotropic noise on top
    signal = torch.randn(4000, k, generator=g) @ torch.randn(k, d, generator=g) * 3
    noisy = signal + torch.randn(4000, d, generator=g)
    assert M.error_alignment(signal, noisy, k=k) == pytest.approx(k / d, abs=0.05)
    # an error along the signal's own directions is fully aligned
    assert M.error_alignment(signal, 1.5 * signal, k=k) == pytest.approx(1, abs=1e-6)
    assert M.error_alignment(signal, signal, k=k) == 0  # no error at all


@pytest.mark.parametrize("n,d", [(20, 40), (300, 40)])  # fewer samples than features (SVD), more (eigh)
def test_principal_directions_span_the_svds(n, d):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 5, generator=g) @ torch.randn(5, d, generator=g) * 4 + torch.randn(n, d, generator=g)
    x = x + 10  # the mean is removed first
    vh = torch.linalg.svd(x.double() - x.double().mean(0), full_matrices=False).Vh[:8].t()
    u = M.principal_directions(x, 8)
    assert u.shape == (d, 8)
    assert torch.allclose(u.t() @ u, torch.eye(8, dtype=u.dtype), atol=1e-8)
    assert M.subspace_similarity(u, vh) == pytest.approx(1, abs=1e-8)
    assert M.activation_subspace_similarity(x, x + 1e-3, 8, x_dirs=u) == pytest.approx(1, abs=1e-6)


@pytest.mark.parametrize("n,d", [(30, 50), (80, 12)])  # both code paths: Gram (n <= d) and features
def test_cka_matrix_matches_pairwise(n, d):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, d, generator=g) for _ in range(3)]
    ys = [xs[0] @ torch.randn(d, d, generator=g), torch.randn(n, d, generator=g)]
    got = M.cka_matrix(xs, ys)
    want = torch.tensor([[M.linear_cka(x, y) for y in ys] for x in xs], dtype=torch.float64)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(M.cka_matrix(xs, xs).diagonal(), torch.ones(3, dtype=torch.float64))


def test_chance_jaccard_matches_unrelated_rankings():
    torch.manual_seed(0)
    a, b = torch.randn(4000, 300), torch.randn(4000, 300)
    assert M.topk_jaccard(a, b, 0.05) == pytest.approx(M.chance_jaccard(300, 0.05), rel=0.1)


def test_per_row_metrics_average_to_the_scalar_ones():
    torch.manual_seed(0)
    a, b = torch.randn(50, 64), torch.randn(50, 64)
    assert float(M.sign_flips(a, b).mean()) == pytest.approx(M.sign_flip_rate(a, b))
    assert float(M.topk_overlap(a, b, 0.1).mean()) == pytest.approx(M.topk_jaccard(a, b, 0.1))
    assert float(M.cosines(a, b).mean()) == pytest.approx(M.mean_cosine(a, b))


def test_uniform_like_spreads_over_the_visible_keys():
    attn = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.2, 0.8], [0.1, 0.3, 0.6]])
    want = torch.tensor([[0, 0, 1.0], [0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    assert torch.allclose(M.uniform_like(attn), want)

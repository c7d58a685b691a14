"""qdiag's EoRA factors (a Cholesky factor of the input moment, and a randomized SVD for small
ranks) against EoRA as its paper states it (an eigendecomposition of the moment and a full SVD), on
real matrices: the default model's decoder matrices quantized by RTN, their calibration moments from
WikiText-2, every matrix of a few layers. Prints the time ratio, the moment's factorization
included, and how much larger the weighted error ||(E - B A) X|| of qdiag's fit is than the exact
rank-r optimum (1.000 = no loss). Run from the repository root:

    python benchmarks/eora_speed.py [--layers 0 15 29] [--bits 4 2] [--ranks 16 64] [--device cuda]

On a GPU, pass ``--random llama-8b`` to time one layer of Llama-3.1-8B's shapes (random weights,
random inputs), where the float64 eigendecompositions and full SVDs dominated the repair analysis.
"""

from __future__ import annotations

import argparse
import time

import torch


def weighted_error(E: torch.Tensor, B: torch.Tensor, A: torch.Tensor, H: torch.Tensor) -> float:
    """||(E - B A) X||_F with H = X^T X / n: sqrt(trace(D H D^T))."""
    D = (E - B @ A).double()
    return float(torch.einsum("ij,jk,ik->", D, H.double(), D).clamp_min(0).sqrt())


def eigh_factors(E: torch.Tensor, H: torch.Tensor, rank: int, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """EoRA as stated: ``H = U L U^T``, the full SVD of ``E U L^1/2``, mapped back with ``L^-1/2 U^T``."""
    evals, U = torch.linalg.eigh(H.double())
    s = evals.clamp_min(eps * float(evals.max().clamp_min(eps))).sqrt()
    Uu, S, Vh = torch.linalg.svd(E.double() @ U * s, full_matrices=False)
    return (Uu[:, :rank] * S[:rank]).float(), ((Vh[:rank] / s) @ U.t()).float()


def compare(E: torch.Tensor, H: torch.Tensor, ranks: list[int]) -> list[dict]:
    from qdiag.quant.eora import eora_factors

    def timed(fn):
        if E.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        B, A = fn()
        if E.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, weighted_error(E, B, A, H)

    rows = []
    for r in ranks:
        exact_s, exact_err = timed(lambda: eigh_factors(E, H, r))
        ours_s, ours_err = timed(lambda: eora_factors(E, H, r))
        rows.append({"rank": r, "exact_s": exact_s, "randomized_s": ours_s, "error_ratio": ours_err / exact_err})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="*", default=[0, 15, 29])
    ap.add_argument("--bits", type=int, nargs="*", default=[4, 2])
    ap.add_argument("--ranks", type=int, nargs="*", default=[16, 64])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random", default=None, help="time one layer of these shapes (qdiag.testing.REAL_SHAPES)")
    args = ap.parse_args()

    from qdiag.quant.quantize import QuantSpec, rtn

    table = []
    if args.random:
        from qdiag.testing import REAL_SHAPES

        cfg = REAL_SHAPES[args.random]
        d, f = cfg["hidden_size"], cfg["intermediate_size"]
        g = torch.Generator(device=args.device).manual_seed(0)
        shapes = {"q_proj": (d, d), "gate_proj": (f, d), "down_proj": (d, f)}
        for name, (o, i) in shapes.items():
            X = torch.randn(2048, i, device=args.device, generator=g) * torch.linspace(0.05, 3, i, device=args.device)
            H = X.t() @ X / X.shape[0]
            W = torch.randn(o, i, device=args.device, generator=g) * 0.02
            for b in args.bits:
                E = W - rtn(W, QuantSpec(b, 128)).dequantize(torch.float32)
                table += [{"matrix": f"{name} {o}x{i}", "bits": b, **row} for row in compare(E, H, args.ranks)]
    else:
        from qdiag.core.arch import resolve, unwrap, weight_matrix
        from qdiag.core.data import calibration_tokens
        from qdiag.core.models import load_model
        from qdiag.quant.moments import moments_by_chunk

        model = load_model(device=args.device)
        hf, arch = unwrap(model), resolve(model)
        calib = calibration_tokens(model.tokenizer, 16, 512, 0)
        names = [arch.linear_names([i]) if i in args.layers else [] for i in range(arch.n_layers)]
        for moments in moments_by_chunk(model, names, calib):
            for name, H in moments.items():
                W = weight_matrix(hf.get_submodule(name)).detach().float()
                H = H.to(W.device)
                for b in args.bits:
                    E = W - rtn(W, QuantSpec(b, 64)).dequantize(torch.float32)
                    table += [{"matrix": name, "bits": b, **row} for row in compare(E, H, args.ranks)]
    print(f"{'matrix':<36} {'bits':>4} {'rank':>5} {'eigh s':>9} {'qdiag s':>9} {'speed-up':>9} {'error ratio':>12}")
    for t in table:
        print(f"{t['matrix']:<36} {t['bits']:>4} {t['rank']:>5} {t['exact_s']:>9.3f} {t['randomized_s']:>9.3f} "
              f"{t['exact_s'] / t['randomized_s']:>9.1f} {t['error_ratio']:>12.4f}")
    worst = max(t["error_ratio"] for t in table)
    total = sum(t["exact_s"] for t in table) / sum(t["randomized_s"] for t in table)
    print(f"\nall matrices: {total:.1f}x faster; worst weighted-error ratio {worst:.4f} (1 = the exact optimum)")


if __name__ == "__main__":
    main()

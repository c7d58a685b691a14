"""EoRA's randomized SVD against the full one, on real matrices: the default model's decoder
matrices quantized by RTN, their calibration moments from WikiText-2, every matrix of a few layers.
Prints the time ratio and how much larger the weighted error ||(E - B A) X|| of the randomized fit is
than the exact rank-r optimum (1.000 = no loss). Run from the repository root:

    python benchmarks/eora_speed.py [--layers 0 15 29] [--bits 4 2] [--ranks 16 64] [--device cuda]

On a GPU, pass ``--random llama-8b`` to time one layer of Llama-3.1-8B's shapes (random weights,
random inputs), where the full float64 SVDs dominated the repair analysis.
"""

from __future__ import annotations

import argparse
import time

import torch


def weighted_error(E: torch.Tensor, B: torch.Tensor, A: torch.Tensor, H: torch.Tensor) -> float:
    """||(E - B A) X||_F with H = X^T X / n: sqrt(trace(D H D^T))."""
    D = (E - B @ A).double()
    return float(torch.einsum("ij,jk,ik->", D, H.double(), D).clamp_min(0).sqrt())


def compare(E: torch.Tensor, H: torch.Tensor, ranks: list[int]) -> list[dict]:
    from qdiag.quant.eora import eora_factors

    eig = torch.linalg.eigh(H.double())
    rows = []
    for r in ranks:
        out = {}
        for exact in (True, False):
            if E.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            B, A = eora_factors(E, H, r, eig=eig, exact=exact)
            if E.is_cuda:
                torch.cuda.synchronize()
            out[exact] = (time.perf_counter() - t0, weighted_error(E, B, A, H))
        rows.append({"rank": r, "exact_s": out[True][0], "randomized_s": out[False][0],
                     "error_ratio": out[False][1] / out[True][1]})
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
        from qdiag.quant.calibrate import moments_by_chunk

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
    print(f"{'matrix':<36} {'bits':>4} {'rank':>5} {'exact s':>9} {'random s':>9} {'speed-up':>9} {'error ratio':>12}")
    for t in table:
        print(f"{t['matrix']:<36} {t['bits']:>4} {t['rank']:>5} {t['exact_s']:>9.3f} {t['randomized_s']:>9.3f} "
              f"{t['exact_s'] / t['randomized_s']:>9.1f} {t['error_ratio']:>12.4f}")
    worst = max(t["error_ratio"] for t in table)
    total = sum(t["exact_s"] for t in table) / sum(t["randomized_s"] for t in table)
    print(f"\nall matrices: {total:.1f}x faster; worst weighted-error ratio {worst:.4f} (1 = the exact optimum)")


if __name__ == "__main__":
    main()
